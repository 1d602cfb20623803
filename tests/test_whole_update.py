"""Whole-update bytes: small matrices, 4-D kernels and row-sparse embeddings are inside the budget by default."""

from __future__ import annotations

import torch

from osd_fl import CompressionConfig, compress, decompress, payload_budget
from simulations.bench.whole_update import OLD_DEFAULTS, model_update, payload_shares


def test_quickstart_cnn_update_is_compressed_whole_by_default() -> None:
    update = model_update("cnn", steps=2)
    old = payload_shares(update, CompressionConfig(method="truncsvd", rank=1).replace(**OLD_DEFAULTS))
    new = payload_shares(update, CompressionConfig(method="truncsvd", rank=1))
    assert old["sent_as"]["conv kernels"] == {"dense"} and new["sent_as"]["conv kernels"] == {"lowrank"}
    assert new["sent_as"]["1-D (biases, norms)"] == {"dense"}
    assert new["ratio"] > 3 * old["ratio"] > 30  # 45x against 13x at rank 1 (the bench prints both)


def test_row_sparse_embedding_update_costs_a_rank_one_budget_and_keeps_its_rows() -> None:
    gen = torch.Generator().manual_seed(0)
    emb = torch.zeros(3000, 64)
    rows = torch.randperm(3000, generator=gen)[:40]
    emb[rows] = torch.randn(40, 1, generator=gen) @ torch.randn(1, 64, generator=gen)  # a rank-1 update of 40 rows
    update = {"bert.embeddings.word_embeddings.weight": emb}
    for method in ("truncsvd", "osd"):
        blob = compress(update, method=method, rank=1)
        assert len(blob) <= payload_budget({k: v.shape for k, v in update.items()}, method=method, rank=1)
        assert len(blob) < 0.02 * emb.numel() * 4  # dense would be 768,000 bytes
        got = decompress(blob)["bert.embeddings.word_embeddings.weight"]
        others = torch.ones(3000, dtype=torch.bool)
        others[rows] = False
        assert torch.linalg.norm(got[others]) <= 1e-6 * torch.linalg.norm(emb)  # no other row moves
        # float32 factors (TruncSVD) are exact to rounding; OSD's default int8 values to about a step of 1/127
        tol = 1e-4 if method == "truncsvd" else 1e-2
        assert torch.linalg.norm(got - emb) <= tol * torch.linalg.norm(emb)
