"""Block-aligned ranks (paper eq. 5) and their allocation under a global budget."""
import math
import random

import pytest

from vllm_neuronmlp.tools import allocation as alloc


def smollm2_matrices(layers=30, hidden=576, inter=1536):
    shapes = {}
    for i in range(layers):
        shapes[f"model.layers.{i}.mlp.gate_proj"] = (hidden, inter)
        shapes[f"model.layers.{i}.mlp.up_proj"] = (hidden, inter)
        shapes[f"model.layers.{i}.mlp.down_proj"] = (inter, hidden)
    return alloc.matrices_from_shapes(shapes)


# ---------------------------------------------------------------- eq. 5
@pytest.mark.parametrize("m,n,ratio,block,theta,expected", [
    # (1-0.05)*576*1536/(2112*128) = 3.10 -> 3 blocks
    (576, 1536, 0.05, 128, 0.5, 384),
    # 0.2 -> 2.62 blocks -> rounds up to 3 at theta 0.5, down to 2 at theta 0.7
    (576, 1536, 0.2, 128, 0.5, 384),
    (576, 1536, 0.2, 128, 0.7, 256),
    # 0.4 -> 1.96 -> 2 blocks; theta 1.0 always floors -> 1
    (576, 1536, 0.4, 128, 0.5, 256),
    (576, 1536, 0.4, 128, 1.0, 128),
    # tiny matrix: rounds to zero blocks -> at least one block
    (64, 64, 0.9, 32, 0.5, 32),
    # Llama-3.2-1B MLP, 0.2: 0.8*2048*8192/(10240*128) = 10.24 -> 10 blocks
    (2048, 8192, 0.2, 128, 0.5, 1280),
])
def test_eq5_rank(m, n, ratio, block, theta, expected):
    assert alloc.eq5_rank(m, n, ratio, block, theta) == expected


def test_eq5_formula_against_direct_computation():
    rnd = random.Random(0)
    for _ in range(200):
        m, n = rnd.randint(32, 4096), rnd.randint(32, 4096)
        ratio, block, theta = rnd.uniform(0.01, 0.99), rnd.choice([32, 64, 128, 256]), rnd.uniform(0.05, 1.0)
        x = (1 - ratio) * m * n / ((m + n) * block)
        frac = x - math.floor(x)
        blocks = math.floor(x) + (1 if frac >= theta else 0)
        assert alloc.eq5_rank(m, n, ratio, block, theta) == block * max(1, blocks)


@pytest.mark.parametrize("ratio", [0.0, 1.0, -0.1, 1.5, float("nan")])
def test_bad_ratio(ratio):
    with pytest.raises(ValueError, match="ratio"):
        alloc.eq5_rank(576, 1536, ratio, 128)


@pytest.mark.parametrize("block", [0, -32, 48, 100, 1])
def test_bad_block(block):
    with pytest.raises(ValueError, match="multiple of 32"):
        alloc.eq5_rank(576, 1536, 0.2, block)


def test_max_rank_is_last_block_that_saves():
    mat = alloc.Matrix("x", 576, 1536)
    assert mat.max_rank(128) == 384  # break-even is 418.9
    assert alloc.saves_parameters(576, 1536, 384) and not alloc.saves_parameters(576, 1536, 512)
    assert alloc.Matrix("y", 64, 64).max_rank(64) == 0  # 64*128 > 64*64: nothing saves


# ---------------------------------------------------------------- uniform allocation
@pytest.mark.parametrize("ratio", [0.05, 0.1, 0.2, 0.3, 0.4])
def test_uniform_hits_budget_within_003_on_smollm2(ratio):
    mats = smollm2_matrices()
    ranks = alloc.allocate_uniform(mats, ratio, 128)
    achieved = alloc.achieved_ratio(mats, ranks)
    assert abs(achieved - ratio) <= 0.03
    assert achieved >= ratio - 1e-12  # never above the parameter budget
    assert all(r == alloc.DENSE or r % 128 == 0 for r in ranks.values())


def test_uniform_eq5_alone_would_miss_the_budget():
    # the reason for the global correction: eq. 5 alone gives 384 everywhere for 0.05 and 0.2
    mats = smollm2_matrices()
    plain = {m.name: alloc.eq5_rank(m.m, m.n, 0.05, 128) for m in mats}
    assert abs(alloc.achieved_ratio(mats, plain) - 0.0833) < 1e-3


def test_gate_and_up_dense_together():
    mats = smollm2_matrices()
    for allocate in (lambda r: alloc.allocate_uniform(mats, r, 128),
                     lambda r: alloc.allocate_adaptive(mats, random_spectra(mats), r, 128)):
        for ratio in (0.03, 0.05, 0.1):
            ranks = allocate(ratio)
            for i in range(30):
                g, u = ranks[f"model.layers.{i}.mlp.gate_proj"], ranks[f"model.layers.{i}.mlp.up_proj"]
                assert (g == alloc.DENSE) == (u == alloc.DENSE)


# ---------------------------------------------------------------- adaptive allocation
def random_spectra(mats, seed=0):
    rnd = random.Random(seed)
    out = {}
    for m in mats:
        k = min(m.m, m.n)
        decay = rnd.uniform(0.002, 0.05)
        scale = rnd.uniform(0.1, 10)
        out[m.name] = [scale * math.exp(-decay * i) for i in range(k)]
    return out


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("ratio", [0.03, 0.05, 0.2, 0.4, 0.6])
@pytest.mark.parametrize("normalize", [True, False])  # False: the fisher method's loss-unit spectra
def test_adaptive_never_exceeds_budget(seed, ratio, normalize):
    rnd = random.Random(seed)
    shapes = {}
    for i in range(rnd.randint(2, 8)):
        h, f = rnd.choice([(256, 768), (512, 1408), (576, 1536)])
        shapes.update({f"model.layers.{i}.mlp.gate_proj": (h, f), f"model.layers.{i}.mlp.up_proj": (h, f),
                       f"model.layers.{i}.mlp.down_proj": (f, h)})
    mats = alloc.matrices_from_shapes(shapes)
    ranks = alloc.allocate_adaptive(mats, random_spectra(mats, seed), ratio, 128, normalize=normalize)
    assert alloc.total_cost(mats, ranks) <= alloc.budget_params(mats, ratio)
    assert all(r == alloc.DENSE or (r % 128 == 0 and alloc.saves_parameters(m.m, m.n, r))
               for m, r in zip(mats, (ranks[m.name] for m in mats)))


def test_adaptive_spends_rank_where_spectrum_is_heavy():
    mats = smollm2_matrices(layers=2)
    spectra = {}
    for m in mats:
        k = min(m.m, m.n)
        # layer 0 has flat spectra (hard to compress), layer 1 steep ones (easy)
        decay = 0.001 if ".0." in m.name else 0.05
        spectra[m.name] = [math.exp(-decay * i) for i in range(k)]
    ranks = alloc.allocate_adaptive(mats, spectra, 0.3, 128)
    r0 = sum(ranks[n] or 10 ** 6 for n in ranks if ".0." in n)
    r1 = sum(ranks[n] or 10 ** 6 for n in ranks if ".1." in n)
    assert r0 > r1


def test_adaptive_loss_not_worse_than_uniform_on_its_objective():
    mats = smollm2_matrices()
    spectra = random_spectra(mats, 3)
    for ratio in (0.1, 0.2, 0.3):
        a = alloc.allocate_adaptive(mats, spectra, ratio, 128, normalize=False)
        u = alloc.allocate_uniform(mats, ratio, 128)
        la = sum(alloc.truncation_loss(spectra[n], r) for n, r in a.items())
        lu = sum(alloc.truncation_loss(spectra[n], r) for n, r in u.items())
        assert alloc.total_cost(mats, a) <= alloc.budget_params(mats, ratio)
        assert la <= lu * (1 + 1e-9)


def test_adaptive_missing_spectrum():
    mats = smollm2_matrices(layers=1)
    with pytest.raises(ValueError, match="no spectrum"):
        alloc.allocate_adaptive(mats, {}, 0.2, 128)


def test_unreachable_ratio_is_an_error_naming_the_limit():
    mats = smollm2_matrices(layers=2)
    for allocate in (lambda: alloc.allocate_uniform(mats, 0.9, 128),
                     lambda: alloc.allocate_adaptive(mats, random_spectra(mats), 0.9, 128)):
        # 1 - 128 * (576 + 1536) / (576 * 1536) = 0.6944
        with pytest.raises(alloc.BudgetError, match=r"largest reachable ratio 0\.6944"):
            allocate()


def test_tail_energies_are_the_truncation_losses():
    rnd = random.Random(3)
    spectrum = sorted((rnd.uniform(0, 5) for _ in range(300)), reverse=True)
    tails = alloc.tail_energies(spectrum)
    assert len(tails) == 301 and tails[-1] == 0.0
    for r in range(1, 301):
        assert tails[r] == pytest.approx(alloc.truncation_loss(spectrum, r), rel=1e-12, abs=1e-12)
    assert tails[0] == pytest.approx(sum(s * s for s in spectrum), rel=1e-12)


# ---------------------------------------------------------------- whole-model budgets (attention too)
def smollm2_all_matrices(layers=4, hidden=576, inter=1536, q=576, kv=192):
    """SmolLM2's seven decoder linears per layer: k/v (576 -> 192) save parameters only at one block of 128."""
    shapes = {}
    for i in range(layers):
        for p, shape in (("q_proj", (hidden, q)), ("k_proj", (hidden, kv)), ("v_proj", (hidden, kv)),
                         ("o_proj", (q, hidden))):
            shapes[f"model.layers.{i}.self_attn.{p}"] = shape
        shapes[f"model.layers.{i}.mlp.gate_proj"] = (hidden, inter)
        shapes[f"model.layers.{i}.mlp.up_proj"] = (hidden, inter)
        shapes[f"model.layers.{i}.mlp.down_proj"] = (inter, hidden)
    return alloc.matrices_from_shapes(shapes)


def qkv_consistent(ranks, layers):
    for i in range(layers):
        rs = [ranks[f"model.layers.{i}.self_attn.{p}"] for p in ("q_proj", "k_proj", "v_proj")]
        assert all(r == alloc.DENSE for r in rs) or all(r != alloc.DENSE for r in rs), rs


def test_qkv_share_a_group_and_attention_is_never_narrowed():
    mats = {m.name: m for m in smollm2_all_matrices(layers=1)}
    assert mats["model.layers.0.self_attn.q_proj"].group == mats["model.layers.0.self_attn.v_proj"].group
    assert mats["model.layers.0.self_attn.o_proj"].group is None
    o = mats["model.layers.0.self_attn.o_proj"]
    assert alloc.narrowed(o, 256) == o
    assert alloc.narrowed(mats["model.layers.0.mlp.down_proj"], 256).m == 256


@pytest.mark.parametrize("ratio", [0.05, 0.1, 0.2, 0.3])
def test_rank_allocations_over_all_linears_keep_qkv_together(ratio):
    mats = smollm2_all_matrices()
    for ranks in (alloc.allocate_uniform(mats, ratio, 128),
                  alloc.allocate_adaptive(mats, random_spectra(mats), ratio, 128, normalize=False)):
        assert alloc.total_cost(mats, ranks) <= alloc.budget_params(mats, ratio)
        qkv_consistent(ranks, 4)


def test_a_group_with_a_member_no_rank_saves_on_stays_dense():
    # k/v of 576 -> 64 save nothing at any multiple of 128, so q (576 -> 576) stays dense with them
    mats = smollm2_all_matrices(layers=2, kv=64)
    ranks = alloc.allocate_adaptive(mats, random_spectra(mats), 0.2, 128, normalize=False)
    assert all(ranks[m.name] == alloc.DENSE for m in mats if m.group and m.group.endswith(".qkv"))


def test_hybrid_factors_qkv_with_each_member_at_its_own_largest_saving_rank():
    """Attention cheap, channels costly: the hybrid factors q/k/v, k and v (which hold at most
    one block) at 128 while q goes to 256, and never narrows the attention."""
    import numpy as np

    mats = smollm2_all_matrices(layers=2)
    rng = np.random.default_rng(0)
    spectra = {m.name: sorted(rng.uniform(0, 1, min(m.m, m.n)) ** 3 * (1e-6 if "self_attn" in m.name else 1e3),
                              reverse=True) for m in mats}
    losses = {i: (1e6 * np.cumsum(np.sort(rng.uniform(0, 1, 1536)))[::-1]).tolist() + [0.0] for i in range(2)}
    plan = alloc.allocate_hybrid(mats, spectra, losses, 1536, 0.15, 128)
    assert alloc.plan_cost(mats, plan.ranks, plan.widths) <= alloc.budget_params(mats, 0.15)
    qkv_consistent(plan.ranks, 2)
    for i in range(2):
        a = f"model.layers.{i}.self_attn."
        assert plan.ranks[a + "k_proj"] == plan.ranks[a + "v_proj"] == 128
        assert plan.ranks[a + "q_proj"] in (128, 256) and plan.ranks[a + "o_proj"] in (128, 256)
    assert not plan.widths  # channels cost a million times more here
