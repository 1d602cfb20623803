"""The sweeps' vocabulary: the methods a sweep can run, its typed configuration, and the named presets.

:data:`METHOD_SPECS` maps a sweep method name to its
:class:`~osd_fl.config.CompressionConfig` fields (and :data:`DOWNLINK_SPECS`
to a compressed broadcast); :class:`SweepConfig` is one sweep;
:data:`PRESETS` are the sweeps the docs cite (``python -m simulations.sweep
--preset NAME``).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from osd_fl import methods_with

__all__ = [
    "CACHED_ERA",
    "DOWNLINK_SPECS",
    "FULL_MODEL_TASK",
    "METHOD_SPECS",
    "PRESETS",
    "RANK_FREE",
    "SweepConfig",
]

#: Sweep method name -> CompressionConfig fields. Methods without ``rank`` dependence run once per seed.
METHOD_SPECS: dict[str, dict[str, Any]] = {
    "dense": {"method": "dense"},
    "fp16": {"method": "fp16"},
    "int8": {"method": "int8"},
    "topk": {"method": "topk"},
    "topk+ef": {"method": "topk", "error_feedback": True},
    "truncsvd": {"method": "truncsvd"},
    "truncsvd+ef": {"method": "truncsvd", "error_feedback": True},
    "magtruncsvd": {"method": "magtruncsvd"},
    "powersgd+ef": {"method": "powersgd", "error_feedback": True},
    "osd": {"method": "osd"},
    "osd+ef": {"method": "osd", "error_feedback": True},
    "osd-grad+ef": {"method": "osd", "importance": "grad", "error_feedback": True},
    "osd-fixed-c": {"method": "osd", "adaptive": False},
    "osd-grad": {"method": "osd", "importance": "grad"},
    "osd-taylor": {"method": "osd", "importance": "taylor"},
    "osd-fisher": {"method": "osd", "importance": "fisher"},
    "osd-adam": {"method": "osd", "importance": "adam"},
    "osd-obd": {"method": "osd", "importance": "obd"},
    "osd-ones": {"method": "osd", "importance": "ones"},
    # lower precision at float32 TruncSVD's bytes: 2x (4x) the entries, so OSD may draw them from
    # more singular directions (adaptive c never raises the error; a larger relax only costs time)
    "osd-fp16": {"method": "osd", "value_dtype": "float16", "budget_dtype": "float32", "relax": 6},
    "osd-fp16+ef": {
        "method": "osd",
        "value_dtype": "float16",
        "budget_dtype": "float32",
        "relax": 6,
        "error_feedback": True,
    },
    "osd-int8": {"method": "osd", "value_dtype": "int8", "budget_dtype": "float32", "relax": 12},
    # the relax int8 needs: the same at OSD's default c (3) and at 6
    "osd-int8-c3": {"method": "osd", "value_dtype": "int8", "budget_dtype": "float32", "relax": 3},
    "osd-int8-c6": {"method": "osd", "value_dtype": "int8", "budget_dtype": "float32", "relax": 6},
    # OSD's default since 2026-12-03 (int8 at relax 3) with error feedback
    "osd-int8-c3+ef": {
        "method": "osd",
        "value_dtype": "int8",
        "budget_dtype": "float32",
        "relax": 3,
        "error_feedback": True,
    },
    "magtruncsvd-fp16": {"method": "magtruncsvd", "value_dtype": "float16", "budget_dtype": "float32"},
}
#: Sweep methods that compress the broadcast too: the uplink is METHOD_SPECS[name], the downlink
#: this CompressionConfig (``server_ef=False``: no server-side error feedback, the ablation).
DOWNLINK_SPECS: dict[str, dict[str, Any]] = {
    "osd+down1": {"method": "osd", "rank": 1},
    "osd+down2": {"method": "osd", "rank": 2},
    "osd+down4": {"method": "osd", "rank": 4},
    "osd+down4-noef": {"method": "osd", "rank": 4, "server_ef": False},
    # clients already hold the initial model (the shipped checkpoint): no dense first download
    "osd+down1-held": {"method": "osd", "rank": 1, "hold_initial": True},
    "osd+down4-held": {"method": "osd", "rank": 4, "hold_initial": True},
}
METHOD_SPECS.update({name: {"method": "osd"} for name in DOWNLINK_SPECS})
RANK_FREE = frozenset(methods_with("rank_free"))


@dataclass(frozen=True)
class SweepConfig:
    """A sweep: which methods, budgets, seeds, and the federated task they run on."""

    name: str = field(default="demo", metadata={"help": "Preset/sweep name (results go to results/<name>)."})
    methods: tuple[str, ...] = field(default=("dense", "truncsvd", "magtruncsvd", "osd"))
    ranks: tuple[int, ...] = field(default=(1,))
    seeds: tuple[int, ...] = field(default=(0,))
    rounds: int = field(default=8, metadata={"help": "Federated rounds per run."})
    fraction_train: float = field(default=1.0, metadata={"help": "Share of clients per round."})
    server_lr: float = field(default=1.0, metadata={"help": "Server learning rate."})
    relax: int = field(default=3, metadata={"help": "OSD/MagTruncSVD rank relaxation c (adaptive: max c)."})
    value_dtype: str = field(
        default="float32",
        metadata={
            "help": "Value precision for every method (float32, float16, int8), or auto: each method's library "
            "default (OSD int8 within float32 TruncSVD's bytes, the rest float32). The presets that produced "
            "docs/results.md run float32; the demo runs auto."
        },
    )
    task: Mapping[str, Any] = field(default_factory=dict, metadata={"help": "TextTaskConfig overrides."})
    compression: Mapping[str, Any] = field(
        default_factory=dict,
        metadata={"help": "CompressionConfig overrides for every method (a method's own spec wins)."},
    )
    downlink: Mapping[str, Any] = field(
        default_factory=dict,
        metadata={
            "help": "CompressionConfig of the compressed broadcast (OSDStrategy(downlink=...)); "
            "empty = the dense model goes down, as in Flower."
        },
    )
    method_ranks: Mapping[str, tuple[int, ...]] = field(
        default_factory=dict,
        metadata={"help": "Per-method rank lists that replace `ranks` for those methods (ablations at few budgets)."},
    )
    threads: int = field(default=0, metadata={"help": "torch threads (0 = torch default)."})
    shard: tuple[int, int] = field(
        default=(0, 1),
        metadata={"help": "(i, n): run only the planned runs whose index is i mod n (parallel processes)."},
    )


#: The routing defaults before issue 14 (matrices under 4096 entries and embeddings dense), pinned in
#: the cached-mode presets so that they still print the numbers docs/results.md quotes.
CACHED_ERA: dict[str, Any] = {"min_numel": 4096, "embedding_policy": "dense"}

#: The full-model task of the ``fullmodel`` preset and the full-model demo.
FULL_MODEL_TASK: dict[str, Any] = {
    "mode": "full",
    "frozen_layers": 0,
    "max_len": 48,
    "num_clients": 4,
    "max_examples": 4000,
    "test_size": 1000,
    "local_steps": 10,
    "lr": 1e-4,
}

#: The downlink presets' methods: dense, OSD uplink only, and OSD both ways (see DOWNLINK_SPECS).
DOWNLINK_METHODS = ("dense", "osd", *DOWNLINK_SPECS)

#: Compressed broadcast (issue 15) on the full-model task: the fullmodel preset's dense and OSD
#: (uplink only) runs, and OSD both ways (rank-1, 2 and 4 broadcasts, with and without server-side
#: EF, and rank 1 to clients that hold the initial model), all 4 clients every round. 21 runs (dense
#: and osd are the fullmodel preset's: copy them); about 5 min each with two shards side by side.
FULL_MODEL_DOWNLINK = SweepConfig(
    name="fullmodel-downlink",
    methods=("dense", "osd", "osd+down1", "osd+down1-held", "osd+down2", "osd+down4", "osd+down4-noef"),
    ranks=(1,),
    seeds=(0, 1, 2),
    rounds=10,
    threads=1,
    compression={"min_numel": 0},
    task=FULL_MODEL_TASK,
)

PRESETS: dict[str, SweepConfig] = {
    "quick": SweepConfig(
        name="quick",
        methods=("dense", "truncsvd", "osd"),
        rounds=2,
        task={"num_clients": 2, "max_examples": 400, "test_size": 100, "local_steps": 2, "cache_dir": ""},
    ),
    # The README's main command: full-model fine-tuning (where compression can hurt), small enough
    # for a 2-core CPU in under 10 minutes: 3 clients x 8 AdamW steps, 6 rounds, rank 1. Each method
    # at the library's default precision (auto: OSD sends int8 values within TruncSVD's bytes).
    "demo": SweepConfig(
        name="demo",
        methods=("dense", "truncsvd", "magtruncsvd", "osd"),
        ranks=(1,),
        rounds=6,
        value_dtype="auto",
        task={**FULL_MODEL_TASK, "num_clients": 3, "max_examples": 3000, "test_size": 500, "local_steps": 8},
    ),
    "medium": SweepConfig(
        name="medium",
        methods=(
            "dense",
            "fp16",
            "int8",
            "topk+ef",
            "truncsvd",
            "magtruncsvd",
            "powersgd+ef",
            "osd-grad",
            "osd-grad+ef",
            "osd-ones",
            "osd-fisher",
        ),
        ranks=(1, 4),
        seeds=(0,),
        rounds=12,
        compression=CACHED_ERA,
        task={"num_clients": 8, "local_steps": 10},
    ),
    # Every baseline and OSD variant at r = 1, 2, 4, 8 with two seeds; the importance forms
    # (osd = Z of ones, the default) as an ablation at r = 1, where the budget is tightest.
    # 78 runs x 20 rounds: about 85 min on the 2-core CPU with nothing else running.
    "headline": SweepConfig(
        name="headline",
        methods=(
            "dense",
            "fp16",
            "int8",
            "topk",
            "topk+ef",
            "truncsvd",
            "magtruncsvd",
            "powersgd+ef",
            "osd",
            "osd+ef",
            "osd-fixed-c",
            "osd-grad",
            "osd-taylor",
            "osd-fisher",
            "osd-adam",
        ),
        ranks=(1, 2, 4, 8),
        method_ranks={"osd-grad": (1,), "osd-taylor": (1,), "osd-fisher": (1,), "osd-adam": (1,)},
        seeds=(0, 1),
        rounds=20,
        compression=CACHED_ERA,
        task={"num_clients": 8, "local_steps": 10},
    ),
    # Compressed broadcast (issue 15) on the default (cached) task: dense FedAvg, OSD uplink only, and OSD
    # both ways with a rank-1/2/4 broadcast (with and without server-side error feedback), all clients
    # every round. "downlink-partial": 16 clients, 4 per round, so nodes skip rounds and catch up.
    # One torch thread per run, so that two shards side by side do not oversubscribe the 2 cores.
    "downlink": SweepConfig(
        name="downlink",
        methods=DOWNLINK_METHODS,
        ranks=(1,),
        seeds=(0, 1, 2),
        rounds=20,
        threads=1,
        task={"num_clients": 8, "local_steps": 10},
    ),
    "downlink-partial": SweepConfig(
        name="downlink-partial",
        methods=DOWNLINK_METHODS,
        ranks=(1,),
        seeds=(0, 1, 2),
        rounds=20,
        threads=1,
        fraction_train=0.25,
        task={"num_clients": 16, "local_steps": 10},
    ),
    # Full-model fine-tuning (issue 14), where updates are far from low-rank: every encoder layer of
    # MiniLM trained (embeddings frozen, so they travel as ZERO records), 4 clients x 10 AdamW steps
    # at lr 1e-4 (chosen by a dense calibration, docs/results.md), 48 tokens, one torch thread.
    # The importance forms (osd = Z of ones) as an ablation at r = 1, against MagTruncSVD.
    # 105 runs; about 7 min each with two shards side by side on the 2-core CPU (--shard 0/2, 1/2).
    "fullmodel": SweepConfig(
        name="fullmodel",
        methods=(
            "dense",
            "fp16",
            "int8",
            "truncsvd",
            "truncsvd+ef",
            "magtruncsvd",
            "osd",
            "osd+ef",
            "osd-fp16",
            "osd-int8",
            "powersgd+ef",
            "topk+ef",
            "osd-grad",
            "osd-taylor",
            "osd-fisher",
            "osd-adam",
            "osd-obd",
        ),
        ranks=(1, 2, 4),
        method_ranks=dict.fromkeys(("osd-grad", "osd-taylor", "osd-fisher", "osd-adam", "osd-obd"), (1,)),
        seeds=(0, 1, 2),
        rounds=10,
        threads=1,
        compression={"min_numel": 0},
        task=FULL_MODEL_TASK,
    ),
    "fullmodel-downlink": FULL_MODEL_DOWNLINK,
    # The same with partial participation: 8 clients holding 500 examples each, 4 a round (the same
    # work per round as fullmodel-downlink), so nodes skip rounds and catch up by a chain of broadcasts
    # or a dense resend. 21 runs, about 5 min each with two shards side by side.
    "fullmodel-downlink-partial": replace(
        FULL_MODEL_DOWNLINK,
        name="fullmodel-downlink-partial",
        fraction_train=0.5,
        task={**FULL_MODEL_TASK, "num_clients": 8},
    ),
    # Non-IID: Dirichlet(0.5) label mixes over the same 8 clients, rank 1, two seeds
    # (14 runs, about 8 min when the CPU is free).
    "noniid": SweepConfig(
        name="noniid",
        methods=("dense", "truncsvd", "truncsvd+ef", "magtruncsvd", "powersgd+ef", "osd", "osd+ef"),
        ranks=(1,),
        seeds=(0, 1),
        rounds=20,
        compression=CACHED_ERA,
        task={"num_clients": 8, "local_steps": 10, "partitioning": "dirichlet", "alpha": 0.5},
    ),
    # Two trained layers (frozen_layers=4): a larger, less compressible update; rank 1, two seeds
    # (12 runs, about 15 min plus a one-time activation cache).
    "twolayer": SweepConfig(
        name="twolayer",
        methods=("dense", "truncsvd", "truncsvd+ef", "powersgd+ef", "osd", "osd+ef"),
        ranks=(1,),
        seeds=(0, 1),
        rounds=10,
        compression=CACHED_ERA,
        task={"num_clients": 8, "local_steps": 10, "frozen_layers": 4},
    ),
}
