"""The compressor contract and the registry of methods.

A compressor turns the matrices of an update into :class:`TensorRecord` s
whose kind-specific bytes fit the budget it is given. It is pure: state that
outlives one call (PowerSGD's warm starts) lives in a :class:`CompressorState`
passed in; error feedback lives in :class:`osd_fl.feedback.ErrorFeedback`.

The built-in methods live in :mod:`osd_fl.methods`, one module each, and are
registered there when :mod:`osd_fl` is imported; register a new method with
:func:`register`. What a method can do is written once, as class attributes
of its compressor (:attr:`Compressor.uses_importance`,
:attr:`Compressor.rank_free`, ...), and read with :func:`methods_with`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import ClassVar, TypeVar

import numpy as np
import numpy.typing as npt
import torch

from osd_fl.config import CompressionConfig
from osd_fl.errors import ConfigError
from osd_fl.payload import Kind, Section, TensorRecord
from osd_fl.seeds import item_seed

__all__ = [
    "REGISTRY",
    "Compressor",
    "CompressorState",
    "MatrixItem",
    "RecordForm",
    "dense_record",
    "get_compressor",
    "item_generator",
    "lowrank_record",
    "methods_with",
    "register",
    "with_method_precision",
]


@dataclass
class MatrixItem:
    """One tensor to compress, seen as an ``n x d`` float32 matrix."""

    name: str
    shape: tuple[int, ...]
    dtype: str
    mat: torch.Tensor
    importance: torch.Tensor | None = None

    @property
    def n(self) -> int:
        """Rows."""
        return int(self.mat.shape[0])

    @property
    def d(self) -> int:
        """Columns."""
        return int(self.mat.shape[1])


@dataclass
class CompressorState:
    """State a compressor keeps across rounds on one client (PowerSGD warm starts).

    Convert with :meth:`to_numpy` / :meth:`from_numpy` to keep it in a Flower
    ``context.state`` ArrayRecord.
    """

    tensors: dict[str, torch.Tensor] = field(default_factory=dict)

    def to_numpy(self) -> dict[str, npt.NDArray[np.float32]]:
        """Plain float32 arrays, one per key."""
        return {k: v.detach().cpu().to(torch.float32).numpy() for k, v in self.tensors.items()}

    @classmethod
    def from_numpy(cls, arrays: Mapping[str, npt.NDArray[np.floating]]) -> CompressorState:
        """Inverse of :meth:`to_numpy`."""
        return cls({k: torch.from_numpy(np.array(v, dtype=np.float32)) for k, v in arrays.items()})


def item_generator(cfg: CompressionConfig, item: MatrixItem) -> torch.Generator:
    """A generator seeded by the config seed and the tensor name (device of the matrix)."""
    gen = torch.Generator(device=item.mat.device)
    gen.manual_seed(item_seed(cfg.seed, item.name))
    return gen


def to_numpy(t: torch.Tensor) -> npt.NDArray[np.float32]:
    """Flat float32 numpy copy of ``t``."""
    return t.detach().reshape(-1).to(torch.float32).cpu().numpy()


def lowrank_record(
    item: MatrixItem,
    a: torch.Tensor,
    b: torch.Tensor,
    pos_a: npt.NDArray[np.int64] | None = None,
    pos_b: npt.NDArray[np.int64] | None = None,
) -> TensorRecord:
    """A LOWRANK record of factors ``a`` (n x k) and ``b`` (k x d), optionally sparse."""
    k = int(a.shape[1])

    def section(f: torch.Tensor, pos: npt.NDArray[np.int64] | None) -> Section:
        flat = to_numpy(f)
        if pos is None or pos.size == flat.size:
            return Section(slots=flat.size, values=flat)
        return Section(slots=flat.size, values=flat[pos], positions=pos)

    return TensorRecord(
        name=item.name,
        shape=item.shape,
        dtype=item.dtype,
        kind=Kind.LOWRANK,
        rank=k,
        sections=[section(a, pos_a), section(b, pos_b)],
    )


def dense_record(name: str, tensor: torch.Tensor, dtype: str) -> TensorRecord:
    """A DENSE record of ``tensor``."""
    flat = to_numpy(tensor)
    return TensorRecord(
        name=name,
        shape=tuple(int(s) for s in tensor.shape),
        dtype=dtype,
        kind=Kind.DENSE,
        sections=[Section(slots=flat.size, values=flat)],
    )


@dataclass(frozen=True)
class RecordForm:
    """What a correct client of a method sends for one compressed matrix.

    The receiver checks every record against it
    (:func:`osd_fl.checks.check_conformance`): a record of another kind, or
    one of a larger rank, cannot come from a correct client, whatever its
    bytes say.
    """

    kind: Kind
    #: LOWRANK: the largest inner dimension the method uses for this matrix.
    max_rank: int = 0
    #: LOWRANK: whether the factors travel whole (no positions); False = either.
    full_factors: bool = False
    #: QUANT8: the one block size the method uses for this matrix (0 = any).
    block: int = 0


class Compressor(ABC):
    """Base class of a compression method.

    Subclasses set :attr:`name` and implement :meth:`encode_matrix`. Methods
    that select entries can also take one budget for all matrices at once
    (:meth:`encode_global`, ``budget="global"``).
    """

    name: ClassVar[str]
    #: Whether the method fits the rank-derived byte budget.
    budgeted: ClassVar[bool] = True
    #: Whether every tensor travels dense (no matrix routing).
    all_dense: ClassVar[bool] = False
    #: Whether :meth:`encode_global` shares one budget between matrices.
    supports_global: ClassVar[bool] = False
    #: Config fields this method forces (e.g. fp16 -> value_dtype).
    overrides: ClassVar[Mapping[str, object]] = {}
    #: Whether the method's selection uses an importance map Z (so a client should compute one).
    uses_importance: ClassVar[bool] = False
    #: Whether the rank setting changes nothing the method sends: ``not budgeted``, set per subclass.
    rank_free: ClassVar[bool] = False
    #: ``(value_dtype, budget_dtype)`` that ``value_dtype="auto"`` resolves to (the budget dtype only
    #: where the config's is ``"value"``): the method's measured precision (OSD: int8 values within
    #: float32 TruncSVD's bytes).
    auto_precision: ClassVar[tuple[str, str]] = ("float32", "value")

    def __init_subclass__(cls, **kwargs: object) -> None:
        """Derive :attr:`rank_free` from :attr:`budgeted` (one fact, written once)."""
        super().__init_subclass__(**kwargs)
        cls.rank_free = not cls.budgeted

    def __init__(self, config: CompressionConfig) -> None:
        self.config = config if config.value_dtype != "auto" else with_method_precision(type(self), config)

    @abstractmethod
    def encode_matrix(self, item: MatrixItem, budget: int, state: CompressorState) -> TensorRecord:
        """Compress one matrix into a record whose kind-specific bytes fit ``budget``."""

    def encode_matrices(
        self, items: Sequence[MatrixItem], budgets: Sequence[int], state: CompressorState
    ) -> list[TensorRecord]:
        """Compress each matrix within its own budget: :meth:`encode_matrix` on each, in order.

        A method may override it to share work between matrices (the sparse
        low-rank engine batches the selection of equal shapes); the records
        must be those :meth:`encode_matrix` gives.
        """
        return [self.encode_matrix(item, budget, state) for item, budget in zip(items, budgets, strict=True)]

    def encode_global(self, items: list[MatrixItem], budget: int, state: CompressorState) -> list[TensorRecord]:
        """Compress several matrices sharing ``budget`` kind-specific bytes in total."""
        raise ConfigError(f"method {self.name!r} does not support budget='global'")

    @abstractmethod
    def record_form(self, n: int, d: int) -> RecordForm:
        """The record this method produces for an ``n x d`` matrix it compresses (see :class:`RecordForm`)."""


def with_method_precision(cls: type[Compressor], config: CompressionConfig) -> CompressionConfig:
    """``config`` with the method's own precision and forced fields.

    Applies ``cls``'s :attr:`Compressor.overrides` and, where ``value_dtype`` is still ``"auto"``, its
    :attr:`Compressor.auto_precision` (the budget dtype only where the config's is ``"value"``).
    """
    changes: dict[str, object] = dict(cls.overrides)
    if changes.get("value_dtype", config.value_dtype) == "auto":
        value, budget = cls.auto_precision
        changes["value_dtype"] = value
        if config.budget_dtype == "value":
            changes["budget_dtype"] = budget
    return config.replace(**changes) if changes else config


_C = TypeVar("_C", bound=type[Compressor])

#: Method name -> compressor class.
REGISTRY: dict[str, type[Compressor]] = {}


def register(cls: _C) -> _C:
    """Class decorator adding a compressor to :data:`REGISTRY` under ``cls.name``."""
    if cls.name in REGISTRY:
        raise ValueError(f"compressor {cls.name!r} registered twice")
    REGISTRY[cls.name] = cls
    return cls


def get_compressor(config: CompressionConfig) -> Compressor:
    """Instantiate the compressor ``config.method`` names."""
    try:
        cls = REGISTRY[config.method]
    except KeyError:
        raise ConfigError(f"unknown method {config.method!r}; registered: {sorted(REGISTRY)}") from None
    return cls(config)


def methods_with(attribute: str) -> tuple[str, ...]:
    """Names of the registered methods whose compressor has the true class attribute ``attribute``.

    E.g. ``methods_with("uses_importance")`` (``("osd",)``) or
    ``methods_with("rank_free")`` (``("dense", "fp16", "int8")``), in
    registration order.

    Raises
    ------
    AttributeError
        If ``attribute`` is not an attribute of :class:`Compressor`.
    """
    if not hasattr(Compressor, attribute):
        raise AttributeError(f"Compressor has no attribute {attribute!r}")
    return tuple(name for name, cls in REGISTRY.items() if getattr(cls, attribute) is True)
