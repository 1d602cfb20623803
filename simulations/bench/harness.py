"""How the benchmarks measure: machine facts, waiting for quiet, timing, peak memory, child processes, tables."""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import platform
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch

MB = 1024.0**2


GB = 1024.0**3


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
    cmd = [sys.executable, "-m", "simulations.bench.perf", "--child", json.dumps(dict(spec))]
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


def fmt_mb(b: float) -> str:
    return f"{b / MB:,.0f}" if b >= 10 * MB else f"{b / MB:,.1f}"


def print_table(head: list[str], rows: list[list[str]]) -> None:
    print("| " + " | ".join(head) + " |")
    print("|" + "|".join("---" for _ in head) + "|")
    for row in rows:
        print("| " + " | ".join(row) + " |")


def repeat(fn: Callable[[], Any], reps: int) -> list[float]:
    fn()
    out = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return out
