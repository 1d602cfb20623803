"""Compressed broadcasts: replicas equal bit for bit, bad broadcasts refused, bounded history, server EF."""

from __future__ import annotations

import itertools
import random

import pytest
import torch

from osd_fl import CompressionConfig, PayloadError
from osd_fl.codec import decode, reconstruct
from osd_fl.downlink import (
    Broadcast,
    BroadcastServer,
    ReplicaMismatch,
    apply_broadcast,
    apply_chain,
    model_digest,
)
from simulations.bench.downlink import main as bench_main
from simulations.devices import torch_threads

CONFIG = CompressionConfig(method="osd", rank=2)


def _model(g: torch.Generator) -> dict[str, torch.Tensor]:
    return {
        "enc.weight": torch.randn(48, 40, generator=g),
        "enc.bias": torch.randn(48, generator=g),
        "emb.weight": torch.randn(100, 16, generator=g),
        "head.weight": torch.randn(3, 48, generator=g).to(torch.bfloat16),
        "steps": torch.zeros((), dtype=torch.int64),
    }


def _step(x: dict[str, torch.Tensor], g: torch.Generator, t: int) -> dict[str, torch.Tensor]:
    """The server's model after an aggregation: a full-rank change of every floating tensor, a counter bump."""
    out = {}
    for k, v in x.items():
        if v.is_floating_point():
            out[k] = (v.float() + 0.05 * torch.randn(v.shape, generator=g)).to(v.dtype)
        else:
            out[k] = torch.tensor(t, dtype=v.dtype)
    return out


def _copy(m: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in m.items()}


def _equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return list(a) == list(b) and all(a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]) for k in a)


def test_replicas_equal_the_public_model_bit_for_bit_over_many_rounds() -> None:
    """Partial participation, skipped rounds, a node that loses its state and one that joins late."""
    g = torch.Generator().manual_seed(0)
    rng = random.Random(0)
    x = _model(g)
    server = BroadcastServer(x, CONFIG, history_bytes=40_000)
    replicas: dict[int, dict[str, torch.Tensor] | None] = dict.fromkeys(range(6))
    held: dict[int, int | None] = dict.fromkeys(range(6))
    dense_syncs = chains = 0
    for t in range(1, 31):
        x = _step(x, g, t)
        server.publish(x)
        nodes = rng.sample(range(5), 2) + ([5] if t >= 20 else [])  # node 5 joins at round 20
        if t == 12:
            replicas[1], held[1] = None, None  # node 1's SuperNode restarted: context.state is gone
        for node in nodes:
            chain = server.catch_up(held[node])
            replica = replicas[node]
            if chain is None or replica is None:
                replicas[node] = _copy(server.public)
                dense_syncs += 1
            else:
                # clients apply with a different thread count than the server used
                with torch_threads(2):
                    apply_chain(replica, chain)
                chains += len(chain) > 0
            held[node] = server.version
            current = replicas[node]
            assert current is not None
            assert _equal(current, server.public), f"round {t}, node {node}"
            assert model_digest(current) == server.digest
    assert chains > 10 and dense_syncs >= 7  # both paths were exercised (5 first syncs, the restart, the late join)


def test_exact_reconstruction_is_the_ordered_sum_of_rank_one_terms() -> None:
    g = torch.Generator().manual_seed(1)
    blob = (
        BroadcastServer({"w": torch.zeros(64, 50)}, CompressionConfig(method="truncsvd", rank=4))
        .publish({"w": torch.randn(64, 50, generator=g)})
        .blob
    )
    (rec,) = decode(blob).records
    a = torch.from_numpy(rec.sections[0].dense()).reshape(64, 4)
    b = torch.from_numpy(rec.sections[1].dense()).reshape(4, 50)
    manual = a[:, 0:1] * b[0:1]
    for j in range(1, 4):
        manual = manual + a[:, j : j + 1] * b[j : j + 1]
    assert torch.equal(reconstruct(rec, exact=True), manual)


def test_a_corrupted_or_mismatching_broadcast_is_refused_and_the_replica_kept() -> None:
    g = torch.Generator().manual_seed(2)
    x = _model(g)
    server = BroadcastServer(x, CONFIG)
    replica = _copy(server.public)
    b = server.publish(_step(x, g, 1))
    flipped = bytearray(b.blob)
    flipped[len(flipped) // 2] ^= 0x40
    before = _copy(replica)
    with pytest.raises(PayloadError):
        apply_broadcast(replica, Broadcast(b.version, bytes(flipped), b.digest, b.exact))
    assert _equal(replica, before)
    wrong = _copy(replica)
    wrong["enc.bias"][0] += 1e-6  # a replica that drifted by one value
    kept = _copy(wrong)
    with pytest.raises(ReplicaMismatch, match="digest"):
        apply_broadcast(wrong, b)
    assert _equal(wrong, kept)
    with pytest.raises(PayloadError, match="steps"):
        apply_broadcast(_copy(replica), Broadcast(b.version, b.blob, b.digest, {"steps": torch.zeros(2)}))
    apply_broadcast(replica, b)
    assert _equal(replica, server.public)


def test_catch_up_sends_the_chain_only_while_it_exists_and_is_cheaper() -> None:
    g = torch.Generator().manual_seed(3)
    x = _model(g)
    server = BroadcastServer(x, CONFIG)
    assert server.catch_up(None) is None and server.catch_up(0) == [] and server.catch_up(1) is None
    for t in range(1, 4):
        x = _step(x, g, t)
        server.publish(x)
    chain = server.catch_up(1)
    assert chain is not None and [b.version for b in chain] == [2, 3]
    assert server.catch_up(-1) is None and server.catch_up(4) is None
    for t in range(4, 60):
        x = _step(x, g, t)
        server.publish(x)
    # the history is capped at one dense model, so a chain never costs more than the model
    assert sum(b.nbytes for b in server.history) <= server.dense_bytes
    assert server.memory_bytes <= 2 * server.dense_bytes
    assert server.catch_up(1) is None  # fell out of the history: dense
    oldest = server.history[0].version
    assert server.catch_up(oldest - 1) is not None


def test_server_error_feedback_delivers_what_earlier_broadcasts_left_out() -> None:
    """A fixed target x: each rank-2 broadcast carries the next directions of x - w, so w converges to x."""
    g = torch.Generator().manual_seed(4)
    target = {"w": torch.randn(40, 30, generator=g)}
    server = BroadcastServer({"w": torch.zeros(40, 30)}, CompressionConfig(method="truncsvd", rank=2))
    norms = [float(server.residual(target)["w"].norm())]
    for _ in range(15):
        server.publish(target)
        norms.append(float(server.residual(target)["w"].norm()))
    # each of the first 14 steps removes two directions far above float32 rounding
    assert all(b < 0.99 * a for a, b in itertools.pairwise(norms[:15]))
    assert norms[-1] < 1e-3 * norms[0]  # 15 x rank 2 = rank 30: all of it, to float32 rounding


def test_an_unchanged_model_costs_next_to_nothing() -> None:
    g = torch.Generator().manual_seed(5)
    x = _model(g)
    server = BroadcastServer(x, CONFIG)
    b = server.publish(_copy(x))
    assert b.nbytes < 400 and not b.exact
    assert server.digest == model_digest(x)


def test_downlink_bench_runs_and_its_replica_matches(capsys: pytest.CaptureFixture[str]) -> None:
    assert bench_main(["--models", "minilm", "--ranks", "1", "--rounds", "2", "--max-wait", "0"]) == 0
    out = capsys.readouterr().out
    row = next(line for line in out.splitlines() if line.startswith("| minilm | 1 |"))
    share = float(row.split("|")[5].strip().rstrip("%"))
    assert 0 < share < 2.0  # a rank-1 broadcast of MiniLM's encoder is about 1% of the dense model
