"""Typed settings from loose key/value pairs: the one parser and the one settings API.

CLI flags and Flower ``run_config`` / ``ConfigRecord`` s deliver strings
("true", "4", "3e-4") under hyphenated, sometimes prefixed keys
(``osd.importance-batches``). :func:`option_name` and :func:`flag_name` are
the one key normalisation (both ways), :func:`fields_from_mapping` the one parser, and
:class:`Settings` the one ``replace`` / ``to_dict`` / ``from_mapping`` /
``help`` quartet, shared by :class:`osd_fl.config.CompressionConfig` and the
simulations' settings dataclasses.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Mapping
from typing import Any, ClassVar, Literal, Self, get_args

from osd_fl.errors import ConfigError

__all__ = [
    "Settings",
    "check_literal_fields",
    "coerce_value",
    "fields_from_mapping",
    "flag_name",
    "option_name",
]


def option_name(key: str, prefix: str = "") -> str | None:
    """The field name a loose key names (``prefix`` stripped, ``-`` read as ``_``), or ``None`` without ``prefix``."""
    if not key.startswith(prefix):
        return None
    return key[len(prefix) :].replace("-", "_")


def flag_name(name: str, prefix: str = "") -> str:
    """The hyphenated key of field ``name`` (``importance_batches`` -> ``prefix + "importance-batches"``)."""
    return prefix + name.replace("_", "-")


class Settings:
    """Mixin of a frozen settings dataclass: copy with changes, plain dict, build from loose pairs, help texts.

    A subclass sets :attr:`settings_name` (used in error messages, e.g.
    ``unknown compression option 'rnak'``) and gives each field a
    ``metadata["help"]``.
    """

    #: What the settings configure, for error messages.
    settings_name: ClassVar[str] = "config"

    def replace(self, **changes: Any) -> Self:
        """Return a copy with ``changes`` applied (validated, loose types coerced).

        Parameters
        ----------
        **changes
            Field names and new values.

        Returns
        -------
        Settings
            The new settings, of the same class.
        """
        merged = self.to_dict()
        merged.update(changes)
        return type(self).from_mapping(merged)

    def to_dict(self) -> dict[str, Any]:
        """Plain ``{field: value}`` (str, int, float, bool), e.g. for a Flower ConfigRecord."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}  # type: ignore[arg-type]

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any], *, prefix: str = "", strict: bool = True) -> Self:
        """Build the settings from loose key/value pairs (see :func:`fields_from_mapping`).

        Parameters
        ----------
        values
            Keys are field names (optionally with ``prefix`` and ``-`` in place
            of ``_``); values may be strings ("true", "4") as CLI flags and
            ``run_config`` deliver them.
        prefix
            Only keys starting with ``prefix`` are read, with it stripped.
        strict
            Raise :class:`ConfigError` on an unknown key (after the prefix).

        Returns
        -------
        Settings
            The validated settings.
        """
        return cls(**fields_from_mapping(cls, values, prefix=prefix, strict=strict, what=cls.settings_name))

    @classmethod
    def help(cls) -> dict[str, str]:
        """``{field: help text}`` for CLIs and docs."""
        return {f.name: str(f.metadata.get("help", "")) for f in dataclasses.fields(cls)}  # type: ignore[arg-type]


def fields_from_mapping(
    cls: type[Any], values: Mapping[str, Any], *, prefix: str = "", strict: bool = True, what: str = "config"
) -> dict[str, Any]:
    """Keyword arguments for the dataclass ``cls`` from loose key/value pairs.

    The one parser behind :meth:`Settings.from_mapping`: CLI flags and Flower
    ``run_config`` deliver strings ("true", "4", "3e-4") and hyphenated keys.

    Parameters
    ----------
    cls
        A dataclass whose fields are annotated with ``bool``, ``int``,
        ``float``, ``str``, a ``Literal`` of one of those, or ``X | None``
        (other annotations are passed through unconverted).
    values
        Keys are field names, optionally with ``prefix`` and with ``-`` in
        place of ``_``.
    prefix
        Only keys starting with ``prefix`` are read, with it stripped.
    strict
        Raise :class:`ConfigError` on an unknown key (after the prefix);
        otherwise unknown keys are ignored.
    what
        What the options configure, for the error message.

    Returns
    -------
    dict
        ``{field: converted value}`` for the keys present; pass it to ``cls(**kwargs)``.

    Raises
    ------
    ConfigError
        On an unknown key (``strict``) or a value that does not convert, naming both.

    """
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    kwargs: dict[str, Any] = {}
    for raw_key, raw in values.items():
        key = option_name(raw_key, prefix)
        if key is None:
            continue
        if key not in names:
            if strict:
                raise ConfigError(f"unknown {what} option {raw_key!r}; known: {sorted(names)}")
            continue
        kwargs[key] = coerce_value(raw_key, hints[key], raw)
    return kwargs


def check_literal_fields(obj: Any) -> None:
    """Raise :class:`ConfigError` if a ``Literal``-annotated field of dataclass ``obj`` holds another value."""
    hints = typing.get_type_hints(type(obj))
    for f in dataclasses.fields(obj):
        tp = hints[f.name]
        value = getattr(obj, f.name)
        if typing.get_origin(tp) is Literal and value not in get_args(tp):
            raise ConfigError(f"{f.name}={value!r} is not one of {list(get_args(tp))}")


def _base_type(tp: Any) -> Any:
    if typing.get_origin(tp) is Literal:
        return type(get_args(tp)[0])
    if isinstance(tp, types.UnionType):
        return get_args(tp)[0]
    return tp


def coerce_value(name: str, tp: Any, raw: Any) -> Any:
    """Convert ``raw`` to the type ``tp`` of field ``name`` (see :func:`fields_from_mapping`).

    Booleans accept ``True/False``, ``0/1`` and the strings
    ``1/true/yes/on`` and ``0/false/no/off``; integers refuse booleans and
    non-integral floats; floats refuse booleans.

    Raises
    ------
    ConfigError
        If the value does not convert; the message names the option.

    """
    base = _base_type(tp)
    try:
        if base is bool:
            if isinstance(raw, bool):
                return raw
            if isinstance(raw, (int, float)) and raw in (0, 1):
                return bool(raw)
            text = str(raw).strip().lower()
            if text in {"1", "true", "yes", "on"}:
                return True
            if text in {"0", "false", "no", "off"}:
                return False
            raise ValueError(raw)
        if base is int:
            if isinstance(raw, bool) or (isinstance(raw, float) and not raw.is_integer()):
                raise ValueError(raw)
            return int(raw)
        if base is float:
            if isinstance(raw, bool):
                raise ValueError(raw)
            return float(raw)
        if base is str:
            return str(raw)
    except (TypeError, ValueError):
        raise ConfigError(f"option {name}={raw!r} is not a valid {base.__name__}") from None
    return raw
