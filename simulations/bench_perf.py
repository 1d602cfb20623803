"""Performance benchmarks of osd-fl: client cost, server aggregation, codec efficiency, round overhead.

One runner, four sections (issue 6); every table in ``docs/performance.md``
is printed by one of these commands::

    python -m simulations.bench_perf --section client   # 1. compression cost per method (MiniLM, BERT, LLaMA)
    python -m simulations.bench_perf --section split    # 1b. OSD's steps timed one by one on single matrices
    python -m simulations.bench_perf --section server   # 2. server decode + aggregation, N = 10 .. 1000 clients
    python -m simulations.bench_perf --section codec    # 3. bytes vs the paper's formula and dense, framing, MB/s
    python -m simulations.bench_perf --section round    # 4. wall time of a simulated round, OSD vs dense FedAvg
    python -m simulations.bench_perf --section all
    python -m simulations.bench_perf --section all --quick   # small shapes: a smoke run of every path

How things are measured
-----------------------
* Time: ``time.perf_counter`` around the call, after one untimed warm-up;
  repeats are interleaved across methods (so a burst of load from another
  process hits every method alike) and the median is reported. On CUDA
  every timed region is bracketed by ``torch.cuda.synchronize()``.
* Peak memory (CPU): each case runs twice, in two fresh subprocesses.
  Timings use glibc's default allocator (what users run: it recycles freed
  heap memory, so few page faults); memory is measured in a process started
  with ``MALLOC_MMAP_THRESHOLD_=131072``, so glibc returns every large
  buffer to the kernel on free and the resident set follows live memory.
  (The LLaMA case times and measures the same calls in that second setting;
  its buffers are far over glibc's 32 MiB mmap ceiling anyway.) Before
  the measured call the peak resident set is reset (``echo 5 >
  /proc/self/clear_refs``) and afterwards ``VmHWM - VmRSS(before)`` from
  ``/proc/self/status`` is the peak *beyond* what was already resident
  (the inputs). psutil is not installed here; ``tracemalloc`` does not see
  torch's allocations. On CUDA: ``torch.cuda.max_memory_allocated()``
  after ``reset_peak_memory_stats()``, minus the allocation at entry.
* Updates are synthetic low-rank-plus-noise matrices of the real shapes
  (``simulations.bench_codec.synthetic_update``): timing does not depend on
  the values, and no fine-tuned checkpoint of these models is available
  offline. Importance maps for MiniLM and BERT-base are real: ``|G|`` from
  :func:`osd_fl.compute_importance` on a randomly initialised model of that
  architecture (4 batches of 16 x 64 random tokens), timed separately.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch

from osd_fl import compress, decode, decompress, encode, payload_budget
from osd_fl.budget import paper_bits
from osd_fl.codec import iter_tensors
from osd_fl.payload import Kind, TensorRecord
from simulations.bench_codec import synthetic_update
from simulations.devices import resolve_device, seeded

SECTIONS = ("client", "split", "server", "codec", "round")
MB = 1024.0**2
GB = 1024.0**3

#: Methods of the client benchmark: label -> compress options. Importance maps go to OSD only.
CLIENT_METHODS: dict[str, dict[str, Any]] = {
    "truncsvd": {"method": "truncsvd"},
    "magtruncsvd": {"method": "magtruncsvd"},
    "osd fixed c": {"method": "osd", "adaptive": False},
    "osd adaptive c": {"method": "osd"},
    "topk": {"method": "topk"},
    "powersgd": {"method": "powersgd"},
}
USES_IMPORTANCE = {"osd fixed c", "osd adaptive c"}


# ----------------------------------------------------------------------------- environment


def load1() -> float:
    """The 1-minute load average."""
    return os.getloadavg()[0]


def machine() -> dict[str, str]:
    """CPU model, cores, torch and its threads, GPU if any."""
    model = platform.processor() or "unknown"
    with contextlib.suppress(OSError), open("/proc/cpuinfo", encoding="utf-8") as fh:
        for line in fh:
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    info = {
        "cpu": model,
        "cores": str(os.cpu_count()),
        "torch": torch.__version__,
        "threads": str(torch.get_num_threads()),
        "python": platform.python_version(),
    }
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def _cpu_times() -> tuple[int, int]:
    with open("/proc/stat", encoding="ascii") as fh:
        fields = [int(x) for x in fh.readline().split()[1:]]
    idle = fields[3] + fields[4]  # idle + iowait
    return sum(fields), idle


def busy_fraction(window: float = 3.0) -> float:
    """Share of all CPUs busy over the next ``window`` seconds (this process sleeps meanwhile)."""
    total0, idle0 = _cpu_times()
    time.sleep(window)
    total1, idle1 = _cpu_times()
    return 1.0 - (idle1 - idle0) / max(1, total1 - total0)


#: Set from the command line: wait for a quiet machine before each case.
QUIET = {"max_load": 1.2, "max_busy": 0.15, "max_wait": 1200.0}


def wait_quiet(what: str) -> str:
    """Wait (up to ``--max-wait`` s) until the 1-min load and the CPU use of others are low; describe it."""
    t0 = time.time()
    while True:
        busy = busy_fraction()
        load = load1()
        if (load <= QUIET["max_load"] and busy <= QUIET["max_busy"]) or time.time() - t0 > QUIET["max_wait"]:
            break
        print(f"  [{what}: waiting for a quiet machine: load {load:.2f}, CPU busy {busy:.0%}]", file=sys.stderr)
        time.sleep(12)
    waited = time.time() - t0
    return f"load {load:.2f}, CPU busy {busy:.0%} at start" + (f" (after waiting {waited:.0f} s)" if waited > 5 else "")


def header(title: str, args: argparse.Namespace) -> None:
    m = machine()
    print(f"\n# {title}")
    print(
        f"machine: {m['cpu']}, {m['cores']} cores; torch {m['torch']} ({m['threads']} threads); "
        f"python {m['python']}; device {args.device}" + (f" ({m['gpu']})" if "gpu" in m else "")
    )
    print(f"load average (1 min) at start: {load1():.2f}; quick={args.quick}")


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ----------------------------------------------------------------------------- memory


def _status_kib(field: str) -> int:
    with open("/proc/self/status", encoding="ascii") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def rss_bytes() -> int:
    """Resident set size of this process."""
    return _status_kib("VmRSS") * 1024


@dataclass
class PeakMemory:
    """Peak memory beyond the level at entry: RSS high-water mark on CPU, allocator peak on CUDA."""

    device: torch.device
    base: int = 0
    peak: int = 0

    def __enter__(self) -> PeakMemory:
        gc.collect()
        if self.device.type == "cuda":
            sync(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.base = torch.cuda.memory_allocated(self.device)
        else:
            with open("/proc/self/clear_refs", "w", encoding="ascii") as fh:
                fh.write("5")  # reset VmHWM to the current RSS
            self.base = rss_bytes()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.device.type == "cuda":
            sync(self.device)
            self.peak = torch.cuda.max_memory_allocated(self.device) - self.base
        else:
            self.peak = _status_kib("VmHWM") * 1024 - self.base


class PeakSite:
    """Where the resident set peaks: a thread samples RSS and the main thread's stack every 0.5 ms.

    Reports the innermost frame of osd-fl or Flower code at the highest
    sample (``function:line``). Sampling can miss a peak shorter than the
    interval, so this names the phase, while :class:`PeakMemory` gives the
    exact high-water mark.
    """

    def __init__(self, interval: float = 0.0005) -> None:
        import threading

        self.interval = interval
        self.best = -1
        self.site = "?"
        self._main = threading.get_ident()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            rss = rss_bytes()
            if rss > self.best:
                frame = sys._current_frames().get(self._main)
                site = "?"
                while frame is not None:
                    path = frame.f_code.co_filename
                    if any(part in path for part in ("/osd_fl/", "/strategies/", "/flwr/")):
                        site = f"{frame.f_code.co_name}:{frame.f_lineno}"
                        break
                    frame = frame.f_back
                self.best, self.site = rss, site
            time.sleep(self.interval)

    def __enter__(self) -> PeakSite:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def run_child(spec: Mapping[str, Any]) -> dict[str, Any]:
    """Run one case in a fresh interpreter (clean allocator, its own peak RSS); return its JSON result."""
    env = dict(os.environ)
    if spec.get("phase", "memory") == "memory":  # see the module docstring
        env["MALLOC_MMAP_THRESHOLD_"] = "131072"
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    env.setdefault("TRANSFORMERS_OFFLINE", "1")
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    cmd = [sys.executable, "-m", "simulations.bench_perf", "--child", json.dumps(dict(spec))]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        sys.stderr.write(proc.stdout[-4000:] + proc.stderr[-4000:])
        raise RuntimeError(f"benchmark child {spec} failed with exit code {proc.returncode}")
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith("{"):
            out: dict[str, Any] = json.loads(line)
            return out
    raise RuntimeError(f"benchmark child {spec} printed no result")


def timed(fn: Callable[[], Any], device: torch.device) -> tuple[float, Any]:
    sync(device)
    t0 = time.perf_counter()
    out = fn()
    sync(device)
    return time.perf_counter() - t0, out


# ----------------------------------------------------------------------------- models and updates

#: (layers, hidden, heads, intermediate) of the BERT-family encoders benchmarked; quick = fewer layers.
BERT_CONFIGS: dict[str, tuple[int, int, int, int]] = {
    "minilm": (6, 384, 12, 1536),  # all-MiniLM-L6-v2, the project's text-task model
    "bert-base": (12, 768, 12, 3072),
}
MODEL_LABELS = {"minilm": "MiniLM-L6 (H384)", "bert-base": "BERT-base (H768, L12)"}


def bert_model(name: str, quick: bool, *, meta: bool = False) -> torch.nn.Module:
    """A randomly initialised BERT-family sequence classifier of ``name``'s shape (no download)."""
    from transformers import BertConfig, BertForSequenceClassification

    layers, hidden, heads, inter = BERT_CONFIGS[name]
    cfg = BertConfig(
        vocab_size=30522,
        hidden_size=hidden,
        num_hidden_layers=2 if quick else layers,
        num_attention_heads=heads,
        intermediate_size=inter,
        max_position_embeddings=512,
    )
    cfg.num_labels = 2
    if meta:
        with torch.device("meta"):
            return BertForSequenceClassification(cfg)
    with seeded(0):  # the same weights every time, the caller's generator untouched
        model = BertForSequenceClassification(cfg)
    for n, p in model.named_parameters():
        if "embeddings" in n:  # frozen, as in the text task: no gradient, not uploaded
            p.requires_grad_(False)
    return model


def update_names(model: torch.nn.Module) -> dict[str, tuple[int, ...]]:
    """Shapes of the tensors a client uploads: every parameter but the (frozen) embeddings."""
    return {n: tuple(p.shape) for n, p in model.named_parameters() if "embeddings" not in n}


def model_shapes(name: str, quick: bool) -> dict[str, tuple[int, ...]]:
    return update_names(bert_model(name, quick, meta=True))


def synthetic_importance(shapes: Mapping[str, tuple[int, ...]], seed: int) -> dict[str, torch.Tensor]:
    """Heavy-tailed non-negative maps (|N(0,1)|^2) for every matrix."""
    g = torch.Generator().manual_seed(seed + 7919)
    return {k: torch.randn(s, generator=g).square_() for k, s in shapes.items() if len(s) == 2}


def token_batches(count: int, batch: int, seq: int, seed: int) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [
        {
            "input_ids": torch.randint(1000, 30000, (batch, seq), generator=g),
            "attention_mask": torch.ones(batch, seq, dtype=torch.long),
            "labels": torch.randint(0, 2, (batch,), generator=g),
        }
        for _ in range(count)
    ]


def grad_importance(
    model: torch.nn.Module, device: torch.device, names: list[str], batches: list[dict[str, torch.Tensor]]
) -> dict[str, torch.Tensor]:
    """``Z = |G|`` of the validation loss, as a client computes it (eval mode, 4 batches)."""
    from osd_fl import compute_importance

    def loss_fn(m: torch.nn.Module, b: dict[str, torch.Tensor]) -> torch.Tensor:
        out = m(**{k: v.to(device) for k, v in b.items()})
        loss: torch.Tensor = out.loss
        return loss

    return compute_importance(model, batches, loss_fn, form="grad", num_batches=len(batches), names=names)


#: LLaMA-7B's per-layer matrices: q, k, v, o (4096 x 4096) and gate, up (11008 x 4096), down (4096 x 11008).
LLAMA_LAYER = [
    ("self_attn.q_proj", 4096, 4096),
    ("self_attn.k_proj", 4096, 4096),
    ("self_attn.v_proj", 4096, 4096),
    ("self_attn.o_proj", 4096, 4096),
    ("mlp.gate_proj", 11008, 4096),
    ("mlp.up_proj", 11008, 4096),
    ("mlp.down_proj", 4096, 11008),
]


def llama_matrices(quick: bool) -> Iterator[tuple[str, int, int]]:
    """The 224 matrices of LLaMA-7B (quick: 2 layers at a quarter of each side)."""
    layers, scale = (2, 4) if quick else (32, 1)
    for i in range(layers):
        for name, n, d in LLAMA_LAYER:
            yield f"model.layers.{i}.{name}.weight", n // scale, d // scale


def llama_update(
    n: int, d: int, seed: int, device: torch.device, out: torch.Tensor | None, zout: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """One synthetic ``dW`` (decaying rank-16 part plus 20% dense noise) and its importance map, in place."""
    g = torch.Generator(device=device).manual_seed(seed)
    rank = 16
    s = torch.logspace(0, -1.5, rank, device=device)
    u = torch.randn(n, rank, generator=g, device=device) * s
    v = torch.randn(rank, d, generator=g, device=device) / (n * d) ** 0.25
    low_std = float(s.square().sum().sqrt()) / (n * d) ** 0.25  # std of u @ v entries, without forming it
    dw = torch.randn(n, d, generator=g, device=device, out=out).mul_(0.2 * low_std)
    dw.addmm_(u, v).mul_(1e-3)
    z = torch.randn(n, d, generator=g, device=device, out=zout).square_()
    return dw, z


# ----------------------------------------------------------------------------- children


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
        "bytes": n * d * 4,
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


def _reply_content(blob: bytes, num_examples: int = 100) -> Any:
    """A client's train reply as :func:`clients.osd_mod` builds it: payload record and metrics."""
    from flwr.app import MetricRecord, RecordDict

    from osd_fl.records import (
        METRIC_COMPRESS_SECONDS,
        METRIC_DENSE_BYTES,
        METRIC_PAYLOAD_BYTES,
        PAYLOAD_RECORD_KEY,
        WEIGHT_KEY,
        payload_to_record,
    )

    metrics = MetricRecord(
        {
            WEIGHT_KEY: num_examples,
            "train-loss": 0.5,
            METRIC_COMPRESS_SECONDS: 0.25,
            METRIC_PAYLOAD_BYTES: len(blob),
            METRIC_DENSE_BYTES: 4 * 10**7,
        }
    )
    return RecordDict({PAYLOAD_RECORD_KEY: payload_to_record(blob), "metrics": metrics})


def child_server(spec: Mapping[str, Any]) -> dict[str, Any]:
    """Benchmark 2: aggregate N replies; time, throughput and peak memory beyond model + replies."""
    from flwr.app import ArrayRecord, ConfigRecord, Message
    from flwr.clientapp import ClientApp

    from osd_fl.records import tensors_to_record
    from strategies.local_grid import LocalGrid

    quick, n_clients, rank = spec["quick"], spec["clients"], spec["rank"]
    shapes = model_shapes(spec["model"], quick)
    g = torch.Generator().manual_seed(0)
    global_model = {k: 0.02 * torch.randn(s, generator=g) for k, s in shapes.items()}
    model_bytes = sum(t.numel() * 4 for t in global_model.values())
    distinct = min(n_clients, spec["distinct"])
    blobs = [
        compress(
            synthetic_update(shapes, seed=i),
            rank=rank,
            importance=synthetic_importance(shapes, i),
            method=spec["method"],
        )
        for i in range(distinct)
    ]
    gc.collect()
    mode = spec["mode"]
    out: dict[str, Any] = {"clients": n_clients, "model_bytes": model_bytes, "payload_bytes": len(blobs[0])}
    if mode == "strategy":
        from flwr.serverapp.strategy import FedAvg

        from osd_fl import CompressionConfig
        from strategies import OSDStrategy

        arrays = tensors_to_record(global_model)
        del global_model
        grid = LocalGrid(ClientApp(), n_clients)
        strategy = OSDStrategy(
            FedAvg(min_train_nodes=1, min_available_nodes=1),
            config=CompressionConfig(method=spec["method"], rank=rank),
        )
        messages = list(strategy.configure_train(1, arrays, ConfigRecord(), grid))
        replies = []
        for i, msg in enumerate(messages):
            reply = Message(_reply_content(bytes(bytearray(blobs[i % distinct]))), reply_to=msg)
            reply.metadata.__dict__["_message_id"] = uuid.uuid4().hex
            replies.append(reply)
        del blobs, messages

        def aggregate() -> int:
            new_arrays, metrics = strategy.aggregate_train(1, replies)
            assert isinstance(new_arrays, ArrayRecord), "aggregation failed"
            accepted = metrics.get("accepted", -1) if metrics is not None else -1
            return accepted if isinstance(accepted, int) else -1
    else:  # the decode + weighted-accumulate loop alone, float32 accumulators
        specs = {k: (tuple(v.shape), v.dtype) for k, v in global_model.items()}
        payloads = [bytes(bytearray(blobs[i % distinct])) for i in range(n_clients)]
        del blobs

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

    gc.collect()
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


def child_main(raw: str) -> None:
    spec = json.loads(raw)
    torch.set_num_threads(int(spec.get("threads", 2)))
    kind = spec["kind"]
    result = {"update": child_update, "llama": child_llama, "server": child_server}[kind](spec)
    print(json.dumps(result))


# ----------------------------------------------------------------------------- tables


def fmt_mb(b: float) -> str:
    return f"{b / MB:,.0f}" if b >= 10 * MB else f"{b / MB:,.1f}"


def print_table(head: list[str], rows: list[list[str]]) -> None:
    print("| " + " | ".join(head) + " |")
    print("|" + "|".join("---" for _ in head) + "|")
    for row in rows:
        print("| " + " | ".join(row) + " |")


# ----------------------------------------------------------------------------- 1. client


def section_client(args: argparse.Namespace) -> None:
    header("1. Client compression cost per method", args)
    print(
        f"rank r={args.rank}, relax c_max=3, default CompressionConfig otherwise; "
        "importance maps passed to OSD only; median of interleaved repeats after a warm-up"
    )
    methods = list(CLIENT_METHODS)
    for name in [m for m in ("minilm", "bert-base") if m in args.models]:
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
            f"({res['matrices']} matrices), {res['numel'] / 1e6:.1f} M values = {res['numel'] * 4 / MB:,.0f} MB float32"
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

    if "llama" not in args.models:
        return
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
        f"{res['numel'] / 1e9:.2f} G values = {res['numel'] * 4 / GB:.1f} GB float32 (never all in memory)"
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


# ----------------------------------------------------------------------------- 3. codec


def _record_bytes(rec: TensorRecord, value_bytes: int) -> int:
    """Kind-specific bytes of a record on the wire (what follows its name and shape)."""
    return len(encode_record_body(rec, value_bytes))


def encode_record_body(rec: TensorRecord, value_bytes: int) -> bytes:
    from osd_fl.codec import _encode_section

    vdt = "float16" if value_bytes == 2 else "float32"
    if rec.kind == Kind.LOWRANK:
        return b"\0\0" + b"".join(_encode_section(s, vdt) for s in rec.sections)
    return _encode_section(rec.sections[0], vdt)


def entropy_bits(count: int, slots: int) -> float:
    """log2 C(slots, count): the fewest bits that can name which entries are kept."""
    return (math.lgamma(slots + 1) - math.lgamma(count + 1) - math.lgamma(slots - count + 1)) / math.log(2)


def codec_stats(blob: bytes, value_bits: int, specs: Mapping[str, Any]) -> dict[str, float]:
    """Our bytes of the compressed matrices versus the paper's formula and the entropy bound."""
    payload = decode(blob, expected=specs)
    vb = value_bits // 8
    ours = paper = bound = 0.0
    kept = sparse_recs = dense_recs = 0
    dense_fixed = 0
    for rec in payload.records:
        if rec.kind == Kind.LOWRANK:
            n, d = rec.matrix_shape
            k = rec.rank
            s_a, s_b = rec.sections[0].count, rec.sections[1].count
            ours += _record_bytes(rec, vb)
            kept += s_a + s_b
            if rec.sections[0].positions is None and rec.sections[1].positions is None:
                dense_recs += 1  # dense factors: the paper's TruncSVD cost, no index
                paper += value_bits * (s_a + s_b) / 8
                bound += value_bits * (s_a + s_b) / 8
            else:
                sparse_recs += 1
                paper += paper_bits(n, d, k, s_a, s_b, value_bits) / 8
                bound += (value_bits * (s_a + s_b) + entropy_bits(s_a, n * k) + entropy_bits(s_b, k * d)) / 8
        elif rec.kind == Kind.SPARSE:
            sec = rec.sections[0]
            ours += _record_bytes(rec, vb)
            kept += sec.count
            sparse_recs += 1
            width = max(1, (sec.slots - 1).bit_length())
            paper += (value_bits + width) * sec.count / 8
            bound += (value_bits * sec.count + entropy_bits(sec.count, sec.slots)) / 8
        elif rec.kind == Kind.DENSE:
            dense_fixed += rec.numel * vb
    return {
        "ours": ours,
        "paper": paper,
        "bound": bound,
        "kept": kept,
        "sparse": sparse_recs,
        "dense_factors": dense_recs,
        "dense_tensors": dense_fixed,
    }


def section_codec(args: argparse.Namespace) -> None:
    from flwr.app import Message, RecordDict
    from flwr.clientapp import ClientApp
    from flwr.common.serde import message_to_proto

    from strategies.local_grid import LocalGrid, train_message

    header("3. Codec: bytes of the kept entries, Flower framing, encode/decode speed", args)
    ranks = [1, 4] if args.quick else [1, 4, 16]
    variants: list[tuple[str, dict[str, Any], int]] = [
        ("osd adaptive c", {"method": "osd"}, 32),
        ("osd fixed c", {"method": "osd", "adaptive": False}, 32),
        ("magtruncsvd", {"method": "magtruncsvd"}, 32),
        ("topk", {"method": "topk"}, 32),
        ("osd adaptive c, fp16", {"method": "osd", "value_dtype": "float16"}, 16),
    ]
    models = ["minilm", "bert-base"]
    LocalGrid(ClientApp(), 1)  # sets Flower's process-wide task identity, which replies need
    rows: list[list[str]] = []
    frame_rows: list[list[str]] = []
    speed_rows: list[list[str]] = []
    for model in models:
        print(f"{model}: {wait_quiet(f'codec {model}')}")
        shapes = model_shapes(model, args.quick)
        update = synthetic_update(shapes, seed=0)
        imp = synthetic_importance(shapes, 0)
        dense_bytes = sum(math.prod(s) * 4 for s in shapes.values())
        specs = {k: (s, torch.float32) for k, s in shapes.items()}
        for rank in ranks:
            for label, opts, vbits in variants:
                z = imp if opts["method"] == "osd" else None
                blob = compress(update, rank=rank, importance=z, **opts)
                st = codec_stats(blob, vbits, specs)
                budget = payload_budget(shapes, rank=rank, **opts)
                rows.append(
                    [
                        MODEL_LABELS[model],
                        str(rank),
                        label,
                        f"{st['kept']:,}",
                        f"{st['sparse']}/{st['dense_factors']}",
                        f"{st['ours']:,.0f}",
                        f"{st['paper']:,.0f}",
                        f"{st['ours'] / st['paper']:.3f}",
                        f"{st['bound'] / st['paper']:.3f}",
                        f"{len(blob):,}",
                        f"{len(blob) / budget:.3f}",
                        f"{len(blob) / dense_bytes:.4f}",
                    ]
                )
                if label != "osd adaptive c":
                    continue
                # Flower framing: the reply message as serialized by Flower
                msg = train_message(RecordDict(), 1001)
                reply = Message(_reply_content(blob), reply_to=msg)
                size = message_to_proto(reply).ByteSize()
                frame_rows.append(
                    [
                        MODEL_LABELS[model],
                        str(rank),
                        f"{len(blob):,}",
                        f"{size:,}",
                        f"{size - len(blob):,}",
                        f"{100 * (size - len(blob)) / size:.3f}%",
                    ]
                )
                # encode / decode / rebuild speed (median of repeats)
                payload = decode(blob, expected=specs)
                reps = max(3, args.repeats)
                t_enc = statistics.median(_repeat(partial(encode, payload), reps))
                t_dec = statistics.median(_repeat(partial(decode, blob, expected=specs), reps))
                t_full = statistics.median(_repeat(partial(decompress, blob, expected=specs), reps))
                t_comp = statistics.median(
                    _repeat(partial(compress, update, rank=rank, importance=imp), max(1, reps // 2))
                )
                speed_rows.append(
                    [
                        MODEL_LABELS[model],
                        str(rank),
                        f"{len(blob) / MB:.2f}",
                        f"{len(blob) / MB / t_enc:,.0f}",
                        f"{len(blob) / MB / t_dec:,.0f}",
                        f"{t_full * 1e3:.1f}",
                        f"{dense_bytes / MB / t_full:,.0f}",
                        f"{dense_bytes / MB / t_comp:,.0f}",
                    ]
                )
    print("\n## Bytes of the compressed matrices: ours vs the paper's formula (same kept entries)")
    print(
        "ours = kind-specific bytes of every compressed matrix (rank field, section headers, positions, values); "
        "paper = mu/8 with mu = b(s_A+s_B) + ceil(log2(n k)) s_A + ceil(log2(k d)) s_B (b = value bits; "
        "a dense-factor record, c = 0, is charged b(s_A+s_B), TruncSVD's cost; top-k: (b + ceil(log2(n d))) s); "
        "bound = values + log2 C(slots, kept) per section (the fewest bits any position code can use)"
    )
    print_table(
        [
            "model",
            "r",
            "method",
            "kept entries",
            "sparse/dense-factor records",
            "ours B",
            "paper B",
            "ours / paper",
            "bound / paper",
            "payload B",
            "payload / budget",
            "payload / dense fp32",
        ],
        rows,
    )
    print("\n## Flower framing of the reply (osd adaptive c)")
    print(
        "message = flwr.common.serde.message_to_proto(reply).ByteSize() of the train reply as clients.osd_mod "
        "builds it (payload ArrayRecord + MetricRecord of 5 metrics + metadata)"
    )
    print_table(["model", "r", "payload B", "message B", "framing B", "framing share"], frame_rows)
    print("\n## Encode / decode throughput (osd adaptive c, median)")
    print(
        "encode = codec.encode(Payload) (positions, values, CRC); decode = codec.decode with expected shapes "
        "(parse + validate, no tensors); decompress = decode + rebuild every dense tensor; "
        "MB/s of payload bytes, dense-equivalent = float32 size of the rebuilt update"
    )
    print_table(
        [
            "model",
            "r",
            "payload MB",
            "encode MB/s",
            "decode MB/s",
            "decompress ms",
            "decompress dense-equiv MB/s",
            "compress dense-equiv MB/s",
        ],
        speed_rows,
    )
    print(f"load average (1 min) at end: {load1():.2f}")


def _repeat(fn: Callable[[], Any], reps: int) -> list[float]:
    fn()
    out = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return out


# ----------------------------------------------------------------------------- 1b. split

#: Matrix shapes of the split section: MiniLM (384 x 384, 1536 x 384), BERT-base (3072 x 768), LLaMA-7B.
SPLIT_SHAPES = [(384, 384), (1536, 384), (3072, 768), (4096, 4096), (11008, 4096)]
SPLIT_SHAPES_QUICK = [(384, 384), (1536, 384), (1024, 1024)]


def _split_case(n: int, d: int, cfg: Any, device: torch.device, repeats: int) -> dict[str, float]:
    """Median ms of each step of OSD adaptive c (and of the totals) on one synthetic ``n x d`` matrix."""
    import osd_fl.osd as osd_module
    from osd_fl.budget import LOWRANK_OVERHEAD
    from osd_fl.selection import select
    from osd_fl.svd import split_factors, truncated_svd

    r, cmax = cfg.rank, cfg.relax
    mat, z = llama_update(n, d, 11, device, None, None)
    budget = r * (n + d) * cfg.value_bytes - LOWRANK_OVERHEAD
    gen = torch.Generator(device=device)

    def svd(k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        gen.manual_seed(0)
        return truncated_svd(mat, k, mode=cfg.svd, oversample=cfg.oversample, niter=cfg.niter, generator=gen)

    a_max, b_max = split_factors(*svd(r + cmax), r + cmax)
    scored = osd_module.damage_scores(a_max, b_max, z, cfg.damage)
    approx: list[tuple[torch.Tensor, torch.Tensor]] = [(a_max[:, :r].contiguous(), b_max[:r])]
    for c in range(1, cmax + 1):
        k = r + c
        pos_a, pos_b = select([scored[0][:, :k], scored[1][:k]], cfg.value_bytes, budget)
        approx.append((osd_module._masked(a_max[:, :k].contiguous(), pos_a), osd_module._masked(b_max[:k], pos_b)))

    def errors(block: int) -> Callable[[], Any]:
        def run() -> Any:
            saved = osd_module.BLOCK_BYTES
            osd_module.BLOCK_BYTES = block
            try:
                return osd_module.candidate_errors(mat, z, approx, include_base=False)
            finally:
                osd_module.BLOCK_BYTES = saved

        return run

    def selections() -> None:
        for c in range(1, cmax + 1):
            select([scored[0][:, : r + c], scored[1][: r + c]], cfg.value_bytes, budget)

    steps: dict[str, Callable[[], Any]] = {
        "truncsvd": lambda: compress({"w": mat}, config=cfg, method="truncsvd"),
        "osd adaptive": lambda: compress({"w": mat}, config=cfg, importance={"w": z}),
        "osd fixed": lambda: compress({"w": mat}, config=cfg, importance={"w": z}, adaptive=False),
        "svd r": lambda: svd(r),
        "svd r+c": lambda: svd(r + cmax),
        "scores": lambda: osd_module.damage_scores(a_max, b_max, z, cfg.damage),
        "selections": selections,
        "errors": errors(osd_module.BLOCK_BYTES),
        "errors 256K": errors(1 << 18),
    }
    times: dict[str, list[float]] = {name: [] for name in steps}
    for fn in steps.values():
        fn()  # warm-up
    for _ in range(repeats):
        for name, fn in steps.items():
            t, _ = timed(fn, device)
            times[name].append(t * 1e3)
    return {name: statistics.median(v) for name, v in times.items()}


def section_split(args: argparse.Namespace) -> None:
    """Where OSD's time goes on one matrix: the steps of ``encode_matrix`` timed one by one."""
    import osd_fl.osd as osd_module
    from osd_fl import CompressionConfig

    header("1b. Where OSD's time goes: the steps of adaptive c on one matrix (weighted path)", args)
    cfg = CompressionConfig(rank=args.rank)
    r, cmax = cfg.rank, cfg.relax
    device = torch.device(args.device)
    print(
        f"rank r={r}, c_max={cmax}, randomized SVD (oversample {cfg.oversample}, niter {cfg.niter}) where "
        f"`auto` picks it; importance map as in the LLaMA case; median of {args.repeats} interleaved repeats, ms. "
        "`rest` = OSD adaptive total minus the timed steps (policy, records, masks, encoding)."
    )
    rows = []
    for n, d in SPLIT_SHAPES_QUICK if args.quick else SPLIT_SHAPES:
        quiet = wait_quiet(f"split {n}x{d}")
        med = _split_case(n, d, cfg, device, args.repeats)
        gc.collect()
        rest = med["osd adaptive"] - med["svd r+c"] - med["scores"] - med["selections"] - med["errors"]
        rows.append(
            [
                f"{n}x{d}",
                f"{med['truncsvd']:.1f}",
                f"{med['osd fixed']:.1f} ({med['osd fixed'] / med['truncsvd']:.2f}x)",
                f"{med['osd adaptive']:.1f} ({med['osd adaptive'] / med['truncsvd']:.2f}x)",
                f"{med['svd r']:.1f}",
                f"{med['svd r+c']:.1f}",
                f"{med['scores']:.1f}",
                f"{med['selections']:.1f}",
                f"{med['errors']:.1f}",
                f"{med['errors 256K']:.1f}",
                f"{rest:.1f}",
                quiet.split(",")[0],
            ]
        )
    block_kib = osd_module.BLOCK_BYTES // 1024
    print_table(
        [
            "matrix",
            "TruncSVD total",
            "OSD fixed c total",
            "OSD adaptive c total",
            f"SVD rank {r}",
            f"SVD rank {r + cmax}",
            "damage scores",
            f"{cmax} selections",
            f"candidate errors ({block_kib:,} KiB blocks)",
            "candidate errors (256 KiB blocks)",
            "rest",
            "load at start",
        ],
        rows,
    )
    print(f"load average (1 min) at end: {load1():.2f}")


# ----------------------------------------------------------------------------- 2. server


def section_server(args: argparse.Namespace) -> None:
    header("2. Server aggregation: decode, validate, weighted average of N client payloads", args)
    cases: list[tuple[str, list[int]]] = (
        [("minilm", [10, 30]), ("bert-base", [10])]
        if args.quick
        else [("minilm", [10, 100, 1000]), ("bert-base", [10, 100])]
    )
    cases = [(m, [n for n in ns if args.clients is None or n in args.clients]) for m, ns in cases if m in args.models]
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
    print(f"load average (1 min) at end: {load1():.2f}")


# ----------------------------------------------------------------------------- 4. round


def synthetic_client_app(shapes: Mapping[str, tuple[int, ...]]) -> Any:
    """A ClientApp (with :func:`clients.osd_mod`) whose "training" adds a fixed synthetic update.

    Each node draws its update and importance maps once and reuses them, so
    a round costs what the protocol costs: messages, compression, decoding
    and aggregation, not training. Importance maps are attached only when
    the server asked for OSD (``osd.*`` keys in the train config).
    """
    from flwr.app import Context, Message, MetricRecord, RecordDict
    from flwr.clientapp import ClientApp

    from clients import osd_mod
    from osd_fl.records import CONFIG_PREFIX, IMPORTANCE_RECORD_KEY, record_to_tensors, tensors_to_record

    app = ClientApp(mods=[osd_mod])
    cache: dict[int, tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]] = {}

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        node = int(context.node_id)
        if node not in cache:
            cache[node] = (synthetic_update(dict(shapes), seed=node), synthetic_importance(shapes, node))
        delta, imp = cache[node]
        arrays = next(iter(msg.content.array_records.values()))
        trained = {k: v + delta[k] for k, v in record_to_tensors(arrays).items()}
        content = RecordDict(
            {"arrays": tensors_to_record(trained), "metrics": MetricRecord({"num-examples": 100, "train-loss": 0.5})}
        )
        asks_osd = any(k.startswith(CONFIG_PREFIX) for rec in msg.content.config_records.values() for k in rec)
        if asks_osd:
            content[IMPORTANCE_RECORD_KEY] = tensors_to_record(imp)
        return Message(content=content, reply_to=msg)

    return app


def _run_rounds(
    app: Any,
    initial: Mapping[str, torch.Tensor],
    clients: int,
    rounds: int,
    osd: dict[str, Any] | None,
    train_config: Mapping[str, Any],
) -> tuple[float, dict[str, int], float]:
    """Wall time of ``strategy.start`` for ``rounds`` rounds (no evaluation), bytes up, client compress s."""
    from flwr.app import ConfigRecord
    from flwr.serverapp.strategy import FedAvg, Strategy

    from osd_fl import CompressionConfig
    from osd_fl.records import METRIC_COMPRESS_SECONDS, tensors_to_record
    from strategies import ByteMeter, MeteredGrid, OSDStrategy
    from strategies.local_grid import LocalGrid

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
    import logging

    header("4. Round overhead: a simulated round with OSD versus dense FedAvg", args)
    from flwr.common.logger import console_handler

    console_handler.setLevel(logging.WARNING)  # Flower's per-round INFO summary would bury the table
    from simulations.digits_client import app as digits_app
    from simulations.digits_task import build_model

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


# ----------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--section", choices=[*SECTIONS, "all"], default="all")
    ap.add_argument("--quick", action="store_true", help="small shapes and fewer clients: a smoke run")
    ap.add_argument("--device", default="cpu", help="cpu, cuda or auto")
    ap.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    ap.add_argument("--rank", type=int, default=1, help="budget rank r")
    ap.add_argument("--repeats", type=int, default=5, help="timed repeats (median reported)")
    ap.add_argument("--distinct", type=int, default=8, help="server: distinct client payloads cycled over N replies")
    ap.add_argument(
        "--models",
        default="minilm,bert-base,llama",
        help="client and server sections: comma-separated subset of the models (server: minilm, bert-base)",
    )
    ap.add_argument("--clients", default=None, help="server section: comma-separated subset of N (e.g. 10,100)")
    ap.add_argument("--max-load", type=float, default=1.2, help="wait for a 1-min load average below this")
    ap.add_argument("--max-busy", type=float, default=0.15, help="... and for others' CPU use below this share")
    ap.add_argument("--max-wait", type=float, default=1200.0, help="seconds to wait for that before each case")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    args.models = set(args.models.split(","))
    args.clients = None if args.clients is None else {int(n) for n in args.clients.split(",")}
    QUIET.update(max_load=args.max_load, max_busy=args.max_busy, max_wait=args.max_wait)
    if args.child:
        child_main(args.child)
        return
    torch.set_num_threads(args.threads)
    args.device = str(resolve_device(args.device))  # children get "cpu" or "cuda", never "auto"
    sections = SECTIONS if args.section == "all" else (args.section,)
    runners = {
        "client": section_client,
        "split": section_split,
        "server": section_server,
        "codec": section_codec,
        "round": section_round,
    }
    for s in ("client", "split", "codec", "server", "round"):
        if s in sections:
            runners[s](args)


if __name__ == "__main__":
    main()
