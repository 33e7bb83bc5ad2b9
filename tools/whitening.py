"""Activation-aware low-rank factorization of one linear map.

A projection is taken as `W [in, out]` (y = x W). Calibration inputs X are
summarized by their Gram matrix `C = X^T X` (float64), factored as
`C = L L^T` (lower-triangular L). Since `||X M||_F = ||L^T M||_F` for any M,
the best rank-r approximation of W *in the metric of the activations* is read
off the SVD of `L^T W`:

    L^T W = P S Q^T,   U = L^-T P_r S_r^1/2,   V = S_r^1/2 Q_r^T,   W ~ U V.

Error-aware variant: the compressed model feeds the layer inputs X_c that
differ from the original X_o (earlier layers are already approximate). We want
`X_c U V ~ X_o W` (the original output on the original input). With
`C_c = X_c^T X_c = L L^T` and the cross term `K = X_c^T X_o`, the unconstrained
least-squares solution is `W* = C_c^-1 K W` and
`||X_c M - X_o W||^2 = ||L^T (M - W*)||^2 + const`, so the same truncation
applies to `L^T W* = L^-1 K W`. With X_c = X_o it reduces to the plain case.

Output weighting (the `fisher` method): not every output channel matters
equally to the model's loss. With per-channel weights `d_j = sqrt(F_j)` (plus
a small floor), F_j the squared loss gradient w.r.t. output channel j summed
over tokens (the diagonal of the empirical Fisher of the layer's outputs, see
sensitivity.py), the error
`sum_j F_j ||X (W - W_r) e_j||^2 = ||L^T (W - W_r) D||_F^2`, D = diag(d), is a
second-order estimate of the loss increase. It is minimized by truncating
`L^T W D = P S Q^T` and undoing D on the right: `U = L^-T P_r S_r^1/2`,
`V = S_r^1/2 Q_r^T D^-1`. The dropped `S^2` are then loss estimates, which
is what the adaptive rank allocation compares across matrices. (Weighting
the low-rank fit by Fisher information follows FWSVD, Hsu et al. 2022; here
it weights output channels and combines with the input whitening.)

Triangular solves only (no explicit inverse). Cholesky is made robust by
symmetrizing and adding jitter proportional to the mean diagonal when the
first attempt fails (e.g. dead input channels make C singular).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Tuple

import torch


class FactorizationError(RuntimeError):
    """A covariance that cannot be made positive definite, or non-finite data."""


class GramAccumulator:
    """Accumulates `A^T B` in float64 over batches of rows (tokens), on `device`."""

    def __init__(self, dim_a: int, dim_b: Optional[int] = None, device: Optional[torch.device] = None):
        self.dim_a = dim_a
        self.dim_b = dim_b if dim_b is not None else dim_a
        self.matrix = torch.zeros(self.dim_a, self.dim_b, dtype=torch.float64, device=device)
        self.rows = 0

    def add(self, a: torch.Tensor, b: Optional[torch.Tensor] = None) -> None:
        a2 = a.reshape(-1, a.shape[-1]).to(torch.float64)
        if b is None:
            self.matrix.addmm_(a2.T, a2)
        else:
            b2 = b.reshape(-1, b.shape[-1]).to(torch.float64)
            if b2.shape[0] != a2.shape[0]:
                raise ValueError(f"row counts differ: {a2.shape[0]} vs {b2.shape[0]}")
            self.matrix.addmm_(a2.T, b2)
        self.rows += a2.shape[0]


@dataclass
class CholeskyResult:
    factor: torch.Tensor  # lower triangular, float64
    jitter: float  # absolute amount added to the diagonal (damping included)
    retried: bool = False  # the first attempt failed and jitter had to be added


def robust_cholesky(cov: torch.Tensor, name: str = "covariance", damping: float = 0.0) -> CholeskyResult:
    """Lower Cholesky factor of a (nearly) positive semi-definite matrix.

    `damping` (relative to the mean diagonal) is always added; on failure the
    matrix is symmetrized and the jitter grows tenfold from 1e-10 of the mean
    diagonal up to 10x the mean diagonal. Works on one copy of the matrix, with
    in-place diagonal updates (these matrices can be GiBs for wide MLPs).
    """
    if not torch.isfinite(cov).all():
        raise FactorizationError(f"{name}: the calibration covariance has non-finite entries "
                                 f"(the activations overflowed or the weights hold NaN/Inf)")
    with _single_thread():
        return _robust_cholesky(cov, name, damping)


def _robust_cholesky(cov: torch.Tensor, name: str, damping: float) -> CholeskyResult:
    c = cov.to(torch.float64, copy=True)
    diag = c.diagonal()
    mean_diag = float(diag.mean())
    if not math.isfinite(mean_diag) or mean_diag <= 0.0:
        mean_diag = 1.0  # all-zero activations: any scale will do
    base_jitter = damping * mean_diag
    if base_jitter > 0:
        diag.add_(base_jitter)
    factor, info = torch.linalg.cholesky_ex(c)
    if int(info) == 0 and torch.isfinite(factor).all():
        return CholeskyResult(factor, base_jitter)
    del factor
    c.add_(c.T.clone()).mul_(0.5)  # symmetrize
    added = 0.0
    eps = 1e-10
    while eps <= 10.0:
        jitter = eps * mean_diag
        diag.add_(jitter - added)
        added = jitter
        factor, info = torch.linalg.cholesky_ex(c)
        if int(info) == 0 and torch.isfinite(factor).all():
            return CholeskyResult(factor, base_jitter + jitter, retried=True)
        del factor
        eps *= 10.0
    raise FactorizationError(f"{name}: Cholesky failed even with jitter of 10x the mean diagonal")


@dataclass
class Factorization:
    u: torch.Tensor  # [in, r]
    v: torch.Tensor  # [r, out]
    singular_values: torch.Tensor  # all of them, descending (whitened metric)

    @property
    def rank(self) -> int:
        return self.u.shape[1]

    def retained_energy(self) -> float:
        s2 = self.singular_values.double() ** 2
        total = float(s2.sum())
        return float(s2[: self.rank].sum()) / total if total > 0 else 1.0


def whitened_target(weight_io: torch.Tensor, chol: Optional[torch.Tensor],
                    cross: Optional[torch.Tensor] = None, out_scale: Optional[torch.Tensor] = None
                    ) -> torch.Tensor:
    """`L^T W` (plain whitening), `L^-1 K W` (error-aware, K = X_c^T X_o), or W
    itself when `chol` is None (plain SVD); columns times `out_scale` (the
    output-channel weights d) when given."""
    w = weight_io.to(torch.float64)
    if chol is None:
        t = w
    elif cross is None:
        t = chol.T @ w
    else:
        with _single_thread():
            t = torch.linalg.solve_triangular(chol, cross.to(torch.float64) @ w, upper=False)
    if out_scale is not None:
        t = t * _check_scale(out_scale, t.shape[1], t.device)[None, :]
    return t


def _check_scale(out_scale: torch.Tensor, n_out: int, device: torch.device) -> torch.Tensor:
    d = out_scale.to(device=device, dtype=torch.float64).reshape(-1)
    if d.numel() != n_out:
        raise ValueError(f"out_scale has {d.numel()} entries for {n_out} output channels")
    if not (torch.isfinite(d).all() and bool((d > 0).all())):
        raise FactorizationError("output-channel weights must be finite and positive")
    return d


class _single_thread:
    """LAPACK calls on small matrices run fastest on one thread; with OpenMP
    threads on a busy machine they can be 5-10x slower (spin-waiting)."""

    def __enter__(self):
        self.n = torch.get_num_threads()
        torch.set_num_threads(1)

    def __exit__(self, *exc):
        torch.set_num_threads(self.n)
        return False


def truncated_svd(t: torch.Tensor, rank: int) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(P_r [m, r], all singular values [min(m, n)] descending, Qh_r [r, n]) of a
    float64 matrix, from the symmetric eigenproblem of its smaller Gram matrix
    (much faster than a full SVD here, and exact enough for the leading
    singular vectors that are kept). Directions with a zero singular value get
    zero vectors."""
    m, n = t.shape
    with _single_thread():
        if m <= n:
            evals, evecs = torch.linalg.eigh(t @ t.T)
        else:
            evals, evecs = torch.linalg.eigh(t.T @ t)
    order = torch.argsort(evals, descending=True)
    s = evals[order].clamp_min(0).sqrt()
    vecs = evecs[:, order[:rank]]
    sr = s[:rank]
    tiny = sr.max().clamp_min(1e-300) * 1e-12 if rank > 0 else 0
    inv = torch.where(sr > tiny, 1.0 / sr.clamp_min(1e-300), torch.zeros_like(sr))
    if m <= n:
        p = vecs
        qh = inv[:, None] * (p.T @ t)
    else:
        qh = vecs.T
        p = (t @ vecs) * inv[None, :]
    return p, s, qh


def whitened_spectrum(weight_io: torch.Tensor, chol: Optional[torch.Tensor],
                      cross: Optional[torch.Tensor] = None, out_scale: Optional[torch.Tensor] = None
                      ) -> torch.Tensor:
    """All singular values (descending) of the whitened (and output-weighted) target."""
    t = whitened_target(weight_io, chol, cross, out_scale)
    with _single_thread():
        evals = torch.linalg.eigvalsh(t @ t.T if t.shape[0] <= t.shape[1] else t.T @ t)
    return evals.flip(0).clamp_min(0).sqrt()


def factorize(weight_io: torch.Tensor, rank: int, chol: Optional[torch.Tensor] = None,
              cross: Optional[torch.Tensor] = None, out_scale: Optional[torch.Tensor] = None) -> Factorization:
    """Rank-`rank` factors `U [in, r]`, `V [r, out]` of `W [in, out]` minimizing
    the activation-weighted error (see the module docstring). `chol=None` gives
    the plain truncated SVD; `out_scale` (d) weights the output channels."""
    n_in, n_out = weight_io.shape
    if not 0 < rank <= min(n_in, n_out):
        raise ValueError(f"rank {rank} out of range for a [{n_in}, {n_out}] matrix")
    target = whitened_target(weight_io, chol, cross, out_scale)
    p, s, qh = truncated_svd(target, rank)
    root = s[:rank].sqrt()
    left = p * root  # L^T U = P_r S_r^1/2
    if chol is not None:
        with _single_thread():
            u = torch.linalg.solve_triangular(chol.T, left, upper=True)
    else:
        u = left
    v = root[:, None] * qh
    if out_scale is not None:
        v = v / _check_scale(out_scale, n_out, v.device)[None, :]  # undo D: W_r = L^-T (L^T W D)_r D^-1
    if not (torch.isfinite(u).all() and torch.isfinite(v).all()):
        raise FactorizationError("factorization produced non-finite factors")
    return Factorization(u=u, v=v, singular_values=s)


def activation_error(x: torch.Tensor, weight_io: torch.Tensor, u: torch.Tensor, v: torch.Tensor,
                     x_target: Optional[torch.Tensor] = None) -> float:
    """Relative output error `||x U V - x_t W|| / ||x_t W||` (x_t = x by default)."""
    x64 = x.reshape(-1, x.shape[-1]).double()
    xt = x64 if x_target is None else x_target.reshape(-1, x_target.shape[-1]).double()
    ref = xt @ weight_io.double()
    from vllm_neuronmlp.ops import factored_linear

    approx = factored_linear(x64, u.double(), v.double())
    return float(torch.linalg.norm(approx - ref) / torch.linalg.norm(ref))
