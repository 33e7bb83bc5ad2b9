"""Emulated `nki.isa`: the instructions the project's kernels use, with the current
(NKI 0.3+) keyword signatures (`dst` first), their hardware checks, their values and
their cost.

Cost figures (per instruction; `timeline` schedules them, see docs/kernels.md):
* nc_matmul: max(64, N, M) tensor-engine cycles for 2-byte inputs, 4x that for 4-byte
  inputs, N = moving free size, M = stationary free size (LoadStationary-bound when N is
  small), plus the target's per-instruction access overhead, over the target's
  `pe_efficiency` (1 unless calibrated); 2*K*M*N FLOPs.
* nc_transpose (tensor engine): a matmul of the data against an identity, max(64, P, F)
  cycles (x4 for 4-byte data) + access overhead; counted as a transpose
  (`pe_transpose_flops` = 2 P F P), not as matmul FLOPs.
* vector / scalar / gpsimd instructions: F cycles of their engine, F = elements per
  partition, 2F for VectorE instructions with two input tiles (tensor_tensor; "roughly
  2N cycles", trainium_inferentia2_arch.rst, Vector Engine cost model), plus the
  documented 100-cycle static overhead when F < 128. On NeuronCore-v2 the VectorE/ScalarE
  instructions that read or write PSUM also hold a shared PSUM port (the two engines
  "cannot access PSUM in parallel", same page).
* DMA (dma_copy, dma_transpose): bytes over the engines the transfer spreads on
  (ceil(partitions / 8)) at the sustained per-engine rate (17 B/ns trn1, 23 B/ns trn2)
  times an efficiency; the fixed ~1.3 us latency, the in-order queues and the shared
  bandwidth are the timeline's. Efficiency: for a copy, the documented
  throughput-vs-bytes-per-partition curve at the copy's smallest contiguous run
  (`targets.dma_chunk_efficiency`: 256 B -> 0.105, 1 KiB -> 0.43, 2 KiB -> 0.84,
  >= 4 KiB -> 1), halved for element strides over 16 B; for a DMA transpose, the
  target's `dma_transpose_efficiency` (trn2: 0.9, "up to 90%" of a copy; trn1:
  undocumented, bracketed). Descriptor generation: trn2 ~600 ns per DMA on the issuing
  engine; trn1 software DGE on GpSimd for register-addressed DMAs (bracketed). See
  `targets`.
"""
import enum

import numpy as np

from . import core
from .core import FP32, PSUM, SBUF, NkiTensor, _fmt_shape
from .targets import dma_chunk_efficiency
from .errors import (DmaPsumError, DmaTransposeError, EngineAccessError, MatmulMemoryError,
                     MovingFreeError, PartitionDimError, PsumBankError, ShapeMismatchError,
                     StationaryFreeError, UnsupportedError)


class engine(enum.Enum):
    unknown = 0
    tensor = 1
    scalar = 2
    gpsimd = 3
    dma = 4
    vector = 5
    sync = 6


class dge_mode(enum.Enum):
    unknown = 0
    swdge = 1
    hwdge = 2
    none = 3


class oob_mode(enum.Enum):
    error = 0
    skip = 1


class reduce_cmd(enum.Enum):
    idle = 0
    reset = 1
    reduce = 2
    reset_reduce = 3
    load_reduce = 4


class nc_version(enum.Enum):
    gen2 = 2
    gen3 = 3
    gen4 = 4


def get_nc_version() -> nc_version:
    """NeuronCore version of the target the current run emulates."""
    return nc_version(core.current().target.nc_version)


# -- helpers --------------------------------------------------------------------------

def _is_hbm(t: NkiTensor) -> bool:
    return not t.buffer.on_chip


def _need_tensor(t, instr, role):
    if not isinstance(t, NkiTensor):
        raise UnsupportedError(f"{instr}: {role} must be an NKI tensor, got {type(t).__name__}")


def _fp32(t: NkiTensor) -> np.ndarray:
    return np.asarray(t.read(), dtype=np.float32)


_ENGINE_HZ = {"vector": "vector_hz", "scalar": "scalar_hz", "gpsimd": "gpsimd_hz"}


def _charge(ctx, eng: str, free_elems: int, reads, writes, inputs: int = 1):
    """One vector/scalar/gpsimd instruction: N cycles (2N for a VectorE instruction with
    two input tiles), plus the 100-cycle static instruction overhead when N < 128
    (trainium_inferentia2_arch.rst, Vector Engine "Cost Model"); on NC-v2 an instruction
    touching PSUM also holds the VectorE/ScalarE shared PSUM port."""
    t = ctx.target
    n = int(free_elems)
    work = n * t.vector_two_input_factor if (eng == "vector" and inputs >= 2) else n
    cycles = work + (t.engine_static_overhead_cycles if n < t.pe_rows else 0) \
        + t.access_overhead_cycles
    ctx.counters.cycles[eng] += cycles
    port = (t.psum_shared_vector_scalar and eng in ("vector", "scalar")
            and any(o.buffer is PSUM for o in reads + writes))
    ctx.issue(eng, cycles / getattr(t, _ENGINE_HZ[eng]), reads, writes, psum_port=port)


def _compute_engine(eng, default="vector"):
    if eng is None or eng == engine.unknown:
        return default
    if eng in (engine.vector, engine.scalar, engine.gpsimd):
        return eng.name
    raise UnsupportedError(f"engine {eng} cannot run this instruction")


def _check_engine_access(instr, eng, *tensors):
    for t in tensors:
        if _is_hbm(t):
            raise EngineAccessError(
                f"{instr}: operand {_fmt_shape(t.shape)} is in {t.buffer.name}; compute "
                f"engines read and write only SBUF/PSUM (use dma_copy for HBM)")
        if eng == "gpsimd" and t.buffer is PSUM:
            raise EngineAccessError(f"{instr}: the GpSimd engine cannot access PSUM "
                                    f"(operand {_fmt_shape(t.shape)})")


def _same_layout(instr, a: NkiTensor, b: NkiTensor, what="operands"):
    if a.partitions() != b.partitions() or a.free_size() != b.free_size():
        raise ShapeMismatchError(
            f"{instr}: {what} {_fmt_shape(a.shape)} and {_fmt_shape(b.shape)} differ in "
            f"partitions or elements per partition")


def _scalar_or_vector(v, data: NkiTensor, instr, role):
    """A Python number, or a [P, 1] tile broadcast along the free dims."""
    if v is None:
        return np.float32(0.0)
    if isinstance(v, NkiTensor):
        if v.partitions() != data.partitions() or v.free_size() != 1:
            raise ShapeMismatchError(f"{instr}: {role} {_fmt_shape(v.shape)} must be "
                                     f"[{data.partitions()}, 1] for data {_fmt_shape(data.shape)}")
        col = _fp32(v).reshape(data.partitions(), *([1] * (len(data.shape) - 1)))
        return col
    return np.float32(v)


def _tiles(*maybe):
    return tuple(m for m in maybe if isinstance(m, NkiTensor))


class _Shapes:
    """Operand shapes for an error message, formatted only when one is raised."""

    def __init__(self, **tensors):
        self.tensors = tensors

    def __str__(self):
        return ", ".join(f"{k} {_fmt_shape(t.shape)}" for k, t in self.tensors.items())

    __format__ = lambda self, spec: str(self)


# -- tensor engine ------------------------------------------------------------------------

def nc_matmul(dst, stationary, moving, is_stationary_onezero=False, is_moving_onezero=False,
              is_transpose=False, accumulate=None, tile_position=(), tile_size=(),
              perf_mode=None, name=None):
    """dst[M, N] (PSUM, fp32) (+)= stationary[K, M].T @ moving[K, N] on the tensor engine."""
    instr = "nc_matmul"
    for role, t in (("dst", dst), ("stationary", stationary), ("moving", moving)):
        _need_tensor(t, instr, role)
    if is_transpose:
        raise UnsupportedError("nc_matmul(is_transpose=True): use nisa.nc_transpose")
    if tile_position or tile_size:
        raise UnsupportedError("nc_matmul: PE tiling (tile_position/tile_size) is not emulated")
    ctx = core.current()
    tgt = ctx.target
    for role, t in (("stationary", stationary), ("moving", moving)):
        if t.buffer is not SBUF:
            raise MatmulMemoryError(
                f"{instr}: {role} operand {_fmt_shape(t.shape)} is in {t.buffer.name}; the "
                f"tensor engine reads its operands only from SBUF")
    if dst.buffer is not PSUM:
        raise MatmulMemoryError(f"{instr}: result {_fmt_shape(dst.shape)} is in "
                                f"{dst.buffer.name}; the tensor engine writes only to PSUM")
    k, m, n = stationary.partitions(), stationary.free_size(), moving.free_size()
    shapes = _Shapes(stationary=stationary, moving=moving, dst=dst)
    if k > tgt.pe_rows or moving.partitions() > tgt.pe_rows:
        raise PartitionDimError(f"{instr}: contraction (partition) dim {max(k, moving.partitions())}"
                                f" > {tgt.pe_rows} ({shapes})")
    if moving.partitions() != k:
        raise ShapeMismatchError(f"{instr}: stationary and moving partition dims differ ({shapes})")
    if m > tgt.pe_cols:
        raise StationaryFreeError(f"{instr}: stationary free size {m} > {tgt.pe_cols} ({shapes})")
    if n > 512:
        raise MovingFreeError(f"{instr}: moving free size {n} > 512 ({shapes})")
    if dst.partitions() != m or dst.free_size() != n:
        raise ShapeMismatchError(f"{instr}: result must be [{m}, {n}] ({shapes})")
    if dst.dtype != FP32:
        raise MatmulMemoryError(f"{instr}: PSUM result must be float32, got {dst.dtype.name} "
                                f"({shapes})")
    _check_bank(instr, dst, tgt, shapes)

    c = ctx.counters
    factor = tgt.fp32_matmul_factor if max(stationary.itemsize, moving.itemsize) >= 4 else 1
    # LoadStationary-bound when few moving columns: at least the stationary's columns
    cycles = max(tgt.matmul_min_cycles, n, m) * factor + tgt.access_overhead_cycles
    c.cycles["tensor"] += cycles
    c.matmul_count += 1
    c.matmul_flops += 2 * k * m * n
    # (an accumulating matmul also reads dst: ordered by the write-after-write on dst)
    ctx.issue("tensor", cycles / (tgt.pe_hz * tgt.pe_efficiency), (stationary, moving), (dst,))
    if ctx.count_only:
        return
    prod = _fp32(stationary).reshape(k, m).T @ _fp32(moving).reshape(k, n)
    key = dst._np_key()
    alloc = dst._alloc
    cur = np.asarray(dst.read(), dtype=np.float32).reshape(m, n)
    if accumulate is None:
        seen = alloc.written[key].reshape(m, n)
        new = np.where(seen, cur + prod, prod)
    elif accumulate:
        new = cur + prod
    else:
        new = prod
    dst.write(new.astype(np.float32).reshape(dst.shape))
    alloc.written[key] = True


def _check_bank(instr, dst, tgt, shapes):
    bank = tgt.psum_bank_bytes
    width = dst.free_size() * dst.itemsize
    if width > bank:
        raise PsumBankError(f"{instr}: result is {width} B per partition, wider than one PSUM "
                            f"bank ({bank} B = {bank // 4} fp32) ({shapes})")
    first, last = dst.free_offset_elems()
    if (first * dst.itemsize) // bank != (last * dst.itemsize + dst.itemsize - 1) // bank:
        raise PsumBankError(f"{instr}: result straddles two PSUM banks (bytes "
                            f"{first * dst.itemsize}..{last * dst.itemsize + dst.itemsize - 1} of "
                            f"the tile) ({shapes})")


def nc_transpose(dst, data, engine=engine.unknown, name=None):
    """dst[F, P] = data[P, F].T on the tensor engine (SBUF -> PSUM)."""
    instr = "nc_transpose"
    _need_tensor(dst, instr, "dst")
    _need_tensor(data, instr, "data")
    if engine not in (None, globals()["engine"].unknown, globals()["engine"].tensor):
        raise UnsupportedError(f"{instr}: only the tensor-engine transpose is emulated")
    ctx = core.current()
    tgt = ctx.target
    shapes = f"data {_fmt_shape(data.shape)}, dst {_fmt_shape(dst.shape)}"
    if data.buffer is not SBUF:
        raise MatmulMemoryError(f"{instr}: data must be in SBUF ({shapes})")
    if dst.buffer is not PSUM:
        raise MatmulMemoryError(f"{instr}: dst must be in PSUM ({shapes})")
    p, f = data.partitions(), data.free_size()
    if p > tgt.pe_rows:
        raise PartitionDimError(f"{instr}: partition dim {p} > {tgt.pe_rows} ({shapes})")
    if f > tgt.pe_cols:
        raise StationaryFreeError(f"{instr}: free size {f} > {tgt.pe_cols} ({shapes})")
    if dst.partitions() != f or dst.free_size() != p:
        raise ShapeMismatchError(f"{instr}: dst must be [{f}, {p}] ({shapes})")
    if dst.dtype not in (FP32, data.dtype):
        raise ShapeMismatchError(f"{instr}: dst dtype {dst.dtype.name} must be float32 or "
                                 f"{data.dtype.name} ({shapes})")
    _check_bank(instr, dst, tgt, shapes)
    c = ctx.counters
    factor = tgt.fp32_matmul_factor if data.itemsize >= 4 else 1
    # a matmul of data [p, f] (stationary) against a p x p identity (moving)
    cycles = max(tgt.matmul_min_cycles, p, f) * factor + tgt.access_overhead_cycles
    c.cycles["tensor"] += cycles
    c.pe_transpose_count += 1
    c.pe_transpose_flops += 2 * p * f * p
    ctx.issue("tensor", cycles / (tgt.pe_hz * tgt.pe_efficiency), (data,), (dst,))
    if ctx.count_only:
        return
    dst.write(_fp32(data).reshape(p, f).T.reshape(dst.shape))
    dst._alloc.written[dst._np_key()] = True


# -- vector / scalar / gpsimd engines ---------------------------------------------------

def tensor_copy(dst, src, engine=engine.unknown, name=None):
    """dst = src (with dtype conversion), e.g. PSUM -> SBUF."""
    instr = "tensor_copy"
    _need_tensor(dst, instr, "dst")
    _need_tensor(src, instr, "src")
    eng = _compute_engine(engine)
    _check_engine_access(instr, eng, dst, src)
    _same_layout(instr, dst, src, "dst and src")
    ctx = core.current()
    _charge(ctx, eng, src.free_size(), (src,), (dst,))
    if not ctx.count_only:
        dst.write(np.asarray(src.read()).reshape(dst.shape))


_ACT = {}


def _register_activation(op, fn):
    _ACT[id(op)] = (op, fn)


def activation(dst, op, data, bias=None, scale=1.0, reduce_op=None, reduce_res=None,
               reduce_cmd=reduce_cmd.idle, name=None):
    """dst = op(data * scale + bias) on the scalar engine (fp32 math)."""
    instr = "activation"
    _need_tensor(dst, instr, "dst")
    _need_tensor(data, instr, "data")
    if reduce_op is not None or reduce_res is not None:
        raise UnsupportedError(f"{instr}: fused reductions are not emulated")
    entry = _ACT.get(id(op))
    if entry is None:
        raise UnsupportedError(f"{instr}: activation function {op!r} is not emulated")
    _check_engine_access(instr, "scalar", dst, data)
    _same_layout(instr, dst, data, "dst and data")
    ctx = core.current()
    _charge(ctx, "scalar", data.free_size(), (data,) + _tiles(bias, scale), (dst,))
    b = _scalar_or_vector(bias, data, instr, "bias")
    s = _scalar_or_vector(scale, data, instr, "scale")
    if not ctx.count_only:
        x = _fp32(data)
        dst.write(entry[1](x * s + b).astype(np.float32).reshape(dst.shape))


_BIN = {}


def _register_binary(op, fn):
    _BIN[id(op)] = (op, fn)


def _binary(op, instr):
    entry = _BIN.get(id(op))
    if entry is None:
        raise UnsupportedError(f"{instr}: operator {op!r} is not emulated")
    return entry[1]


def tensor_tensor(dst, data1, data2, op, engine=engine.unknown, name=None):
    """dst = op(data1, data2) elementwise on the vector engine (fp32 math)."""
    instr = "tensor_tensor"
    for role, t in (("dst", dst), ("data1", data1), ("data2", data2)):
        _need_tensor(t, instr, role)
    fn = _binary(op, instr)
    eng = _compute_engine(engine)
    _check_engine_access(instr, eng, dst, data1, data2)
    if data1.buffer is PSUM and data2.buffer is PSUM:
        raise EngineAccessError(f"{instr}: data1 {_fmt_shape(data1.shape)} and data2 "
                                f"{_fmt_shape(data2.shape)} cannot both be in PSUM")
    _same_layout(instr, data1, data2, "data1 and data2")
    _same_layout(instr, dst, data1, "dst and data1")
    ctx = core.current()
    _charge(ctx, eng, data1.free_size(), (data1, data2), (dst,), inputs=2)
    if not ctx.count_only:
        a = _fp32(data1).reshape(dst.shape)
        b = _fp32(data2).reshape(dst.shape)
        dst.write(fn(a, b).astype(np.float32))


def tensor_scalar(dst, data, op0, operand0, reverse0=False, op1=None, operand1=None,
                  reverse1=False, engine=engine.unknown, name=None):
    """dst = (data op0 operand0) op1 operand1, operands scalars or [P, 1] tiles."""
    instr = "tensor_scalar"
    _need_tensor(dst, instr, "dst")
    _need_tensor(data, instr, "data")
    f0 = _binary(op0, instr)
    f1 = _binary(op1, instr) if op1 is not None else None
    eng = _compute_engine(engine)
    _check_engine_access(instr, eng, dst, data)
    _same_layout(instr, dst, data, "dst and data")
    ctx = core.current()
    _charge(ctx, eng, data.free_size(), (data,) + _tiles(operand0, operand1), (dst,))
    a0 = _scalar_or_vector(operand0, data, instr, "operand0")
    a1 = _scalar_or_vector(operand1, data, instr, "operand1") if f1 is not None else None
    if not ctx.count_only:
        x = _fp32(data)
        x = f0(a0, x) if reverse0 else f0(x, a0)
        if f1 is not None:
            x = f1(a1, x) if reverse1 else f1(x, a1)
        dst.write(np.asarray(x, dtype=np.float32).reshape(dst.shape))


def memset(dst, value, engine=engine.unknown, name=None):
    """Fill dst with a constant."""
    instr = "memset"
    _need_tensor(dst, instr, "dst")
    eng = _compute_engine(engine)
    _check_engine_access(instr, eng, dst)
    ctx = core.current()
    _charge(ctx, eng, dst.free_size(), (), (dst,))
    if not ctx.count_only:
        dst.write(np.full(dst.shape, value, dtype=np.float64))
        if dst.buffer is PSUM:
            dst._alloc.written[dst._np_key()] = False


# -- DMA -----------------------------------------------------------------------------------

def _squeezed(shape):
    return tuple(s for s in shape if s != 1)


def _account_dma(ctx, dst: NkiTensor, src: NkiTensor, transpose=False):
    """Counts of one DMA and its timeline event. Data time: bytes over the engines the
    transfer spreads on (ceil(partitions / 8), at most 16) at the sustained per-engine
    rate times the efficiency of its contiguous run; occupancy of the shared bandwidth:
    bytes over all 16 engines' rate times that efficiency (see `timeline`)."""
    c = ctx.counters
    tgt = ctx.target
    payload = max(src.nbytes, dst.nbytes)
    if transpose:
        eff = tgt.dma_transpose_efficiency
    else:
        run = max(1, min(src.contiguous_run_bytes(), dst.contiguous_run_bytes()))
        c.dma_min_run_bytes = run if c.dma_min_run_bytes is None else min(c.dma_min_run_bytes, run)
        eff = dma_chunk_efficiency(run)
        if max(src.element_stride_bytes(), dst.element_stride_bytes()) > tgt.dma_stride_limit_bytes:
            eff *= 0.5                 # "half bandwidth" for strides over 16 B
    eff = min(1.0, eff * tgt.dma_efficiency_scale)
    hbm = None
    if _is_hbm(src):
        c.hbm_read_bytes += src.nbytes
        hbm = src
    if _is_hbm(dst):
        c.hbm_write_bytes += dst.nbytes
        hbm = dst
    c.dma_count += 1
    c.dma_bytes += payload
    c.dma_min_bytes = payload if c.dma_min_bytes is None else min(c.dma_min_bytes, payload)
    c.dma_max_bytes = max(c.dma_max_bytes, payload)
    bucket = 1 << max(0, int(payload).bit_length() - 1) if payload else 0
    c.dma_size_hist[bucket] = c.dma_size_hist.get(bucket, 0) + 1
    on_chip = dst if dst.buffer.on_chip else src
    parts = on_chip.partitions() if on_chip.buffer.on_chip else tgt.partitions
    engines = min(tgt.dma_engines, max(1, -(-parts // tgt.dma_partitions_per_engine)))
    rate = tgt.dma_cost_bytes_per_s * eff
    occupancy = payload / (rate * tgt.dma_engines)
    if tgt.hbm_bytes_per_s < tgt.dma_cost_bytes_per_s * tgt.dma_engines and hbm is not None:
        occupancy = max(occupancy, payload / tgt.hbm_bytes_per_s)
    queue = ("hbm", hbm._alloc.uid) if hbm is not None else ("sbuf",)
    # descriptor generation: trn2's hardware DGE on the issuing engine for every DMA; on
    # trn1 (no hardware DGE) software DGE on GpSimd for a register-addressed DMA
    dge_s, dge_engine = tgt.hwdge_s, "sync"
    if not dge_s and (src.is_indirect() or dst.is_indirect()):
        dge_s, dge_engine = tgt.swdge_dynamic_s, "gpsimd"
    ctx.issue("dma", payload / (rate * engines), (src,), (dst,), queue=queue,
              occupancy_s=occupancy, dge_s=dge_s, dge_engine=dge_engine)


def _no_psum(instr, dst, src):
    for role, t in (("dst", dst), ("src", src)):
        if t.buffer is PSUM:
            raise DmaPsumError(f"{instr}: {role} {_fmt_shape(t.shape)} is in PSUM; DMA engines "
                               f"cannot access PSUM (copy it to SBUF with tensor_copy first)")


def dma_copy(dst, src, oob_mode=oob_mode.error, dge_mode=dge_mode.unknown,
             engine=engine.unknown, name=None):
    """dst = src between HBM and SBUF (or within either) on the DMA engines."""
    instr = "dma_copy"
    _need_tensor(dst, instr, "dst")
    _need_tensor(src, instr, "src")
    _no_psum(instr, dst, src)
    if _squeezed(dst.shape) != _squeezed(src.shape):
        raise ShapeMismatchError(f"{instr}: dst {_fmt_shape(dst.shape)} and src "
                                 f"{_fmt_shape(src.shape)} differ")
    ctx = core.current()
    _account_dma(ctx, dst, src)
    if not ctx.count_only:
        dst.write(np.asarray(src.read()).reshape(dst.shape))


def dma_transpose(dst, src, axes=None, dge_mode=dge_mode.unknown, oob_mode=oob_mode.error,
                  name=None):
    """dst[F, P] = src[P, F].T by a transposing DMA into SBUF (2-byte dtypes, 2-D)."""
    instr = "dma_transpose"
    _need_tensor(dst, instr, "dst")
    _need_tensor(src, instr, "src")
    _no_psum(instr, dst, src)
    if axes not in (None, (1, 0), [1, 0]):
        raise UnsupportedError(f"{instr}: only 2-D transposes (axes=(1, 0)) are emulated")
    if len(src.shape) != 2 or len(dst.shape) != 2:
        raise DmaTransposeError(f"{instr}: src {_fmt_shape(src.shape)} and dst "
                                f"{_fmt_shape(dst.shape)} must both be 2-D")
    if dst.buffer is not SBUF:
        raise DmaTransposeError(f"{instr}: dst {_fmt_shape(dst.shape)} must be in SBUF")
    if src.itemsize != 2 or dst.itemsize != 2:
        raise DmaTransposeError(f"{instr}: DMA transposes move 2-byte elements; src "
                                f"{_fmt_shape(src.shape)} is {src.dtype.name}, dst is "
                                f"{dst.dtype.name}")
    if tuple(dst.shape) != tuple(src.shape[::-1]):
        raise ShapeMismatchError(f"{instr}: dst {_fmt_shape(dst.shape)} must be src "
                                 f"{_fmt_shape(src.shape)} transposed")
    ctx = core.current()
    _account_dma(ctx, dst, src, transpose=True)
    ctx.counters.dma_transpose_count += 1
    if not ctx.count_only:
        dst.write(np.asarray(src.read()).T)
