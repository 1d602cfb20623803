"""2. Server decode and aggregation: time and peak memory per client, N = 10 .. 1000."""

from __future__ import annotations

import argparse
import gc
import time
import uuid
from collections import Counter
from collections.abc import Mapping
from typing import Any

import torch
from flwr.app import ArrayRecord, ConfigRecord, Message
from flwr.clientapp import ClientApp
from flwr.common.serde import message_from_proto, message_to_proto
from flwr.serverapp.strategy import FedAvg

from osd_fl import (
    CompressionConfig,
    check_conformance,
    decode,
    iter_tensors,
    payload_limit,
    resolve_config,
    total_dense_bytes,
)
from osd_fl.records import (
    PAYLOAD_RECORD_KEY,
    record_to_payload,
    tensors_to_record,
)
from simulations.bench.harness import (
    GB,
    PeakMemory,
    PeakSite,
    fmt_mb,
    header,
    load1,
    print_table,
    rss_bytes,
    run_child,
    wait_quiet,
)
from simulations.bench.workloads import MODEL_LABELS, mod_replies, model_shapes, train_messages
from strategies import OSDStrategy
from strategies.aggregation import FactorSum, zeros
from strategies.local_grid import LocalGrid
from strategies.replies import check_value_bound

#: The steps of one reply's validation and sum, in the order the strategy runs them (strategies.replies).
PHASES = ("decode", "conformance", "value bound", "sum")


def copy_reply(reply: Message, to: Message) -> Message:
    """``reply``'s content, in buffers of its own (as if received), answering ``to``."""
    copy = Message(message_from_proto(message_to_proto(reply)).content, reply_to=to)
    copy.metadata.__dict__["_message_id"] = uuid.uuid4().hex  # what the SuperLink stamps on arrival
    return copy


def child_server(spec: Mapping[str, Any]) -> dict[str, Any]:
    """Benchmark 2: aggregate N replies; time, throughput and peak memory beyond model + replies."""
    quick, n_clients, rank = spec["quick"], spec["clients"], spec["rank"]
    shapes = model_shapes(spec["model"], quick)
    g = torch.Generator().manual_seed(0)
    global_model = {k: 0.02 * torch.randn(s, generator=g) for k, s in shapes.items()}
    model_bytes = total_dense_bytes(shapes)
    distinct = min(n_clients, spec["distinct"])
    config = CompressionConfig(method=spec["method"], rank=rank)
    mode = spec["mode"]
    if mode == "strategy":
        arrays = tensors_to_record(global_model)
        del global_model
        grid = LocalGrid(ClientApp(), n_clients)
        strategy = OSDStrategy(FedAvg(min_train_nodes=1, min_available_nodes=1), config=config)
        messages = list(strategy.configure_train(1, arrays, ConfigRecord(), grid))
        first = mod_replies(messages[:distinct], shapes, n_clients)
        replies = first + [copy_reply(first[i % distinct], messages[i]) for i in range(distinct, n_clients)]
        payload_bytes = len(record_to_payload(first[0].content[PAYLOAD_RECORD_KEY]))
        del messages, first

        def aggregate() -> int:
            new_arrays, metrics = strategy.aggregate_train(1, replies)
            assert isinstance(new_arrays, ArrayRecord), "aggregation failed"
            accepted = metrics.get("accepted", -1) if metrics is not None else -1
            return accepted if isinstance(accepted, int) else -1
    else:  # "loop": the decode + weighted-accumulate loop alone, float32 accumulators; "phases": reply_phases
        specs = {k: (tuple(v.shape), v.dtype) for k, v in global_model.items()}
        first = mod_replies(train_messages(global_model, config, distinct), shapes, distinct)
        blobs = [record_to_payload(r.content[PAYLOAD_RECORD_KEY]) for r in first]
        payloads = [bytes(bytearray(blobs[i % distinct])) for i in range(n_clients)]
        payload_bytes = len(blobs[0])
        del blobs, first

        def aggregate() -> int:
            acc = {k: torch.zeros(s) for k, s in shapes.items()}
            total = 0.0
            for i, blob in enumerate(payloads):
                weight = float(100 + i % 7)
                for name, tensor in iter_tensors(decode(blob, expected=specs)):
                    acc[name].add_(tensor, alpha=weight)
                total += weight
            for name, tensor in global_model.items():
                tensor.add_(acc.pop(name), alpha=1.0 / total)
            return int(n_clients)

    out: dict[str, Any] = {"clients": n_clients, "model_bytes": model_bytes, "payload_bytes": payload_bytes}
    gc.collect()
    if mode == "phases":
        out["accepted"] = n_clients
        out["phases"] = reply_phases(payloads, specs, config)
        kinds = Counter(rec.kind.name.lower() for rec in decode(payloads[0], expected=specs).records)
        out["records"] = ", ".join(f"{count} {kind}" for kind, count in sorted(kinds.items()))
        out["seconds"] = sum(out["phases"].values())
        out["load_end"] = load1()
        return out
    if spec["phase"] == "time":
        t0 = time.perf_counter()
        out["accepted"] = aggregate()
        out["seconds"] = time.perf_counter() - t0
    else:
        out["rss_before"] = rss_bytes()
        with PeakMemory(torch.device("cpu")) as mem, PeakSite() as site:
            out["accepted"] = aggregate()
        out["peak"] = mem.peak
        out["peak_at"] = site.site
    out["load_end"] = load1()
    return out


def reply_phases(payloads: list[bytes], specs: Mapping[str, Any], config: CompressionConfig) -> dict[str, float]:
    """Seconds spent in each of :data:`PHASES` over all ``payloads``, one reply at a time.

    The steps are those of :func:`strategies.replies.check_reply` and the
    strategy's :class:`~strategies.aggregation.FactorSum`, in their order.
    """
    resolved = resolve_config(config)
    limit = payload_limit({name: shape for name, (shape, _) in specs.items()}, resolved)
    sums = FactorSum(zeros(specs))
    spent = dict.fromkeys(PHASES, 0.0)
    for i, blob in enumerate(payloads):
        t0 = time.perf_counter()
        payload = decode(blob, expected=specs, max_bytes=limit, method=resolved.method)
        t1 = time.perf_counter()
        check_conformance(payload, resolved)
        t2 = time.perf_counter()
        check_value_bound(payload)  # the strategy's step 5 (strategies.replies), rejecting nothing here
        t3 = time.perf_counter()
        sums.add(payload, float(100 + i % 7))
        if i == len(payloads) - 1:
            sums.flush()
        t4 = time.perf_counter()
        for name, seconds in zip(PHASES, (t1 - t0, t2 - t1, t3 - t2, t4 - t3), strict=True):
            spent[name] += seconds
    return spent


def server_cases(args: argparse.Namespace) -> list[tuple[str, list[int]]]:
    """The (model, [N, ...]) pairs of the server sections, filtered by ``--models`` and ``--clients``."""
    cases: list[tuple[str, list[int]]] = (
        [("minilm", [10, 30]), ("bert-base", [10])]
        if args.quick
        else [("minilm", [10, 100, 1000]), ("bert-base", [10, 100]), ("bert-large", [10, 100])]
    )
    return [(m, [n for n in ns if args.clients is None or n in args.clients]) for m, ns in cases if m in args.models]


def section_server(args: argparse.Namespace) -> None:
    header("2. Server aggregation: decode, validate, weighted average of N client payloads", args)
    cases = server_cases(args)
    print(
        f"method osd, rank r={args.rank}; replies built from {args.distinct} distinct client payloads "
        "(each reply holds its own copy of the bytes); peak = RSS high-water mark during aggregation minus "
        "RSS before it (global model and all replies already resident); single-threaded Python loop plus torch ops"
    )
    for mode, title in (
        ("strategy", "OSDStrategy(FedAvg()).aggregate_train (validation, float64 sums, new ArrayRecord)"),
        ("loop", "decode(blob, expected) + iter_tensors into float32 accumulators (the core loop alone)"),
    ):
        rows = []
        for model, ns in cases:
            for n in ns:
                quiet = wait_quiet(f"server {model} N={n}")
                case = {
                    "kind": "server",
                    "model": model,
                    "quick": args.quick,
                    "clients": n,
                    "rank": args.rank,
                    "method": "osd",
                    "distinct": args.distinct,
                    "mode": mode,
                    "threads": args.threads,
                }
                res = run_child({**case, "phase": "time"})
                res.update({k: v for k, v in run_child({**case, "phase": "memory"}).items() if k != "load_end"})
                dense_total = res["model_bytes"] * n
                rows.append(
                    [
                        MODEL_LABELS[model],
                        str(n),
                        fmt_mb(res["model_bytes"]),
                        f"{res['payload_bytes'] / 1024:,.0f}",
                        f"{res['seconds']:.2f}",
                        f"{res['seconds'] / n * 1e3:.1f}",
                        f"{dense_total / GB / res['seconds']:.2f}",
                        fmt_mb(res["rss_before"]),
                        fmt_mb(res["peak"]),
                        f"{res['peak'] / res['model_bytes']:.2f}",
                        res["peak_at"],
                        str(res["accepted"]),
                        f"{quiet.split(',')[0]} / {res['load_end']:.2f}",
                    ]
                )
        print(f"\n## {title}")
        print_table(
            [
                "model",
                "N",
                "model MB",
                "payload KiB",
                "wall s",
                "ms / client",
                "dense-equiv GB/s",
                "RSS before MB",
                "peak beyond MB",
                "peak / model",
                "peak at (sampled)",
                "accepted",
                "load start / end",
            ],
            rows,
        )
    section_replies(args)


def section_replies(args: argparse.Namespace) -> None:
    """Section 2, per reply: where one reply's server time goes: ms per reply in each step of :func:`reply_phases`."""
    if args.section == "replies":
        header("2. Server time per reply: decode, conformance, value bound, sum", args)
    rows = []
    for model, ns in server_cases(args):
        for n in ns:
            wait_quiet(f"server phases {model} N={n}")
            case = {"kind": "server", "model": model, "quick": args.quick, "clients": n, "rank": args.rank}
            case.update(method="osd", distinct=args.distinct, mode="phases", threads=args.threads, phase="time")
            res = run_child(case)
            per = [res["phases"][p] / n * 1e3 for p in PHASES]
            rows.append([MODEL_LABELS[model], str(n), *(f"{x:.2f}" for x in per), f"{sum(per):.2f}", res["records"]])
    print("\n## Per reply: decode, conformance, value bound and sum, timed apart (the strategy's order)")
    print_table(["model", "N", *(f"{p} ms" for p in PHASES), "total ms / reply", "records per reply"], rows)
    print(f"load average (1 min) at end: {load1():.2f}")
