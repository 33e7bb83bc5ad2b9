"""The NKI emulator itself: values, counts, memory lifetimes and the latency model,
checked with small hand-written kernels against numpy and hand arithmetic."""
import math

import ml_dtypes
import numpy as np
import pytest

from vllm_neuronmlp.kernels import sim
from vllm_neuronmlp.kernels.sim import isa as nisa
from vllm_neuronmlp.kernels.sim import language as nl

BF16 = ml_dtypes.bfloat16


def _rng(seed=0):
    return np.random.default_rng(seed)


def k_matmul(a_t, b, accumulate_twice=False):
    """out = a_t.T @ b (optionally the product accumulated twice)."""
    K, M = a_t.shape
    N = b.shape[1]
    out = nl.ndarray((M, N), dtype=nl.float32, buffer=nl.shared_hbm)
    at = nl.ndarray((K, M), dtype=a_t.dtype, buffer=nl.sbuf)
    nisa.dma_copy(dst=at, src=a_t)
    bt = nl.ndarray((K, N), dtype=b.dtype, buffer=nl.sbuf)
    nisa.dma_copy(dst=bt, src=b)
    ps = nl.ndarray((M, N), dtype=nl.float32, buffer=nl.psum)
    nisa.nc_matmul(dst=ps, stationary=at, moving=bt)
    if accumulate_twice:
        nisa.nc_matmul(dst=ps, stationary=at, moving=bt, accumulate=True)
    o = nl.ndarray((M, N), dtype=nl.float32, buffer=nl.sbuf)
    nisa.tensor_copy(dst=o, src=ps)
    nisa.dma_copy(dst=out, src=o)
    return out


@pytest.mark.parametrize("dtype", [np.float32, BF16])
def test_matmul_values_match_float64(dtype):
    rng = _rng(1)
    a = rng.standard_normal((128, 96)).astype(dtype)
    b = rng.standard_normal((128, 300)).astype(dtype)
    y, st = sim.run(k_matmul, a, b)
    ref = a.astype(np.float64).T @ b.astype(np.float64)
    assert y.dtype == np.float32 and y.shape == (96, 300)
    # operands are exact in both cases; only fp32 accumulation rounds
    np.testing.assert_allclose(y, ref, rtol=1e-5, atol=1e-4)
    assert st.matmul_count == 1 and st.flops == 2 * 128 * 96 * 300


def test_psum_accumulate_true_adds_and_default_overwrites_first():
    rng = _rng(2)
    a = rng.standard_normal((64, 32)).astype(np.float32)
    b = rng.standard_normal((64, 40)).astype(np.float32)
    y, _ = sim.run(k_matmul, a, b, accumulate_twice=True)
    np.testing.assert_allclose(y, 2 * (a.T.astype(np.float64) @ b), rtol=1e-5, atol=1e-4)


def k_roundtrip(x, through):
    """HBM fp32 -> SBUF tile of dtype `through` -> HBM fp32."""
    out = nl.ndarray(x.shape, dtype=nl.float32, buffer=nl.shared_hbm)
    t = nl.ndarray(x.shape, dtype=through, buffer=nl.sbuf)
    nisa.dma_copy(dst=t, src=x)
    nisa.dma_copy(dst=out, src=t)
    return out


def test_bf16_tiles_round_to_nearest_even():
    x = np.array([[1.0 + 2 ** -9, 1.0 + 3 * 2 ** -9, 3.14159265, -2.0 ** -130]],
                 dtype=np.float32)
    y, _ = sim.run(k_roundtrip, x, through=nl.bfloat16)
    np.testing.assert_array_equal(y, x.astype(BF16).astype(np.float32))
    assert y[0, 0] == 1.0 and y[0, 1] == 1.0 + 2 ** -7   # ties to even
    y32, _ = sim.run(k_roundtrip, x, through=nl.float32)
    np.testing.assert_array_equal(y32, x)


def k_bytes(a, b):
    """Load a [128, 64] bf16 and b [64, 300] fp32; store a back twice and b once."""
    out_a = nl.ndarray((2, 128, 64), dtype=a.dtype, buffer=nl.shared_hbm)
    out_b = nl.ndarray(b.shape, dtype=b.dtype, buffer=nl.shared_hbm)
    ta = nl.load(a)
    tb = nl.ndarray(b.shape, dtype=b.dtype, buffer=nl.sbuf)
    nisa.dma_copy(dst=tb, src=b)
    nisa.dma_copy(dst=out_a[0], src=ta)
    nisa.dma_copy(dst=out_a[1, :, :], src=ta)
    nl.store(out_b, tb)
    return out_a, out_b


def test_hand_computed_hbm_and_dma_counts():
    rng = _rng(3)
    a = rng.standard_normal((128, 64)).astype(BF16)
    b = rng.standard_normal((64, 300)).astype(np.float32)
    (oa, ob), st = sim.run(k_bytes, a, b)
    np.testing.assert_array_equal(oa[1], a)
    np.testing.assert_array_equal(ob, b)
    a_bytes = 128 * 64 * 2          # 16384
    b_bytes = 64 * 300 * 4          # 76800
    assert st.hbm_read_bytes == a_bytes + b_bytes
    assert st.hbm_write_bytes == 2 * a_bytes + b_bytes
    assert st.dma_count == 5
    assert st.dma_min_bytes == a_bytes and st.dma_max_bytes == b_bytes
    assert st.dma_size_hist == {16384: 3, 65536: 2}
    # SBUF: a tile 64*2 B + b tile 300*4 B per partition, both live at the end
    assert st.sbuf_peak_bytes == 64 * 2 + 300 * 4
    assert st.psum_peak_bytes == 0


def test_count_only_counts_equal_value_mode():
    rng = _rng(4)
    a = rng.standard_normal((128, 64)).astype(BF16)
    b = rng.standard_normal((64, 300)).astype(np.float32)
    _, st_v = sim.run(k_bytes, a, b)
    outs, st_c = sim.run(k_bytes, sim.spec((128, 64), "bfloat16"), sim.spec((64, 300), "float32"),
                         count_only=True)
    assert outs == (None, None)
    d_v, d_c = st_v.as_dict(), st_c.as_dict()
    d_v.pop("count_only"), d_c.pop("count_only")
    assert d_v == d_c


def k_lifetimes(x, n_iter, late_use=False):
    """Explicit double buffer, a tile allocated after the buffers' last use, PSUM banks."""
    keep = nl.ndarray((128, 10), dtype=nl.float32, buffer=nl.sbuf)     # 40 B, lives throughout
    nisa.memset(dst=keep, value=0.0)
    bufs = [nl.ndarray((128, 250), dtype=nl.bfloat16, buffer=nl.sbuf) for _ in range(2)]  # 500 B
    for i in range(n_iter):
        nisa.dma_copy(dst=bufs[i % 2][0:1, 0:250], src=x)
    t = nl.ndarray((128, 300), dtype=nl.float32, buffer=nl.sbuf)       # 1200 B
    nisa.memset(dst=t, value=0.0)
    if late_use:                                                        # bufs[0] used again
        nisa.dma_copy(dst=bufs[0][0:1, 0:250], src=x)
    nisa.memset(dst=keep, value=1.0)
    ps = [nl.ndarray((128, 100), dtype=nl.float32, buffer=nl.psum) for _ in range(3)]
    big = nl.ndarray((128, 2, 512), dtype=nl.float32, buffer=nl.psum)  # 4 KiB: two banks
    for p in ps + [big]:
        nisa.memset(dst=p, value=0.0)
    return None


def test_memory_is_allocated_by_static_liveness():
    """A tensor occupies SBUF from its nl.ndarray to its last use in the program (compile
    time), not while Python holds a reference: t (1200 B) reuses the space of the two
    buffers (2 x 500 B), unless a buffer is used again after t is allocated."""
    x = np.ones((1, 250), dtype=BF16)
    _, st = sim.run(k_lifetimes, x, n_iter=3)
    assert st.sbuf_peak_bytes == 40 + 1200
    # three 400 B PSUM tiles take a bank each, the 4 KiB tile two banks
    assert st.psum_peak_banks == 5 and st.psum_peak_bytes == 5 * 2048
    _, late = sim.run(k_lifetimes, x, n_iter=3, late_use=True)
    assert late.sbuf_peak_bytes == 40 + 500 + 1200


def k_engines(x):
    """One tile through scalar (silu), vector (multiply), and a PE transpose."""
    P, F = x.shape
    out = nl.ndarray((F, P), dtype=nl.float32, buffer=nl.shared_hbm)
    t = nl.ndarray((P, F), dtype=x.dtype, buffer=nl.sbuf)
    nisa.dma_copy(dst=t, src=x)
    s = nl.ndarray((P, F), dtype=nl.float32, buffer=nl.sbuf)
    nisa.activation(dst=s, op=nl.silu, data=t)
    m = nl.ndarray((P, F), dtype=nl.float32, buffer=nl.sbuf)
    nisa.tensor_tensor(dst=m, data1=s, data2=t, op=nl.multiply)
    tp = nl.ndarray((F, P), dtype=nl.float32, buffer=nl.psum)
    nisa.nc_transpose(dst=tp, data=m)
    o = nl.ndarray((F, P), dtype=nl.float32, buffer=nl.sbuf)
    nisa.tensor_copy(dst=o, src=tp)
    nisa.dma_copy(dst=out, src=o)
    return out


def test_scalar_vector_and_transpose_values_and_cycles():
    rng = _rng(5)
    x = rng.standard_normal((100, 120)).astype(np.float32)
    y, st = sim.run(k_engines, x)
    xd = x.astype(np.float64)
    ref = (xd / (1 + np.exp(-xd)) * xd).T
    np.testing.assert_allclose(y, ref, rtol=1e-5, atol=1e-6)
    # N cycles, +100 static overhead for N < 128 (arch guide, VectorE cost model)
    assert st.engine_cycles["scalar"] == 120 + 100
    # multiply: two input tiles, ~2N cycles; PSUM copy F=100
    assert st.engine_cycles["vector"] == (2 * 120 + 100) + (100 + 100)
    # fp32 transpose of [100, 120]: 4 passes of max(64, 100 moving, 120 stationary columns)
    assert st.engine_cycles["tensor"] == 4 * max(64, 100, 120)
    assert st.pe_transpose_count == 1 and st.flops == 0


def k_dma_t(x):
    F, P = x.shape
    out = nl.ndarray((P, F), dtype=x.dtype, buffer=nl.shared_hbm)
    t = nl.ndarray((P, F), dtype=x.dtype, buffer=nl.sbuf)
    nisa.dma_transpose(dst=t, src=x)
    nisa.dma_copy(dst=out, src=t)
    return out


def test_dma_transpose_values_and_counts():
    x = _rng(6).standard_normal((300, 128)).astype(BF16)
    y, st = sim.run(k_dma_t, x)
    np.testing.assert_array_equal(y, x.T)
    assert st.dma_transpose_count == 1 and st.dma_count == 2
    assert st.hbm_read_bytes == st.hbm_write_bytes == 300 * 128 * 2


def k_many_matmuls(a_t, b, n):
    K, M = a_t.shape
    at = nl.load(a_t)
    bt = nl.load(b)
    for _ in range(n):
        ps = nl.ndarray((M, b.shape[1]), dtype=nl.float32, buffer=nl.psum)
        nisa.nc_matmul(dst=ps, stationary=at, moving=bt)
    return None


@pytest.mark.parametrize("target", ["trn1", "trn2"])
def test_latency_model_by_hand(target):
    """Two loads then 1000 matmuls that read both: the schedule by hand."""
    t = sim.get_target(target)
    _, st = sim.run(k_many_matmuls, sim.spec((128, 128)), sim.spec((128, 512)), n=1000,
                    target=target, count_only=True)
    tensor_s = 1000 * 512 / t.pe_hz
    # a_t rows are 256 B (efficiency 0.105), b rows 1 KiB (0.43), at the sustained rate
    # (17 B/ns trn1, 23 B/ns trn2) of 16 engines (128 partitions / 8 per engine)
    rate = {"trn1": 17e9, "trn2": 23e9}[target]
    assert t.dma_cost_bytes_per_s == rate
    a = 128 * 128 * 2 / (16 * rate * 0.105)
    b = 128 * 512 * 2 / (16 * rate * 0.43)
    end_a = t.dma_fixed_s + a                  # first transfer: latency, then data
    end_b = max(t.dma_fixed_s, end_a) + b      # second queue, shared bandwidth: after a
    assert st.engine_busy_s["tensor"] == pytest.approx(tensor_s)
    assert st.engine_busy_s["dma"] == pytest.approx(a + b)
    assert st.engine_stall_s["tensor"] == pytest.approx(end_b)
    assert st.bound_by == "tensor"
    assert st.modeled_latency_s == pytest.approx(end_b + tensor_s)
    flops = 1000 * 2 * 128 * 128 * 512
    assert st.flops == flops
    assert st.mfu == pytest.approx(flops / (2 * 128 * 128 * t.pe_hz * st.modeled_latency_s))
    assert 0.97 < st.mfu < 1.0      # only the exposed first loads are lost


def test_small_matmuls_waste_the_array():
    """A 16-column moving operand is LoadStationary-bound (the 128 stationary columns);
    a 64-column stationary with 16 moving columns costs the 64-cycle floor; a 32-row
    contraction still occupies the whole array: MFU falls accordingly."""
    _, st = sim.run(k_many_matmuls, sim.spec((32, 128)), sim.spec((32, 16)), n=100,
                    count_only=True)
    assert st.engine_cycles["tensor"] == 100 * 128
    assert st.flops == 100 * 2 * 32 * 128 * 16
    _, st = sim.run(k_many_matmuls, sim.spec((32, 64)), sim.spec((32, 16)), n=100,
                    count_only=True)
    assert st.engine_cycles["tensor"] == 100 * 64


def test_trn2_has_more_sbuf_than_trn1():
    def k(x):
        nl.ndarray((128, 100_000), dtype=nl.bfloat16, buffer=nl.sbuf)   # 200000 B/partition
        return None

    _, st = sim.run(k, np.zeros((1, 1), np.float32), target="trn2")
    assert st.sbuf_peak_bytes == 200_000 and st.sbuf_capacity_bytes == 224 * 1024
    with pytest.raises(sim.SbufCapacityError):
        sim.run(k, np.zeros((1, 1), np.float32), target="trn1", spill=False)
    _, st = sim.run(k, np.zeros((1, 1), np.float32), target="trn1")
    # never used: spilled (with room for the staging area) but never moved
    assert st.sbuf_spilled_bytes == 200_000 - 192 * 1024 + sim.core.SPILL_STAGING_BYTES
    assert st.spill_bytes == 0


def test_targets_numbers():
    assert sim.TRN1.peak_flops == pytest.approx(91.75e12, rel=1e-3)
    assert sim.TRN2.peak_flops == pytest.approx(78.6e12, rel=1e-3)
    assert 220 < sim.TRN1.ridge_flop_per_byte < 226
    assert 214 < sim.TRN2.ridge_flop_per_byte < 220
    with pytest.raises(ValueError, match="unknown target"):
        sim.get_target("trn9")


def test_views_and_shapes():
    def k(x):
        t = nl.ndarray((128, 4, 300), dtype=nl.float32, buffer=nl.sbuf)
        assert t[:, 1, :].shape == (128, 300)
        assert t[0:7, 2, 10:20].shape == (7, 10)
        assert t[0:7][..., 0:3].shape == (7, 4, 3)
        assert t[3:10][2:4, 1].shape == (2, 300)
        with pytest.raises(IndexError):
            t[0, 0, 0, 0]
        return None

    sim.run(k, np.zeros((1, 1), np.float32))


def test_jit_and_simulate_return_outputs():
    a = _rng(7).standard_normal((16, 8)).astype(np.float32)
    b = _rng(8).standard_normal((16, 24)).astype(np.float32)
    jitted = sim.jit(k_matmul)
    np.testing.assert_allclose(jitted(a, b), a.T @ b, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(sim.simulate(k_matmul)(a, b), a.T @ b, rtol=1e-5, atol=1e-5)


def test_stats_dict_access():
    _, st = sim.run(k_matmul, sim.spec((128, 128)), sim.spec((128, 512)), count_only=True)
    for key in ("hbm_read_bytes", "hbm_write_bytes", "flops", "sbuf_peak_bytes",
                "psum_peak_bytes", "modeled_latency_s", "mfu", "dma_count", "matmul_count",
                "engine_cycles", "hbm_bytes"):
        assert st[key] == getattr(st, key)
    assert math.isclose(st.arithmetic_intensity, st.flops / st.hbm_bytes)


# -- documented DMA / engine costs (sources in kernels/sim/targets.py) -------------------

def k_copy(x):
    """HBM -> SBUF -> nowhere: one DMA of the whole argument."""
    t = nl.ndarray(x.shape, dtype=x.dtype, buffer=nl.sbuf)
    nisa.dma_copy(dst=t, src=x)
    return None


def k_copy_cols(x, cols):
    """One DMA of x[:, 0:cols] (a partial row: contiguous runs of cols elements)."""
    t = nl.ndarray((x.shape[0], cols), dtype=x.dtype, buffer=nl.sbuf)
    nisa.dma_copy(dst=t, src=x[:, 0:cols])
    return None


def test_dma_chunk_efficiency_table_and_interpolation():
    eff = sim.targets.dma_chunk_efficiency
    assert eff(256) == pytest.approx(0.105)
    assert eff(1024) == pytest.approx(0.43)
    assert eff(2048) == pytest.approx(0.84)
    assert eff(4096) == eff(65536) == 1.0
    assert eff(8) == pytest.approx(0.015)
    # log2-linear between 256 (0.105) and 512 (0.22): 384 B -> 0.105 + 0.115 * log2(1.5)
    assert eff(384) == pytest.approx(0.105 + 0.115 * math.log2(1.5))


@pytest.mark.parametrize("cols,eff", [(128, 0.105), (1024, 0.84), (2048, 1.0)])
def test_dma_cost_by_bytes_per_partition(cols, eff):
    """trn1: [128, cols] bf16 in one DMA: 1.3 us latency, then bytes over 16 engines at
    17 B/ns x eff."""
    t = sim.TRN1
    _, st = sim.run(k_copy, sim.spec((128, cols)), count_only=True)
    nbytes = 128 * cols * 2
    data = nbytes / (16 * 17e9 * eff)
    assert data > nbytes / t.hbm_bytes_per_s          # the engines, not HBM, bound it
    assert st.engine_busy_s["dma"] == pytest.approx(data)
    assert st.modeled_latency_s == pytest.approx(1.3e-6 + data)
    assert st.dma_min_run_bytes == cols * 2


def test_dma_run_is_the_contiguous_part_of_a_strided_view():
    """128 columns out of 4096-wide rows: 256 B runs (eff 0.105), although the HBM
    tensor is long; the whole rows: 8 KiB runs (eff 1)."""
    _, part = sim.run(k_copy_cols, sim.spec((128, 4096)), cols=128, count_only=True)
    assert part.dma_min_run_bytes == 256
    assert part.engine_busy_s["dma"] == pytest.approx(32768 / (16 * 17e9 * 0.105))
    _, full = sim.run(k_copy_cols, sim.spec((128, 4096)), cols=4096, count_only=True)
    assert full.dma_min_run_bytes == 8192
    assert full.engine_busy_s["dma"] == pytest.approx(1048576 / (16 * 17e9))


def test_dma_uses_one_engine_per_eight_partitions():
    """A 1-partition transfer runs on one engine: 16x the data time of a full one."""
    _, one = sim.run(k_copy, sim.spec((1, 4096)), count_only=True)
    assert one.modeled_latency_s == pytest.approx(1.3e-6 + 8192 / 17e9)


@pytest.mark.parametrize("target,rate", [("trn1", 17e9), ("trn2", 23e9)])
def test_dma_transpose_runs_at_90_percent(target, rate):
    """x [2048, 128] bf16 -> x^T [128, 2048] by DMA transpose (eff 0.9), then stored
    with 4 KiB runs (eff 1), the store waiting for the load: by hand. HBM bandwidth
    caps the shared rate (trn2: 362 GB/s < 16 x 23 B/ns)."""
    t = sim.get_target(target)
    _, st = sim.run(k_dma_t, sim.spec((2048, 128)), target=target, count_only=True)
    nbytes = 2048 * 128 * 2
    load = max(nbytes / (16 * rate * 0.9), nbytes / t.hbm_bytes_per_s)
    store = max(nbytes / (16 * rate), nbytes / t.hbm_bytes_per_s)
    assert st.modeled_latency_s == pytest.approx(2 * 1.3e-6 + load + store)
    assert st.engine_busy_s["dma"] == pytest.approx(load + store)


def k_two_input(x, op_count):
    t = nl.ndarray(x.shape, dtype=x.dtype, buffer=nl.sbuf)
    nisa.dma_copy(dst=t, src=x)
    o = nl.ndarray(x.shape, dtype=nl.float32, buffer=nl.sbuf)
    for _ in range(op_count):
        nisa.tensor_tensor(dst=o, data1=t, data2=t, op=nl.add)          # two inputs: 2F
        nisa.tensor_scalar(dst=o, data=t, op0=nl.multiply, operand0=2.0)  # one input: F
    return None


def test_vector_two_input_instructions_cost_twice():
    _, st = sim.run(k_two_input, sim.spec((128, 300), "float32"), op_count=10, count_only=True)
    assert st.engine_cycles["vector"] == 10 * (2 * 300 + 300)
    # N < 128: the 100-cycle static overhead on top: F=20 -> (40 + 100) + (20 + 100)
    _, small = sim.run(k_two_input, sim.spec((128, 20), "float32"), op_count=1, count_only=True)
    assert small.engine_cycles["vector"] == 140 + 120


def k_psum_consumers(a_t, b, with_silu=True):
    """One matmul; ScalarE (silu) and VectorE (copy) both read its PSUM result, independently."""
    at = nl.load(a_t)
    bt = nl.load(b)
    ps = nl.ndarray((a_t.shape[1], b.shape[1]), dtype=nl.float32, buffer=nl.psum)
    nisa.nc_matmul(dst=ps, stationary=at, moving=bt)
    if with_silu:
        g = nl.ndarray(ps.shape, dtype=nl.float32, buffer=nl.sbuf)
        nisa.activation(dst=g, op=nl.silu, data=ps)                     # scalar, PSUM
    o = nl.ndarray(ps.shape, dtype=nl.float32, buffer=nl.sbuf)
    nisa.tensor_copy(dst=o, src=ps)                                     # vector, PSUM
    return None


def test_psum_port_shared_by_vector_and_scalar_on_trn1_only():
    """NeuronCore-v2: VectorE and ScalarE cannot access PSUM in parallel, so the copy
    waits for the silu; NeuronCore-v3 runs them side by side."""
    specs = (sim.spec((128, 128)), sim.spec((128, 512)))
    lat = {}
    for target in ("trn1", "trn2"):
        for silu in (True, False):
            _, st = sim.run(k_psum_consumers, *specs, with_silu=silu, target=target,
                            count_only=True)
            lat[target, silu] = st.modeled_latency_s
    assert lat["trn1", True] - lat["trn1", False] == pytest.approx(512 / sim.TRN1.scalar_hz)
    t2 = sim.TRN2
    assert lat["trn2", True] - lat["trn2", False] == pytest.approx(
        max(0.0, 512 / t2.scalar_hz - 512 / t2.vector_hz), abs=1e-15)


# -- documented effects and the brackets of undocumented constants ---------------------------

def test_brackets_move_only_the_undocumented_constants():
    """trn1's DMA transpose throughput is undocumented: 0.9 (trn2's figure) at the
    optimistic end, the curve's floor for 2-byte runs at the pessimistic one; trn2's is
    documented (0.9 at both ends). The access overhead is 0 or 60 cycles; trn1's software
    descriptor generation 0 or 1.3 us; everything documented stays put."""
    from vllm_neuronmlp.kernels.sim.targets import bracket
    lo1, hi1 = bracket("trn1")
    lo2, hi2 = bracket("trn2")
    assert (lo1.dma_transpose_efficiency, hi1.dma_transpose_efficiency) == (0.9, 0.015)
    assert lo2.dma_transpose_efficiency == hi2.dma_transpose_efficiency == 0.9
    assert (lo1.access_overhead_cycles, hi1.access_overhead_cycles) == (0, 60)
    assert (lo1.swdge_dynamic_s, hi1.swdge_dynamic_s) == (0.0, 1.3e-6)
    assert hi2.swdge_dynamic_s == 0.0 and hi2.hwdge_s == lo2.hwdge_s == 600e-9
    for lo, hi, t in ((lo1, hi1, sim.TRN1), (lo2, hi2, sim.TRN2)):
        for f in ("pe_hz", "dma_fixed_s", "hbm_bytes_per_s", "sbuf_bytes_per_partition"):
            assert getattr(lo, f) == getattr(hi, f) == getattr(t, f)
    with pytest.raises(ValueError, match="bracket end must be 'optimistic' or 'pessimistic'"):
        sim.targets.bracket_end("trn1", "typical")


def test_access_overhead_is_charged_per_instruction():
    """60 cycles on top of each matmul (here 512 moving columns) and each vector copy."""
    import dataclasses
    t = dataclasses.replace(sim.TRN1, access_overhead_cycles=60)
    _, st = sim.run(k_many_matmuls, sim.spec((128, 128)), sim.spec((128, 512)), n=10,
                    count_only=True, target=t)
    assert st.engine_cycles["tensor"] == 10 * (512 + 60)


def test_trn1_dma_transpose_bracket_changes_its_cost():
    """The same DMA transpose at both ends of trn1's bracket: 0.9 / 0.015 of a copy."""
    from vllm_neuronmlp.kernels.sim.targets import bracket
    lo, hi = bracket("trn1")
    _, a = sim.run(k_dma_t, sim.spec((2048, 128)), target=lo, count_only=True)
    _, b = sim.run(k_dma_t, sim.spec((2048, 128)), target=hi, count_only=True)
    nbytes = 2048 * 128 * 2
    store = nbytes / (16 * 17e9)
    assert a.engine_busy_s["dma"] - store == pytest.approx(nbytes / (16 * 17e9 * 0.9))
    assert b.engine_busy_s["dma"] - store == pytest.approx(nbytes / (16 * 17e9 * 0.015))


def k_strided(x, step):
    t = nl.ndarray((128, 64), dtype=x.dtype, buffer=nl.sbuf)
    nisa.dma_copy(dst=t, src=x[:, 0:64 * step:step])
    return None


def test_dma_with_element_stride_over_16_bytes_runs_at_half_bandwidth():
    """64 fp32 elements per partition, 4-byte runs either way: a 16-byte stride is
    charged the curve's rate, a 32-byte stride half of it."""
    _, s16 = sim.run(k_strided, sim.spec((128, 512), "float32"), step=4, count_only=True)
    _, s32 = sim.run(k_strided, sim.spec((128, 512), "float32"), step=8, count_only=True)
    assert s32.engine_busy_s["dma"] == pytest.approx(2 * s16.engine_busy_s["dma"])


def k_dynamic_loads(x):
    t = nl.ndarray((128, 512), dtype=x.dtype, buffer=nl.sbuf)
    for i in nl.dynamic_range(0, x.shape[0], 128):
        nisa.dma_copy(dst=t, src=x.ap([[512, 128], [1, 512]], scalar_offset=i, indirect_dim=0))
    return None


def test_descriptor_generation_trn2_hardware_trn1_software_for_dynamic_addresses():
    """trn2: every DMA costs its issuing engine ~600 ns of descriptor generation. trn1 has
    no hardware DGE: a register-addressed DMA gets its descriptors from GpSimd software,
    0 at the optimistic end of the bracket, 1.3 us at the pessimistic end."""
    from vllm_neuronmlp.kernels.sim.targets import bracket
    x = sim.spec((1024, 512))
    _, st2 = sim.run(k_dynamic_loads, x, target="trn2", count_only=True)
    assert st2.dma_count == 8 and st2.engine_busy_s["sync"] == pytest.approx(8 * 600e-9)
    lo, hi = bracket("trn1")
    _, a = sim.run(k_dynamic_loads, x, target=lo, count_only=True)
    _, b = sim.run(k_dynamic_loads, x, target=hi, count_only=True)
    assert a.engine_busy_s["gpsimd"] == 0.0
    assert b.engine_busy_s["gpsimd"] == pytest.approx(8 * 1.3e-6)
