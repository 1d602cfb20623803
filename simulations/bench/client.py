"""1. Client compression cost per method (MiniLM, BERT-base, a LLaMA-7B-shaped update streamed)."""

from __future__ import annotations

import argparse
import gc
import math
import statistics
import time
from collections.abc import Callable, Mapping
from functools import partial
from typing import Any

import torch

from osd_fl import compress, methods_with
from osd_fl.sizes import value_bytes
from simulations.bench.harness import (
    GB,
    MB,
    PeakMemory,
    fmt_mb,
    header,
    load1,
    print_table,
    rss_bytes,
    run_child,
    sync,
    timed,
    wait_quiet,
)
from simulations.bench.workloads import (
    MODEL_LABELS,
    bert_model,
    grad_importance,
    llama_matrices,
    llama_update,
    synthetic_update,
    token_batches,
    update_names,
)
from simulations.devices import resolve_device

#: Methods of the client benchmark: label -> compress options. Importance maps go to OSD only, except
#: to the ``Z = ones`` rows: OSD without a map, the default since the importance comparison of
#: docs/results.md (``importance="ones"``), which takes cheaper paths (no products with ``Z``).
CLIENT_METHODS: dict[str, dict[str, Any]] = {
    "truncsvd": {"method": "truncsvd"},
    "magtruncsvd": {"method": "magtruncsvd"},
    "osd fixed c": {"method": "osd", "adaptive": False, "value_dtype": "float32"},
    "osd adaptive c": {"method": "osd", "value_dtype": "float32"},
    "osd fixed c, Z = ones": {"method": "osd", "adaptive": False, "value_dtype": "float32"},
    "osd adaptive c, Z = ones": {"method": "osd", "value_dtype": "float32"},
    # the library default since 2026-12-03: int8 values within float32 TruncSVD's bytes
    "osd int8 (default), Z = ones": {"method": "osd"},
    "topk": {"method": "topk"},
    "powersgd": {"method": "powersgd"},
}


#: Bytes of one float32 value.
FLOAT32 = value_bytes("float32")
USES_IMPORTANCE = {
    label
    for label, opts in CLIENT_METHODS.items()
    if opts["method"] in methods_with("uses_importance") and not label.endswith("Z = ones")
}


def _timed_importance(
    name: str, quick: bool, device: torch.device, repeats: int
) -> tuple[dict[str, tuple[int, ...]], dict[str, torch.Tensor], list[float], Callable[[], int]]:
    """Shapes of the update, its importance maps, the times to compute them and a peak-memory probe."""
    model = bert_model(name, quick).to(device)
    shapes = update_names(model)
    matrices = [n for n, s in shapes.items() if len(s) == 2]
    batches = token_batches(4, 16, 64, seed=1)
    grad_importance(model, device, matrices, batches[:1])  # warm-up
    times: list[float] = []
    for _ in range(repeats):
        t, _ = timed(partial(grad_importance, model, device, matrices, batches), device)
        times.append(t)
    imp = grad_importance(model, device, matrices, batches)

    def peak() -> int:
        with PeakMemory(device) as mem:
            grad_importance(model, device, matrices, batches)
        return mem.peak

    return shapes, imp, times, peak


def child_update(spec: Mapping[str, Any]) -> dict[str, Any]:
    """Benchmark 1 for a whole model update held in memory (MiniLM, BERT-base)."""
    device = resolve_device(spec["device"])
    shapes, imp, imp_times, imp_peak_fn = _timed_importance(
        spec["model"], spec["quick"], device, spec["importance_repeats"]
    )
    matrices = [n for n, s in shapes.items() if len(s) == 2]
    update = {k: v.to(device) for k, v in synthetic_update(shapes, seed=spec["seed"]).items()}
    rank = spec["rank"]
    results: dict[str, dict[str, Any]] = {}
    methods = list(spec["methods"])

    def call(label: str) -> bytes:
        z = imp if label in USES_IMPORTANCE else None
        return compress(update, rank=rank, importance=z, **CLIENT_METHODS[label])

    for label in methods:  # warm-up
        call(label)
    if spec["phase"] == "time":
        times: dict[str, list[float]] = {m: [] for m in methods}
        for _ in range(spec["repeats"]):
            for label in methods:
                t, _ = timed(partial(call, label), device)
                times[label].append(t)
        results = {label: {"times": times[label]} for label in methods}
        imp_peak = 0
    else:
        imp_peak = imp_peak_fn()
        for label in methods:
            with PeakMemory(device) as mem:
                blob = call(label)
            results[label] = {"peak": mem.peak, "bytes": len(blob)}
    numel = sum(math.prod(s) for s in shapes.values())
    return {
        "model": spec["model"],
        "tensors": len(shapes),
        "matrices": len(matrices),
        "numel": numel,
        "importance_times": imp_times,
        "importance_peak": imp_peak,
        "methods": results,
        "load_end": load1(),
    }


def _bandwidth_probe(device: torch.device, n: int, d: int, reps: int = 5) -> dict[str, Any]:
    """Seconds of one pass over an ``n x d`` float32 matrix: read (sum), read+write (mul_), skinny GEMM."""
    g = torch.Generator(device=device).manual_seed(0)
    m = torch.randn(n, d, generator=g, device=device)
    omega = torch.randn(d, 14, generator=g, device=device)

    def med(fn: Callable[[], Any]) -> float:
        fn()
        return statistics.median(timed(fn, device)[0] for _ in range(reps))

    return {
        "shape": f"{n}x{d}",
        "bytes": n * d * FLOAT32,
        "read_s": med(m.sum),
        "rw_s": med(partial(m.mul_, 1.0)),
        "gemm14_s": med(partial(torch.matmul, m, omega)),
    }


def child_llama(spec: Mapping[str, Any]) -> dict[str, Any]:
    """Benchmark 1 for the LLaMA-7B-shaped update, streamed one matrix at a time."""
    device = resolve_device(spec["device"])
    rank = spec["rank"]
    methods = list(spec["methods"])
    # warm-up every method on a small matrix (first LAPACK / allocator calls)
    wdw, wz = llama_update(512, 512, 0, device, None, None)
    for label in methods:
        wimp = {"w": wz} if label in USES_IMPORTANCE else None
        compress({"w": wdw}, rank=rank, importance=wimp, **CLIENT_METHODS[label])
    del wdw, wz
    probe = _bandwidth_probe(device, *(max(llama_matrices(spec["quick"]), key=lambda m: m[1] * m[2])[1:]))
    gen_s = 0.0
    per: dict[str, dict[str, Any]] = {m: {"time": 0.0, "peak": 0, "bytes": 0, "by_shape": {}} for m in methods}
    buffers: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor]] = {}
    base_rss = 0
    count = 0
    numel = 0
    for index, (name, n, d) in enumerate(llama_matrices(spec["quick"])):
        t0 = time.perf_counter()
        out, zout = buffers.get((n, d), (None, None))
        # only one shape's buffers live at a time: drop the others
        if out is None:
            buffers.clear()
            gc.collect()
        dw, z = llama_update(n, d, 1000 + index, device, out, zout)
        buffers[(n, d)] = (dw, z)
        sync(device)
        gen_s += time.perf_counter() - t0
        base_rss = max(base_rss, rss_bytes())
        count += 1
        numel += n * d
        for label in methods:
            imp = {name: z} if label in USES_IMPORTANCE else None
            call = partial(compress, {name: dw}, rank=rank, importance=imp, **CLIENT_METHODS[label])
            with PeakMemory(device) as mem:
                t, blob = timed(call, device)
            rec = per[label]
            rec["time"] += t
            rec["peak"] = max(rec["peak"], mem.peak)
            rec["bytes"] += len(blob)
            rec["by_shape"].setdefault(f"{n}x{d}", []).append(t)
    return {
        "matrices": count,
        "numel": numel,
        "probe": probe,
        "generate_s": gen_s,
        "rss_with_inputs": base_rss,
        "methods": per,
        "load_end": load1(),
    }


def section_client(args: argparse.Namespace) -> None:
    header("1. Client compression cost per method", args)
    print(
        f"rank r={args.rank}, relax c_max=3, default CompressionConfig otherwise; "
        "importance maps passed to OSD only; median of interleaved repeats after a warm-up"
    )
    methods = list(CLIENT_METHODS)
    for name in [m for m in ("minilm", "bert-base") if m in args.models]:
        client_model(args, name, methods)
    if "llama" in args.models:
        client_llama(args, methods)


def client_model(args: argparse.Namespace, name: str, methods: list[str]) -> None:
    """One model's whole update compressed by every method: times in one child, memory in another."""
    spec = {
        "kind": "update",
        "model": name,
        "quick": args.quick,
        "rank": args.rank,
        "repeats": args.repeats if name == "minilm" else max(1, args.repeats // 2),
        "importance_repeats": 3,
        "methods": methods,
        "device": args.device,
        "threads": args.threads,
        "seed": 0,
    }
    quiet = wait_quiet(name)
    res = run_child({**spec, "phase": "time"})
    mem = run_child({**spec, "phase": "memory", "importance_repeats": 0})
    for label, r in mem["methods"].items():
        res["methods"][label].update(r)
    res["importance_peak"] = mem["importance_peak"]
    imp = statistics.median(res["importance_times"])
    base = statistics.median(res["methods"]["truncsvd"]["times"])
    print(
        f"\n## {MODEL_LABELS[name]}{' (2 layers, quick)' if args.quick else ''}: {res['tensors']} tensors "
        f"({res['matrices']} matrices), {res['numel'] / 1e6:.1f} M values = "
        f"{res['numel'] * FLOAT32 / MB:,.0f} MB float32"
    )
    print(
        f"importance Z = |G| (4 batches of 16 x 64 tokens, forward + backward): "
        f"median {imp:.3f} s (of {len(res['importance_times'])}), peak +{fmt_mb(res['importance_peak'])} MB"
    )
    rows = []
    for label in methods:
        r = res["methods"][label]
        t = statistics.median(r["times"])
        rows.append(
            [
                label,
                f"{t:.3f}",
                f"{min(r['times']):.3f}",
                f"{t / base:.2f}",
                f"{r['bytes']:,}",
                fmt_mb(r["peak"]),
            ]
        )
    print_table(
        ["method", "compress s (median)", "min s", "x TruncSVD", "payload bytes", "peak MB beyond inputs"], rows
    )
    print(f"(repeats: {len(res['methods']['truncsvd']['times'])}; {quiet}; load at end {res['load_end']:.2f})")


def client_llama(args: argparse.Namespace, methods: list[str]) -> None:
    """The LLaMA-7B-shaped update streamed matrix by matrix, and a memory-bandwidth probe for scale."""
    spec = {
        "kind": "llama",
        "quick": args.quick,
        "rank": args.rank,
        "methods": methods,
        "device": args.device,
        "threads": args.threads,
    }
    quiet = wait_quiet("llama")
    res = run_child(spec)
    per = res["methods"]
    base = per["truncsvd"]["time"]
    shape_note = "2 layers, sides / 4 (quick)" if args.quick else "32 layers"
    print(
        f"\n## LLaMA-7B-shaped update, streamed matrix by matrix ({shape_note}): {res['matrices']} matrices, "
        f"{res['numel'] / 1e9:.2f} G values = {res['numel'] * FLOAT32 / GB:.1f} GB float32 (never all in memory)"
    )
    print(
        f"synthetic generation of dW and Z (excluded below): {res['generate_s']:.1f} s; "
        f"process RSS with one matrix and its Z resident: {fmt_mb(res['rss_with_inputs'])} MB"
    )
    rows = []
    for label in methods:
        r = per[label]
        medians = ", ".join(f"{k}: {statistics.median(v):.2f}" for k, v in r["by_shape"].items())
        rows.append(
            [label, f"{r['time']:.1f}", f"{r['time'] / base:.2f}", medians, f"{r['bytes']:,}", fmt_mb(r["peak"])]
        )
    print_table(
        [
            "method",
            "total compress s",
            "x TruncSVD",
            "median s per matrix by shape",
            "payload bytes",
            "peak MB beyond inputs",
        ],
        rows,
    )
    print(f"(one pass over all matrices; {quiet}; load at end {res['load_end']:.2f})")
    pr = res["probe"]
    print(
        f"memory-bandwidth probe on one {pr['shape']} float32 matrix ({pr['bytes'] / MB:.0f} MB): "
        f"read pass (sum) {pr['read_s'] * 1e3:.1f} ms = {pr['bytes'] / GB / pr['read_s']:.1f} GB/s; "
        f"read+write pass (mul_) {pr['rw_s'] * 1e3:.1f} ms; M @ (d x 14) {pr['gemm14_s'] * 1e3:.1f} ms"
    )
    big = pr["shape"]
    rows = []
    for label in methods:
        times = per[label]["by_shape"].get(big)
        if times:
            t = statistics.median(times)
            rows.append([label, f"{t * 1e3:.0f}", f"{t / pr['read_s']:.1f}", f"{t / pr['rw_s']:.1f}"])
    print(f"time per {big} matrix in units of one pass over it (what bounds each method):")
    print_table(["method", "ms per matrix (median)", "= read passes", "= read+write passes"], rows)
