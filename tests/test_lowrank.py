"""Tests for surgery.core.lowrank: the SVD engine, its exact error, rank policies.

SVD factors are never compared directly (signs are arbitrary): we compare products,
errors against the true spectrum (Eckart–Young), and errors against direct norms.
Every numeric check has a negative control showing the same check can fail.
"""

from __future__ import annotations

import functools
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import surgery.core.lowrank as lowrank
from surgery.core.lowrank import (
    SVDResult,
    allocate_budget,
    default_oversample,
    lapack_threads,
    lora_factors,
    parse_budget,
    rank_for_energy,
    truncated_svd,
)
from surgery.errors import OptionError, SurgeryError, ValidationError

# ---------------------------------------------------------------- helpers


def spectrum_matrix(m: int, n: int, s: torch.Tensor, seed: int = 0) -> torch.Tensor:
    """An (m, n) fp32 matrix with singular values s (random orthonormal bases)."""
    g = torch.Generator().manual_seed(seed)
    k = s.shape[0]
    U, _ = torch.linalg.qr(torch.randn(m, k, generator=g, dtype=torch.float64))  # (m, k)
    V, _ = torch.linalg.qr(torch.randn(n, k, generator=g, dtype=torch.float64))  # (n, k)
    return ((U * s.double()) @ V.T).float()  # (m, n)


@functools.cache
def exact_of(key: str) -> SVDResult:
    """Full exact SVD of a named test matrix, computed once per session."""
    return truncated_svd(MATRICES[key](), None, method="exact")


def decaying(m: int, n: int, alpha: float = 1.0, seed: int = 0) -> torch.Tensor:
    s = torch.arange(1, min(m, n) + 1, dtype=torch.float64) ** -alpha
    return spectrum_matrix(m, n, s, seed)


def low_rank_plus_noise(m: int, n: int, r: int, noise: float, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    L = torch.randn(m, r, generator=g) @ torch.randn(r, n, generator=g)  # (m, n) rank r
    return L + noise * torch.randn(m, n, generator=g)


def direct_error(M: torch.Tensor, U: torch.Tensor, S: torch.Tensor, Vh: torch.Tensor) -> float:
    """‖M − U S Vh‖_F computed the slow way, in fp64."""
    return torch.linalg.matrix_norm(M.double() - (U.double() * S.double()) @ Vh.double()).item()


def eckart_young(M: torch.Tensor, r: int) -> float:
    """The optimal rank-r error, from the true spectrum (fp64 svdvals)."""
    s = torch.linalg.svdvals(M.double())
    return s[r:].pow(2).sum().sqrt().item()


def recon(res: SVDResult, r: int) -> torch.Tensor:
    return (res.U[:, :r] * res.S[:r]) @ res.Vh[:r]  # (m, n)


# ---------------------------------------------------------------- exact SVD


def test_full_rank_exact_reconstruction():
    M = torch.randn(48, 32, generator=torch.Generator().manual_seed(1))
    res = truncated_svd(M, None, method="exact")
    assert res.k == 32 and res.shape == (48, 32) and res.method == "exact"
    assert res.U.shape == (48, 32) and res.S.shape == (32,) and res.Vh.shape == (32, 32)
    assert all(t.dtype == torch.float32 and t.device.type == "cpu" for t in (res.U, res.S, res.Vh))
    torch.testing.assert_close(recon(res, 32), M, rtol=1e-5, atol=1e-5)
    assert res.error(32) == 0.0 and res.energy_kept(32) == 1.0  # whole spectrum: tail is empty
    # Negative control: the same check fails with two singular values swapped.
    S_bad = res.S.clone()
    S_bad[[0, 5]] = S_bad[[5, 0]]
    with pytest.raises(AssertionError):
        torch.testing.assert_close((res.U * S_bad) @ res.Vh, M, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("method", ["exact", "randomized"])
def test_eckart_young_error_is_exact(method):
    M = decaying(160, 96, alpha=0.7, seed=2)
    for r in (0, 1, 5, 20, 40):
        res = truncated_svd(M, r, method=method)
        bound = eckart_young(M, r)
        # The identity-based error equals the direct error of the returned factors...
        assert res.error(r) == pytest.approx(direct_error(M, res.U, res.S, res.Vh), rel=1e-4, abs=1e-6)
        # ...and (exact method) the Eckart–Young optimum; randomized is within 1% of it.
        if method == "exact":
            assert res.error(r) == pytest.approx(bound, rel=1e-4, abs=1e-6)
        else:
            assert bound - 1e-6 <= res.error(r) <= 1.01 * bound + 1e-6
    # Negative control: a perturbed factor no longer meets the bound, and its reported
    # error (the identity) no longer matches its direct error.
    res = truncated_svd(M, 20, method="exact")
    U_bad = res.U.clone()
    U_bad[:, 0] += 0.05 * torch.randn(160, generator=torch.Generator().manual_seed(3))
    bad = direct_error(M, U_bad, res.S, res.Vh)
    assert bad != pytest.approx(eckart_young(M, 20), rel=1e-4)
    assert bad != pytest.approx(res.error(20), rel=1e-4)


def test_relative_error_and_energy():
    M = decaying(64, 40, seed=4)
    res = truncated_svd(M, None, method="exact")
    norm = torch.linalg.matrix_norm(M.double()).item()
    assert res.total_energy == pytest.approx(norm**2, rel=1e-12)
    for r in (0, 3, 17, 40):
        assert res.rel_error(r) == pytest.approx(res.error(r) / norm, rel=1e-9)
        assert res.energy_kept(r) + res.rel_error(r) ** 2 == pytest.approx(1.0, abs=1e-12)
    assert res.error(0) == pytest.approx(norm, rel=1e-6)
    assert res.rel_error(0) == pytest.approx(1.0, rel=1e-6)


def test_fp64_retry_when_fp32_does_not_converge(monkeypatch):
    real_svd = torch.linalg.svd
    calls = []

    def flaky(A, full_matrices=True):
        calls.append(A.dtype)
        if A.dtype == torch.float32:
            raise torch.linalg.LinAlgError("linalg.svd: The algorithm failed to converge")
        return real_svd(A, full_matrices=full_matrices)

    monkeypatch.setattr(torch.linalg, "svd", flaky)
    M = torch.randn(20, 12, generator=torch.Generator().manual_seed(5))
    res = truncated_svd(M, None, method="exact")
    assert calls == [torch.float32, torch.float64]
    assert res.S.dtype == torch.float32
    torch.testing.assert_close(recon(res, 12), M, rtol=1e-5, atol=1e-5)

    def broken(A, full_matrices=True):
        raise torch.linalg.LinAlgError("linalg.svd: The algorithm failed to converge")

    monkeypatch.setattr(torch.linalg, "svd", broken)
    with pytest.raises(ValidationError, match="did not converge for layer.w"):
        truncated_svd(M, None, method="exact", name="layer.w")


def test_inputs_upcast_and_untouched():
    M = decaying(40, 30, seed=6).to(torch.bfloat16)
    before = M.clone()
    res = truncated_svd(M.T, 5, method="exact")  # non-contiguous bf16 view
    assert torch.equal(M, before)
    assert res.shape == (30, 40) and res.U.dtype == torch.float32
    ref = truncated_svd(M.T.float().contiguous(), 5, method="exact")
    torch.testing.assert_close(recon(res, 5), recon(ref, 5))


# ---------------------------------------------------------------- randomized SVD


MATRICES = {
    "1/i": functools.lru_cache()(lambda: decaying(384, 256, alpha=1.0, seed=7)),
    "1/sqrt(i)": functools.lru_cache()(lambda: decaying(256, 384, alpha=0.5, seed=8)),
    "lowrank+noise": functools.lru_cache()(lambda: low_rank_plus_noise(512, 256, r=16, noise=0.05, seed=9)),
}


@pytest.mark.parametrize(
    "key, ranks",
    [("1/i", (8, 32, 48)), ("1/sqrt(i)", (8, 32, 48)), ("lowrank+noise", (8, 16, 24, 48))],
)
def test_randomized_within_one_percent_of_exact(key, ranks):
    M, exact = MATRICES[key](), exact_of(key)
    for r in ranks:
        rnd = truncated_svd(M, r, method="randomized")  # default niter / oversample
        assert rnd.method == "randomized" and rnd.k == r
        assert exact.error(r) <= rnd.error(r) * (1 + 1e-5)
        assert rnd.error(r) <= 1.01 * exact.error(r), (r, rnd.error(r) / exact.error(r))
        # The reported error is the true error of the returned factors.
        assert rnd.error(r) == pytest.approx(direct_error(M, rnd.U, rnd.S, rnd.Vh), rel=1e-3)


def test_randomized_negative_control_without_power_iterations():
    # Same 1% check on a slowly decaying spectrum, without power iterations or
    # oversampling: the range finder misses too much and the check fails.
    M, exact = MATRICES["1/sqrt(i)"](), exact_of("1/sqrt(i)")
    rnd = truncated_svd(M, 32, method="randomized", niter=0, oversample=0)
    assert rnd.error(32) > 1.01 * exact.error(32)


def test_randomized_is_deterministic():
    M = decaying(300, 200, seed=10)
    a = truncated_svd(M, 16, method="randomized", seed=3)
    b = truncated_svd(M, 16, method="randomized", seed=3)
    assert torch.equal(a.U, b.U) and torch.equal(a.S, b.S) and torch.equal(a.Vh, b.Vh)
    assert a.total_energy == b.total_energy
    # Negative control: another seed gives other bits (same subspace, up to rounding).
    c = truncated_svd(M, 16, method="randomized", seed=4)
    assert not torch.equal(a.U, c.U)


def test_auto_method_choice():
    big = torch.randn(512, 300, generator=torch.Generator().manual_seed(11))
    assert truncated_svd(big, 8).method == "randomized"  # (8 + 10) * 4 <= 300
    assert truncated_svd(big, 100).method == "exact"  # too close to min(m, n)
    assert truncated_svd(big, None).method == "exact"  # full spectrum
    assert truncated_svd(big[:100, :100], 4).method == "exact"  # tiny: exact is cheap
    assert default_oversample(8) == 10 and default_oversample(256) == 64


# ---------------------------------------------------------------- rank and errors


def test_error_monotone_in_rank():
    M = low_rank_plus_noise(120, 80, r=10, noise=0.1, seed=12)
    for method in ("exact", "randomized"):
        res = truncated_svd(M, 40, method=method)
        errs = [res.error(r) for r in range(res.k + 1)]
        assert all(a >= b for a, b in zip(errs, errs[1:])), method
    # Negative control: the same check catches a non-monotone sequence.
    bad = errs[:5] + [errs[3]] + errs[6:]
    assert not all(a >= b for a, b in zip(bad, bad[1:]))


def test_rank_clamped_to_min_dim():
    M = torch.randn(8, 5, generator=torch.Generator().manual_seed(13))
    for method in ("exact", "randomized", "auto"):
        res = truncated_svd(M, 1000, method=method)
        assert res.k == 5 and res.U.shape == (8, 5) and res.Vh.shape == (5, 5)
        torch.testing.assert_close(recon(res, 5), M, rtol=1e-5, atol=1e-5)
    with pytest.raises(OptionError, match="0..5"):
        res.error(6)


def test_rank_zero():
    M = torch.randn(6, 4, generator=torch.Generator().manual_seed(14))
    res = truncated_svd(M, 0)
    assert res.k == 0 and res.U.shape == (6, 0) and res.Vh.shape == (0, 4)
    assert res.error(0) == pytest.approx(torch.linalg.matrix_norm(M).item(), rel=1e-6)
    A, B = lora_factors(res, 0)
    assert A.shape == (0, 4) and B.shape == (6, 0)


@pytest.mark.parametrize("method", ["exact", "randomized"])
def test_zero_matrix_gets_rank_zero(method):
    res = truncated_svd(torch.zeros(300, 260), 16, method=method)
    assert res.k == 0 and res.total_energy == 0.0
    assert res.error(0) == 0.0 and res.rel_error(0) == 0.0 and res.energy_kept(0) == 1.0
    assert res.rank_for_energy(0.9) == 0
    assert rank_for_energy(res.S, res.total_energy, 0.9) == 0
    # Negative control: a single non-zero entry is enough to get a rank.
    one = torch.zeros(300, 260)
    one[3, 7] = 1e-3
    assert truncated_svd(one, 16, method=method).k == 16


# ---------------------------------------------------------------- LoRA factors


def test_lora_factors_product_and_balance():
    M = decaying(70, 50, seed=15)
    res = truncated_svd(M, 12, method="exact")
    A, B = lora_factors(res, 8)
    assert A.shape == (8, 50) and B.shape == (70, 8)
    torch.testing.assert_close(B @ A, recon(res, 8))
    assert math.sqrt(res.sq_error(8)) == pytest.approx(direct_error(M, B, torch.ones(8), A), rel=1e-4)
    # √S on both sides: column norms of B equal row norms of A (both √σ).
    torch.testing.assert_close(B.norm(dim=0), A.norm(dim=1))
    # Negative control: S on one side only gives the same product but unbalanced norms.
    B1 = res.U[:, :8] * res.S[:8]
    with pytest.raises(AssertionError):
        torch.testing.assert_close(B1.norm(dim=0), res.Vh[:8].norm(dim=1))
    with pytest.raises(OptionError):
        lora_factors(res, 13)


# ---------------------------------------------------------------- energy policy


def diag_matrix(values, m=7, n=6) -> torch.Tensor:
    M = torch.zeros(m, n)
    for i, v in enumerate(values):
        M[i, i] = v
    return M


def test_energy_policy_picks_smallest_rank():
    # σ² = 16, 4, 4, 1, 1 (total 26): cumulative energy 16/26, 20/26, 24/26, 25/26, 1.
    M = diag_matrix([4.0, 2.0, 2.0, 1.0, 1.0])
    res = truncated_svd(M, None, method="exact")
    cases = {0.5: 1, 16 / 26: 1, 0.7: 2, 0.8: 3, 0.95: 4, 0.99: 5, 1.0: 5}
    for energy, want in cases.items():
        assert res.rank_for_energy(energy) == want, energy
        assert rank_for_energy(res.S, res.total_energy, energy) == want, energy
        assert res.energy_kept(want) >= energy - 1e-12
        # Smallest: one rank less does not reach the threshold (negative control).
        assert res.energy_kept(want - 1) < energy


def test_energy_policy_uses_full_norm_and_caps_at_k():
    M = diag_matrix([4.0, 2.0, 2.0, 1.0, 1.0])
    top2 = truncated_svd(M, 2, method="exact")  # sees σ = 4, 2 only
    assert top2.total_energy == pytest.approx(26.0)
    assert top2.rank_for_energy(0.7) == 2
    assert top2.rank_for_energy(0.9) == 2  # not reachable within k: returns k...
    assert top2.energy_kept(2) < 0.9  # ...and the caller can tell
    assert rank_for_energy(top2.S, top2.total_energy, 0.9) == 2
    # Against the full norm, 0.75 of 26 = 19.5 needs σ² 16 + 4: rank 2. Negative control:
    # measured against the computed σ² only (16 + 4 = 20), 0.75 of 20 = 15 gives rank 1.
    assert rank_for_energy(top2.S, top2.total_energy, 0.75) == 2
    assert rank_for_energy(top2.S, 20.0, 0.75) == 1


# ---------------------------------------------------------------- budget allocator


def test_budget_prefers_sigma2_per_param():
    # a: (10, 10), rank-1 cost 20, gains 100 then 1 -> 5.0 and 0.05 per param.
    # b: (100, 100), rank-1 cost 200, gain 900 -> 4.5 per param (larger σ², worse ratio).
    mods = {
        "b": (torch.tensor([30.0, 0.1]), 100, 100),
        "a": (torch.tensor([10.0, 1.0]), 10, 10),
    }
    assert allocate_budget(mods, 200) == {"b": 0, "a": 2}  # b's 200 no longer fits after a
    assert allocate_budget(mods, 220) == {"b": 1, "a": 1}
    assert allocate_budget(mods, 240) == {"b": 1, "a": 2}
    assert allocate_budget(mods, 19) == {"b": 0, "a": 0}
    assert allocate_budget(mods, 0) == {"b": 0, "a": 0}
    # Negative control: ranking by σ² alone (not per parameter) would pick b first.
    by_sigma = max(mods, key=lambda k: float(mods[k][0][0]) ** 2)
    assert by_sigma == "b" and allocate_budget(mods, 200)["b"] == 0


def test_budget_respected_and_caps():
    g = torch.Generator().manual_seed(16)
    mods = {}
    for i, (m, n) in enumerate([(64, 32), (32, 96), (128, 128), (16, 8), (48, 48)]):
        s = torch.sort(torch.rand(min(m, n), generator=g) * (i + 1), descending=True).values
        mods[f"m{i}"] = (s, m, n)
    for budget in (0, 50, 500, 5_000, 20_000):
        ranks = allocate_budget(mods, budget)
        spent = sum(r * (mods[k][1] + mods[k][2]) for k, r in ranks.items())
        assert spent <= budget
        assert all(0 <= r <= mods[k][0].numel() for k, r in ranks.items())
    # Unlimited budget buys every non-zero singular value, never more.
    big = allocate_budget(mods, 10**9)
    assert big == {k: v[0].numel() for k, v in mods.items()}
    # Zero singular values are never bought.
    assert allocate_budget({"z": (torch.tensor([2.0, 0.0, 0.0]), 4, 4)}, 10**6) == {"z": 1}
    assert allocate_budget({"z": (torch.zeros(0), 4, 4)}, 10**6) == {"z": 0}


def test_budget_greedy_order_is_marginal_gain():
    # Total captured σ² equals the sum of the best steps by σ²/(m+n) when all costs
    # are equal (then greedy is optimal): compare with brute force over a small case.
    mods = {
        "x": (torch.tensor([5.0, 4.0, 1.0]), 3, 3),
        "y": (torch.tensor([4.5, 3.0, 2.0]), 3, 3),
    }
    ranks = allocate_budget(mods, 4 * 6)
    gains = sorted([s**2 for s in [5.0, 4.0, 1.0, 4.5, 3.0, 2.0]], reverse=True)[:4]
    got = sum(float(mods[k][0][:r].pow(2).sum()) for k, r in ranks.items())
    assert got == pytest.approx(sum(gains))
    assert ranks == {"x": 2, "y": 2}


def test_budget_ties_are_deterministic():
    s = torch.tensor([3.0, 1.0])
    assert allocate_budget({"p": (s, 4, 4), "q": (s, 4, 4)}, 8) == {"p": 1, "q": 0}
    assert allocate_budget({"q": (s, 4, 4), "p": (s, 4, 4)}, 8) == {"q": 1, "p": 0}


def test_budget_bad_inputs():
    with pytest.raises(OptionError, match="budget"):
        allocate_budget({}, -1)
    with pytest.raises(OptionError, match="m1"):
        allocate_budget({"m1": (torch.ones(2), 0, 4)}, 10)
    with pytest.raises(OptionError, match="m2"):
        allocate_budget({"m2": torch.ones(2)}, 10)
    with pytest.raises(ValidationError, match="m3"):
        allocate_budget({"m3": (torch.tensor([float("nan")]), 2, 2)}, 10)


# ---------------------------------------------------------------- parse_budget


@pytest.mark.parametrize(
    "text, want",
    [
        ("150000", 150_000),
        ("1e6", 1_000_000),
        ("2.5e3", 2_500),
        ("1_000_000", 1_000_000),
        (" 42 ", 42),
        ("2%", 20_000),
        ("0.5%", 5_000),
        ("100%", 1_000_000),
        ("123456789012345678901", 123456789012345678901),
        (7, 7),
    ],
)
def test_parse_budget(text, want):
    assert parse_budget(text, 1_000_000) == want


@pytest.mark.parametrize(
    "text", ["", "abc", "-5", "1.5", "0%", "101%", "2%%", "inf", "nan", "1e", "%", "-2%", "1e6x"]
)
def test_parse_budget_rejects(text):
    with pytest.raises(OptionError, match="budget"):
        parse_budget(text, 1_000_000)


def test_parse_budget_percentage_needs_model_params():
    with pytest.raises(OptionError, match="parameter count"):
        parse_budget("2%", None)
    assert parse_budget("3%", 1001) == 30  # rounded down


# ---------------------------------------------------------------- validation


@pytest.mark.parametrize(
    "M, kwargs, exc, pattern",
    [
        (torch.randn(4, 3), {"rank": -1}, OptionError, "rank must be >= 0 for w"),
        (torch.randn(4, 3), {"rank": 1.5}, OptionError, "rank must be an integer"),
        (torch.randn(4, 3), {"rank": True}, OptionError, "rank must be an integer"),
        (torch.randn(4, 3, 2), {}, OptionError, r"2-D matrix for w, got shape \(4, 3, 2\)"),
        (torch.randn(4), {}, OptionError, "2-D matrix"),
        ([[1.0, 2.0]], {}, OptionError, "torch.Tensor"),
        (torch.randn(4, 3), {"method": "fast"}, OptionError, "unknown SVD method"),
        (torch.randn(4, 3), {"niter": -1}, OptionError, "niter"),
        (torch.randn(4, 3), {"device": "tpu"}, OptionError, "device"),
        (torch.randn(4, 3, dtype=torch.complex64), {}, OptionError, "complex"),
    ],
)
def test_bad_inputs_raise(M, kwargs, exc, pattern):
    with pytest.raises(exc, match=pattern):
        truncated_svd(M, name="w", **{"rank": 2, **kwargs})


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_raises(bad):
    M = torch.randn(5, 4)
    M[2, 1] = bad
    with pytest.raises(ValidationError, match=r"layers.0.w has 1 non-finite"):
        truncated_svd(M, 2, name="layers.0.w")
    assert issubclass(ValidationError, SurgeryError)
    # Negative control: the largest finite fp32 values are fine (their squares fit fp64).
    M[2, 1] = torch.finfo(torch.float32).max / 4
    assert truncated_svd(M, 2, method="exact").k == 2


@pytest.mark.parametrize("energy", [0, 0.0, -0.1, 1.0001, float("nan"), "x"])
def test_bad_energy_raises(energy):
    res = truncated_svd(torch.randn(4, 3), None)
    with pytest.raises(OptionError, match="energy"):
        res.rank_for_energy(energy)
    with pytest.raises(OptionError, match="energy"):
        rank_for_energy(res.S, res.total_energy, energy)


def test_cuda_unavailable_is_an_option_error():
    if torch.cuda.is_available():
        pytest.skip("CUDA present; see test_cuda_matches_cpu")
    with pytest.raises(OptionError, match="CUDA is not available"):
        truncated_svd(torch.randn(4, 3), 2, device="cuda")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
@pytest.mark.parametrize("method", ["exact", "randomized"])
def test_cuda_matches_cpu(method):
    M = decaying(300, 280, seed=17)
    cpu = truncated_svd(M, 16, method=method)
    gpu = truncated_svd(M, 16, method=method, device="cuda")
    assert gpu.U.device.type == "cpu" and gpu.S.dtype == torch.float32
    torch.testing.assert_close(recon(gpu, 16), recon(cpu, 16), rtol=1e-3, atol=1e-4)
    assert gpu.error(16) == pytest.approx(cpu.error(16), rel=1e-3)


# ---------------------------------------------------------------- threads


def test_lapack_threads_sets_and_restores():
    before = torch.get_num_threads()
    seen = []
    orig = torch.linalg.svd

    def spy(A, full_matrices=True):
        seen.append(torch.get_num_threads())
        return orig(A, full_matrices=full_matrices)

    try:
        torch.linalg.svd = spy
        truncated_svd(torch.randn(6, 5), None, method="exact")
    finally:
        torch.linalg.svd = orig
    assert seen == [lowrank.LAPACK_THREADS]
    assert torch.get_num_threads() == before
    with pytest.raises(RuntimeError):
        with lapack_threads(1):
            assert torch.get_num_threads() == 1
            raise RuntimeError("boom")
    assert torch.get_num_threads() == before


# ---------------------------------------------------------------- properties

shapes = st.tuples(st.integers(1, 12), st.integers(1, 12))


@settings(max_examples=25, deadline=None)
@given(shape=shapes, seed=st.integers(0, 2**16), method=st.sampled_from(["exact", "randomized"]))
def test_property_full_rank_is_exact(shape, seed, method):
    M = torch.randn(*shape, generator=torch.Generator().manual_seed(seed))
    res = truncated_svd(M, None if method == "exact" else min(shape), method=method)
    r = min(shape)
    assert res.k == r
    torch.testing.assert_close(recon(res, r), M, rtol=1e-4, atol=1e-5)
    assert res.rel_error(r) <= 1e-3
    A, B = lora_factors(res, r)
    torch.testing.assert_close(B @ A, M, rtol=1e-4, atol=1e-5)


@settings(max_examples=25, deadline=None)
@given(shape=shapes, seed=st.integers(0, 2**16), method=st.sampled_from(["exact", "randomized"]))
def test_property_error_monotone_and_true(shape, seed, method):
    M = torch.randn(*shape, generator=torch.Generator().manual_seed(seed))
    res = truncated_svd(M, min(shape), method=method)
    errs = [res.error(r) for r in range(res.k + 1)]
    scale = math.sqrt(res.total_energy)
    assert all(a >= b - 1e-6 * scale for a, b in zip(errs, errs[1:]))
    for r in range(res.k + 1):
        direct = direct_error(M, res.U[:, :r], res.S[:r], res.Vh[:r])
        assert errs[r] == pytest.approx(direct, rel=1e-3, abs=1e-3 * scale)
        assert errs[r] >= eckart_young(M, r) - 1e-4 * scale
