"""Emulator core: the run context, memory allocations and tensor views.

Memory model
------------
* HBM tensors (kernel inputs, `nl.shared_hbm` outputs, `nl.hbm`/`nl.private_hbm`
  scratch) have no capacity limit.
* An SBUF tile occupies `prod(shape[1:]) * itemsize` bytes in each of its
  partitions (dim 0 is the partition dim, at most 128). A PSUM tile occupies whole
  2 KiB banks: `ceil(bytes per partition / 2 KiB)` of the 8 banks.
* A tile is live from its `nl.ndarray` call until the last Python reference to it
  (or to any view of it) disappears -- CPython reference counting makes this
  deterministic. Consequences a kernel author should know:
    - a tile allocated in a loop body and rebound on every iteration is live twice
      at the moment of rebinding (the new one and the previous one): exactly the
      double buffer that overlapping a load with compute needs, which is what the
      latency model assumes;
    - tiles local to a helper function die when it returns, so single-buffered
      phases are written as helper functions.
  The peak is the largest sum of live bytes per partition seen at any allocation.
  Allocation fails (SbufCapacityError / PsumCapacityError) the moment the live
  total would exceed the target's capacity. Fragmentation and alignment are not
  modelled.
* In count-only mode no values exist: views carry shapes only, arithmetic is skipped,
  every count is still exact.
"""
import itertools
import math
import threading

import numpy as np
import ml_dtypes

from .errors import (PartitionDimError, PsumCapacityError, SbufCapacityError,
                     UnsupportedError)
from .targets import Target

BF16 = np.dtype(ml_dtypes.bfloat16)
FP32 = np.dtype(np.float32)
FP16 = np.dtype(np.float16)


def as_dtype(dtype) -> np.dtype:
    """Normalise an NKI/numpy dtype spelling to a numpy dtype."""
    if isinstance(dtype, str):
        name = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}.get(dtype, dtype)
        if name == "bfloat16":
            return BF16
        return np.dtype(name)
    return np.dtype(dtype)


class Buffer:
    """A memory region (`nl.sbuf`, `nl.psum`, `nl.hbm`, ...)."""

    def __init__(self, name: str, on_chip: bool):
        self.name = name
        self.on_chip = on_chip

    def __repr__(self):
        return f"nl.{self.name}"


SBUF = Buffer("sbuf", True)
PSUM = Buffer("psum", True)
HBM = Buffer("hbm", False)
SHARED_HBM = Buffer("shared_hbm", False)
PRIVATE_HBM = Buffer("private_hbm", False)


def _fmt_shape(shape) -> str:
    return "[" + ", ".join(str(int(s)) for s in shape) + "]"


class Counters:
    """Raw event counts of one run; `runner.Stats` turns them into the report."""

    def __init__(self):
        self.hbm_read_bytes = 0
        self.hbm_write_bytes = 0
        self.dma_count = 0
        self.dma_transpose_count = 0
        self.dma_bytes = 0
        self.dma_min_bytes = None
        self.dma_max_bytes = 0
        self.dma_size_hist = {}          # power-of-two bucket (bytes) -> count
        self.dma_engine_s = 0.0          # engine-seconds summed over all DMA engines
        self.dma_min_run_bytes = None    # smallest contiguous run (DMA buffer) of any copy
        self.psum_port_s = 0.0           # NC-v2: VectorE+ScalarE time on PSUM operands
        self.matmul_count = 0
        self.matmul_flops = 0
        self.pe_transpose_count = 0
        self.cycles = {"tensor": 0, "vector": 0, "scalar": 0, "gpsimd": 0}
        self.instructions = {"tensor": 0, "vector": 0, "scalar": 0, "gpsimd": 0}


class Context:
    """Everything one emulated kernel launch owns."""

    def __init__(self, target: Target, count_only: bool):
        self.target = target
        self.count_only = count_only
        self.counters = Counters()
        self.sbuf_live = 0
        self.sbuf_peak = 0
        self.psum_live_banks = 0
        self.psum_peak_banks = 0
        self.active = True

    # -- allocation bookkeeping -------------------------------------------------
    def reserve(self, alloc: "Allocation"):
        t = self.target
        if alloc.buffer is SBUF:
            need = self.sbuf_live + alloc.bytes_pp
            if need > t.sbuf_bytes_per_partition:
                raise SbufCapacityError(
                    f"nl.ndarray{_fmt_shape(alloc.shape)} {alloc.dtype.name} in SBUF needs "
                    f"{alloc.bytes_pp} B/partition while {self.sbuf_live} B/partition are live: "
                    f"{need} B > {t.name} capacity {t.sbuf_bytes_per_partition} B/partition")
            self.sbuf_live = need
            self.sbuf_peak = max(self.sbuf_peak, need)
        elif alloc.buffer is PSUM:
            need = self.psum_live_banks + alloc.banks
            if need > t.psum_banks:
                raise PsumCapacityError(
                    f"nl.ndarray{_fmt_shape(alloc.shape)} {alloc.dtype.name} in PSUM needs "
                    f"{alloc.banks} bank(s) while {self.psum_live_banks} are live: {need} > "
                    f"{t.psum_banks} banks ({t.psum_bytes_per_partition} B/partition)")
            self.psum_live_banks = need
            self.psum_peak_banks = max(self.psum_peak_banks, need)

    def release(self, alloc: "Allocation"):
        if alloc.buffer is SBUF:
            self.sbuf_live -= alloc.bytes_pp
        elif alloc.buffer is PSUM:
            self.psum_live_banks -= alloc.banks


_state = threading.local()


def current() -> Context:
    ctx = getattr(_state, "ctx", None)
    if ctx is None:
        raise UnsupportedError(
            "no emulator context: call kernels through sim.run(...), a jitted kernel, "
            "or nki.simulate(kernel)(...)")
    return ctx


def push(ctx: Context):
    prev = getattr(_state, "ctx", None)
    _state.ctx = ctx
    return prev


def pop(prev):
    _state.ctx = prev


_alloc_ids = itertools.count()


class Allocation:
    """One `nl.ndarray` (or kernel argument): storage plus capacity bookkeeping."""

    __slots__ = ("buffer", "dtype", "shape", "array", "written", "ctx", "bytes_pp",
                 "banks", "name", "uid", "__weakref__")

    def __init__(self, ctx: Context, shape, dtype, buffer: Buffer, name="", array=None):
        self.ctx = ctx
        self.buffer = buffer
        self.dtype = dtype
        self.shape = tuple(int(s) for s in shape)
        self.name = name
        self.uid = next(_alloc_ids)
        self.written = None
        self.bytes_pp = 0
        self.banks = 0
        if buffer.on_chip:
            if len(self.shape) == 0:
                raise UnsupportedError("nl.ndarray: on-chip tiles need at least one dim")
            if self.shape[0] > ctx.target.partitions:
                raise PartitionDimError(
                    f"nl.ndarray{_fmt_shape(self.shape)} in {buffer.name.upper()}: partition dim "
                    f"{self.shape[0]} > {ctx.target.partitions}")
            free = math.prod(self.shape[1:]) if len(self.shape) > 1 else 1
            self.bytes_pp = free * dtype.itemsize
            if buffer is PSUM:
                self.banks = max(1, -(-self.bytes_pp // ctx.target.psum_bank_bytes))
            ctx.reserve(self)
        if ctx.count_only:
            self.array = None
        elif array is not None:
            self.array = array
        else:
            # Uninitialised memory is not zero on hardware; NaN makes reads of
            # never-written elements visible in tests.
            floating = dtype.kind == "f" or dtype == BF16
            self.array = np.full(self.shape, np.nan, dtype=dtype) if floating \
                else np.zeros(self.shape, dtype=dtype)
        if buffer is PSUM and not ctx.count_only:
            self.written = np.zeros(self.shape, dtype=bool)

    def __del__(self):
        ctx = self.ctx
        if ctx is not None:
            try:
                ctx.release(self)
            except Exception:  # interpreter shutdown
                pass


def _norm_key(key, ndim):
    if not isinstance(key, tuple):
        key = (key,)
    if any(k is Ellipsis for k in key):
        i = key.index(Ellipsis)
        fill = ndim - (len(key) - 1)
        key = key[:i] + (slice(None),) * fill + key[i + 1:]
    if len(key) > ndim:
        raise IndexError(f"too many indices ({len(key)}) for a tensor with {ndim} dims")
    return key + (slice(None),) * (ndim - len(key))


class NkiTensor:
    """A view onto an allocation: per base dim either an int (dim dropped) or a range."""

    __slots__ = ("_alloc", "_index", "_shape")

    def __init__(self, alloc: Allocation, index=None):
        self._alloc = alloc
        self._index = index if index is not None else tuple(range(s) for s in alloc.shape)
        self._shape = tuple(len(r) for r in self._index if r.__class__ is range)

    # -- metadata ---------------------------------------------------------------
    @property
    def shape(self):
        return self._shape

    @property
    def dtype(self):
        return self._alloc.dtype

    @property
    def buffer(self):
        return self._alloc.buffer

    @property
    def ndim(self):
        return len(self._shape)

    @property
    def itemsize(self):
        return self._alloc.dtype.itemsize

    @property
    def size(self):
        return math.prod(self._shape)

    @property
    def nbytes(self):
        return self.size * self.itemsize

    @property
    def name(self):
        return self._alloc.name

    def __len__(self):
        return self._shape[0]

    def __repr__(self):
        return f"NkiTensor({_fmt_shape(self.shape)}, {self.dtype.name}, {self.buffer!r})"

    # -- views --------------------------------------------------------------------
    def __getitem__(self, key):
        if key.__class__ is not tuple:
            key = (key,)
        index = self._index
        new = list(index)
        ki = 0
        nkey = len(key)
        for dim, r in enumerate(index):
            if r.__class__ is not range:
                continue
            if ki >= nkey:
                break
            k = key[ki]
            ki += 1
            if k.__class__ is slice:
                if k.step is not None and k.step <= 0:
                    raise UnsupportedError("negative or zero slice steps are not supported")
                new[dim] = r[k]
            elif isinstance(k, (int, np.integer)):
                new[dim] = r[int(k)]  # raises IndexError when out of range
            elif k is Ellipsis:
                return self[_norm_key(key, len(self._shape))]
            else:
                raise UnsupportedError(f"unsupported index {k!r}: use ints and slices")
        if ki < nkey:
            if any(k is Ellipsis for k in key[ki:]):
                return self[_norm_key(key, len(self._shape))]
            raise IndexError(f"too many indices ({nkey}) for a tensor with "
                             f"{len(self._shape)} dims")
        return NkiTensor(self._alloc, tuple(new))

    def _np_key(self):
        return tuple(r if isinstance(r, int) else slice(r.start, r.stop, r.step)
                     for r in self._index)

    def free_offset_elems(self):
        """Element offset of the first element within its partition, and of the last."""
        shape = self._alloc.shape
        strides = [math.prod(shape[d + 1:]) for d in range(len(shape))]
        first = last = 0
        for d in range(1, len(shape)):
            r = self._index[d]
            if isinstance(r, int):
                first += r * strides[d]
                last += r * strides[d]
            elif len(r):
                first += r[0] * strides[d]
                last += r[-1] * strides[d]
        return first, last

    def contiguous_run_bytes(self):
        """Bytes of the innermost run of the view that is contiguous in memory (one DMA
        buffer). On-chip tiles never run across partitions (dim 0); HBM views may."""
        shape = self._alloc.shape
        lo = 1 if self._alloc.buffer.on_chip else 0
        run = 1
        for d in range(len(shape) - 1, lo - 1, -1):
            r = self._index[d]
            if r.__class__ is range:
                n = len(r)
                if n > 1 and r.step != 1:
                    break                      # strided: runs of what is inside
                run *= n
                if n != shape[d]:
                    break                      # partial dim: the run ends here
            elif shape[d] != 1:
                break                          # a fixed index into a longer dim
        return run * self.itemsize

    def partitions(self):
        """Number of partitions the view spans (dim 0 of an on-chip tile)."""
        r = self._index[0]
        return 1 if isinstance(r, int) else len(r)

    def free_size(self):
        """Elements per partition of an on-chip view (all dims after the first)."""
        shape = self._shape
        if self._index[0].__class__ is not range:
            return math.prod(shape)
        return math.prod(shape[1:])

    # -- values (value mode only) ----------------------------------------------------
    def read(self) -> np.ndarray:
        return self._alloc.array[self._np_key()]

    def write(self, values):
        self._alloc.array[self._np_key()] = np.asarray(values).astype(self._alloc.dtype,
                                                                       copy=False)

    def numpy(self) -> np.ndarray:
        """A copy of the values (value mode only)."""
        return np.array(self.read(), copy=True)
