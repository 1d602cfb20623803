"""4. Wall time of simulated rounds, OSD against dense FedAvg."""

from __future__ import annotations

import argparse
import logging
import statistics
import time
from collections.abc import Mapping
from typing import Any

import torch
from flwr.app import ConfigRecord
from flwr.common.logger import console_handler
from flwr.serverapp.strategy import FedAvg, Strategy

from osd_fl import CompressionConfig
from osd_fl.records import (
    METRIC_COMPRESS_SECONDS,
    tensors_to_record,
)
from simulations.bench.harness import header, load1, print_table, wait_quiet
from simulations.bench.workloads import model_shapes, synthetic_client_app
from simulations.digits_client import app as digits_app
from simulations.digits_task import build_model
from strategies import ByteMeter, MeteredGrid, OSDStrategy
from strategies.local_grid import LocalGrid


def _run_rounds(
    app: Any,
    initial: Mapping[str, torch.Tensor],
    clients: int,
    rounds: int,
    osd: dict[str, Any] | None,
    train_config: Mapping[str, Any],
) -> tuple[float, dict[str, int], float]:
    """Wall time of ``strategy.start`` for ``rounds`` rounds (no evaluation), bytes up, client compress s."""
    inner = FedAvg(fraction_evaluate=0.0, min_train_nodes=1, min_evaluate_nodes=0, min_available_nodes=1)
    meter = ByteMeter()
    grid = MeteredGrid(LocalGrid(app, clients), meter)
    strategy: Strategy = inner if osd is None else OSDStrategy(inner, config=CompressionConfig(**osd), meter=meter)
    t0 = time.perf_counter()
    result = strategy.start(
        grid=grid,
        initial_arrays=tensors_to_record(dict(initial)),
        num_rounds=rounds,
        train_config=ConfigRecord(dict(train_config)),
    )
    seconds = time.perf_counter() - t0
    compress_s = 0.0
    for metrics in result.train_metrics_clientapp.values():
        value = metrics.get(METRIC_COMPRESS_SECONDS, 0.0)
        compress_s += float(value) if isinstance(value, (int, float)) else 0.0
    return seconds, meter.totals(), compress_s


def section_round(args: argparse.Namespace) -> None:

    header("4. Round overhead: a simulated round with OSD versus dense FedAvg", args)

    console_handler.setLevel(logging.WARNING)  # Flower's per-round INFO summary would bury the table

    clients = 2 if args.quick else 4
    rounds = 2 if args.quick else 3
    minilm = model_shapes("minilm", args.quick)
    g = torch.Generator().manual_seed(0)
    tasks: list[tuple[str, Any, dict[str, torch.Tensor], dict[str, Any]]] = [
        ("digits MLP (64-128-10), real local training", digits_app, dict(build_model(128).state_dict()), {}),
        (
            "MiniLM-L6-shaped update, synthetic training" + (" (2 layers, quick)" if args.quick else ""),
            synthetic_client_app(minilm),
            {k: 0.02 * torch.randn(s, generator=g) for k, s in minilm.items()},
            {},
        ),
    ]
    print(
        f"LocalGrid (in-process; every message goes through Flower's protobuf serialization both ways), "
        f"{clients} clients run one after another, {rounds} rounds, no evaluation; osd rank r={args.rank}; "
        "per round = wall time of strategy.start / rounds (after a 1-round warm-up of each variant); "
        "the MiniLM client's update and importance maps are drawn once per node"
    )
    rows = []
    for title, app, initial, train_config in tasks:
        print(f"{title}: {wait_quiet('round')}")
        variants: list[tuple[str, dict[str, Any] | None]] = [
            ("dense FedAvg", None),
            ("OSDStrategy + osd_mod", {"method": "osd", "rank": args.rank}),
        ]
        for _, osd in variants:  # warm-up
            _run_rounds(app, initial, clients, 1, osd, train_config)
        measured: dict[str, list[float]] = {v: [] for v, _ in variants}
        info: dict[str, tuple[dict[str, int], float]] = {}
        for _ in range(max(1, args.repeats // 2)):
            for label, osd in variants:
                seconds, totals, compress_s = _run_rounds(app, initial, clients, rounds, osd, train_config)
                measured[label].append(seconds / rounds)
                info[label] = (totals, compress_s / rounds)
        dense_t = statistics.median(measured["dense FedAvg"])
        for label, _ in variants:
            t = statistics.median(measured[label])
            totals, comp = info[label]
            rows.append(
                [
                    title,
                    label,
                    f"{t:.3f}",
                    f"{t - dense_t:+.3f}",
                    f"{t / dense_t:.2f}",
                    f"{comp * clients:.3f}" if comp else "-",
                    f"{totals['bytes-up'] / rounds / clients:,.0f}",
                ]
            )
    print_table(
        [
            "task",
            "variant",
            "s / round (median)",
            "vs dense s",
            "x dense",
            "client compress s / round",
            "bytes up / client / round",
        ],
        rows,
    )
    print(f"load average (1 min) at end: {load1():.2f}")
