"""A thousand clients on Flower's simulation engine: per-round wall time, server time and memory.

Runs the text task (MiniLM on Rotten Tomatoes, cached mode: the top
BertLayer, pooler and head are trained) with ``--nodes`` virtual SuperNodes
on Flower's Ray backend (what ``flwr run`` uses for simulation), samples
``--per-round`` of them each round, compresses uploads with OSD and error
feedback (the residual lives in each node's ``context.state``) and, with
the broadcast too (unless ``--no-downlink``; each node's replica of the global model
lives in its ``context.state``, the strategy keeps the version per node)::

    python -m simulations.bench.engine                                # 1000 nodes, 15 per round, 4 rounds
    python -m simulations.bench.engine --nodes 100 --rounds 2 --no-downlink

Per round it prints the wall time, the server's own time (the round's wall
time minus the time spent waiting in ``send_and_receive`` for the clients),
the central evaluation's time, the resident memory of this process (the
ServerApp, the simulation engine and every node's ``context``: in a
simulation all of them live here) and of the Ray worker processes, and the
nodes that have held state so far. What grows with the number of nodes is
what the run shows: this process grows by about one ``context.state`` per
node that has trained (error-feedback residual plus the downlink replica,
each the size of the trained model), not with the nodes that never did.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from flwr.app import ArrayRecord, Context, Message, MessageType, MetricRecord
from flwr.serverapp import Grid, ServerApp

from osd_fl import CompressionConfig
from osd_fl.downlink import model_bytes
from osd_fl.records import record_to_tensors, tensors_to_record
from simulations.app_config import AppSettings
from simulations.bench.harness import machine, print_table, rss_bytes
from simulations.federation import run_federation
from simulations.text import TextTaskConfig, evaluate
from simulations.text_fl import get_task
from strategies import ForwardingGrid

__all__ = ["TimedGrid", "main", "ray_workers_rss"]


class TimedGrid(ForwardingGrid):
    """A grid proxy that adds up the seconds spent waiting for replies (``send_and_receive``)."""

    def __init__(self, grid: Grid) -> None:
        super().__init__(grid)
        self.waiting = 0.0
        #: Nodes sent a train instruction so far (each then holds state in its context).
        self.trained: set[int] = set()

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        """Forward to the wrapped grid; time the wait and note the nodes told to train."""
        batch = list(messages)
        self.trained.update(m.metadata.dst_node_id for m in batch if m.metadata.message_type == MessageType.TRAIN)
        t0 = time.perf_counter()
        try:
            return list(super().send_and_receive(batch, timeout=timeout))
        finally:
            self.waiting += time.perf_counter() - t0


def ray_workers_rss() -> tuple[int, int]:
    """``(processes, resident bytes)`` of this machine's Ray worker processes (``ray::`` in the command line)."""
    count, total = 0, 0
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as fh:
                if b"ray::" not in fh.read():
                    continue
            with open(f"/proc/{pid}/status", encoding="ascii") as fh:
                rss = next(int(line.split()[1]) for line in fh if line.startswith("VmRSS:"))
        except (OSError, StopIteration):
            continue
        count += 1
        total += rss * 1024
    return count, total


def _server_app(args: argparse.Namespace, rows: list[dict[str, Any]], info: dict[str, Any]) -> ServerApp:
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        timed = TimedGrid(grid)
        task = get_task(TextTaskConfig())
        model = task.new_model()
        test_loader = task.test_loader()
        info["model_bytes"] = model_bytes(dict(model.state_dict()))
        clock = {"start": time.perf_counter(), "waiting": 0.0}

        def central(server_round: int, arrays: ArrayRecord) -> MetricRecord:
            t0 = time.perf_counter()
            model.load_state_dict(record_to_tensors(arrays))
            loss, acc = evaluate(model, test_loader)
            eval_s = time.perf_counter() - t0
            if server_round > 0:
                wall = t0 - clock["start"]
                waiting = timed.waiting - clock["waiting"]
                workers, workers_rss = ray_workers_rss()
                rows.append(
                    {
                        "round": server_round,
                        "wall_s": wall,
                        "server_s": wall - waiting,
                        "clients_s": waiting,
                        "eval_s": eval_s,
                        "rss_mb": rss_bytes() / 1e6,
                        "ray_workers": workers,
                        "ray_rss_mb": workers_rss / 1e6,
                        "nodes_with_state": len(timed.trained),
                        "test_accuracy": acc,
                    }
                )
                print(json.dumps(rows[-1]), flush=True)
            clock["start"], clock["waiting"] = time.perf_counter(), timed.waiting
            return MetricRecord({"test-loss": loss, "test-accuracy": acc})

        settings = AppSettings(
            num_server_rounds=args.rounds,
            fraction_train=args.per_round / args.nodes,
            fraction_evaluate=0.0,
            min_nodes=args.nodes,
            downlink_method="" if args.no_downlink else "osd",
            downlink_rank=args.downlink_rank,
            downlink_hold_initial=not args.no_hold_initial,
        )
        compression = CompressionConfig(method="osd", rank=args.rank, error_feedback=True)
        info["rss_before_mb"] = rss_bytes() / 1e6
        result, strategy = run_federation(
            timed,
            settings,
            compression,
            tensors_to_record(model.state_dict()),
            central,
            sampling_seed=0,
        )
        info["traffic"] = strategy.meter.totals()
        info["rejections"] = len(strategy.rejections)
        info["finished"] = bool(result.evaluate_metrics_serverapp)

    return app


def _report(args: argparse.Namespace, rows: list[dict[str, Any]], info: dict[str, Any], total: float) -> None:
    """Print the machine, the set-up and one table row per round."""
    print(f"\n{machine()}")
    print(
        f"{args.nodes} virtual SuperNodes (Ray backend, {args.actors} actors of 1 CPU), {args.per_round} sampled per "
        f"round, {args.rounds} rounds; text task (cached mode), OSD r = {args.rank} uplink with error feedback, "
        + (
            "dense downlink"
            if args.no_downlink
            else f"OSD r = {args.downlink_rank} downlink"
            + ("" if args.no_hold_initial else " (nodes hold the initial model)")
        )
        + f"; trained model {info['model_bytes'] / 1e6:.2f} MB; whole run {total:.0f} s "
        f"(engine start-up and first model loads included); this process held {info['rss_before_mb']:.0f} MB "
        "before round 1"
    )
    print_table(
        [
            "round",
            "wall s",
            "server s",
            "waiting for clients s",
            "central eval s",
            "this process MB",
            "Ray workers (MB)",
            "nodes that have trained",
            "test accuracy",
        ],
        [
            [
                str(r["round"]),
                f"{r['wall_s']:.1f}",
                f"{r['server_s']:.2f}",
                f"{r['clients_s']:.1f}",
                f"{r['eval_s']:.2f}",
                f"{r['rss_mb']:.0f}",
                f"{r['ray_workers']} ({r['ray_rss_mb']:.0f})",
                str(r["nodes_with_state"]),
                f"{r['test_accuracy']:.4f}",
            ]
            for r in rows
        ],
    )
    traffic = info["traffic"]
    print(f"traffic totals: {json.dumps(traffic)}; rejected replies: {info['rejections']}")


def main(argv: list[str] | None = None) -> None:
    """Run the federation and print one row per round, then a table."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--nodes", type=int, default=1000, help="virtual SuperNodes")
    parser.add_argument("--per-round", type=int, default=15, help="nodes sampled per round")
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--rank", type=int, default=1, help="uplink rank")
    parser.add_argument("--downlink-rank", type=int, default=4)
    parser.add_argument("--no-downlink", action="store_true", help="dense broadcast (Flower's default)")
    parser.add_argument(
        "--no-hold-initial",
        action="store_true",
        help="nodes do not hold the initial model: each node's first download is dense",
    )
    parser.add_argument("--actors", type=int, default=2, help="CPUs for Ray (one client per CPU)")
    parser.add_argument("--out", default="", help="write the rows as JSON here")
    args = parser.parse_args(argv)
    if not 1 <= args.per_round <= args.nodes:
        parser.error("--per-round must be between 1 and --nodes")

    from flwr.simulation import run_simulation

    from simulations.client_app import app as client_app

    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    rows: list[dict[str, Any]] = []
    info: dict[str, Any] = {"finished": False}
    t0 = time.perf_counter()
    run_simulation(
        server_app=_server_app(args, rows, info),
        client_app=client_app,
        num_supernodes=args.nodes,
        backend_config={
            "client_resources": {"num_cpus": 1, "num_gpus": 0.0},
            "init_args": {"num_cpus": args.actors},
        },
    )
    total = time.perf_counter() - t0
    if not info["finished"] or len(rows) != args.rounds:
        raise SystemExit(f"the federation did not finish: {len(rows)} of {args.rounds} rounds (see the log above)")
    _report(args, rows, info, total)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps({"args": vars(args), "info": info, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
