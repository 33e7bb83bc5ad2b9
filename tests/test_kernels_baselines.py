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


# -- the paper's baselines as it measured them ---------------------------------------------

def paper_tensors(S, K, r, N, dtype, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((S, K)).astype(dtype)
    u = (rng.standard_normal((K, r)) / np.sqrt(K)).astype(dtype)
    v = (rng.standard_normal((r, N)) / np.sqrt(r)).astype(dtype)
    w = (d(u) @ d(v)).astype(dtype)
    return {"x": x, "u": u, "v": v, "w": w}


@pytest.mark.parametrize("target", ["trn1", "trn2"])
@pytest.mark.parametrize("name", ["dense_xw", "sequential_xuv", "fused_xuv"])
def test_paper_sequences_compute_y_transposed(name, target):
    """Each launch sequence the paper timed ends in y^T = (x w)^T or (x u v)^T, on both
    targets (the tutorial's accumulators are bf16: a looser tolerance)."""
    S, K, r, N = 300, 384, 256, 1100
    t = paper_tensors(S, K, r, N, BF16, seed=1)
    out, st = baselines.run_launches(baselines.paper_launches(name, block_m=256), t, target)
    ref = d(t["x"]) @ d(t["w"]) if name == "dense_xw" else d(t["x"]) @ d(t["u"]) @ d(t["v"])
    y_t = d(out["yT"])
    assert y_t.shape == (N, S)
    assert np.abs(y_t - ref.T).max() / np.abs(ref).max() < 2e-2
    assert st.latency_s == pytest.approx(sum(s.modeled_latency_s for _, s in st.launches))


def test_transpose_launch_is_exact_and_moves_each_byte_twice():
    rng = np.random.default_rng(2)
    x = rng.standard_normal((1100, 300)).astype(BF16)
    y, st = sim.run(baselines.transpose, x)
    assert np.array_equal(d(y), d(x).T)
    assert st.hbm_read_bytes == st.hbm_write_bytes == 2 * 1100 * 300
    assert st.pe_transpose_count == 9 * 3            # 128 x 128 blocks, edges masked
    assert st.matmul_count == 0 and st.flops == 0


def test_paper_structure_hbm_and_transpose_flops():
    """No spills at this size: the HBM bytes of each sequence are its launches' by hand
    (transposes read and write their tensor once; the tutorial reads lhsT once per N
    block of 1024 columns, rhs once, writes the result once; the fused kernel reads x
    once and U, V once per strip, writes y^T once), and the transpose FLOPs are
    2 x 128 per element transposed, so their ratio XW / XUV is (K + N) / (K + r + N) --
    exactly the ratio of the paper's measured 68.01 / 78.92 G."""
    S, K, r, N = 2048, 1024, 512, 2048
    e = 2
    shapes = {"x": (S, K), "w": (K, N), "u": (K, r), "v": (r, N)}
    _, xw = baselines.run_launches(baselines.paper_launches("dense_xw"), shapes, count_only=True)
    _, xuv = baselines.run_launches(baselines.paper_launches("sequential_xuv"), shapes,
                                    count_only=True)
    _, fused = baselines.run_launches(baselines.paper_launches("fused_xuv", block_m=1024), shapes,
                                      count_only=True)
    nb = lambda n: -(-n // 1024)   # noqa: E731  (tutorial N blocks)
    assert xw.hbm_bytes == e * (2 * S * K + (nb(N) * S * K + K * N + S * N) + 2 * S * N)
    assert xuv.hbm_bytes == e * (2 * S * K + (nb(r) * S * K + K * r + S * r) + 2 * S * r
                                 + (nb(N) * S * r + r * N + S * N) + 2 * S * N)
    assert fused.hbm_bytes == e * (S * K + 2 * (K * r + r * N) + S * N)
    assert xw.spill_bytes == xuv.spill_bytes == fused.spill_bytes == 0
    assert xw.transpose_flops == 2 * 128 * S * (K + N)
    assert xuv.transpose_flops == 2 * 128 * S * (K + r + N)
    assert fused.transpose_flops == 0
    assert xw.transpose_flops / xuv.transpose_flops == pytest.approx((K + N) / (K + r + N))
    # (the paper rounds to 0.01 G: 0.8618 against 0.8621)
    assert 68.01 / 78.92 == pytest.approx((7168 + 18432) / (7168 + 4096 + 18432), rel=5e-4)


def test_tutorial_accumulators_spill_and_are_saved_and_reloaded_on_each_reuse():
    """All-M bf16 accumulators: 16 bytes per partition per token. At M = 8192 with two K
    blocks they need 128 KiB next to 68 KiB of double-buffered lhsT/rhs/packed tiles
    (2 x 16 KiB of 1024-row lhsT blocks, 2 x 16 KiB of rhs, 2 x 2 KiB packed): the excess
    spills. Each spilled byte is saved after the zeroing and after each K
    block's addition (1 + 2 writes) and reloaded before each addition and before the final
    copy out (2 + 1 reads); strict mode refuses instead."""
    M, K, N = 8192, 2048, 1024
    args = (sim.spec((K, M)), sim.spec((K, N)))
    _, st = sim.run(baselines.tutorial_matmul, *args, count_only=True)
    spilled = st.sbuf_spilled_bytes
    staging = sim.core.SPILL_STAGING_BYTES     # room kept free for reloads and saves
    assert spilled == 16 * M + 68 * 1024 - 192 * 1024 + staging
    assert st.spill_write_bytes == 3 * 128 * spilled
    assert st.spill_read_bytes == 3 * 128 * spilled
    assert st.hbm_bytes - st.spill_bytes == 2 * (K * M + K * N + M * N)
    with pytest.raises(sim.SbufCapacityError, match="result_tiles"):
        sim.run(baselines.tutorial_matmul, *args, count_only=True, spill=False)
    # trn2's 224 KiB partitions hold them all; at 1.5 x the rows they spill there too
    _, st2 = sim.run(baselines.tutorial_matmul, *args, count_only=True, target="trn2")
    assert st2.sbuf_spilled_bytes == 0 and st2.spill_bytes == 0
    M2 = 3 * M // 2
    _, st2 = sim.run(baselines.tutorial_matmul, sim.spec((K, M2)), sim.spec((K, N)), count_only=True,
                     target="trn2")
    assert st2.sbuf_spilled_bytes == 16 * M2 + 68 * 1024 - 224 * 1024 + staging
    assert st2.spill_bytes == 6 * 128 * st2.sbuf_spilled_bytes


def test_tutorial_matmul_values_with_spills():
    """Spills change the cost, never the values: a spilling tutorial matmul (small K so
    it runs in seconds) equals numpy within bf16 accumulation error."""
    rng = np.random.default_rng(4)
    M, K, N = 12288, 128, 1024
    lhsT = rng.standard_normal((K, M)).astype(BF16)
    rhs = rng.standard_normal((K, N)).astype(BF16)
    y, st = sim.run(baselines.tutorial_matmul, lhsT, rhs)
    assert st.spill_bytes > 0
    ref = d(lhsT).T @ d(rhs)
    assert np.abs(d(y) - ref).max() / np.abs(ref).max() < 1e-2


def test_unknown_paper_sequence_is_refused():
    with pytest.raises(ValueError, match="no paper launch sequence named 'dense'"):
        baselines.paper_launches("dense")
