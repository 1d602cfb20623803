"""osd_fl.timing: phases are measured only inside a recorder, and cost nothing outside one."""

from __future__ import annotations

import threading

import torch

from osd_fl import timing
from osd_fl.compressor import CompressorState, MatrixItem, get_compressor
from osd_fl.config import CompressionConfig
from osd_fl.sizes import matrix_budget


def test_phases_accumulate_only_while_recording() -> None:
    with timing.phase("outside"):
        pass
    calls = []
    with timing.record(sync=lambda: calls.append(1)) as phases:
        for _ in range(3):
            with timing.phase("a"), timing.phase("b"):
                pass
    assert set(phases) == {"a", "b"} and all(v >= 0 for v in phases.values())
    assert len(calls) == 12  # before and after each of the six phases
    with timing.phase("later"):
        pass
    assert "later" not in phases
    assert timing.phase("x") is timing.phase("y")  # off: one shared no-op, nothing allocated


def test_recorders_are_per_thread() -> None:
    seen: dict[str, dict[str, float]] = {}

    def work(name: str) -> None:
        with timing.record() as phases, timing.phase(name):
            pass
        seen[name] = phases

    threads = [threading.Thread(target=work, args=(n,)) for n in ("t1", "t2")]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert set(seen["t1"]) == {"t1"} and set(seen["t2"]) == {"t2"}


def test_compressors_mark_their_phases() -> None:
    mat = torch.randn(80, 60, generator=torch.Generator().manual_seed(0))
    item = MatrixItem("w", (80, 60), "float32", mat)
    for method, want in (("osd", {"svd", "scores", "select", "candidates", "record"}), ("truncsvd", {"svd", "record"})):
        # rank-2 float32 TruncSVD's bytes: no relaxed candidate fits whole, so adaptive c compares them
        comp = get_compressor(CompressionConfig(method=method, rank=2, value_dtype="float32"))
        with timing.record() as phases:
            comp.encode_matrix(item, matrix_budget(80, 60, 2, "float32"), CompressorState())
        assert set(phases) == want
