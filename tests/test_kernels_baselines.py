"""baselines.dense_xw / sequential_xuv against float64 numpy, and the HBM-traffic
ordering fused < sequential < dense at the paper's shapes (count-only)."""
import ml_dtypes
import numpy as np
import pytest

from vllm_neuronmlp.kernels import baselines, blocking, sim, strip_plan, xuv

BF16 = ml_dtypes.bfloat16
TOL = {np.float32: (2e-6, 2e-6), BF16: (1e-2, 3e-2)}


def d(a):
    return np.asarray(a).astype(np.float64)


def check(y, ref, dtype):
    y = d(y)
    assert y.shape == ref.shape
    rel = np.linalg.norm(y - ref) / np.linalg.norm(ref)
    worst = np.abs(y - ref).max() / np.abs(ref).max()
    assert rel <= TOL[dtype][0] and worst <= TOL[dtype][1], (rel, worst)


SHAPES = [
    (1, 64, 32, 96),
    (7, 200, 96, 300),
    (130, 1100, 129, 1030),   # two K blocks and two N blocks of the blocked matmul
]


@pytest.mark.parametrize("dtype", [np.float32, BF16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("S,K,r,N", SHAPES)
def test_dense_and_sequential_match_float64(S, K, r, N, dtype):
    rng = np.random.default_rng(S + K)
    x = rng.standard_normal((S, K)).astype(dtype)
    u = (rng.standard_normal((K, r)) / np.sqrt(K)).astype(dtype)
    v = (rng.standard_normal((r, N)) / np.sqrt(r)).astype(dtype)
    w = (d(u) @ d(v)).astype(dtype)
    y, st = sim.run(baselines.dense_xw, x, w)
    check(y, d(x) @ d(w), dtype)
    assert st.flops == 2 * S * K * N
    y2, st2 = sim.run(baselines.sequential_xuv, x, u, v)
    check(y2, d(x) @ d(u) @ d(v), dtype)
    e = np.dtype(dtype).itemsize
    # the intermediate x u goes to HBM and comes back
    assert st2.hbm_write_bytes == e * (S * r + S * N)


def test_several_m_blocks():
    """fp32 halves BLOCK_M to 1024 tokens: 1100 tokens take two M blocks."""
    rng = np.random.default_rng(9)
    x = rng.standard_normal((1100, 300)).astype(np.float32)
    w = rng.standard_normal((300, 600)).astype(np.float32)
    y, st = sim.run(baselines.dense_xw, x, w)
    check(y, d(x) @ d(w), np.float32)
    # x is read once per N block (one here), w once per M block (two)
    assert st.hbm_read_bytes == 4 * (1100 * 300 + 2 * 300 * 600)


@pytest.mark.slow
@pytest.mark.parametrize("S", [1024, 4096])
def test_hbm_traffic_order_at_paper_shapes(S):
    """DeepSeek-V3 up_proj shapes: fused (traffic-minimal block) < sequential < dense."""
    K, r, N = 7168, 4096, 18432
    bf = "bfloat16"
    _, dense = sim.run(baselines.dense_xw, sim.spec((S, K), bf), sim.spec((K, N), bf),
                       count_only=True)
    _, seq = sim.run(baselines.sequential_xuv, sim.spec((S, K), bf), sim.spec((K, r), bf),
                     sim.spec((r, N), bf), count_only=True)
    bm = blocking.select_block_m(strip_plan.xuv_shape(S, K, r, N), "trn1", objective="traffic")
    _, fused = sim.run(xuv.fused_xuv, sim.spec((S, K), bf), sim.spec((K, r), bf),
                       sim.spec((r, N), bf), block_m=bm, count_only=True)
    assert fused.hbm_bytes < seq.hbm_bytes < dense.hbm_bytes
    assert fused.flops == seq.flops < dense.flops


@pytest.mark.parametrize("dtype", [np.float32, BF16], ids=["fp32", "bf16"])
def test_naive_fused_recomputes_xu_per_output_block(dtype):
    """The paper's Table-1 strawman: same values; U is read once per (128-token block,
    512-column block) pair and the FLOPs of x @ u repeat as often."""
    S, K, r, N = 300, 200, 130, 1100
    rng = np.random.default_rng(3)
    x = rng.standard_normal((S, K)).astype(dtype)
    u = (rng.standard_normal((K, r)) / np.sqrt(K)).astype(dtype)
    v = (rng.standard_normal((r, N)) / np.sqrt(r)).astype(dtype)
    y, st = sim.run(baselines.naive_fused_xuv, x, u, v)
    check(y, d(x) @ d(u) @ d(v), dtype)
    m_blocks, n_blocks = 3, 3
    assert st.flops == 2 * S * r * K * n_blocks + 2 * S * r * N
    e = np.dtype(dtype).itemsize
    assert st.hbm_read_bytes == e * (S * K * n_blocks + K * r * m_blocks * n_blocks
                                     + r * N * m_blocks)


def test_dense_m_blocks_are_one_hardware_loop():
    """The M-block loop is a nl.dynamic_range: the static program does not grow with S,
    the executed one does."""
    counts = {}
    for S in (2048, 8192):
        _, st = sim.run(baselines.dense_xw, sim.spec((S, 512)), sim.spec((512, 1024)),
                        count_only=True)
        counts[S] = (st.static_instructions, st.dynamic_instructions)
    assert counts[2048][0] == counts[8192][0]
    assert counts[8192][1] == 4 * counts[2048][1]
