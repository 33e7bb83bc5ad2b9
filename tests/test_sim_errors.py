"""Every refusal of the emulator, triggered on purpose: exception type (and its common
base) plus a message naming the instruction and the shapes."""
import numpy as np
import pytest

from vllm_neuronmlp.kernels import sim
from vllm_neuronmlp.kernels.sim import isa as nisa
from vllm_neuronmlp.kernels.sim import language as nl

X = np.zeros((128, 128), dtype=np.float32)


def run_body(body, target="trn1", **kw):
    """Run `body(x)` as a kernel on a [128, 128] fp32 HBM input."""
    def kernel(x):
        body(x)
        return None
    return sim.run(kernel, X, target=target, **kw)


def expect(exc, *fragments, target="trn1"):
    def deco(body):
        with pytest.raises(exc) as info:
            run_body(body, target)
        assert isinstance(info.value, sim.NkiSimError)
        for f in fragments:
            assert f in str(info.value), (f, str(info.value))
        return body
    return deco


def sb(*shape, dtype=nl.float32):
    return nl.ndarray(shape, dtype=dtype, buffer=nl.sbuf)


def ps(*shape):
    return nl.ndarray(shape, dtype=nl.float32, buffer=nl.psum)


def test_partition_dim_over_128_sbuf_and_psum():
    @expect(sim.PartitionDimError, "nl.ndarray[129, 4]", "SBUF", "129 > 128")
    def _(x):
        sb(129, 4)

    @expect(sim.PartitionDimError, "nl.ndarray[200, 8]", "PSUM")
    def _(x):
        ps(200, 8)


def test_stationary_free_over_128():
    @expect(sim.StationaryFreeError, "nc_matmul", "stationary free size 129 > 128",
            "stationary [128, 129]", "moving [128, 512]")
    def _(x):
        nisa.nc_matmul(dst=ps(128, 512), stationary=sb(128, 129), moving=sb(128, 512))


def test_moving_free_over_512():
    @expect(sim.MovingFreeError, "nc_matmul", "moving free size 513 > 512",
            "moving [64, 513]")
    def _(x):
        nisa.nc_matmul(dst=ps(128, 512), stationary=sb(64, 128), moving=sb(64, 513))


def test_result_straddling_two_psum_banks():
    @expect(sim.PsumBankError, "nc_matmul", "straddles two PSUM banks", "dst [128, 512]")
    def _(x):
        two_banks = ps(128, 1024)
        nisa.nc_matmul(dst=two_banks[:, 256:768], stationary=sb(128, 128),
                       moving=sb(128, 512))


def test_bank_aligned_second_bank_is_fine():
    def body(x):
        two_banks = ps(128, 1024)
        nisa.nc_matmul(dst=two_banks[:, 512:1024], stationary=sb(128, 128),
                       moving=sb(128, 512))
    _, st = run_body(body)
    assert st.matmul_count == 1 and st.psum_peak_banks == 2


def test_matmul_operands_outside_sbuf():
    @expect(sim.MatmulMemoryError, "nc_matmul", "stationary operand [128, 128] is in psum")
    def _(x):
        nisa.nc_matmul(dst=ps(128, 512), stationary=ps(128, 128), moving=sb(128, 512))

    @expect(sim.MatmulMemoryError, "nc_matmul", "moving operand [128, 128] is in hbm")
    def _(x):
        nisa.nc_matmul(dst=ps(128, 128), stationary=sb(128, 128), moving=x)


def test_matmul_result_outside_psum():
    @expect(sim.MatmulMemoryError, "nc_matmul", "result [128, 512] is in sbuf")
    def _(x):
        nisa.nc_matmul(dst=sb(128, 512), stationary=sb(128, 128), moving=sb(128, 512))


def test_matmul_shape_mismatch():
    @expect(sim.ShapeMismatchError, "nc_matmul", "result must be [96, 512]")
    def _(x):
        nisa.nc_matmul(dst=ps(128, 512), stationary=sb(128, 96), moving=sb(128, 512))

    @expect(sim.ShapeMismatchError, "partition dims differ")
    def _(x):
        nisa.nc_matmul(dst=ps(128, 512), stationary=sb(128, 128), moving=sb(64, 512))


def test_dma_touching_psum():
    @expect(sim.DmaPsumError, "dma_copy", "src [128, 128] is in PSUM")
    def _(x):
        out = nl.ndarray((128, 128), dtype=nl.float32, buffer=nl.shared_hbm)
        nisa.dma_copy(dst=out, src=ps(128, 128))

    @expect(sim.DmaPsumError, "dma_copy", "dst [128, 128] is in PSUM")
    def _(x):
        nisa.dma_copy(dst=ps(128, 128), src=x)

    @expect(sim.DmaPsumError, "dma_transpose")
    def _(x):
        nisa.dma_transpose(dst=ps(128, 128), src=x)


def test_sbuf_capacity_trn1_and_trn2():
    # 48 KiB + 48 KiB + 100 KiB = 196 KiB > 192 KiB (trn1), < 224 KiB (trn2)
    def body(x):
        a = sb(128, 12 * 1024)
        b = sb(128, 12 * 1024)
        c = sb(128, 25 * 1024)
        return a, b, c

    with pytest.raises(sim.SbufCapacityError) as info:
        run_body(body, "trn1", spill=False)          # strict mode: refuse instead of spilling
    msg = str(info.value)
    assert "nl.ndarray[128, 25600] float32 in SBUF needs 102400 B/partition" in msg
    assert "98304 B/partition are live" in msg and "trn1 capacity 196608" in msg
    _, st = run_body(body, "trn2")
    assert st.sbuf_peak_bytes == 200704 and st.sbuf_spilled_bytes == 0
    # by default trn1 spills the excess (4 KiB per partition of the largest tensor) and
    # the staging area the spilled bytes pass through
    staging = sim.core.SPILL_STAGING_BYTES
    _, st = run_body(body, "trn1")
    assert st.sbuf_peak_bytes == 196608 - staging
    assert st.sbuf_spilled_bytes == 200704 - 196608 + staging


def test_an_instruction_wider_than_a_partition_is_refused_even_with_spills():
    """A 200000 B/partition tensor spills when used piecewise; one instruction on all of
    it cannot run (its operand must be on chip at once)."""
    @expect(sim.SbufCapacityError, "nl.ndarray[128, 50000]", "200000 B/partition of SBUF in "
            "one instruction", "nothing can be spilled")
    def body(x):
        nisa.memset(dst=sb(128, 50000), value=0.0)

    def halves(x):
        t = sb(128, 50000)
        nisa.memset(dst=t[:, 0:25000], value=0.0)
        nisa.memset(dst=t[:, 25000:50000], value=1.0)
    _, st = run_body(halves)
    spilled = 200000 - 196608 + sim.core.SPILL_STAGING_BYTES
    assert st.sbuf_spilled_bytes == spilled
    assert st.spill_write_bytes == 128 * spilled and st.spill_read_bytes == 0


def test_tiles_past_their_last_use_make_room():
    def body(x):
        for _ in range(10):
            t = sb(128, 24 * 1024)   # 96 KiB, used once: its space is free for the next
            nisa.memset(dst=t, value=0.0)
        return None
    _, st = run_body(body)
    assert st.sbuf_peak_bytes == 96 * 1024


def test_psum_capacity_nine_banks():
    @expect(sim.PsumCapacityError, "nl.ndarray[128, 512] float32 in PSUM", "8 banks are live",
            "9 banks > trn1 capacity 8 banks")
    def _(x):
        keep = [ps(128, 512) for _ in range(9)]
        return keep


def test_dma_transpose_needs_two_byte_elements():
    @expect(sim.DmaTransposeError, "dma_transpose", "2-byte", "src [128, 128] is float32")
    def _(x):
        nisa.dma_transpose(dst=sb(128, 128), src=x)


def test_dma_shape_mismatch():
    @expect(sim.ShapeMismatchError, "dma_copy", "dst [128, 64]", "src [128, 128]")
    def _(x):
        nisa.dma_copy(dst=sb(128, 64), src=x)


def test_engine_access_rules():
    @expect(sim.EngineAccessError, "tensor_tensor", "cannot both be in PSUM")
    def _(x):
        nisa.tensor_tensor(dst=sb(128, 64), data1=ps(128, 64), data2=ps(128, 64), op=nl.add)

    @expect(sim.EngineAccessError, "tensor_copy", "is in hbm")
    def _(x):
        nisa.tensor_copy(dst=sb(128, 128), src=x)

    @expect(sim.EngineAccessError, "GpSimd engine cannot access PSUM")
    def _(x):
        nisa.tensor_copy(dst=sb(128, 64), src=ps(128, 64), engine=nisa.engine.gpsimd)


def test_unsupported_paths_are_explicit():
    @expect(sim.UnsupportedError, "activation function")
    def _(x):
        nisa.activation(dst=sb(128, 8), op=np.exp, data=sb(128, 8))

    @expect(sim.UnsupportedError, "pass a buffer object")
    def _(x):
        nl.ndarray((128, 8), dtype=nl.float32, buffer="sbuf")


def test_spec_placeholders_need_count_only():
    with pytest.raises(sim.UnsupportedError, match="count_only=True"):
        sim.run(lambda x: None, sim.spec((4, 4)))
