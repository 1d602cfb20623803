"""Peak memory stays bounded while hostile payloads are rejected.

``tracemalloc`` sees every Python and NumPy allocation of the decoder (NumPy
reports its buffers to it), so a size field that made the decoder allocate
what it claims would show up as a peak of gigabytes. A subprocess also checks
the process's resident-set high-water mark (``ru_maxrss``, which counts torch
too) across the whole server path: ``decompress`` and
``OSDStrategy.aggregate_train`` fed size bombs.
"""

from __future__ import annotations

import json
import struct
import subprocess
import sys
import textwrap
import tracemalloc
from collections.abc import Callable

import numpy as np
import pytest

from osd_fl import PayloadError
from osd_fl.codec import decode
from osd_fl.payload import Kind
from osd_fl.positions import Coding, index_width
from tests.test_security_fuzz_decoder import raw_payload, raw_record, raw_section

TERA = (10**6, 10**6)  # 10**12 elements
Specs = dict[str, tuple[tuple[int, ...], str]]
BIG: Specs = {"x": (TERA, "float32")}  # a model as large as the claim, so the shape check passes

#: name -> (payload, expected): every one claims at least 10**12 elements (or 2**32-1 of something).
BOMBS: dict[str, tuple[bytes, Specs | None]] = {
    "dense 1e12, no model": (raw_payload([raw_record(b"x", Kind.DENSE, TERA, b"\x00" * 16)]), None),
    "dense 1e12, model that large": (raw_payload([raw_record(b"x", Kind.DENSE, TERA, b"\x00" * 16)]), BIG),
    "zero 1e12, no model": (raw_payload([raw_record(b"x", Kind.ZERO, TERA)]), None),
    "sparse count 2**32-1 (fixed)": (
        raw_payload([raw_record(b"x", Kind.SPARSE, TERA, raw_section(int(Coding.FIXED), 0, 2**32 - 1, b"\xff" * 64))]),
        BIG,
    ),
    "sparse bitmask over 1e12 slots": (
        raw_payload([raw_record(b"x", Kind.SPARSE, TERA, raw_section(int(Coding.BITMASK), 0, 5, b"\xff" * 64))]),
        BIG,
    ),
    "sparse elias-fano count 2**32-1": (
        raw_payload([raw_record(b"x", Kind.SPARSE, TERA, raw_section(int(Coding.ELIAS_FANO), 20, 2**32 - 1))]),
        BIG,
    ),
    "lowrank rank 65535": (
        raw_payload([raw_record(b"x", Kind.LOWRANK, TERA, struct.pack("<H", 65535) + raw_section(0, 0, 2**32 - 1))]),
        BIG,
    ),
    "quant8 block 1": (raw_payload([raw_record(b"x", Kind.QUANT8, TERA, struct.pack("<I", 1) + b"\x00" * 16)]), BIG),
    "record count 2**32-1": (raw_payload([b"\x00" * 32], nrec=2**32 - 1), None),
    "tensors of 2**31 elements each": (
        raw_payload([raw_record(f"z{i}".encode(), Kind.ZERO, (2**16, 2**15)) for i in range(64)]),
        None,
    ),
}


def _peak(fn: Callable[[], object]) -> int:
    """Peak traced bytes while ``fn`` runs (its exception, if any, is swallowed)."""
    tracemalloc.start()
    tracemalloc.reset_peak()
    base = tracemalloc.get_traced_memory()[0]
    try:
        fn()
    except PayloadError:
        pass
    finally:
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    return peak - base


@pytest.mark.parametrize("name", sorted(BOMBS))
def test_size_bomb_is_rejected_without_allocating_it(name: str) -> None:
    blob, expected = BOMBS[name]
    assert len(blob) < 4096
    with pytest.raises(PayloadError):
        decode(blob, expected=expected)
    peak = _peak(lambda: decode(blob, expected=expected))
    assert peak < 256 * 1024, f"{name}: {peak} bytes traced while rejecting a {len(blob)}-byte payload"


def test_a_count_the_payload_cannot_back_is_refused_before_positions_are_unpacked() -> None:
    """1 MiB bitmask of ones declares 8 Mi positions but carries no values: refused at O(payload) cost.

    Unpacking first (as the decoder used to) costs 8 MiB of bits plus 64 MiB of int64 positions.
    """
    nbytes = 1 << 20
    slots = nbytes * 8
    section = raw_section(int(Coding.BITMASK), 0, slots - 1, b"\xff" * (nbytes - 1) + b"\x7f")
    blob = raw_payload([raw_record(b"x", Kind.SPARSE, (slots,), section)], method=b"topk")
    with pytest.raises(PayloadError, match="count"):
        decode(blob)
    assert _peak(lambda: decode(blob)) < 3 * len(blob)


def test_unpacking_valid_positions_is_linear_in_the_payload() -> None:
    """Fixed-width indices used to be expanded to one int64 per bit (about 140x the payload)."""
    slots, count = 1 << 24, 200_000
    rng = np.random.default_rng(0)
    pos = np.sort(rng.choice(slots, size=count, replace=False)).astype(np.int64)
    width = index_width(slots)
    bits = ((pos[:, None] >> np.arange(width, dtype=np.int64)) & 1).astype(np.uint8).reshape(-1)
    positions = np.packbits(bits, bitorder="little").tobytes()
    values = rng.standard_normal(count).astype("<f4").tobytes()
    section = raw_section(int(Coding.FIXED), 0, count, positions, values)
    blob = raw_payload([raw_record(b"x", Kind.SPARSE, (slots,), section)], method=b"topk")
    out = decode(blob)
    np.testing.assert_array_equal(out.records[0].sections[0].positions, pos)
    # The result itself holds int64 positions and float32 values: 12 bytes per entry, ~2.2x the payload.
    assert _peak(lambda: decode(blob)) < 5 * len(blob)


def test_max_bytes_is_checked_before_the_payload_is_copied() -> None:
    big = bytearray(64 * 1024 * 1024)
    view = memoryview(big)
    assert _peak(lambda: decode(view, max_bytes=1024)) < 1024 * 1024
    with pytest.raises(PayloadError, match="maximum"):
        decode(view, max_bytes=1024)


_SUBPROCESS = textwrap.dedent(
    """
    import json, resource, struct, sys, zlib
    import torch
    from flwr.app import ConfigRecord, Message, MetricRecord, RecordDict
    from flwr.clientapp import ClientApp
    from flwr.serverapp.strategy import FedAvg
    from osd_fl import CompressionConfig, PayloadError, compress, decompress
    from osd_fl.records import PAYLOAD_RECORD_KEY, payload_to_record, tensors_to_record
    from strategies.local_grid import LocalGrid
    from strategies import OSDStrategy

    torch.set_num_threads(1)
    bombs = [bytes.fromhex(h) for h in json.loads(sys.argv[1])]
    shapes = {"w": (64, 48), "b": (64,)}
    model = {k: torch.randn(s) for k, s in shapes.items()}
    cfg = CompressionConfig(method="osd", rank=2, min_numel=128, importance="ones")
    good = compress({k: 0.01 * torch.randn(s) for k, s in shapes.items()}, config=cfg)

    def round_trip(bad_blobs):
        strategy = OSDStrategy(FedAvg(min_available_nodes=1, min_train_nodes=1), config=cfg, max_payload_bytes=10**6)
        grid = LocalGrid(ClientApp(), len(bad_blobs) + 1)
        msgs = sorted(strategy.configure_train(1, tensors_to_record(model), ConfigRecord(), grid),
                      key=lambda m: m.metadata.dst_node_id)
        blobs = [good, *bad_blobs]
        replies = [Message(RecordDict({PAYLOAD_RECORD_KEY: payload_to_record(b),
                                       "m": MetricRecord({"num-examples": 5})}), reply_to=m)
                   for m, b in zip(msgs, blobs)]
        arrays, metrics = strategy.aggregate_train(1, replies)
        assert arrays is not None and metrics["accepted"] == 1, dict(metrics)
        return metrics["rejected"]

    round_trip([good[:-1]])  # warm up every code path once
    for b in bombs:
        try:
            decompress(b)
        except PayloadError:
            pass
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    for _ in range(3):
        for b in bombs:
            try:
                decompress(b)
                raise SystemExit("a size bomb was accepted")
            except PayloadError:
                pass
        rejected = round_trip(bombs)
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"before_kib": before, "after_kib": after, "rejected": rejected}))
    """
)


def test_resident_memory_stays_flat_while_the_server_rejects_size_bombs() -> None:
    bombs = [blob.hex() for blob, _ in BOMBS.values()]
    done = subprocess.run(
        [sys.executable, "-c", _SUBPROCESS, json.dumps(bombs)],
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    figures = json.loads(done.stdout.strip().splitlines()[-1])
    assert figures["rejected"] == len(BOMBS)
    growth_mib = (figures["after_kib"] - figures["before_kib"]) / 1024
    assert growth_mib < 64, f"maxrss grew by {growth_mib:.0f} MiB while rejecting size bombs"
