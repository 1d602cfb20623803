"""The one typed configuration of a compressor.

:class:`CompressionConfig` is the single source of truth for every knob: the
Python API (``compress(..., **options)``), the Flower train config sent by the
server, ``[tool.flwr.app.config]`` and the simulation CLI are all generated
from its fields, whose ``metadata["help"]`` says what each does and how to
tune it.

Tuning guide (turn the knobs in this order):

1. ``rank`` sets the byte budget: a rank-r budget is what two dense rank-r
   factors cost, ``r * (n + d)`` values per matrix. Double it to double the
   upload.
2. ``value_dtype`` is the precision of every transmitted value. The default,
   ``"auto"``, is each method's measured choice (:func:`osd_fl.resolve_config`
   resolves it): OSD sends int8 values within the bytes float32 rank-r
   TruncSVD sends (``budget_dtype="float32"``), room for about four times
   as many entries (docs/results.md, "Value precision: the decision": more
   accurate per byte than float32 OSD on both tasks measured); every other
   method sends float32. ``"float32"`` is the paper's setting.
   ``"float16"`` by itself halves the upload; with ``budget_dtype="float32"``
   OSD keeps about twice as many entries.
3. ``relax`` (c) is how many extra singular directions OSD may draw entries
   from. With ``adaptive=True`` (default) each matrix tries c = 0..relax and
   keeps the one with the least importance-weighted error, so a larger
   ``relax`` never hurts that error, it only costs compute. With int8
   values at rank r >= 2 the default 3 leaves part of the budget unspent;
   about ``3 * rank`` spends it (measured 0.3-0.4 points better on the
   full model, within noise, for about 3x the client time).
4. ``error_feedback=True`` (client side) accumulates what was not sent and
   sends it later; it helps most at small ranks.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar, Literal

from osd_fl.errors import ConfigError
from osd_fl.settings import Settings, check_literal_fields
from osd_fl.sizes import value_bytes

__all__ = [
    "LIMITS",
    "MAX_RANK",
    "CompressionConfig",
    "ImportanceForm",
    "ValueDType",
]

ValueDType = Literal["auto", "float32", "float16", "int8"]
BudgetDType = Literal["value", "float32", "float16"]
ImportanceForm = Literal["grad", "taylor", "fisher", "obd", "ones", "adam"]
BudgetMode = Literal["matrix", "global"]
EmbeddingPolicy = Literal["compress", "dense", "skip"]
SVDMode = Literal["auto", "exact", "randomized"]


#: Largest rank (and rank + relax) a record can carry: the wire stores it as u16.
MAX_RANK = 65535

#: ``(lowest, highest)`` accepted value of every numeric setting. The ceilings are
#: what a client can run in reasonable time and memory, not tuning advice.
LIMITS: dict[str, tuple[int, int]] = {
    "rank": (1, MAX_RANK),
    "relax": (0, 64),
    "budget_bytes": (0, 2**40),
    "importance_batches": (1, 10_000),
    "min_numel": (0, 2**62),
    "int8_block": (0, 2**31 - 1),
    "oversample": (0, 1024),
    "niter": (0, 64),
    "seed": (0, 2**63 - 1),
}
_LIMIT_WHY = {
    "rank": "the wire's u16 rank",
    "relax": "each extra rank costs an SVD column and a candidate",
    "budget_bytes": "0 = derive from rank; 1 TiB at most",
    "importance_batches": "validation batches per round",
    "min_numel": "entries below which a matrix travels dense",
    "int8_block": "the wire's u32 block; 0 = one block per tensor",
    "oversample": "extra randomized-SVD columns",
    "niter": "randomized-SVD power iterations, two products each",
    "seed": "torch.Generator seeds are 64-bit",
}


@dataclass(frozen=True)
class CompressionConfig(Settings):
    """Every setting of a compressor, with defaults a user would pick.

    Build one directly, or from loose key/value pairs (a Flower
    ``ConfigRecord`` or CLI flags) with :meth:`from_mapping`; :meth:`replace`,
    :meth:`to_dict` and :meth:`help` come from :class:`~osd_fl.settings.Settings`.
    """

    settings_name: ClassVar[str] = "compression"

    method: str = field(
        default="osd",
        metadata={"help": "Compressor name: osd, truncsvd, magtruncsvd, topk, powersgd, dense, fp16, int8."},
    )
    rank: int = field(
        default=1,
        metadata={"help": "Budget rank r: each compressed matrix gets the bytes of dense rank-r factors."},
    )
    relax: int = field(
        default=3,
        metadata={"help": "Rank relaxation c (OSD works at rank r + c); with adaptive=True the largest c tried."},
    )
    adaptive: bool = field(
        default=True,
        metadata={
            "help": "OSD: choose c in 0..relax per matrix by the importance-weighted error (0 = dense TruncSVD)."
        },
    )
    damage: Literal["l2", "l1"] = field(
        default="l2",
        metadata={
            "help": "OSD damage score: l2 = Z-weighted squared error of dropping an entry "
            "(default, measured better), l1 = the first-order bound."
        },
    )
    second_pass: bool = field(
        default=False,
        metadata={"help": "OSD: re-select B's entries after masking A (the interleaved refinement)."},
    )
    value_dtype: ValueDType = field(
        default="auto",
        metadata={
            "help": "Precision of every transmitted value: auto (the method's measured choice: int8 for OSD "
            "within float32 TruncSVD's bytes, float32 for every other method), float32, float16, or int8 "
            "(blocks of values with one float32 scale each)."
        },
    )
    budget_dtype: BudgetDType = field(
        default="value",
        metadata={
            "help": "Precision the rank-r budget is priced at: value = value_dtype (float16 values then halve "
            "the upload); float32 = the bytes float32 rank-r TruncSVD sends, so float16 values let OSD and "
            "MagTruncSVD keep about twice the entries at equal bytes."
        },
    )
    budget: BudgetMode = field(
        default="matrix",
        metadata={"help": "matrix: each matrix gets its own rank-r budget; global: one budget shared by all."},
    )
    budget_bytes: int = field(
        default=0,
        metadata={"help": "Explicit byte budget of the whole payload (0 = derive it from rank)."},
    )
    importance: ImportanceForm = field(
        default="ones",
        metadata={
            "help": "Client side: importance map Z (ones = data-free, the measured default; grad, taylor, "
            "fisher, obd from local validation gradients; adam from the optimizer state). See docs/results.md."
        },
    )
    importance_batches: int = field(
        default=4,
        metadata={"help": "Client side: validation batches averaged to compute the importance map."},
    )
    error_feedback: bool = field(
        default=False,
        metadata={"help": "Client side: keep the residual e <- dW + e - dW_hat and add it to the next update."},
    )
    min_numel: int = field(
        default=0,
        metadata={
            "help": "Matrices with fewer entries than this travel dense (so do all 1-D tensors); 0 = compress "
            "every matrix (and 4-D kernel, as out x rest) whose rank-r budget is below its dense size."
        },
    )
    embedding_policy: EmbeddingPolicy = field(
        default="compress",
        metadata={
            "help": "Tensors whose name matches embedding_pattern: compress (as any matrix: OSD keeps only the "
            "rows that changed), dense, or skip (send no update)."
        },
    )
    embedding_pattern: str = field(
        default="embeddings.word_embeddings",
        metadata={"help": "Substring that marks a tensor as an embedding matrix."},
    )
    int8_block: int = field(
        default=256,
        metadata={"help": "int8: values per quantization block (one float32 scale each); 0 = one block per tensor."},
    )
    svd: SVDMode = field(
        default="auto",
        metadata={"help": "SVD routine: exact, randomized, or auto (randomized when r + c << min(n, d))."},
    )
    oversample: int = field(
        default=10,
        metadata={"help": "Randomized SVD: extra columns beyond r + c."},
    )
    niter: int = field(
        default=2,
        metadata={"help": "Randomized SVD: power iterations (more = more accurate, slower)."},
    )
    seed: int = field(
        default=0,
        metadata={"help": "Seed of every random choice (randomized SVD, PowerSGD init): same seed, same bytes."},
    )

    def __post_init__(self) -> None:
        """Check every field and raise :class:`ConfigError` naming the bad one."""
        check_literal_fields(self)
        # Every number has a ceiling as well as a floor: a client runs what the server
        # sends, so a setting beyond what can run (niter=10**9 hangs an SVD) is refused
        # here, on both sides, with the range in the message.
        for name, (low, high) in LIMITS.items():
            value = getattr(self, name)
            if not low <= value <= high:
                raise ConfigError(f"{name}={value} must be in {low}..{high} ({_LIMIT_WHY[name]})")
        if self.rank + self.relax > MAX_RANK:
            raise ConfigError(f"rank + relax = {self.rank + self.relax} must be <= {MAX_RANK} (the wire's u16 rank)")
        if len(self.embedding_pattern) > 1024:
            raise ConfigError(f"embedding_pattern has {len(self.embedding_pattern)} characters; at most 1024")

    @property
    def value_bytes(self) -> int:
        """Bytes of one transmitted value (4 for float32, 2 for float16, 1 for int8)."""
        return value_bytes(self._concrete_value_dtype())

    @property
    def budget_value_dtype(self) -> str:
        """The value dtype a matrix's rank-r budget is priced in (``budget_dtype``, or ``value_dtype``)."""
        return self._concrete_value_dtype() if self.budget_dtype == "value" else self.budget_dtype

    def _concrete_value_dtype(self) -> str:
        if self.value_dtype == "auto":
            raise ConfigError(
                "value_dtype='auto' is chosen per method: resolve the config first "
                "(osd_fl.resolve_config(config)), or set value_dtype explicitly"
            )
        return self.value_dtype
