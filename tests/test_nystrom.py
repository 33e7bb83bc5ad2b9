"""Intermediate-channel selection with a Nyström-corrected down projection
(tools/methods/nystrom.py) against numpy references, and the width / hybrid
allocations (tools/allocation/) under the budget."""
import numpy as np
import pytest
import torch

from test_ranks import smollm2_matrices
from vllm_neuronmlp.tools import allocation as alloc
from vllm_neuronmlp.tools.methods import nystrom as ny


def random_z(tokens=400, inter=48, seed=0, dead=True):
    """Correlated intermediate activations, with (`dead`) a few nearly dead channels."""
    rng = np.random.default_rng(seed)
    z = rng.standard_normal((tokens, 16)) @ rng.standard_normal((16, inter))
    z += 0.1 * rng.standard_normal((tokens, inter))
    if dead:
        z[:, :3] *= 1e-3
    return z


def test_ridge_leverage_scores_match_numpy():
    z = random_z()
    c = z.T @ z
    lam = ny.LEVERAGE_RIDGE * np.mean(np.diag(c))
    want = np.diag(c @ np.linalg.solve(c + lam * np.eye(c.shape[0]), np.eye(c.shape[0])))
    got = ny.ridge_leverage_scores(torch.from_numpy(c)).numpy()
    np.testing.assert_allclose(got, want, rtol=1e-8, atol=1e-10)
    order = ny.leverage_order(torch.from_numpy(c)).tolist()
    assert sorted(order) == list(range(c.shape[0]))
    assert np.all(np.diff(want[order]) <= 1e-12)
    assert set(order[-3:]) == {0, 1, 2}  # the dead channels score lowest


def test_nystrom_down_minimises_the_reconstruction_error_over_the_kept_channels():
    rng = np.random.default_rng(1)
    z = random_z(seed=1, dead=False)
    w = rng.standard_normal((z.shape[1], 20))
    keep = torch.tensor(sorted(rng.choice(z.shape[1], 30, replace=False).tolist()))
    got = ny.nystrom_down(torch.from_numpy(z.T @ z), torch.from_numpy(w), keep).numpy()
    zs = z[:, keep.numpy()]
    want = np.linalg.lstsq(zs, z @ w, rcond=None)[0]  # argmin_B ||Z W - Z_S B||
    err = lambda b: np.linalg.norm(z @ w - zs @ b)
    assert err(got) <= err(want) * (1 + 1e-6)
    assert np.linalg.norm(zs @ got - zs @ want) < 1e-4 * np.linalg.norm(z @ w)  # the same fit, up to the ridge
    # a perturbed down projection is worse, and the uncorrected rows of W are much worse
    assert err(got + 1e-3 * rng.standard_normal(got.shape)) > err(got)
    assert err(w[keep.numpy()]) > 1.5 * err(got)


def test_nystrom_ridge_bounds_the_coefficients_of_nearly_dead_channels():
    z = random_z(seed=3)  # channels 0-2 carry ~1e-3 of the others' energy
    w = np.random.default_rng(3).standard_normal((z.shape[1], 8))
    keep = torch.arange(30)
    got = ny.nystrom_down(torch.from_numpy(z.T @ z), torch.from_numpy(w), keep).numpy()
    exact = np.linalg.lstsq(z[:, :30], z @ w, rcond=None)[0]
    assert np.abs(got[:3]).max() < np.abs(exact[:3]).max()
    assert np.linalg.norm(z @ w - z[:, :30] @ got) < 1.05 * np.linalg.norm(z @ w - z[:, :30] @ exact)


def test_channel_losses_are_the_weighted_schur_complement_along_the_order():
    rng = np.random.default_rng(2)
    z = random_z(seed=2, dead=False)
    c = z.T @ z
    w = rng.standard_normal((z.shape[1], 12))
    d = rng.uniform(0.5, 2.0, 12)
    order = torch.from_numpy(rng.permutation(z.shape[1]))
    got = ny.channel_losses(torch.from_numpy(c), torch.from_numpy(w), order, torch.from_numpy(d)).numpy()
    wt = w * d[None, :]
    lam = ny.SOLVE_RIDGE * np.mean(np.diag(c))
    assert got[0] == pytest.approx(np.trace(wt.T @ c @ wt), rel=1e-10)
    for k in (1, 7, 30, 47):
        s = order[:k].numpy()
        schur = c - c[:, s] @ np.linalg.solve(c[np.ix_(s, s)] + lam * np.eye(k), c[s, :])
        assert got[k] == pytest.approx(np.trace(wt.T @ schur @ wt), rel=1e-6, abs=1e-9 * got[0])
        # and it is the Fisher-weighted output error the corrected down projection leaves
        b = ny.nystrom_down(torch.from_numpy(c), torch.from_numpy(w), torch.from_numpy(s)).numpy()
        resid = (z @ w - z[:, s] @ b) * d[None, :]
        assert got[k] == pytest.approx(np.sum(resid ** 2), rel=1e-2, abs=1e-4 * got[0])  # up to the ridge
    assert got[-1] == 0.0 and got[-2] < 1e-3 * got[0]
    assert np.all(np.diff(got) <= 1e-9 * got[0])  # more channels never cost more


@pytest.mark.parametrize("block", [128, 3])  # one lazy batch; batches of 3 with rows moved between them
def test_loss_aware_order_removes_the_channel_that_loses_least_at_every_step(monkeypatch, block):
    monkeypatch.setattr(ny, "ORDER_BLOCK", block)
    rng = np.random.default_rng(4)
    z = random_z(inter=14, seed=4, dead=False)
    c = z.T @ z
    w = rng.standard_normal((14, 6))
    w[9] *= 1e-3  # channel 9 barely reaches the output
    d = rng.uniform(0.5, 2.0, 6)
    order = ny.loss_aware_order(torch.from_numpy(c), torch.from_numpy(w), torch.from_numpy(d)).tolist()
    assert sorted(order) == list(range(14))
    a = c + ny.SOLVE_RIDGE * np.mean(np.diag(c)) * np.eye(14)
    bt = c @ (w * d[None, :])

    def explained(keep):  # tr(B_S^T A_SS^-1 B_S), by a direct solve
        s = sorted(keep)
        return np.trace(bt[s].T @ np.linalg.solve(a[np.ix_(s, s)], bt[s]))

    kept = set(range(14))
    for removed in order[::-1][:-1]:  # the reverse of the order is the removal sequence
        values = {j: explained(kept - {j}) for j in kept}
        assert values[removed] == pytest.approx(max(values.values()), rel=1e-9)
        kept.remove(removed)
    assert order[-1] == 9  # the channel the output does not need goes first
    # on the loss it was built for, the order beats ridge leverage here (greedy: no guarantee in general)
    losses = lambda o: ny.channel_losses(torch.from_numpy(c), torch.from_numpy(w), torch.tensor(o),
                                         torch.from_numpy(d)).numpy()
    lev = ny.leverage_order(torch.from_numpy(c)).tolist()
    assert np.all(losses(order)[7:] <= losses(lev)[7:] + 1e-9 * losses(order)[0])


def rank_one_order(c, w, d, rel_ridge=ny.SOLVE_RIDGE):
    """The reference: the previous loss_aware_order, one rank-one downdate of
    the full G = A_SS^-1 and M = G B_S per removal (float64). Also returns the
    smallest relative gap between the best and second-best removal over the
    steps, so that a test can tell a real disagreement from a near-tie."""
    a = torch.from_numpy(c).clone()
    wt = torch.from_numpy(w * d[None, :])
    b = a @ wt
    a.diagonal().add_(rel_ridge * float(a.diagonal().mean()))
    g = torch.cholesky_inverse(torch.linalg.cholesky(a))
    m = g @ b
    n = a.shape[0]
    kept = torch.ones(n, dtype=torch.bool)
    removed, gap = [], float("inf")
    for _ in range(n - 1):
        lost = torch.where(kept, m.pow(2).sum(1) / g.diagonal(), torch.tensor(float("inf"), dtype=torch.float64))
        two = torch.topk(lost, min(2, int(kept.sum())), largest=False).values
        if two.numel() == 2 and float(two[0]) > 0:
            gap = min(gap, float((two[1] - two[0]) / two[1]))
        j = int(torch.argmin(lost))
        removed.append(j)
        kept[j] = False
        g_j, m_j, pivot = g[:, j].clone(), m[j].clone(), float(g[j, j])
        g.addr_(g_j, g_j, alpha=-1.0 / pivot)
        m.addr_(g_j, m_j, alpha=-1.0 / pivot)
        g[j, j] = 1.0
    return [int(i) for i in torch.nonzero(kept)] + removed[::-1], gap


def mlp_like(inter, hidden, seed, rank=None):
    """C of correlated activations with a spread of channel energies, W_d, Fisher weights."""
    rng = np.random.default_rng(seed)
    rank = rank or max(2, inter // 3)
    z = rng.standard_normal((3 * inter, rank)) @ rng.standard_normal((rank, inter))
    z = z * rng.lognormal(0.0, 1.0, inter)[None, :] + 0.05 * rng.standard_normal((3 * inter, inter))
    return z.T @ z, rng.standard_normal((inter, hidden)), rng.uniform(0.5, 2.0, hidden)


@pytest.mark.parametrize("inter,hidden,block,rows", [
    (37, 9, 128, 1024),  # one partial block
    (200, 24, 128, 1024),  # a full block, then a partial one
    (150, 16, 16, 24),  # many blocks; row chunks that do not divide the width
    (61, 8, 1, 7),  # every downdate applied at once
])
def test_blocked_loss_aware_order_matches_the_rank_one_reference(monkeypatch, inter, hidden, block, rows):
    monkeypatch.setattr(ny, "ORDER_BLOCK", block)
    monkeypatch.setattr(ny, "_ORDER_ROWS", rows)
    c, w, d = mlp_like(inter, hidden, seed=inter)
    want, gap = rank_one_order(c, w, d)
    assert gap > 1e-7  # no near-tie for rounding to flip: a difference below is the algorithm's
    got = ny.loss_aware_order(torch.from_numpy(c), torch.from_numpy(w), torch.from_numpy(d)).tolist()
    assert got == want


def test_blocked_loss_aware_order_breaks_exact_ties_by_channel_index(monkeypatch):
    # dead channels (zero activations) lose exactly nothing: removed first, lowest index first,
    # also after the block moves rows around
    monkeypatch.setattr(ny, "ORDER_BLOCK", 4)
    c, w, d = mlp_like(40, 6, seed=7)
    dead = [3, 11, 12, 20, 25, 38, 39]  # the first block moves 38 and 39 into rows 12 and 20, before 25
    c[dead, :] = 0.0
    c[:, dead] = 0.0
    want, _ = rank_one_order(c, w, d)
    got = ny.loss_aware_order(torch.from_numpy(c), torch.from_numpy(w), torch.from_numpy(d)).tolist()
    assert got[-len(dead):] == dead[::-1]
    assert got == want


# ---------------------------------------------------------------- allocations
def smollm2_like(layers=8):
    return smollm2_matrices(layers=layers)


@pytest.mark.parametrize("ratio", [0.05, 0.2, 0.4, 0.7])
def test_width_allocations_fit_the_budget(ratio):
    mats = smollm2_like()
    layers = list(range(8))
    rng = np.random.default_rng(0)
    losses = {i: np.cumsum(rng.uniform(0, 1, 1537)[::-1])[::-1].tolist() for i in layers}
    for widths in (alloc.allocate_widths_uniform(layers, 576, 1536, ratio, 128),
                   alloc.allocate_widths_greedy(layers, 576, 1536, losses, ratio, 128)):
        assert all(k % 128 == 0 and 128 <= k < 1536 for k in widths.values())
        achieved = alloc.plan_ratio(mats, {}, widths)
        assert ratio <= achieved < ratio + 3 * 128 / 1536 / 8 + 1e-9


@pytest.mark.parametrize("ratio", [0.05, 0.1, 0.2, 0.3, 0.4])
def test_width_allocations_hit_a_reachable_ratio_exactly(ratio):
    # SmolLM2's 30 layers x 12 blocks: every ratio here is a whole number of blocks
    # (0.05 -> 18); a float-rounded budget once made the greedy remove a 19th
    layers = list(range(30))
    mats = smollm2_matrices(layers=30)
    losses = {i: [float(1536 - k) * (1 + i) for k in range(1537)] for i in layers}
    for widths in (alloc.allocate_widths_uniform(layers, 576, 1536, ratio, 128),
                   alloc.allocate_widths_greedy(layers, 576, 1536, losses, ratio, 128)):
        assert sum(1536 - k for k in widths.values()) == round(ratio * 360) * 128
        assert alloc.plan_ratio(mats, {}, widths) == pytest.approx(ratio, abs=1e-12)


def test_greedy_widths_cut_the_layer_whose_channels_matter_least():
    layers = [0, 1]
    flat = [float(1536 - k) for k in range(1537)]  # 1 per channel
    steep = [100.0 * (1536 - k) for k in range(1537)]
    widths = alloc.allocate_widths_greedy(layers, 576, 1536, {0: steep, 1: flat}, 0.2, 128)
    assert 0 not in widths and widths[1] < 1536


def test_width_budget_errors():
    with pytest.raises(alloc.BudgetError, match="largest reachable ratio"):
        alloc.allocate_widths_uniform([0, 1], 576, 1536, 0.95, 128)
    with pytest.raises(alloc.BudgetError, match="not a multiple of block size"):
        alloc.allocate_widths_uniform([0, 1], 576, 1500, 0.2, 128)


def _synthetic(mats, seed, channel_scale):
    rng = np.random.default_rng(seed)
    spectra = {m.name: sorted(rng.uniform(0, 1, min(m.m, m.n)) ** 3 * rng.uniform(0.5, 2), reverse=True)
               for m in mats}
    layers = sorted({m.layer for m in mats})
    losses = {i: (channel_scale * np.cumsum(np.sort(rng.uniform(0, 1, 1536) ** 4))[::-1]).tolist() + [0.0]
              for i in layers}
    return spectra, losses


@pytest.mark.parametrize("ratio", [0.05, 0.1, 0.2, 0.3, 0.4, 0.6])
@pytest.mark.parametrize("seed,channel_scale", [(0, 1.0), (1, 0.05), (2, 20.0)])
def test_hybrid_never_exceeds_the_budget(ratio, seed, channel_scale):
    mats = smollm2_like()
    spectra, losses = _synthetic(mats, seed, channel_scale)
    plan = alloc.allocate_hybrid(mats, spectra, losses, 1536, ratio, 128)
    assert alloc.plan_cost(mats, plan.ranks, plan.widths) <= alloc.budget_params(mats, ratio)
    assert alloc.plan_ratio(mats, plan.ranks, plan.widths) < ratio + 0.01  # the give-back pass fills the budget
    for m in mats:
        r = plan.ranks[m.name]
        shaped = alloc.narrowed(m, plan.widths.get(m.layer))
        assert r == alloc.DENSE or (r % 128 == 0 and 128 <= r <= shaped.max_rank(128))
    for i, k in plan.widths.items():
        assert k % 128 == 0 and 128 <= k < 1536
    for i in range(8):  # gate and up factored together or dense together
        g, u = (plan.ranks[f"model.layers.{i}.mlp.{p}"] for p in ("gate_proj", "up_proj"))
        assert (g == alloc.DENSE) == (u == alloc.DENSE)


def test_hybrid_mixes_both_kinds_of_moves_by_their_losses():
    mats = smollm2_like()
    spectra, losses = _synthetic(mats, 0, 1.0)
    # channels nearly free in layers 0-1 (which alone cannot reach 0.3), very costly in 2-7
    for i in range(2):
        losses[i] = [x * 1e-6 for x in losses[i]]
    for i in range(2, 8):
        losses[i] = [x * 1e6 for x in losses[i]]
    plan = alloc.allocate_hybrid(mats, spectra, losses, 1536, 0.3, 128)
    assert set(plan.widths) == {0, 1} and max(plan.widths.values()) <= 256
    # the rest of the budget is ranks in layers 2-7
    assert any(plan.ranks[m.name] != alloc.DENSE for m in mats if m.layer >= 2)
    # with free ranks instead, the hybrid factors rather than narrowing
    cheap = {n: [x * 1e-9 for x in s] for n, s in spectra.items()}
    plan = alloc.allocate_hybrid(mats, cheap, losses, 1536, 0.3, 128)
    assert not plan.widths


def test_hybrid_unreachable_ratio():
    mats = smollm2_like(layers=2)
    spectra, losses = _synthetic(mats, 0, 1.0)
    with pytest.raises(alloc.BudgetError, match=r"cannot be reached .*largest reachable ratio 0\.9166\)"):
        alloc.allocate_hybrid(mats, spectra, losses, 1536, 0.99, 128)  # one block of 12 per layer: 11/12


@pytest.mark.parametrize("channel_scale", [1.0, 1e4])  # 1e4: ranks are cut first, then layers narrowed under them
def test_hybrid_reaches_ratios_near_the_largest_reachable(channel_scale):
    # a narrowing move that leaves a factored matrix less than one block of rank turns it
    # back to dense instead of being unavailable (the greedy once got stuck there)
    mats = smollm2_like(layers=4)
    spectra, losses = _synthetic(mats, 3, channel_scale)
    for ratio in (0.85, 0.9, 0.91):
        plan = alloc.allocate_hybrid(mats, spectra, losses, 1536, ratio, 128)
        assert ratio <= alloc.plan_ratio(mats, plan.ranks, plan.widths) <= 11 / 12 + 1e-12
