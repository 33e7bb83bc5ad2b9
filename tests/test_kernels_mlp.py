"""mlp.up_gate and mlp.down in the emulator against a float64 numpy reference.

Tolerances as in test_kernels_xuv: fp32 2e-6 (relative Frobenius and max); bf16
1e-2 / 3e-2 for up_gate and down separately (each has two bf16 roundings of its own
plus the bf16 output), 2e-2 / 5e-2 for the whole MLP chained in bf16.
"""
import ml_dtypes
import numpy as np
import pytest

from vllm_neuronmlp.kernels import blocking, sim, strip_plan

BF16 = ml_dtypes.bfloat16


def d(a):
    return np.asarray(a).astype(np.float64)


def silu(z):
    return z / (1.0 + np.exp(-z))


def factors(S, H, rg, ru, I, rd, dtype, seed=0):
    rng = np.random.default_rng(seed)
    f = lambda *s: (rng.standard_normal(s) / np.sqrt(s[0])).astype(dtype)   # noqa: E731
    x = rng.standard_normal((S, H)).astype(dtype)
    return x, f(H, rg), f(rg, I), f(H, ru), f(ru, I), f(I, rd), f(rd, H)


def rel_err(y, ref):
    y = d(y)
    return (np.linalg.norm(y - ref) / np.linalg.norm(ref),
            np.abs(y - ref).max() / np.abs(ref).max())


SHAPES = [
    # S, H, r_gate, r_up, I, r_down
    (1, 64, 32, 32, 96, 32),
    (7, 200, 96, 64, 300, 32),       # gate and up ranks differ; nothing tile-aligned
    (640, 256, 128, 256, 384, 128),
    (130, 129, 64, 160, 513, 200),
    (150, 130, 520, 260, 2100, 300),  # several U slab groups and V blocks per kernel
]
TOL = {np.float32: (2e-6, 2e-6), BF16: (1e-2, 3e-2)}


@pytest.mark.parametrize("dtype", [np.float32, BF16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("S,H,rg,ru,I,rd", SHAPES)
def test_up_gate_and_down(S, H, rg, ru, I, rd, dtype):
    x, ug, vg, uu, vu, ud, vd = factors(S, H, rg, ru, I, rd, dtype)
    h_ref = silu(d(x) @ d(ug) @ d(vg)) * (d(x) @ d(uu) @ d(vu))
    h_t, st_up = sim.run(blocking.up_gate, x, ug, vg, uu, vu)
    assert h_t.shape == (I, S) and h_t.dtype == np.dtype(dtype)
    rel, worst = rel_err(h_t, h_ref.T)
    assert rel <= TOL[dtype][0] and worst <= TOL[dtype][1], (rel, worst)
    # down on the kernel's own h^T, referenced in float64 from that same h^T
    y, st_down = sim.run(blocking.down, h_t, ud, vd)
    assert y.shape == (S, H) and y.dtype == np.dtype(dtype)
    rel, worst = rel_err(y, d(h_t).T @ d(ud) @ d(vd))
    assert rel <= TOL[dtype][0] and worst <= TOL[dtype][1], (rel, worst)
    assert st_up.flops == 2 * S * (rg + ru) * (H + I)
    assert st_down.flops == 2 * S * rd * (I + H)


def test_whole_mlp_chained_in_bf16():
    x, ug, vg, uu, vu, ud, vd = factors(200, 256, 128, 96, 512, 64, BF16, seed=1)
    ref = (silu(d(x) @ d(ug) @ d(vg)) * (d(x) @ d(uu) @ d(vu))) @ d(ud) @ d(vd)
    h_t, _ = sim.run(blocking.up_gate, x, ug, vg, uu, vu)
    y, _ = sim.run(blocking.down, h_t, ud, vd)
    rel, worst = rel_err(y, ref)
    assert rel <= 2e-2 and worst <= 5e-2, (rel, worst)


@pytest.mark.parametrize("target", ["trn1", "trn2"])
def test_no_transpose_between_the_kernels(target):
    """up_gate transposes only while loading x (trn2: one DMA transpose per k tile;
    trn1: one tensor-engine transpose per 128 x 128 block, its DMA transpose being
    undocumented); down reads h^T as written, with no transpose of any kind; neither
    kernel writes anything to HBM but its output."""
    S, H, rg, ru, I, rd = 256, 256, 128, 128, 384, 128
    x, ug, vg, uu, vu, ud, vd = factors(S, H, rg, ru, I, rd, BF16, seed=2)
    h_t, st_up = sim.run(blocking.up_gate, x, ug, vg, uu, vu, target=target)
    y, st_down = sim.run(blocking.down, h_t, ud, vd, target=target)
    # the values on both targets, whichever transposing load
    h_ref = silu(d(x) @ d(ug) @ d(vg)) * (d(x) @ d(uu) @ d(vu))
    rel, worst = rel_err(h_t, h_ref.T)
    assert rel <= TOL[BF16][0] and worst <= TOL[BF16][1], (rel, worst)
    rel, worst = rel_err(y, d(h_t).T @ d(ud) @ d(vd))
    assert rel <= TOL[BF16][0] and worst <= TOL[BF16][1], (rel, worst)
    if target == "trn2":
        assert st_up.dma_transpose_count == H // 128 and st_up.pe_transpose_count == 0
    else:
        assert st_up.dma_transpose_count == 0
        assert st_up.pe_transpose_count == (H // 128) * (S // 128)
    assert st_down.dma_transpose_count == 0 and st_down.pe_transpose_count == 0
    assert st_up.hbm_write_bytes == 2 * I * S
    assert st_down.hbm_write_bytes == 2 * S * H


def test_silu_and_product_run_on_chip():
    """One scalar-engine SiLU and one vector-engine product per output tile, read from
    PSUM: [I=384 rows in 3 tiles of 128] x [S=600 tokens in chunks of 512 + 88]."""
    x, ug, vg, uu, vu, _, _ = factors(600, 128, 64, 64, 384, 32, BF16, seed=3)
    _, st = sim.run(blocking.up_gate, x, ug, vg, uu, vu)
    tiles = 3 * 2
    assert st.instructions["scalar"] == tiles
    # vector: the products, plus PSUM evacuations of stage 1 (2 ranks x 2 chunks), plus
    # on trn1 one copy of transposed x per 128 tokens (5 groups for 600 tokens)
    assert st.instructions["vector"] == tiles + 2 * 2 + 5
    _, st = sim.run(blocking.up_gate, x, ug, vg, uu, vu, target="trn2")
    assert st.instructions["vector"] == tiles + 2 * 2


def test_up_gate_reads_x_once_for_both_projections():
    S, H, rg, ru, I = 384, 512, 128, 256, 256
    x, ug, vg, uu, vu, _, _ = factors(S, H, rg, ru, I, 32, BF16, seed=4)
    _, st = sim.run(blocking.up_gate, x, ug, vg, uu, vu)
    assert st.hbm_read_bytes == 2 * (S * H + H * (rg + ru) + (rg + ru) * I)
    ks = strip_plan.up_gate_shape(S, H, rg, ru, I)
    assert st.sbuf_peak_bytes == strip_plan.sbuf_peak_bytes(ks, blocking.select_block_m(ks))


def test_shape_errors():
    x, ug, vg, uu, vu, ud, vd = factors(4, 64, 32, 32, 96, 32, np.float32)
    with pytest.raises(ValueError, match="up_gate: I mismatch"):
        sim.run(blocking.up_gate, x, ug, vg, uu, vu[:, :95])
    with pytest.raises(ValueError, match="down: I mismatch"):
        sim.run(blocking.down, np.zeros((95, 4), np.float32), ud, vd)
