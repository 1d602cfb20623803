"""Performance benchmarks of osd-fl: client cost, server aggregation, codec efficiency, round overhead.

One runner, four sections (issue 6); every table in ``docs/performance.md``
is printed by one of these commands::

    python -m simulations.bench.perf --section client   # 1. compression cost per method (MiniLM, BERT, LLaMA)
    python -m simulations.bench.perf --section split    # 1b. OSD's steps timed one by one on single matrices
    python -m simulations.bench.perf --section server   # 2. server decode + aggregation, N = 10 .. 1000 clients
    python -m simulations.bench.perf --section replies  # 2, per reply (also printed by 2): server time by step
    python -m simulations.bench.perf --section codec    # 3. bytes vs the paper's formula and dense, framing, MB/s
    python -m simulations.bench.perf --section round    # 4. wall time of a simulated round, OSD vs dense FedAvg
    python -m simulations.bench.perf --section all
    python -m simulations.bench.perf --section all --quick   # small shapes: a smoke run of every path

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
  (``simulations.bench.workloads.synthetic_update``): timing does not depend on
  the values, and no fine-tuned checkpoint of these models is available
  offline. Importance maps for MiniLM and BERT-base are real: ``|G|`` from
  :func:`osd_fl.compute_importance` on a randomly initialised model of that
  architecture (4 batches of 16 x 64 random tokens), timed separately.
"""

from __future__ import annotations

import argparse
import json

import torch

from simulations.bench.client import child_llama, child_update, section_client
from simulations.bench.codec import section_codec
from simulations.bench.harness import QUIET
from simulations.bench.rounds import section_round
from simulations.bench.server import child_server, section_replies, section_server
from simulations.bench.split import section_split
from simulations.devices import resolve_device

SECTIONS = ("client", "split", "server", "replies", "codec", "round")


def child_main(raw: str) -> None:
    spec = json.loads(raw)
    torch.set_num_threads(int(spec.get("threads", 2)))
    kind = spec["kind"]
    result = {"update": child_update, "llama": child_llama, "server": child_server}[kind](spec)
    print(json.dumps(result))


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
        help="client and server sections: comma-separated subset of the models (server: minilm, bert-base, bert-large)",
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
    # "all": the server section prints 2b itself
    sections: tuple[str, ...] = (
        tuple(s for s in SECTIONS if s != "replies") if args.section == "all" else (args.section,)
    )
    runners = {
        "client": section_client,
        "split": section_split,
        "server": section_server,
        "replies": section_replies,
        "codec": section_codec,
        "round": section_round,
    }
    for s in ("client", "split", "codec", "server", "replies", "round"):
        if s in sections:
            runners[s](args)


if __name__ == "__main__":
    main()
