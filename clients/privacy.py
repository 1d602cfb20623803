"""Client side of osd-fl with Flower's differential-privacy mods: the mod order.

Flower's ``fixedclipping_mod``, ``adaptiveclipping_mod`` and ``LocalDpMod``
clip (and noise) the dense update, and refuse a reply whose array keys differ
from the ones the server sent. :func:`clients.osd_mod` replaces the weights
by its compressed payload, so it has to run *outside* them::

    app = ClientApp(mods=[osd_mod])          # compression outermost
    @app.train(mods=[fixedclipping_mod])     # clipping on the dense update, inside it
    def train(msg, context): ...

(``ClientApp(mods=[osd_mod, fixedclipping_mod])`` is the same order, but an
app-wide Flower DP mod also runs on evaluate messages, and fails there.)

In the opposite order the privacy mod gets the payload back, and its error
reply is built as a reply to that reply, so it never reaches the server as
this node's answer (the server only sees the node time out). osd_mod cannot
see the mods around it, but they are on the call stack while it runs:
:func:`enclosing_privacy_mod` finds them, and osd_mod then answers with an
error naming the order that works, before training.
"""

from __future__ import annotations

import inspect
from functools import cache
from types import CodeType

__all__ = ["enclosing_privacy_mod", "privacy_mod_order_error"]

#: Frames walked up from the caller at most (a ClientApp call is far shallower).
_MAX_FRAMES = 256


@cache
def _privacy_mod_codes() -> dict[CodeType, str]:
    """Code objects of Flower's privacy mods (Message API and legacy), by the name a user writes."""
    codes: dict[CodeType, str] = {}
    from flwr.clientapp import mod as message_mods

    modules: list[object] = [message_mods]
    try:
        from flwr.client import mod as legacy_mods

        modules.append(legacy_mods)
    except ImportError:  # pragma: no cover - a Flower without the legacy package
        pass
    for module in modules:
        for name in ("fixedclipping_mod", "adaptiveclipping_mod"):
            code = getattr(getattr(module, name, None), "__code__", None)
            if isinstance(code, CodeType):
                codes[code] = name
        local_dp = getattr(module, "LocalDpMod", None)
        if isinstance(local_dp, type):  # an instance is the mod: its __call__ runs
            code = getattr(vars(local_dp).get("__call__"), "__code__", None)
            if isinstance(code, CodeType):
                codes[code] = "LocalDpMod"
    return codes


def enclosing_privacy_mod() -> str | None:
    """The name of a Flower privacy mod that is running around the caller, or ``None``.

    Walks the Python call stack (Flower chains mods as nested calls, so an
    outer mod's frame is on it while an inner one runs). Returns
    ``"fixedclipping_mod"``, ``"adaptiveclipping_mod"`` or ``"LocalDpMod"``.
    """
    codes = _privacy_mod_codes()
    frame = inspect.currentframe()
    try:
        for _ in range(_MAX_FRAMES):
            if frame is None:
                return None
            name = codes.get(frame.f_code)
            if name is not None:
                return name
            frame = frame.f_back
        return None
    finally:
        del frame  # no reference cycle through the frames


def privacy_mod_order_error(mod_name: str) -> str:
    """The reason osd_mod gives when ``mod_name`` runs outside it."""
    return (
        f"{mod_name} runs outside osd_mod, so it would get the compressed payload back instead of the "
        "weights, clip nothing and fail. Put osd_mod outermost and the privacy mod inside it: "
        f"ClientApp(mods=[osd_mod]) with @app.train(mods=[{mod_name}]), "
        f"or ClientApp(mods=[osd_mod, {mod_name}])."
    )
