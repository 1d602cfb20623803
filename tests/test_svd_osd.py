"""The math of OSD and its baselines against plain references."""

from __future__ import annotations

import pytest
import torch

from osd_fl import compress, decompress, payload_budget
from osd_fl.compressor import MatrixItem
from osd_fl.config import CompressionConfig
from osd_fl.methods.osd import OSD, damage_scores
from osd_fl.methods.sparse_lowrank import _contenders, _whole_errors, candidate_errors
from osd_fl.sizes import LOWRANK_OVERHEAD, matrix_budget
from osd_fl.svd import split_factors, truncated_svd
from osd_fl.thin import t_times_thin, times_thin
from tests.helpers import low_rank_plus_sparse, weighted_rel_error

# test code here draws from torch's global generator: seeded per test and restored afterwards
pytestmark = pytest.mark.usefixtures("global_rng")


@pytest.mark.parametrize("shape", [(60, 40), (40, 90), (600, 300)])
@pytest.mark.parametrize("mode", ["exact", "randomized"])
def test_truncsvd_reaches_eckart_young(shape: tuple[int, int], mode: str) -> None:
    n, d = shape
    m = low_rank_plus_sparse(n, d, rank=6, noise=0.0005)
    r = 3
    sv = torch.linalg.svdvals(m.double())
    optimum = float(sv[r:].square().sum().sqrt())
    g = torch.Generator().manual_seed(0)
    u, s, vh = truncated_svd(m, r, mode=mode, oversample=10, niter=2, generator=g)  # type: ignore[arg-type]
    err = float(torch.linalg.norm(m - (u * s) @ vh))
    assert err == pytest.approx(optimum, rel=1e-3 if mode == "exact" else 2e-2)
    # and through the whole codec path
    blob = compress({"w": m}, method="truncsvd", rank=r, svd=mode, min_numel=0)
    err2 = float(torch.linalg.norm(m - decompress(blob)["w"]))
    assert err2 == pytest.approx(optimum, rel=1e-3 if mode == "exact" else 2e-2)


@pytest.mark.parametrize("width", [1, 4, 11, 16])
def test_thin_products_equal_the_plain_products(width: int) -> None:
    """The re-laid-out products are the same products (float32 summation order aside)."""
    gen = torch.Generator().manual_seed(width)
    m = torch.randn(300, 70, generator=gen, dtype=torch.float64)
    x, q = (
        torch.randn(70, width, generator=gen, dtype=torch.float64),
        torch.randn(300, width, generator=gen, dtype=torch.float64),
    )
    assert times_thin(m, x).shape == (300, width) and t_times_thin(m, q).shape == (70, width)
    torch.testing.assert_close(times_thin(m, x), m @ x, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(t_times_thin(m, q), m.T @ q, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("mode", ["exact", "randomized"])
def test_whole_candidates_error_falls_with_rank(mode: str) -> None:
    """Adaptive c skips whole candidates below the largest (Z = ones): their error is ||M||^2 - sum s^2, falling."""
    m = low_rank_plus_sparse(200, 120, rank=6, seed=3)
    u, s, vh = truncated_svd(m, 5, mode=mode, generator=torch.Generator().manual_seed(0))  # type: ignore[arg-type]
    a, b = split_factors(u, s, vh, 5)
    errors = candidate_errors(m, None, [(a[:, :k], b[:k]) for k in range(1, 6)])
    direct = [float(((m - a[:, :k] @ b[:k]) ** 2).sum()) for k in range(1, 6)]
    total = float((m.double() ** 2).sum())
    for k in range(1, 6):
        expected = total - float((s[:k].double() ** 2).sum())
        assert errors[k - 1] == pytest.approx(expected, rel=1e-4, abs=1e-6 * total)
        assert direct[k - 1] == pytest.approx(expected, rel=1e-4, abs=1e-6 * total)
    gaps = [float(s[k].double() ** 2) for k in range(1, 5)]
    for k in range(4):  # each step down is the next s^2, far above float32 noise here
        assert errors[k] - errors[k + 1] == pytest.approx(gaps[k], rel=1e-3)


def test_contenders_drop_only_whole_candidates_below_the_largest() -> None:
    assert _contenders([0, 1, 2, 3], [True, True, True, False], weighted=False) == [2, 3]
    assert _contenders([0, 1, 2, 3], [True, True, True, False], weighted=True) == [0, 1, 2, 3]
    assert _contenders([0], [True], weighted=False) == [0]
    assert _contenders([0, 3], [True, False], weighted=False) == [0, 3]
    assert _contenders([0, 1, 2], [True, False, True], weighted=False) == [1, 2]


def test_whole_errors_are_the_expanded_errors() -> None:
    """A whole candidate's error read off the singular values equals the expansion through ``M`` (Z = ones)."""
    m = low_rank_plus_sparse(200, 120, rank=6, seed=5)
    for mode in ("exact", "randomized"):
        u, s, vh = truncated_svd(m, 5, mode=mode, generator=torch.Generator().manual_seed(0))
        a, b = split_factors(u, s, vh, 5)
        expanded = candidate_errors(m, None, [(a[:, :k], b[:k]) for k in range(1, 6)], include_base=False)
        scale = float((s.double() ** 2).sum())
        for got, want in zip(_whole_errors(s, range(1, 6)), expanded, strict=True):
            assert got == pytest.approx(want, abs=1e-5 * scale)


def test_split_factors_reproduce_svd() -> None:
    m = torch.randn(30, 20, generator=torch.Generator().manual_seed(1))
    u, s, vh = truncated_svd(m, 5, mode="exact")
    a, b = split_factors(u, s, vh, 5)
    torch.testing.assert_close(a @ b, (u * s) @ vh, rtol=1e-5, atol=1e-5)
    # the two factors have comparable column/row norms (sqrt(S) on both sides)
    torch.testing.assert_close(a.norm(dim=0), b.norm(dim=1), rtol=1e-4, atol=1e-5)


def test_osd_c0_full_budget_reproduces_truncsvd() -> None:
    m = low_rank_plus_sparse(200, 120, seed=3)
    osd = compress(
        {"w": m}, method="osd", rank=2, relax=0, adaptive=False, min_numel=0, svd="exact", value_dtype="float32"
    )
    ts = compress({"w": m}, method="truncsvd", rank=2, min_numel=0, svd="exact")
    torch.testing.assert_close(decompress(osd)["w"], decompress(ts)["w"], rtol=0, atol=0)
    assert len(osd) == len(ts) + len(b"osd") - len(b"truncsvd")


def test_osd_with_room_for_every_entry_keeps_all_of_them() -> None:
    m = low_rank_plus_sparse(80, 50, seed=4)
    cfg = CompressionConfig(rank=2, relax=1, adaptive=False, svd="exact")
    item = MatrixItem("w", (80, 50), "float32", m)
    k = 3
    rec = OSD(cfg).encode_matrix(item, LOWRANK_OVERHEAD + k * (80 + 50) * 4, state=None)  # type: ignore[arg-type]
    assert rec.rank == k and rec.kept == k * (80 + 50)
    u, s, vh = truncated_svd(m, k, mode="exact")
    from osd_fl.codec import reconstruct

    torch.testing.assert_close(reconstruct(rec), (u * s) @ vh, rtol=1e-4, atol=1e-5)


def test_damage_scores_match_their_definitions() -> None:
    g = torch.Generator().manual_seed(0)
    a, b, z = torch.randn(7, 3, generator=g), torch.randn(3, 5, generator=g), torch.rand(7, 5, generator=g)
    s_a, s_b = damage_scores(a, b, z, "l2")
    # l2: the Z-weighted squared error of zeroing exactly that one entry
    for i, j in [(0, 0), (6, 2), (3, 1)]:
        a2 = a.clone()
        a2[i, j] = 0
        assert float(s_a[i, j]) == pytest.approx(float((((a @ b) - (a2 @ b)) ** 2 * z).sum()), rel=1e-5)
    for j, t in [(0, 0), (2, 4)]:
        b2 = b.clone()
        b2[j, t] = 0
        assert float(s_b[j, t]) == pytest.approx(float((((a @ b) - (a @ b2)) ** 2 * z).sum()), rel=1e-5)
    l1_a, l1_b = damage_scores(a, b, z, "l1")
    torch.testing.assert_close(l1_a, a.abs() * (z @ b.abs().T))
    torch.testing.assert_close(l1_b, b.abs() * (a.abs().T @ z))
    # Z = None means ones
    o_a, o_b = damage_scores(a, b, None, "l1")
    torch.testing.assert_close(o_a, a.abs() * (torch.ones(7, 5) @ b.abs().T))
    torch.testing.assert_close(o_b, b.abs() * (a.abs().T @ torch.ones(7, 5)))


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("shape", [(384, 1536), (256, 256), (1000, 200)])
@pytest.mark.parametrize("rank", [1, 2, 4])
def test_osd_no_worse_than_baselines_on_low_rank_plus_sparse(seed: int, shape: tuple[int, int], rank: int) -> None:
    n, d = shape
    m = low_rank_plus_sparse(n, d, seed=seed)
    z = torch.rand(n, d, generator=torch.Generator().manual_seed(seed + 100)) ** 2
    errs: dict[str, float] = {}
    sizes: dict[str, int] = {}
    for method in ("osd", "truncsvd", "magtruncsvd"):
        blob = compress({"w": m}, method=method, rank=rank, importance={"w": z})
        errs[method] = weighted_rel_error(m, decompress(blob)["w"], z)
        sizes[method] = len(blob)
    budget = {meth: payload_budget({"w": (n, d)}, method=meth, rank=rank) for meth in sizes}
    print(
        f"\n{shape} r={rank} seed={seed} bytes={sizes} budget={budget} "
        f"osd={errs['osd']:.4f} margin_vs_truncsvd={errs['truncsvd'] - errs['osd']:+.4f} "
        f"margin_vs_mag={errs['magtruncsvd'] - errs['osd']:+.4f}"
    )
    assert all(sizes[meth] <= budget[meth] for meth in sizes)
    # adaptive c includes dense TruncSVD, so this holds by construction up to float error
    assert errs["osd"] <= errs["truncsvd"] * (1 + 1e-4)
    assert errs["osd"] <= errs["magtruncsvd"] * (1 + 1e-4)


def test_importance_steers_the_selection() -> None:
    """With Z concentrated on some rows, OSD must reconstruct those rows better than with Z = ones."""
    m = low_rank_plus_sparse(300, 200, seed=5)
    z = torch.full((300, 200), 1e-3)
    z[:30] = 1.0
    with_z = decompress(compress({"w": m}, rank=1, importance={"w": z}))["w"]
    without = decompress(compress({"w": m}, rank=1))["w"]
    assert weighted_rel_error(m, with_z, z) < weighted_rel_error(m, without, z)


def test_matrix_budget_is_truncsvd_cost() -> None:
    n, d, r = 120, 70, 3
    blob = compress({"w": torch.randn(n, d)}, method="truncsvd", rank=r, min_numel=0)
    # header + record header + kind-specific part
    from osd_fl.sizes import header_bytes, record_header_bytes

    assert len(blob) == header_bytes("truncsvd") + record_header_bytes("w", 2) + matrix_budget(n, d, r, "float32")


def weighted_error(mat: torch.Tensor, approx: torch.Tensor, z: torch.Tensor | None) -> float:
    """``||sqrt(Z) * (mat - approx)||_F^2`` (Z = ones when ``None``), formed directly."""
    diff = (mat - approx).square_()
    if z is not None:
        diff.mul_(z)
    return float(diff.sum())


@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("shape", [(7, 5), (96, 40), (300, 1100)])
def test_candidate_errors_equal_the_direct_weighted_error(shape: tuple[int, int], weighted: bool) -> None:
    """The one-pass candidate errors (expansion without Z, cache blocks with Z) equal the n x d formula."""
    from osd_fl.methods.sparse_lowrank import candidate_errors

    g = torch.Generator().manual_seed(sum(shape))
    n, d = shape
    mat = low_rank_plus_sparse(n, d, rank=3, seed=sum(shape))
    z = torch.rand(n, d, generator=g) if weighted else None
    cands = []
    for k in (1, 2, 4):
        a = torch.randn(n, k, generator=g) * (torch.rand(n, k, generator=g) > 0.3)
        b = torch.randn(k, d, generator=g) * (torch.rand(k, d, generator=g) > 0.5)
        cands.append((a, b))
    got = candidate_errors(mat, z, cands)
    want = [weighted_error(mat.double(), (a @ b).double(), None if z is None else z.double()) for a, b in cands]
    assert got == pytest.approx(want, rel=1e-5)
    assert min(range(3), key=got.__getitem__) == min(range(3), key=want.__getitem__)


def test_seeds_are_the_documented_formulas() -> None:
    """The one home of the seed arithmetic keeps the formulas every past payload was made with."""
    import zlib

    from osd_fl.seeds import client_seed, item_seed

    assert item_seed(7, "fc.weight") == (7 * 1_000_003 + zlib.crc32(b"fc.weight")) % 2**63
    assert client_seed(3, 5, 2) == (3 * 1_000_003 + 5 * 7919 + 2) % 2**63
    assert item_seed(2**63 - 1, "w") < 2**63
