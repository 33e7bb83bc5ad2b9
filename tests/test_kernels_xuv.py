"""xuv.fused_xuv in the emulator against a float64 numpy reference.

Tolerances (relative Frobenius error, and max abs error relative to max |ref|):
* fp32 inputs: 2e-6 -- the kernel is exact up to fp32 accumulation;
* bf16 inputs: 1e-2 / 3e-2 -- the reference uses the same bf16 inputs, so the error is
  the kernel's own roundings: the (x u)^T strip to bf16 (the tensor engine reads it as
  a bf16 operand) and the bf16 output, each <= 2^-9 relative.
"""
import ml_dtypes
import numpy as np
import pytest

from vllm_neuronmlp.kernels import blocking, sim, strip_plan, xuv

BF16 = ml_dtypes.bfloat16
TOL = {np.float32: (2e-6, 2e-6), BF16: (1e-2, 3e-2)}


def make(S, K, r, N, dtype, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((S, K)).astype(dtype)
    u = (rng.standard_normal((K, r)) / np.sqrt(K)).astype(dtype)
    v = (rng.standard_normal((r, N)) / np.sqrt(r)).astype(dtype)
    return x, u, v


def reference(x, u, v):
    d = lambda a: a.astype(np.float64)   # noqa: E731
    return (d(x) @ d(u)) @ d(v)


def assert_close(y, ref, dtype):
    rel_tol, max_tol = TOL[dtype]
    y = y.astype(np.float64)
    assert y.shape == ref.shape
    assert np.all(np.isfinite(y))
    rel = np.linalg.norm(y - ref) / np.linalg.norm(ref)
    worst = np.abs(y - ref).max() / np.abs(ref).max()
    assert rel <= rel_tol, rel
    assert worst <= max_tol, worst


SHAPES = [
    (1, 64, 32, 96),        # decode: one token, tiny rank
    (7, 200, 96, 300),      # nothing a multiple of 128 or 512
    (640, 384, 256, 640),   # several token tiles and chunks
    (130, 257, 129, 513),   # one element past each tile boundary
]


@pytest.mark.parametrize("dtype", [np.float32, BF16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("S,K,r,N", SHAPES)
@pytest.mark.parametrize("transpose_out", [False, True], ids=["rows", "cols"])
def test_fused_xuv_matches_float64(S, K, r, N, dtype, transpose_out):
    x, u, v = make(S, K, r, N, dtype)
    y, st = sim.run(blocking.fused_xuv, x, u, v, transpose_out=transpose_out)
    ref = reference(x, u, v)
    assert y.dtype == np.dtype(dtype)
    assert_close(y, ref.T if transpose_out else ref, dtype)
    assert st.flops == 2 * S * r * (K + N)


@pytest.mark.parametrize("block_m", [128, 256, 384])
def test_multiple_strips(block_m):
    x, u, v = make(640, 200, 64, 300, BF16, seed=1)
    y, st = sim.run(xuv.fused_xuv, x, u, v, block_m=block_m)
    assert_close(y, reference(x, u, v), BF16)
    strips = -(-640 // block_m)
    # u and v are read once per strip (one stage-1 sub-strip each at this size)
    assert st.hbm_read_bytes == 2 * (640 * 200 + strips * (200 * 64 + 64 * 300))


@pytest.mark.parametrize("dtype", [np.float32, BF16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("transpose_out", [False, True], ids=["rows", "cols"])
def test_wide_u_slabs_and_v_blocks(dtype, transpose_out):
    """Several U slab groups per sub-strip (r = 520: 5 r tiles, 4 per group at 640
    tokens, the last group one partial tile) and several V blocks (N = 2100: 2048 + 52
    columns), two strips, the second shorter: every edge is masked, nothing dropped."""
    S, K, r, N = 700, 130, 520, 2100
    x, u, v = make(S, K, r, N, dtype, seed=7)
    y, st = sim.run(xuv.fused_xuv, x, u, v, block_m=640, transpose_out=transpose_out)
    ref = reference(x, u, v)
    assert_close(y, ref.T if transpose_out else ref, dtype)
    ks = strip_plan.xuv_shape(S, K, r, N, 4 if dtype == np.float32 else 2, transpose_out)
    assert strip_plan.u_group_tiles(640) == 4
    assert strip_plan.plan(ks, 640).block_n == 2048
    assert st.sbuf_peak_bytes == strip_plan.sbuf_peak_bytes(ks, 640)
    assert (st.hbm_read_bytes, st.hbm_write_bytes) == strip_plan.hbm_bytes(ks, 640)
    assert st.modeled_latency_s == pytest.approx(blocking.modeled_time(ks, 640), rel=1e-9)


@pytest.mark.slow
def test_multiple_stage1_substrips():
    """K so large that x^T of a whole strip does not fit next to (x u)^T: the strip is
    computed in two stage-1 sub-strips, u read twice, v once."""
    S, K, r, N = 1024, 12288, 128, 128
    ks = strip_plan.xuv_shape(S, K, r, N)
    plan = strip_plan.plan(ks, 1024)
    assert plan.sub_heights(1024) == (896, 128)
    x, u, v = make(S, K, r, N, BF16, seed=2)
    y, st = sim.run(xuv.fused_xuv, x, u, v, block_m=1024)
    assert_close(y, reference(x, u, v), BF16)
    assert st.hbm_read_bytes == 2 * (S * K + 2 * K * r + r * N)
    assert st.sbuf_peak_bytes == strip_plan.sbuf_peak_bytes(ks, 1024)


def test_transposed_output_is_the_transpose():
    x, u, v = make(300, 256, 128, 384, np.float32, seed=3)
    y, _ = sim.run(blocking.fused_xuv, x, u, v)
    y_t, _ = sim.run(blocking.fused_xuv, x, u, v, transpose_out=True)
    np.testing.assert_allclose(y_t, y.T, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("target", ["trn1", "trn2"])
def test_hand_computed_counts(target):
    """S=256, K=256, r=128, N=512, bf16, one strip:
    reads x 256*256*2 + u 256*128*2 + v 128*512*2; writes y 256*512*2;
    DMAs: x^T (trn2: 2 transposing DMAs, one per K tile; trn1: 2 row blocks of 128 tokens
    x 256 columns, then 2 x 2 tensor-engine transposes) + 2 u tiles + 1 v block + 2
    output tiles = 7; matmuls: stage 1 (1 r tile x 2 k tiles x 1 chunk) + stage 2 (2 token
    tiles x 1 r tile). Between the stages no transpose at all (implicit transposition)."""
    x, u, v = make(256, 256, 128, 512, BF16, seed=4)
    y, st = sim.run(blocking.fused_xuv, x, u, v, target=target)
    assert_close(y, reference(x, u, v), BF16)
    assert st.hbm_read_bytes == 131072 + 65536 + 131072
    assert st.hbm_write_bytes == 262144
    assert st.dma_count == 7
    assert st.matmul_count == 4
    assert st.flops == 2 * 256 * 256 * 128 + 2 * 256 * 128 * 512
    if target == "trn2":
        assert st.dma_transpose_count == 2 and st.pe_transpose_count == 0
    else:     # trn1: no DMA transpose ("much lower" bandwidth, undocumented)
        assert st.dma_transpose_count == 0 and st.pe_transpose_count == 4
        assert st.transpose_flops == 4 * 2 * 128 ** 3
    # SBUF/partition: (xu)^T strip 1*256*2 + x^T 2*256*2 + two u tiles 2*128*2 = 2048
    # in stage 1; stage 2: strip 512 + v block 1*512*2 + two output tiles 2*512*2 = 3584
    assert st.sbuf_peak_bytes == 3584


def test_fp32_accumulation_beats_bf16_accumulation():
    """All-positive bf16 data and a long K: summing the 128-wide partial products in
    bf16 (as the authors' code did) would lose far more than this kernel does."""
    rng = np.random.default_rng(5)
    S, K, r, N = 64, 4096, 128, 128
    x = rng.uniform(0.5, 1.0, (S, K)).astype(BF16)
    u = rng.uniform(0.5, 1.0, (K, r)).astype(BF16)
    v = np.eye(r, N).astype(BF16)                   # stage 2 passes (x u) through
    y, _ = sim.run(blocking.fused_xuv, x, u, v)
    ref = reference(x, u, v)
    err_kernel = np.abs(y.astype(np.float64) - ref).max() / ref.max()
    acc = np.zeros((S, r), dtype=np.float32)        # bf16 running sum over k tiles
    for k0 in range(0, K, 128):
        part = x[:, k0:k0 + 128].astype(np.float64) @ u[k0:k0 + 128].astype(np.float64)
        acc = (acc.astype(np.float64) + part).astype(BF16).astype(np.float32)
    err_bf16 = np.abs(acc.astype(BF16).astype(np.float64) - ref).max() / ref.max()
    assert err_kernel <= 2 ** -8                    # one bf16 rounding of (xu), one of y
    assert err_bf16 > 4 * err_kernel


def test_default_block_is_the_selector_choice():
    x, u, v = make(700, 128, 64, 128, BF16, seed=6)
    ks = strip_plan.xuv_shape(700, 128, 64, 128)
    bm = blocking.select_block_m(ks, "trn1")
    _, st_default = sim.run(blocking.fused_xuv, x, u, v)
    _, st_explicit = sim.run(xuv.fused_xuv, x, u, v, block_m=bm)
    assert st_default.as_dict() == st_explicit.as_dict()


def test_shape_errors():
    x, u, v = make(8, 64, 32, 16, np.float32)
    with pytest.raises(ValueError, match="fused_xuv: K mismatch"):
        sim.run(blocking.fused_xuv, x, u[:60], v)
    with pytest.raises(ValueError, match="fused_xuv: r mismatch"):
        sim.run(blocking.fused_xuv, x, u, v[:31])


def test_block_too_large_for_sbuf_spills():
    """(x u)^T for 4096 tokens at rank 4096 needs 256 KiB per partition: no plan fits
    trn1's 192 KiB. The emulator charges the spill (saved and reloaded by DMA) instead of
    refusing; strict mode (spill=False) refuses."""
    args = (sim.spec((4096, 256)), sim.spec((256, 4096)), sim.spec((4096, 256)))
    with pytest.raises(sim.SbufCapacityError, match="nl.ndarray"):
        sim.run(xuv.fused_xuv, *args, block_m=4096, count_only=True, spill=False)
    _, st = sim.run(xuv.fused_xuv, *args, block_m=4096, count_only=True)
    _, fits = sim.run(xuv.fused_xuv, *args, block_m=2048, count_only=True)
    assert fits.spill_bytes == 0 and fits.sbuf_spilled_bytes == 0
    assert st.sbuf_peak_bytes <= sim.TRN1.sbuf_bytes_per_partition
    assert st.sbuf_spilled_bytes >= 256 * 1024 - sim.TRN1.sbuf_bytes_per_partition
    # every spilled byte is saved once when its piece is written, and reloaded when read
    assert st.spill_write_bytes >= 128 * (256 * 1024 - sim.TRN1.sbuf_bytes_per_partition)
    assert st.spill_read_bytes >= st.spill_write_bytes
    # the kernel's own traffic is the plan's; the spill traffic comes on top
    ks = strip_plan.xuv_shape(4096, 256, 4096, 256)
    assert (st.hbm_read_bytes - st.spill_read_bytes,
            st.hbm_write_bytes - st.spill_write_bytes) == strip_plan.hbm_bytes(ks, 4096)
    assert st.modeled_latency_s > fits.modeled_latency_s


@pytest.mark.parametrize("target", ["trn1", "trn2"])
@pytest.mark.parametrize("how", ["pe", "dma"])
@pytest.mark.parametrize("K", [700, 2300])
def test_both_transposing_loads_give_the_values(K, how, target):
    """x^T by DMA transposes or by tensor-engine transposes of 4 KiB row blocks (K = 2300:
    two row blocks per 128 tokens; K = 700 and 2300: a partial last K tile copied on its
    own), on both targets: the same values as numpy."""
    S, r, N = 300, 256, 384
    x, u, v = make(S, K, r, N, BF16, seed=11)
    y, st = sim.run(xuv.fused_xuv, x, u, v, block_m=256, x_transpose=how, target=target)
    assert_close(y, reference(x, u, v), BF16)
    k_tiles, token_groups = -(-K // 128), 3      # 256 + 44 tokens: groups of 128
    if how == "pe":
        assert st.dma_transpose_count == 0 and st.pe_transpose_count == k_tiles * token_groups
    else:
        assert st.pe_transpose_count == 0 and st.dma_transpose_count == k_tiles * 2
    ks = strip_plan.xuv_shape(S, K, r, N, x_transpose=how)
    assert st.sbuf_peak_bytes == strip_plan.sbuf_peak_bytes(ks, 256, target)


def test_unknown_transposing_load_is_refused():
    x, u, v = make(8, 64, 32, 16, BF16)
    with pytest.raises(ValueError, match="x_transpose must be one of"):
        sim.run(xuv.fused_xuv, x, u, v, block_m=128, x_transpose="vector")


def test_trn1_takes_the_tensor_engine_transpose_trn2_the_dma_one():
    """trn1's DMA transpose throughput is undocumented ("much lower"): at the pessimistic
    end of its bracket the model cannot show it cheaper than the tensor engine's identity
    transpose, so the kernels use the latter; trn2 documents 90% of a copy and uses DMA."""
    from dataclasses import replace
    ks = strip_plan.xuv_shape(2048, 7168, 1024, 4096)
    assert strip_plan.default_x_transpose("trn1") == "pe"
    assert strip_plan.default_x_transpose("trn2") == "dma"
    assert blocking.x_transpose_choice(ks, 1024, "trn1") == "pe"
    assert blocking.x_transpose_choice(ks, 1024, "trn2") == "dma"
    worst = sim.targets.bracket_end("trn1", "pessimistic")
    pe = blocking.modeled_time(ks, 1024, worst)
    dma = blocking.modeled_time(replace(ks, x_transpose="dma"), 1024, worst)
    assert dma > 1.5 * pe
    # and the selector's kernel on trn1 indeed runs no DMA transpose
    x, u, v = make(300, 256, 128, 200, BF16, seed=12)
    y, st = sim.run(blocking.fused_xuv, x, u, v, target="trn1")
    assert_close(y, reference(x, u, v), BF16)
    assert st.dma_transpose_count == 0 and st.pe_transpose_count > 0
