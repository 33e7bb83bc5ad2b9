"""The emulator's device loops, compile-time rules and timeline cost model, checked by hand:
nl.dynamic_range (values per iteration, count-only replay, static vs dynamic instruction
counts), each rejection the NKI docs name, and the schedule (dependencies, buffer reuse,
DMA latency)."""
import numpy as np
import pytest

from vllm_neuronmlp.kernels import baselines, blocking, sim, xuv
from vllm_neuronmlp.kernels.sim import isa as nisa
from vllm_neuronmlp.kernels.sim import language as nl

T1 = sim.TRN1


# -- the timeline, by hand -----------------------------------------------------------------

def k_three(x, w):
    """DMA -> matmul -> copy: each waits for the previous one's result."""
    wt = nl.ndarray((128, 128), dtype=nl.bfloat16, buffer=nl.sbuf)
    nisa.memset(dst=wt, value=1.0, engine=nisa.engine.gpsimd)        # (not timed below)
    t = nl.ndarray((128, 2048), dtype=nl.bfloat16, buffer=nl.sbuf)
    nisa.dma_copy(dst=t, src=x)
    ps = nl.ndarray((128, 512), dtype=nl.float32, buffer=nl.psum)
    nisa.nc_matmul(dst=ps, stationary=wt, moving=t[:, 0:512])
    o = nl.ndarray((128, 512), dtype=nl.float32, buffer=nl.sbuf)
    nisa.tensor_copy(dst=o, src=ps)
    return None


def test_three_instruction_schedule_by_hand():
    """x [128, 2048] bf16: 4 KiB per partition (efficiency 1), 16 engines at 17 B/ns:
    1.3 us latency + 524288 B / 272 GB/s; then one 512-column matmul (512 cycles at
    2.8 GHz); then the PSUM copy on VectorE (512 cycles at 1.12 GHz)."""
    _, st = sim.run(k_three, sim.spec((128, 2048)), sim.spec((1, 1)), count_only=True)
    dma_end = 1.3e-6 + 524288 / (16 * 17e9)
    gpsimd = (128 + 0) / T1.gpsimd_hz                 # memset [128, 128]: N = 128 cycles
    mm_end = max(dma_end, gpsimd) + 512 / 2.8e9
    end = mm_end + 512 / 1.12e9
    assert st.modeled_latency_s == pytest.approx(end, rel=1e-12)
    assert st.engine_stall_s["tensor"] == pytest.approx(dma_end)
    assert st.engine_stall_s["vector"] == pytest.approx(mm_end)
    assert st.static_instructions == st.dynamic_instructions == 4


def k_stream(x, bufs):
    """Load 8 tiles and multiply each: with one buffer a load waits for the previous
    tile's matmul (its buffer's previous use), with two the next load overlaps."""
    w = nl.ndarray((128, 128), dtype=nl.bfloat16, buffer=nl.sbuf)
    nisa.memset(dst=w, value=1.0)
    tiles = [nl.ndarray((128, 512), dtype=nl.bfloat16, buffer=nl.sbuf) for _ in range(bufs)]
    accs = [nl.ndarray((128, 512), dtype=nl.float32, buffer=nl.psum) for _ in range(2)]
    for i in range(8):
        t = tiles[i % bufs]
        nisa.dma_copy(dst=t, src=x[:, 512 * i:512 * (i + 1)])
        for _ in range(16):
            nisa.nc_matmul(dst=accs[i % 2], stationary=w, moving=t)
    return None


def test_buffer_reuse_waits_for_its_previous_use():
    spec = sim.spec((128, 4096))
    _, one = sim.run(k_stream, spec, bufs=1, count_only=True)
    _, two = sim.run(k_stream, spec, bufs=2, count_only=True)
    assert one.engine_busy_s == two.engine_busy_s          # same work ...
    assert one.modeled_latency_s > 1.3 * two.modeled_latency_s   # ... not overlapped
    assert one.engine_stall_s["tensor"] > two.engine_stall_s["tensor"]
    assert one.sbuf_peak_bytes + 1024 == two.sbuf_peak_bytes


@pytest.mark.parametrize("kernel,shapes,kw", [
    (xuv.fused_xuv, [(1000, 640), (640, 256), (256, 900)], {"block_m": 256}),
    (blocking.fused_xuv, [(8, 4096), (4096, 512), (512, 4096)], {}),
    (baselines.dense_xw, [(700, 1000), (1000, 1300)], {}),
    (baselines.sequential_xuv, [(700, 1000), (1000, 256), (256, 1300)], {}),
])
def test_schedule_never_ends_before_the_busiest_engine(kernel, shapes, kw):
    for target in ("trn1", "trn2"):
        _, st = sim.run(kernel, *[sim.spec(s) for s in shapes], target=target,
                        count_only=True, **kw)
        assert st.modeled_latency_s >= max(st.engine_busy_s.values()) * (1 - 1e-12)
        assert st.engine_time_s == st.engine_busy_s


# -- dynamic_range --------------------------------------------------------------------------

def k_rows(x, dynamic):
    """y = 2 x, 128 rows at a time: a hardware loop (register addressing) or unrolled."""
    S, F = x.shape
    y = nl.ndarray((S, F), dtype=x.dtype, buffer=nl.shared_hbm)
    t = nl.ndarray((128, F), dtype=x.dtype, buffer=nl.sbuf)
    o = nl.ndarray((128, F), dtype=x.dtype, buffer=nl.sbuf)
    if dynamic:
        for r in nl.dynamic_range(0, S, 128):
            nisa.dma_copy(dst=t, src=x.ap([[F, 128], [1, F]], scalar_offset=r))
            nisa.tensor_scalar(dst=o, data=t, op0=nl.multiply, operand0=2.0)
            nisa.dma_copy(dst=y.ap([[F, 128], [1, F]], scalar_offset=r), src=o)
    else:
        for r in nl.static_range(0, S, 128):
            nisa.dma_copy(dst=t, src=x[r:r + 128, :])
            nisa.tensor_scalar(dst=o, data=t, op0=nl.multiply, operand0=2.0)
            nisa.dma_copy(dst=y[r:r + 128, :], src=o)
    return y


def test_dynamic_range_runs_every_iteration_like_the_unrolled_loop():
    x = np.random.default_rng(0).standard_normal((640, 96)).astype(np.float32)
    y_dyn, dyn = sim.run(k_rows, x, dynamic=True)
    y_sta, sta = sim.run(k_rows, x, dynamic=False)
    np.testing.assert_array_equal(y_dyn, 2 * x)
    np.testing.assert_array_equal(y_sta, 2 * x)
    assert dyn.dynamic_instructions == sta.dynamic_instructions == sta.static_instructions == 15
    assert dyn.static_instructions == 3                     # the body, compiled once
    assert dyn.modeled_latency_s == pytest.approx(sta.modeled_latency_s)
    assert dyn.hbm_bytes == sta.hbm_bytes and dyn.sbuf_peak_bytes == sta.sbuf_peak_bytes


def test_count_only_replay_equals_value_mode():
    x = np.zeros((1280, 96), np.float32)
    _, vals = sim.run(k_rows, x, dynamic=True)
    _, counts = sim.run(k_rows, sim.spec((1280, 96), "float32"), dynamic=True, count_only=True)
    a, b = vals.as_dict(), counts.as_dict()
    a.pop("count_only"), b.pop("count_only")
    timed = ("engine_time_s", "engine_busy_s", "engine_stall_s", "modeled_latency_s", "mfu")
    assert {k: v for k, v in a.items() if k not in timed} == \
        {k: v for k, v in b.items() if k not in timed}
    for k in timed:      # count-only replays the body, extrapolating its steady state
        assert b[k] == pytest.approx(a[k], rel=1e-9, abs=1e-15)


def test_fused_static_instructions_do_not_grow_with_s():
    K, r, N = 512, 256, 1024
    static, dynamic = set(), []
    for S in (256, 512, 2048, 8192):
        _, st = sim.run(xuv.fused_xuv, sim.spec((S, K)), sim.spec((K, r)), sim.spec((r, N)),
                        block_m=256, count_only=True)
        static.add(st.static_instructions)
        dynamic.append(st.dynamic_instructions)
    assert len(static) == 1
    assert dynamic[-1] == 32 * dynamic[0]


# -- rejections the NKI docs name -------------------------------------------------------------

def _run(body, *shapes):
    return sim.run(body, *[sim.spec(s, "float32") for s in shapes], count_only=True)


@pytest.mark.parametrize("misuse", ["if", "arith", "slice", "range"])
def test_loop_register_is_not_a_python_int(misuse):
    def body(x):
        t = nl.ndarray((128, 64), dtype=nl.float32, buffer=nl.sbuf)
        for r in nl.dynamic_range(0, 256, 128):
            if misuse == "if":
                if r == 0:
                    pass
            elif misuse == "arith":
                nisa.dma_copy(dst=t, src=x.ap([[64, 128], [1, 64]], scalar_offset=r + 1))
            elif misuse == "slice":
                nisa.dma_copy(dst=t, src=x[r:r + 128, :])
            else:
                for _ in range(r):
                    pass
    with pytest.raises(sim.DynamicIndexError, match="device register"):
        _run(body, (256, 64))


def test_indirect_dimension_cannot_be_sliced_again():
    def body(x):
        t = nl.ndarray((64, 64), dtype=nl.float32, buffer=nl.sbuf)
        for r in nl.dynamic_range(0, 256, 128):
            v = x.ap([[64, 128], [1, 64]], scalar_offset=r)
            nisa.dma_copy(dst=t, src=v[0:64, :])
    with pytest.raises(sim.IndirectViewError, match="indirect dimension"):
        _run(body, (256, 64))


def test_loop_body_tensor_used_after_the_loop():
    def body(x):
        for r in nl.dynamic_range(0, 256, 128):
            t = nl.ndarray((128, 64), dtype=nl.float32, buffer=nl.sbuf)
            nisa.dma_copy(dst=t, src=x.ap([[64, 128], [1, 64]], scalar_offset=r))
        o = nl.ndarray((128, 64), dtype=nl.float32, buffer=nl.sbuf)
        nisa.tensor_copy(dst=o, src=t)
    with pytest.raises(sim.LoopScopeError, match="used after the loop"):
        _run(body, (256, 64))


@pytest.mark.parametrize("step", [0, -128, 1.5])
def test_dynamic_range_step_must_be_a_positive_int(step):
    def body(x):
        for _ in nl.dynamic_range(0, 256, step):
            pass
    with pytest.raises(sim.LoopBoundsError, match="step must be a compile-time positive int"):
        _run(body, (1, 1))


@pytest.mark.parametrize("address,match", [((0, 1000), "must start a bank"),
                                           ((0, 7 * 2048), "do not exist"),
                                           ((3, 0), "must start a bank")])
def test_psum_placement_is_checked(address, match):
    def body(x):
        nl.ndarray((128, 2, 512), dtype=nl.float32, buffer=nl.psum, address=address)
    with pytest.raises(sim.PsumPlacementError, match=match):
        _run(body, (1, 1))


def test_psum_tiles_placed_over_each_other_while_live():
    def body(x, second):
        a = nl.ndarray((128, 512), dtype=nl.float32, buffer=nl.psum, address=(0, 0))
        b = nl.ndarray((128, 512), dtype=nl.float32, buffer=nl.psum, address=(0, second))
        nisa.memset(dst=a, value=0.0)
        nisa.memset(dst=b, value=0.0)
        nisa.memset(dst=a, value=1.0)
    with pytest.raises(sim.PsumPlacementError, match="overlap while both are live"):
        _run(lambda x: body(x, 0), (1, 1))
    _, st = _run(lambda x: body(x, 2048), (1, 1))
    assert st.psum_peak_banks == 2


def test_buffer_count_that_does_not_fit():
    """Four 56 KiB buffers (224 KiB) fit trn2's 224 KiB partitions, not trn1's 192 KiB."""
    def body(x):
        bufs = [nl.ndarray((128, 14 * 1024), dtype=nl.float32, buffer=nl.sbuf) for _ in range(4)]
        for b in bufs:
            nisa.memset(dst=b, value=0.0)
        for b in bufs:
            nisa.memset(dst=b, value=1.0)
    with pytest.raises(sim.SbufCapacityError, match="229376 B/partition > trn1 capacity"):
        sim.run(body, sim.spec((1, 1), "float32"), count_only=True, spill=False)
    _, st = sim.run(body, sim.spec((1, 1), "float32"), target="trn2", count_only=True)
    assert st.sbuf_peak_bytes == 4 * 56 * 1024
