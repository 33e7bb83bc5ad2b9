"""Whitened factorization, the error-aware closed form and the robust Cholesky,
checked against independent numpy computations."""
import numpy as np
import pytest
import torch

from vllm_neuronmlp.tools import whitening as wh


def anisotropic_inputs(n=6000, d=48, seed=0):
    """Activations with a few huge channels (as in real LLMs) and correlated ones."""
    g = np.random.default_rng(seed)
    base = g.standard_normal((n, d))
    mix = np.eye(d) + 0.3 * g.standard_normal((d, d))
    scales = np.logspace(1.5, -1.5, d)
    return torch.tensor((base @ mix) * scales)


def np_error(x, w, u, v):
    x, w, u, v = (np.asarray(t, dtype=np.float64) for t in (x, w, u, v))
    return np.linalg.norm(x @ u @ v - x @ w) / np.linalg.norm(x @ w)


def gram(x):
    acc = wh.GramAccumulator(x.shape[1])
    for chunk in torch.split(x, 1000):
        acc.add(chunk)
    return acc.matrix


def test_gram_accumulator_matches_numpy():
    x = anisotropic_inputs(n=3000, d=16)
    y = anisotropic_inputs(n=3000, d=16, seed=1)
    acc = wh.GramAccumulator(16)
    cross = wh.GramAccumulator(16)
    for a, b in zip(torch.split(x, 700), torch.split(y, 700)):
        acc.add(a.float())
        cross.add(a.float(), b.float())
    xf, yf = x.float().double().numpy(), y.float().double().numpy()
    np.testing.assert_allclose(acc.matrix.numpy(), xf.T @ xf, rtol=1e-10)
    np.testing.assert_allclose(cross.matrix.numpy(), xf.T @ yf, rtol=1e-9, atol=1e-6)
    assert acc.rows == 3000


@pytest.mark.parametrize("rank", [4, 12, 24])
def test_whitening_beats_plain_svd_on_anisotropic_activations(rank):
    x = anisotropic_inputs()
    w = torch.tensor(np.random.default_rng(1).standard_normal((48, 64)))
    chol = wh.robust_cholesky(gram(x)).factor
    fw = wh.factorize(w, rank, chol)
    fp = wh.factorize(w, rank)
    err_w = np_error(x, w, fw.u, fw.v)
    err_p = np_error(x, w, fp.u, fp.v)
    assert fw.u.shape == (48, rank) and fw.v.shape == (rank, 64)
    assert err_w < 0.8 * err_p


def test_whitened_factors_are_optimal_rank_r_in_activation_metric():
    # independent reference: the best rank-r approximation of X W in the column
    # space of X is the truncated SVD of Q^T X W with X = Q R (thin QR).
    x = anisotropic_inputs(n=2000, d=24)
    w = torch.tensor(np.random.default_rng(2).standard_normal((24, 40)))
    r = 7
    f = wh.factorize(w, r, wh.robust_cholesky(gram(x)).factor)
    xn, wn = x.numpy(), w.numpy()
    q, _ = np.linalg.qr(xn)
    p, s, vt = np.linalg.svd(q.T @ xn @ wn, full_matrices=False)
    best = np.sqrt(np.sum(s[r:] ** 2)) / np.linalg.norm(xn @ wn)
    assert np_error(x, w, f.u, f.v) == pytest.approx(best, rel=1e-6)


def test_plain_factorize_is_truncated_svd():
    w = torch.tensor(np.random.default_rng(3).standard_normal((30, 50)))
    f = wh.factorize(w, 10)
    p, s, vt = np.linalg.svd(w.numpy(), full_matrices=False)
    ref = (p[:, :10] * s[:10]) @ vt[:10]
    np.testing.assert_allclose((f.u @ f.v).numpy(), ref, atol=1e-10)
    # balanced split: both factors carry sqrt(sigma)
    np.testing.assert_allclose(np.linalg.norm(f.u.numpy(), axis=0), np.sqrt(s[:10]), rtol=1e-10)


def test_error_aware_matches_least_squares_reference():
    # compressed-path inputs differ from the originals; at full rank the fit
    # must equal the least-squares solution of  X_c M = X_o W.
    g = np.random.default_rng(4)
    xo = anisotropic_inputs(n=3000, d=20, seed=5).numpy()
    xc = xo + 0.2 * g.standard_normal(xo.shape) * xo.std(axis=0)
    w = g.standard_normal((20, 30))
    xo_t, xc_t, w_t = torch.tensor(xo), torch.tensor(xc), torch.tensor(w)
    cc = gram(xc_t)
    co = wh.GramAccumulator(20)
    co.add(xc_t, xo_t)
    chol = wh.robust_cholesky(cc).factor
    full = wh.factorize(w_t, 20, chol, co.matrix)
    ref, *_ = np.linalg.lstsq(xc, xo @ w, rcond=None)
    np.testing.assert_allclose((full.u @ full.v).numpy(), ref, rtol=1e-6, atol=1e-8)
    # at low rank it beats plain whitening (which ignores the input shift) on the true objective
    r = 8
    ea = wh.factorize(w_t, r, chol, co.matrix)
    pw = wh.factorize(w_t, r, wh.robust_cholesky(gram(xo_t)).factor)
    target = xo @ w

    def err(f):
        return np.linalg.norm(xc @ f.u.numpy() @ f.v.numpy() - target)

    assert err(ea) < err(pw)
    assert wh.activation_error(xc_t, w_t, ea.u, ea.v, x_target=xo_t) == pytest.approx(
        err(ea) / np.linalg.norm(target), rel=1e-9)


def test_cholesky_recovers_from_singular_covariance():
    # dead input channels (all-zero columns) and rank deficiency: plain Cholesky fails
    x = anisotropic_inputs(n=500, d=32).clone()
    x[:, 5] = 0.0
    x[:, 9] = x[:, 3]  # duplicated channel
    c = gram(x)
    _, info = torch.linalg.cholesky_ex(c)
    assert int(info) != 0
    res = wh.robust_cholesky(c, "layer.mlp.gate_proj")
    assert res.retried and res.jitter > 0
    lower = res.factor
    assert torch.allclose(lower, torch.tril(lower))
    # a valid factor of the jittered matrix, within the added jitter
    assert torch.allclose(lower @ lower.T, 0.5 * (c + c.T) + res.jitter * torch.eye(32), rtol=1e-8, atol=1e-8)
    # and it still gives finite factors that beat plain SVD in the activation metric
    w = torch.tensor(np.random.default_rng(6).standard_normal((32, 40)))
    f = wh.factorize(w, 8, lower)
    assert torch.isfinite(f.u).all() and torch.isfinite(f.v).all()
    assert np_error(x, w, f.u, f.v) < np_error(x, w, *(lambda g: (g.u, g.v))(wh.factorize(w, 8)))


def test_cholesky_of_all_zero_and_asymmetric_input():
    res = wh.robust_cholesky(torch.zeros(6, 6))
    assert res.retried and torch.isfinite(res.factor).all()
    a = torch.tensor(np.random.default_rng(7).standard_normal((10, 10)))
    spd = a @ a.T + torch.eye(10)
    skewed = spd.clone()
    skewed[0, 1] += 1e-9  # tiny asymmetry from accumulation order
    assert torch.isfinite(wh.robust_cholesky(skewed).factor).all()


def test_cholesky_rejects_non_finite_covariance():
    c = torch.eye(4)
    c[1, 1] = float("nan")
    with pytest.raises(wh.FactorizationError, match="model.layers.3.mlp.down_proj input.*non-finite"):
        wh.robust_cholesky(c, "model.layers.3.mlp.down_proj input")


def test_factorize_rank_out_of_range():
    with pytest.raises(ValueError, match="rank 0 out of range"):
        wh.factorize(torch.ones(4, 6), 0)
    with pytest.raises(ValueError, match="rank 5 out of range"):
        wh.factorize(torch.ones(4, 6), 5)


def test_output_weighted_factors_are_optimal_in_the_weighted_metric():
    # the fisher method minimizes ||X (W - W_r) D||_F over rank-r W_r; reference:
    # truncated SVD of Q^T X W D (X = Q R), computed with numpy
    x = anisotropic_inputs(n=2000, d=24)
    g = np.random.default_rng(4)
    w = torch.tensor(g.standard_normal((24, 40)))
    d = torch.tensor(np.exp(g.standard_normal(40)))  # channel weights spanning ~e^±3
    r = 6
    f = wh.factorize(w, r, wh.robust_cholesky(gram(x)).factor, out_scale=d)
    xn, wn, dn = x.numpy(), w.numpy(), d.numpy()
    q, _ = np.linalg.qr(xn)
    s = np.linalg.svd(q.T @ xn @ wn * dn, compute_uv=False)
    got = np.linalg.norm(xn @ (f.u.numpy() @ f.v.numpy() - wn) * dn)
    assert got == pytest.approx(np.sqrt(np.sum(s[r:] ** 2)), rel=1e-6)
    # the dropped spectrum is the weighted loss: what the adaptive allocation compares
    np.testing.assert_allclose(f.singular_values.numpy(), s, rtol=1e-6)
    # and the unweighted fit is worse in the weighted metric
    plain = wh.factorize(w, r, wh.robust_cholesky(gram(x)).factor)
    assert np.linalg.norm(xn @ (plain.u.numpy() @ plain.v.numpy() - wn) * dn) > 1.05 * got


def test_unit_output_weights_change_nothing():
    x = anisotropic_inputs(n=1000, d=16)
    w = torch.tensor(np.random.default_rng(5).standard_normal((16, 20)))
    chol = wh.robust_cholesky(gram(x)).factor
    a = wh.factorize(w, 5, chol)
    b = wh.factorize(w, 5, chol, out_scale=torch.ones(20))
    np.testing.assert_allclose((a.u @ a.v).numpy(), (b.u @ b.v).numpy(), atol=1e-9)


@pytest.mark.parametrize("scale, err, msg", [
    (torch.ones(7), ValueError, "out_scale has 7 entries for 20 output channels"),
    (torch.cat([torch.ones(19), torch.zeros(1)]), wh.FactorizationError, "finite and positive"),
    (torch.full((20,), float("nan")), wh.FactorizationError, "finite and positive"),
])
def test_bad_output_weights_are_refused(scale, err, msg):
    w = torch.tensor(np.random.default_rng(6).standard_normal((16, 20)))
    with pytest.raises(err, match=msg):
        wh.factorize(w, 4, None, out_scale=scale)
