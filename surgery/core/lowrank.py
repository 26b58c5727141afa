"""The SVD engine: truncated SVD (exact or randomized), its exact error, rank policies.

Public API::

    res = truncated_svd(M, rank=None, method="auto", niter=4, oversample=None,
                        seed=0, device="cpu", name=None)        # -> SVDResult
    res.U (m, k), res.S (k,), res.Vh (k, n)    fp32 CPU tensors, S descending
    res.total_energy                           ‖M‖²_F, accumulated in fp64
    res.method                                 "exact" | "randomized"
    res.k, res.shape                           computed rank, (m, n)
    res.beyond_energy                          ‖M‖²_F not reachable by the k factors (see below)
    res.sq_error(r), res.error(r), res.rel_error(r)   ‖M − U_r S_r V_rᵀ‖²_F, its root, / ‖M‖_F (0 ≤ r ≤ k)
    res.energy_kept(r)                         1 − error(r)² / ‖M‖²_F
    res.rank_for_energy(energy)                smallest r ≤ k with energy_kept(r) ≥ energy
    lora_factors(res, r) -> (A (r, n), B (m, r))   B @ A = U_r S_r V_rᵀ, √S on both sides
    rank_for_energy(S, total_energy, energy) -> int
    allocate_budget({name: (S, m, n) | RowSpectrum}, budget) -> {name: rank | rows}
    RowSpectrum.of(delta)                      an embedding written as whole rows, for the allocator
    parse_budget("2%" | "1e6" | "150000", model_params) -> int
    default_oversample(rank) -> max(10, rank // 4)
    lapack_threads()                           context manager used around LAPACK calls

Exact error without another SVD. For any orthonormal U_r with S_r V_rᵀ = U_rᵀ M (true
for the exact SVD, and for the randomized one, whose factors are the exact SVD of
Q Qᵀ M): ‖M − U_r S_r V_rᵀ‖²_F = ‖M‖²_F − Σ_{i≤r} σ_i². That subtraction cancels
badly when the error is small next to ‖M‖ (its floor is ≈ sqrt(eps_fp32)·‖M‖_F ≈
3e-4·‖M‖_F: 0.1% wrong on a low-rank-plus-noise matrix), so the engine sums what is
dropped instead: err²(r) = Σ_{r<i≤k} σ_i² + beyond_energy, where beyond_energy is
Σ_{i>k} σ_i² for the exact method (it computes the whole spectrum anyway) and, for
the randomized one, Σ_{k<i≤l} σ_i² + ‖M − Q Qᵀ M‖²_F (one extra product, no SVD).
err²(0) is ‖M‖²_F by definition; err² is clamped to ‖M‖²_F.

Rank policies. Fixed rank: `truncated_svd(M, rank)` clamps rank to min(m, n).
Energy and budget policies only see the singular values that were computed: with
`rank=None` (exact, full spectrum) that is all of them; with a cap rank k
(typically the randomized method and a max rank) only the top k, and the energy
policy returns k when the threshold is not reached within k — compare
`res.energy_kept(k)` with the threshold to tell the user. Energy is always
measured against the full ‖M‖²_F, never against the computed σ² alone.
A zero matrix (‖M‖_F == 0) gets k == 0: callers skip it.

Threads. torch.set_num_threads is process-global; `lapack_threads()` sets it to
LAPACK_THREADS (default 1, env SURGERY_LAPACK_THREADS) around all CPU SVD work
(the SVDs, and the QRs and matmuls of the randomized method) and restores it.
Measured on this 2-core machine (MKL, OpenMP), fp32 thin SVD: idle, 2 threads are
~1.6x faster (2048x2048: 1.27 s vs 2.24 s); but with one other busy process,
2 threads took 13–51 s vs 2.3–5.3 s at 1 thread (1024x2816: 2.3–4.1 s vs 1.0 s),
and with the other helpers' load 2048x2048 took 14–45 s vs 3.5–5 s. MKL's
spinning threads fight for the cores; 1 thread is steady, so it is the default.
"""

from __future__ import annotations

import heapq
import math
import operator
import os
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import cached_property

import torch
from torch import Tensor

from surgery.core.hf import resolve_device
from surgery.core.tensors import count_non_finite
from surgery.errors import OptionError, ValidationError
from surgery.options.extract import parse_budget  # torch-free, beside the options that use it; re-exported

__all__ = [
    "SVDResult",
    "truncated_svd",
    "lora_factors",
    "rank_for_energy",
    "allocate_budget",
    "RowSpectrum",
    "rank_budget_params",
    "parse_budget",
    "lapack_threads",
    "default_oversample",
    "METHODS",
    "AUTO_RATIO",
    "LAPACK_THREADS",
]

METHODS = ("auto", "exact", "randomized")

# "auto" picks randomized when (rank + oversample) * AUTO_RATIO <= min(m, n) and the
# matrix is not tiny. Measured on 2 shared cores, 1 thread, fp32, 1024x2816: exact
# 1.6-1.8 s; randomized (niter=4, oversample=max(10, rank//4)) 0.1 s at rank 16,
# 0.25 s at 64, 0.4 s at 128, 0.7-0.9 s at 256 (l = 320 > min/4), with errors within
# 0.6% of exact. Past l ≈ min/4 the speed-up falls under ~2x: take the exact answer.
AUTO_RATIO = 4
AUTO_MIN_DIM = 256  # below this the exact SVD takes milliseconds: take the exact answer

LAPACK_THREADS = int(os.environ.get("SURGERY_LAPACK_THREADS", "1"))


@contextmanager
def lapack_threads(n: int | None = None) -> Iterator[None]:
    """Run the block with torch.set_num_threads(n or LAPACK_THREADS), then restore.

    Why: MKL's gesdd/geqrf with 2 threads on 2 shared cores were measured 2–20x
    slower and erratic than with 1 thread whenever anything else ran on the
    machine. Not thread-safe: the thread count is process-global.
    """
    want = LAPACK_THREADS if n is None else n
    before = torch.get_num_threads()
    if want <= 0 or want == before:
        yield
        return
    torch.set_num_threads(want)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _where(name: str | None) -> str:
    return f" for {name}" if name else ""


@dataclass(frozen=True)
class SVDResult:
    """Top-k singular triplets of an (m, n) matrix M, and what is needed for exact errors."""

    U: Tensor  # (m, k)
    S: Tensor  # (k,) descending
    Vh: Tensor  # (k, n)
    total_energy: float  # ‖M‖²_F, fp64 accumulation
    method: str  # "exact" | "randomized"
    # Squared error of the full rank-k approximation: what the k factors cannot reach.
    beyond_energy: float = field(repr=False)

    @property
    def k(self) -> int:
        return int(self.S.shape[0])

    @property
    def shape(self) -> tuple[int, int]:
        return (int(self.U.shape[0]), int(self.Vh.shape[1]))

    def _check_r(self, r: int) -> int:
        r = _as_int(r, "rank")
        if not 0 <= r <= self.k:
            raise OptionError(
                f"rank {r} is outside the computed rank range 0..{self.k}; "
                f"compute the SVD with rank >= {r} first"
            )
        return r

    @cached_property
    def _sq_errors(self) -> Tensor:
        """err²(r) for r = 0..k, fp64, computed once."""
        s2 = self.S.double().pow(2)  # (k,)
        zero = torch.zeros(1, dtype=torch.float64)
        # Sum what is dropped (no cancellation, see the module docstring).
        tail = torch.cat([s2.flip(0).cumsum(0).flip(0), zero])  # (k+1,) Σ_{r<i≤k} σ_i²
        # Σσ² of an fp32 SVD differs from ‖M‖² by ~1e-7 relative; rank 0 keeps all of M.
        err = (tail + self.beyond_energy).clamp_max(self.total_energy)
        err[0] = self.total_energy
        return err

    def sq_error(self, r: int) -> float:
        """‖M − U_r S_r V_rᵀ‖²_F, exact (see the module docstring)."""
        return float(self._sq_errors[self._check_r(r)])

    def error(self, r: int) -> float:
        """Absolute Frobenius error of the rank-r truncation."""
        return math.sqrt(self.sq_error(r))

    def rel_error(self, r: int) -> float:
        """error(r) / ‖M‖_F (0 for a zero matrix)."""
        if self.total_energy == 0.0:
            self._check_r(r)
            return 0.0
        return math.sqrt(min(self.sq_error(r) / self.total_energy, 1.0))

    def energy_kept(self, r: int) -> float:
        """Fraction of ‖M‖²_F kept at rank r: 1 − rel_error(r)² (1 for a zero matrix)."""
        if self.total_energy == 0.0:
            self._check_r(r)
            return 1.0
        return 1.0 - min(self.sq_error(r) / self.total_energy, 1.0)

    def rank_for_energy(self, energy: float) -> int:
        """Smallest r ≤ k with energy_kept(r) ≥ energy; k if the threshold is not reached."""
        energy = _check_energy(energy)
        if self.total_energy == 0.0:
            return 0
        kept = 1.0 - (self._sq_errors / self.total_energy).clamp_max(1.0)  # (k+1,) as energy_kept
        hit = torch.nonzero(kept >= energy)
        return int(hit[0, 0]) if hit.numel() else self.k


def _as_int(value, what: str) -> int:
    if isinstance(value, bool):
        raise OptionError(f"{what} must be an integer, got {value!r}")
    try:
        return operator.index(value)
    except TypeError:
        raise OptionError(f"{what} must be an integer, got {value!r}") from None


def _check_energy(energy) -> float:
    try:
        e = float(energy)
    except (TypeError, ValueError):
        raise OptionError(f"energy must be a number in (0, 1], got {energy!r}") from None
    if not (0.0 < e <= 1.0):  # also rejects NaN
        raise OptionError(f"energy must be in (0, 1], got {energy!r}; e.g. 0.9 keeps 90% of ‖M‖²_F")
    return e


def frob_sq(M: Tensor, Q: Tensor | None = None, B: Tensor | None = None) -> float:
    """‖M‖²_F, or ‖M − Q B‖²_F, accumulated in fp64 a block of rows at a time
    (no full fp64 copy, no full residual in memory).

    Blocks of ~256K elements (2 MB in fp64) stay in cache: measured 5x faster than
    4M-element blocks on a 2048x5632 matrix. A transposed view is walked in its
    storage order (‖M‖ = ‖Mᵀ‖), since strided rows are 100x slower.
    """
    if M.dim() == 2 and not M.is_contiguous() and M.T.is_contiguous():
        M = M.T
        if Q is not None and B is not None:
            Q, B = B.T, Q.T  # ‖M − QB‖ = ‖Mᵀ − BᵀQᵀ‖
    rows = max(1, (1 << 18) // max(1, M.shape[1]))
    total = 0.0
    for i in range(0, M.shape[0], rows):
        block = M[i : i + rows]  # (rows, n)
        if Q is not None and B is not None:
            block = block - Q[i : i + rows] @ B  # (rows, n) residual outside span(Q)
        flat = block.reshape(-1).double()  # (rows·n,) fp64: exact squares, bounded block
        total += float(torch.dot(flat, flat))
    return total


def _check_matrix(M, name: str | None) -> Tensor:
    if not isinstance(M, Tensor):
        raise OptionError(f"expected a torch.Tensor{_where(name)}, got {type(M).__name__}")
    if M.dim() != 2:
        raise OptionError(
            f"SVD needs a 2-D matrix{_where(name)}, got shape {tuple(M.shape)}; "
            "exclude this tensor or reshape it to (out, in) first"
        )
    if M.is_complex():
        raise OptionError(f"complex tensors are not supported{_where(name)} (dtype {M.dtype})")
    return M


def _svd(M: Tensor, name: str | None) -> tuple[Tensor, Tensor, Tensor]:
    """Thin SVD in fp32; retried in fp64 when LAPACK/cuSOLVER fails to converge."""
    try:
        return torch.linalg.svd(M, full_matrices=False)
    except torch.linalg.LinAlgError:
        pass
    try:
        U, S, Vh = torch.linalg.svd(M.double(), full_matrices=False)
    except torch.linalg.LinAlgError as exc:
        raise ValidationError(
            f"SVD did not converge{_where(name)} even in fp64 ({exc}); "
            "check the tensor for extreme or degenerate values"
        ) from None
    return U.float(), S.float(), Vh.float()


def _qr_q(X: Tensor) -> Tensor:
    with lapack_threads() if X.device.type == "cpu" else _nullcontext():
        return torch.linalg.qr(X, mode="reduced").Q


def _randomized(
    M: Tensor, width: int, niter: int, seed: int, name: str | None
) -> tuple[Tensor, Tensor, Tensor, float]:
    """Halko–Martinsson–Tropp range finder + power iterations; exact SVD of Qᵀ M.

    Also returns ‖M − Q Qᵀ M‖²_F, the energy outside the found subspace."""
    m, n = M.shape
    gen = torch.Generator(device=M.device).manual_seed(seed)
    omega = torch.randn(n, width, generator=gen, device=M.device, dtype=M.dtype)  # (n, l), l = width
    Q = _qr_q(M @ omega)  # (m, l)
    for _ in range(niter):
        # Re-orthonormalise between the two half-steps: without it the columns
        # collapse onto the top singular vector and the small ones are lost to rounding.
        Z = _qr_q(M.T @ Q)  # (n, l)
        Q = _qr_q(M @ Z)  # (m, l)
    B = Q.T @ M  # (l, n)
    with lapack_threads() if M.device.type == "cpu" else _nullcontext():
        Ub, S, Vh = _svd(B, name)  # (l, l), (l,), (l, n)
    return Q @ Ub, S, Vh, frob_sq(M, Q, B)  # (m, l), (l,), (l, n), float


def default_oversample(rank: int) -> int:
    """Extra range-finder columns: max(10, rank // 4).

    A fixed +10 is not enough at larger ranks: with niter=2 the error was 1–3% above
    exact at rank 128–256 on flat and 1/i spectra (1024x2816); max(10, rank//4) with
    niter=4 stayed within 0.6% on all of them at similar cost.
    """
    return max(10, rank // 4)


def _pick_method(method: str, rank: int, oversample: int, mn: int) -> str:
    if method not in METHODS:
        raise OptionError(f"unknown SVD method {method!r}; use one of {', '.join(METHODS)}")
    if method != "auto":
        return method
    if mn >= AUTO_MIN_DIM and (rank + oversample) * AUTO_RATIO <= mn:
        return "randomized"
    return "exact"


def truncated_svd(
    M: Tensor,
    rank: int | None = None,
    method: str = "auto",
    niter: int = 4,
    oversample: int | None = None,
    seed: int = 0,
    device="cpu",
    name: str | None = None,
    total_energy: float | None = None,
) -> SVDResult:
    """Top-`rank` SVD of the 2-D tensor M (any real dtype; computed in fp32).

    rank:   None = full (min(m, n)); an int is clamped to min(m, n).
    method: "exact" (torch.linalg.svd), "randomized" (range finder with `oversample`
            extra columns, default max(10, rank // 4), and `niter` power iterations,
            seeded: same inputs and seed give byte-identical factors on the same
            machine and thread setting),
            or "auto" (randomized when (rank + oversample) * AUTO_RATIO <= min(m, n)).
    device: where to compute ("cpu", "cuda", "cuda:N" or "auto": cuda when available);
            results are always CPU fp32. Checked by surgery.core.hf.resolve_device.
    name:   tensor name used in error messages.
    total_energy: ‖M‖²_F if the caller already has it (fp64-accurate), else computed here.
    Raises OptionError (bad shape/rank/method/device) or ValidationError (NaN/Inf,
    SVD not converging even in fp64).
    """
    M = _check_matrix(M, name)
    k, niter, oversample, seed = _check_args(M, rank, niter, oversample, seed, name)
    chosen = _pick_method(method, k, oversample, min(M.shape))
    dev = resolve_device(device)
    M32 = M.detach().to(device=dev, dtype=torch.float32)
    # LAPACK (gesdd, geqrf) runs at LAPACK_THREADS; the randomized method's matrix
    # products keep the process's thread count (GEMM scales: 1.46x at 2 threads on a
    # 2048x5632 rank-16 SVD, measured on an idle 2-core machine).
    with lapack_threads() if dev.type == "cpu" and chosen == "exact" else _nullcontext():
        # the caller may pass ‖M‖²_F it already computed (one pass less over M)
        total = frob_sq(M32) if total_energy is None else float(total_energy)
        if not math.isfinite(total):
            raise ValidationError(
                f"matrix{_where(name)} has {count_non_finite(M32)} non-finite value(s) (NaN/Inf); "
                "fix or exclude this tensor before the SVD"
            )
        if total == 0.0 or k == 0:
            # Zero matrix (callers skip it) or rank 0: no factors, error = ‖M‖_F.
            m, n = M.shape
            return SVDResult(U=torch.zeros(m, 0), S=torch.zeros(0), Vh=torch.zeros(0, n), total_energy=total,
                             method=chosen, beyond_energy=total)
        U, S, Vh, beyond = _top_k(M32, k, chosen, niter, oversample, seed, name)
    return SVDResult(
        U=U.to("cpu", torch.float32).contiguous(),
        S=S.to("cpu", torch.float32).contiguous(),
        Vh=Vh.to("cpu", torch.float32).contiguous(),
        total_energy=total,
        method=chosen,
        beyond_energy=beyond,
    )


def _check_args(M: Tensor, rank, niter, oversample, seed, name: str | None) -> tuple[int, int, int, int]:
    """(k, niter, oversample, seed) checked: k = rank clamped to min(m, n), None = min(m, n)."""
    mn = min(int(d) for d in M.shape)
    k = mn if rank is None else _as_int(rank, "rank")
    if k < 0:
        raise OptionError(f"rank must be >= 0{_where(name)}, got {k}")
    k = min(k, mn)
    niter = _as_int(niter, "niter")
    oversample = default_oversample(k) if oversample is None else _as_int(oversample, "oversample")
    if niter < 0 or oversample < 0:
        raise OptionError(f"niter and oversample must be >= 0, got {niter} and {oversample}")
    return k, niter, oversample, _as_int(seed, "seed")


def _top_k(M32: Tensor, k: int, method: str, niter: int, oversample: int, seed: int,
           name: str | None) -> tuple[Tensor, Tensor, Tensor, float]:
    """U (m, k), S (k,), Vh (k, n) on M32's device, and the squared error the k factors cannot reach."""
    if method == "exact":
        U, S, Vh = _svd(M32, name)  # (m, mn), (mn,), (mn, n)
        beyond = S[k:].double().pow(2).sum().item()
    else:
        width = min(k + oversample, min(M32.shape))
        U, S, Vh, outside = _randomized(M32, width, niter, seed, name)  # (m, l), (l,), (l, n)
        beyond = S[k:].double().pow(2).sum().item() + outside
    return U[:, :k], S[:k], Vh[:k], beyond  # (m, k), (k,), (k, n)


@contextmanager
def _nullcontext() -> Iterator[None]:
    yield


def lora_factors(res: SVDResult, r: int) -> tuple[Tensor, Tensor]:
    """LoRA factors of the rank-r truncation: A (r, n) = √S Vh, B (m, r) = U √S.

    Splitting √S onto both sides keeps A and B on the same scale (neither factor
    carries all of σ), which is what fine-tuning from an SVD init wants too.
    """
    r = res._check_r(r)
    root = res.S[:r].sqrt()  # (r,)
    B = (res.U[:, :r] * root).contiguous()  # (m, r)
    A = (root[:, None] * res.Vh[:r]).contiguous()  # (r, n)
    return A, B


def rank_for_energy(S: Tensor, total_energy: float, energy: float) -> int:
    """Smallest r with Σ_{i≤r} σ_i² ≥ energy · total_energy; len(S) if never reached.

    total_energy must be the full ‖M‖²_F (not Σ S²): with only the top-k values
    computed, a threshold beyond them returns k and the caller reports it.
    """
    energy = _check_energy(energy)
    if total_energy < 0 or not math.isfinite(total_energy):
        raise OptionError(f"total_energy must be finite and >= 0, got {total_energy!r}")
    if total_energy == 0.0:
        return 0
    cum = S.detach().double().pow(2).cumsum(0)  # (k,)
    hit = torch.nonzero(cum >= energy * total_energy)
    return int(hit[0, 0]) + 1 if hit.numel() else int(S.shape[0])


def rank_budget_params(shapes: Iterable[tuple[int, int, int]], rank: int) -> int:
    """The "rN" budget: the LoRA parameters rank N takes on every (m, n) matrix, `copies` times each
    (an expert stack), min(N, m, n)·(m + n) per copy: the size of a uniform rank-N extraction.

    Example:
        >>> rank_budget_params([(384, 384, 1), (2, 384, 1)], 8)
        6916
    """
    return sum(copies * min(rank, m, n) * (m + n) for m, n, copies in shapes)


@dataclass(frozen=True)
class RowSpectrum:
    """An embedding delta written as whole rows (PEFT's trainable tokens) instead of LoRA factors:
    its rows' squared norms `sq` (descending, zeros dropped), the row width (parameters per row)
    and the row count of the whole matrix.

    Example:
        >>> RowSpectrum.of(torch.tensor([[0.0, 0.0], [3.0, 4.0], [1.0, 0.0]])).sq.tolist()
        [25.0, 1.0]
    """

    sq: Tensor  # (k,) fp64, descending, > 0
    width: int  # parameters per row
    rows: int  # rows of the matrix (changed or not)

    @staticmethod
    def row_sq(delta: Tensor) -> Tensor:
        """Squared norm of each row of a (rows, width) delta, fp64, a block of rows at a time."""
        out = torch.empty(delta.shape[0], dtype=torch.float64)
        step = max(1, (1 << 22) // max(1, delta.shape[1]))
        for i in range(0, delta.shape[0], step):
            out[i : i + step] = delta[i : i + step].double().pow(2).sum(1)
        return out

    @classmethod
    def of(cls, delta: Tensor) -> RowSpectrum:
        """The rows of a (rows, width) delta in storage layout (an embedding's (vocab, dim))."""
        sq = cls.row_sq(delta)
        sq = torch.sort(sq[sq > 0], descending=True).values
        return cls(sq, int(delta.shape[1]), int(delta.shape[0]))


def _lora_entry(name: str, spec) -> tuple[list[float], int]:
    """(σ² per rank step, cost per step m + n) of an allocator entry (S, m, n)."""
    try:
        S, m, n = spec
    except (TypeError, ValueError):
        raise OptionError(f"module {name}: expected (S, m, n) or a RowSpectrum, got {type(spec).__name__}") from None
    m, n = _as_int(m, f"{name} rows"), _as_int(n, f"{name} cols")
    if m <= 0 or n <= 0:
        raise OptionError(f"module {name}: shape ({m}, {n}) must be positive")
    s2 = [float(x) ** 2 for x in torch.as_tensor(S).detach().double().reshape(-1).tolist()]
    if any(not math.isfinite(x) for x in s2):
        raise ValidationError(f"module {name}: singular values contain NaN/Inf")
    return s2[: min(m, n)], m + n


def _row_counts(modules: Mapping[str, object], entries: Mapping[str, tuple[list[float], int]],
                budget: int) -> dict[str, int]:
    """Rows for each RowSpectrum entry: the share of `budget` a uniform rank would give its matrix,
    budget·(rows + width) / Σ(m + n) over the changed matrices, in whole rows, at most the changed ones."""
    weights = {n: e[1] for n, e in entries.items() if e[0] and e[0][0] > 0}
    for name, spec in modules.items():
        if isinstance(spec, RowSpectrum) and spec.sq.numel():
            weights[name] = spec.rows + spec.width
    total = sum(weights.values())
    out = {}
    for name, spec in modules.items():
        if isinstance(spec, RowSpectrum):
            if spec.width <= 0 or not bool(torch.isfinite(spec.sq).all()):
                raise ValidationError(f"module {name}: row norms must be finite with a positive width")
            share = budget * weights.get(name, 0) // total if total else 0
            out[name] = min(share // spec.width, int(spec.sq.numel()))
    return out


def allocate_budget(modules: Mapping[str, tuple[Tensor, int, int] | RowSpectrum], budget: int) -> dict[str, int]:
    """Spread `budget` parameters over modules; {name: rank} (row count for a RowSpectrum).

    modules: name -> (S, m, n), S descending (the computed singular values; their count caps
    the module's rank), or a RowSpectrum (an embedding written as whole rows).

    Rows first: σ² per parameter cannot weigh a lookup table against dense layers (a row is
    used whole by every occurrence of its token, and never otherwise), so a RowSpectrum keeps
    the share a uniform rank would give it (see _row_counts): its most changed rows.
    Then LoRA ranks, greedily: a rank-1 step on an (m, n) module costs m + n parameters and
    removes σ² from the squared error; steps are taken in order of σ²/(m+n) (a heap); a step
    that no longer fits is skipped and cheaper ones may still fit. Zero singular values are
    never bought. Ties go to the module that comes first in `modules`. Every module appears in
    the result (0 if none).
    """
    budget = _as_int(budget, "budget")
    if budget < 0:
        raise OptionError(f"budget must be >= 0 parameters, got {budget}")
    entries = {name: _lora_entry(name, spec) for name, spec in modules.items() if not isinstance(spec, RowSpectrum)}
    ranks = _row_counts(modules, entries, budget)
    left = budget - sum(k * spec.width for n, k in ranks.items() if isinstance(spec := modules[n], RowSpectrum))
    heap: list[tuple[float, int, str]] = []  # (-gain per param, module order, name)
    steps: dict[str, int] = {}
    for order, (name, (s2, cost)) in enumerate(entries.items()):
        ranks[name] = steps[name] = 0
        if s2 and s2[0] > 0.0:
            heap.append((-s2[0] / cost, order, name))
    heapq.heapify(heap)
    while heap:
        _, order, name = heapq.heappop(heap)
        s2, cost = entries[name]
        if cost > left:
            continue  # this module cannot grow any more; cheaper ones still might
        left -= cost
        i = steps[name]
        ranks[name] = steps[name] = i + 1
        if i + 1 < len(s2) and s2[i + 1] > 0.0:
            heapq.heappush(heap, (-s2[i + 1] / cost, order, name))
    return {name: ranks[name] for name in modules}
