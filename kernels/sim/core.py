"""Emulator core: the run context, memory allocations and tensor views.

Memory model (compile-time allocation)
--------------------------------------
* HBM tensors (kernel inputs, `nl.shared_hbm` outputs, `nl.hbm`/`nl.private_hbm`
  scratch) have no capacity limit.
* An SBUF tile occupies `prod(shape[1:]) * itemsize` bytes in each of its
  partitions (dim 0 is the partition dim, at most 128). A PSUM tile occupies whole
  2 KiB banks: `ceil(bytes per partition / 2 KiB)` of the 8 banks; with an explicit
  `address=(0, byte_offset)` it occupies exactly those banks.
* Allocation is decided on the *static* program, as NKI's compiler does it (the
  tensor allocator runs at compile time; nki/guides/architecture/
  trainium_inferentia2_arch.rst, "Data Movement"): a tensor is live from its
  `nl.ndarray` to its last use by an instruction of the static program; a tensor
  allocated outside a `nl.dynamic_range` loop and used inside stays live for the whole
  loop, and tensors allocated inside the loop body are allocated once and reused by
  every iteration ("Tensors allocated inside the loop body are allocated once and
  reused across iterations", nki/deep-dives/nki-dynamic-loops.rst). Python object
  lifetimes play no part: multi-buffering is explicit (a kernel allocates as many
  buffers as it wants in flight).
  The peak is the largest sum of live bytes per partition at any point of the static
  program. PSUM beyond its 8 banks fails with PsumCapacityError (DMA cannot reach PSUM,
  so nothing can be spilled from it).
* SBUF spills: when the live SBUF bytes exceed the capacity, the run is not refused; as
  a compiler's allocator does, the largest live tensor gives up its trailing bytes per
  partition until the peak fits (`spill_plan`), and the run is executed again with that
  plan: every instruction that reads spilled bytes first reloads them from HBM by DMA,
  every one that writes them saves them afterwards ("saved and reloaded on each reuse";
  a reload is skipped while the bytes are still in the tensor's staging area, the most
  recently reloaded or saved ranges up to SPILL_STAGING_BYTES per partition, which the
  spill plan keeps free). The traffic is counted as HBM bytes (and `spill_*_bytes`) and scheduled
  on the timeline like any DMA. Only an instruction whose SBUF operands together exceed
  a partition is refused (SbufCapacityError): they must be on chip at once.
  Fragmentation and alignment are not modelled.
* In count-only mode no values exist: views carry shapes only, arithmetic is skipped,
  every count is still exact; a dynamic loop's body is traced once and its instruction
  stream replayed through the timeline for the remaining iterations.
"""
import itertools
import math
import threading

import numpy as np
import ml_dtypes

from .errors import (IndirectViewError, LoopScopeError, PartitionDimError, PsumCapacityError, PsumPlacementError,
                     SbufCapacityError, UnsupportedError)
from .targets import Target, dma_chunk_efficiency
from .timeline import CELL_BYTES, HBM_CELLS
from .timeline import Event as _Event

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

    SUMMED = ("hbm_read_bytes", "hbm_write_bytes", "dma_count", "dma_transpose_count",
              "dma_bytes", "matmul_count", "matmul_flops", "pe_transpose_count",
              "pe_transpose_flops", "spill_read_bytes", "spill_write_bytes",
              "dynamic_instructions")

    def __init__(self):
        self.hbm_read_bytes = 0
        self.hbm_write_bytes = 0
        self.dma_count = 0
        self.dma_transpose_count = 0
        self.dma_bytes = 0
        self.dma_min_bytes = None
        self.dma_max_bytes = 0
        self.dma_size_hist = {}          # power-of-two bucket (bytes) -> count
        self.dma_min_run_bytes = None    # smallest contiguous run (DMA buffer) of any copy
        self.matmul_count = 0
        self.matmul_flops = 0
        self.pe_transpose_count = 0
        self.pe_transpose_flops = 0      # identity-matmul FLOPs of tensor-engine transposes
        self.spill_read_bytes = 0        # SBUF spill reloads (HBM -> SBUF)
        self.spill_write_bytes = 0       # SBUF spill saves (SBUF -> HBM)
        self.static_instructions = 0     # as the compiler sees them (dynamic loop bodies once)
        self.dynamic_instructions = 0    # as the engines execute them
        self.cycles = {"tensor": 0, "vector": 0, "scalar": 0, "gpsimd": 0}
        self.instructions = {"tensor": 0, "vector": 0, "scalar": 0, "gpsimd": 0, "dma": 0}

    def snapshot(self):
        return ({k: getattr(self, k) for k in self.SUMMED}, dict(self.dma_size_hist),
                dict(self.cycles), dict(self.instructions))

    def add_since(self, snap, times):
        """Add `times` x (counts now - counts at `snap`): the replayed loop iterations."""
        flat, hist, cycles, instr = snap
        for k in self.SUMMED:
            setattr(self, k, getattr(self, k) + times * (getattr(self, k) - flat[k]))
        for mine, old in ((self.dma_size_hist, hist), (self.cycles, cycles),
                          (self.instructions, instr)):
            for k in list(mine):
                mine[k] += times * (mine[k] - old.get(k, 0))


class DynamicLoop:
    """State of one `nl.dynamic_range` loop while it runs."""

    def __init__(self, depth):
        self.depth = depth           # loops enclosing it
        self.iteration = 0
        self.allocs = []             # allocations made during iteration 0 (reused later)
        self.cursor = 0
        self.outer_uses = []         # allocations from outside the loop used inside it
        self.closed = False
        self.start_index = 0
        self.tape = None


class SpillNeeded(Exception):
    """Internal: the static program needs more SBUF than the target has; `plan` says
    which tensors keep how many bytes per partition (the run is repeated with it)."""

    def __init__(self, plan):
        super().__init__(f"spill plan {plan}")
        self.plan = plan


class Context:
    """Everything one emulated kernel launch owns."""

    def __init__(self, target: Target, count_only: bool, sync_latency_s=0.0, spill_plan=None):
        from .timeline import Timeline
        self.target = target
        self.count_only = count_only
        self.counters = Counters()
        self.timeline = Timeline(target, sync_latency_s)
        self.loops = []              # active dynamic loops, outermost first
        self.tracing = True
        self.allocations = []        # on-chip allocations of the static program
        self.active = True
        self.sbuf_peak = 0
        self.psum_peak_banks = 0
        self.spill_plan = dict(spill_plan or {})   # on-chip allocation index -> kept bytes
        self.sbuf_spilled_bytes = 0                # per partition, summed over tensors
        self.widest_access = (0, "")               # most SBUF bytes/partition one instruction touches

    def update_tracing(self):
        """`tracing`: True while the instruction stream is the static program (every
        enclosing dynamic loop in its first iteration)."""
        self.tracing = not any(loop.iteration for loop in self.loops)

    # -- allocation ------------------------------------------------------------------
    def reused_allocation(self, shape, dtype, buffer):
        """In a dynamic loop's later iterations, nl.ndarray returns the tensor the same
        call made in the first iteration (compile-time allocation)."""
        for loop in self.loops:
            if loop.iteration:
                if loop.cursor >= len(loop.allocs):
                    raise UnsupportedError("nl.ndarray: a dynamic_range body allocated more "
                                           "tensors than in its first iteration")
                alloc = loop.allocs[loop.cursor]
                loop.cursor += 1
                if alloc.shape != tuple(shape) or alloc.dtype != dtype or alloc.buffer is not buffer:
                    raise UnsupportedError("nl.ndarray: a dynamic_range body must allocate the "
                                           "same tensors in every iteration")
                return alloc
        return None

    def register(self, alloc):
        alloc.first_use = self.counters.static_instructions
        alloc.last_use = alloc.first_use - 1
        alloc.loop = self.loops[-1] if self.loops else None
        alloc.depth = len(self.loops)
        for loop in self.loops:
            loop.allocs.append(alloc)
        if alloc.buffer.on_chip:
            keep = self.spill_plan.get(len(self.allocations))
            if keep is not None and alloc.buffer is SBUF and keep < alloc.bytes_pp:
                alloc.keep = keep
            self.allocations.append(alloc)

    def use(self, alloc):
        """Liveness and loop-scope bookkeeping for an operand of a static instruction."""
        loop = alloc.loop
        if loop is not None and loop.closed:
            raise LoopScopeError(
                f"tensor {alloc.describe()} was allocated inside a nl.dynamic_range body and "
                f"is used after the loop; the body's tensors are reused by every iteration "
                f"and do not outlive it (nki/deep-dives/nki-dynamic-loops.rst)")
        if self.tracing:
            alloc.last_use = self.counters.static_instructions
            if len(self.loops) > alloc.depth:
                self.loops[alloc.depth].outer_uses.append(alloc)

    def span(self, t):
        """(storage key, first cell, last cell) of a view, for the timeline."""
        alloc = t._alloc
        first, last = t.byte_span()
        if alloc.address is not None:
            first += alloc.address
            last += alloc.address
            return ("psum", first // CELL_BYTES, last // CELL_BYTES)
        c = alloc.cell
        return (alloc.uid, first // c, last // c)

    def issue(self, engine, cost_s, reads=(), writes=(), psum_port=False, queue=None,
              occupancy_s=0.0, dge_s=0.0, dge_engine=None):
        """One instruction: liveness/scope checks, counts, and the timeline."""
        c = self.counters
        use, span = self.use, self.span
        rspans = []
        for t in reads:
            a = t._alloc
            use(a)
            if a.keep is not None:
                self._spill_move(t, reload=True)
            if a.buffer.on_chip or a.hbm_written:
                rspans.append(span(t))
        wspans = []
        for t in writes:
            a = t._alloc
            use(a)
            if not a.buffer.on_chip:
                a.hbm_written = True
            wspans.append(span(t))
        if self.tracing:
            c.static_instructions += 1
            touched = sum(t.free_size() * t.itemsize for t in reads + writes
                          if t._alloc.buffer is SBUF)
            if touched > self.widest_access[0]:
                self.widest_access = (touched, f"a {engine} instruction on "
                                      + ", ".join(t._alloc.describe() for t in reads + writes))
        c.dynamic_instructions += 1
        c.instructions[engine] = c.instructions.get(engine, 0) + 1
        self.timeline.schedule(_Event(engine, cost_s, tuple(rspans), tuple(wspans), psum_port,
                                      queue, occupancy_s, dge_s, dge_engine))
        for t in writes:
            if t._alloc.keep is not None:
                self._spill_move(t, reload=False)

    def _spill_move(self, t, reload):
        """The DMA that reloads (before a read) or saves (after a write) the spilled bytes
        of view `t` (its bytes per partition beyond the tensor's kept size)."""
        a = t._alloc
        first, last = t.byte_span()
        lo = max(first, a.keep)
        if lo > last:
            return
        staged = a.staged
        if reload and any(s0 <= lo and last <= s1 for s0, s1 in staged):
            return                     # still staged from a recent use
        staged.append((lo, last))      # the staging area keeps the most recent ranges
        while len(staged) > 1 and sum(s1 + 1 - s0 for s0, s1 in staged) > SPILL_STAGING_BYTES:
            del staged[0]
        per_part = max(1, (last + 1 - lo) * t.free_size() * t.itemsize // (last + 1 - first))
        parts = t.partitions()
        payload = per_part * parts
        tgt = self.target
        eff = min(1.0, dma_chunk_efficiency(min(per_part, t.contiguous_run_bytes()))
                  * tgt.dma_efficiency_scale)
        rate = tgt.dma_cost_bytes_per_s * eff
        engines = min(tgt.dma_engines, max(1, -(-parts // tgt.dma_partitions_per_engine)))
        occupancy = max(payload / (rate * tgt.dma_engines), payload / tgt.hbm_bytes_per_s)
        c = self.counters
        if reload:
            c.hbm_read_bytes += payload
            c.spill_read_bytes += payload
        else:
            c.hbm_write_bytes += payload
            c.spill_write_bytes += payload
        c.dma_count += 1
        c.dma_bytes += payload
        c.dynamic_instructions += 1
        c.instructions["dma"] = c.instructions.get("dma", 0) + 1
        s = self.span(t)
        home = (("spill", a.uid), s[1], s[2])      # the bytes' HBM home, cell for cell
        # reloads and saves each stream through their own in-order queue
        self.timeline.schedule(_Event("dma", payload / (rate * engines),
                                      (home,) if reload else (s,), (s,) if reload else (home,),
                                      False, ("spill", a.uid, reload), occupancy))

    def close_loop(self, loop):
        end = self.counters.static_instructions - 1
        for alloc in loop.outer_uses:
            alloc.last_use = max(alloc.last_use, end)
        loop.closed = True

    def check_capacity(self, allow_spill=True):
        """Peak live bytes of the static program, checked against the target. SBUF beyond
        capacity: raises SpillNeeded with a spill plan (or SbufCapacityError when a single
        tensor exceeds a partition, or allow_spill is False); PSUM: PsumCapacityError."""
        t = self.target
        cap = t.sbuf_bytes_per_partition
        sbuf = [a for a in self.allocations if a.buffer is SBUF]
        size = lambda a: a.bytes_pp if a.keep is None else a.keep   # noqa: E731
        peak, live_set = _peak(sbuf, size)
        self.sbuf_peak = peak
        self.sbuf_spilled_bytes = sum(a.bytes_pp - a.keep for a in sbuf if a.keep is not None)
        if self.widest_access[0] > cap:
            nbytes, instr = self.widest_access
            raise SbufCapacityError(
                f"{instr} touches {nbytes} B/partition of SBUF in one instruction: more than "
                f"{t.name}'s {cap} B/partition (an instruction's operands must be on chip "
                f"at once; nothing can be spilled)")
        if peak > cap:
            if not allow_spill or self.spill_plan:
                last = live_set[-1]
                others = ", ".join(x.describe() for x in live_set if x is not last)
                raise SbufCapacityError(
                    f"nl.ndarray{_fmt_shape(last.shape)} {last.dtype.name} in SBUF needs "
                    f"{size(last)} B/partition while {peak - size(last)} B/partition are live "
                    f"({others}): {peak} B/partition > {t.name} capacity {cap} B/partition")
            raise SpillNeeded(spill_plan(self.allocations, cap))
        psum = [a for a in self.allocations if a.buffer is PSUM]
        peak, live_set = _peak(psum, lambda a: a.banks)
        self.psum_peak_banks = peak
        if peak > t.psum_banks:
            last = live_set[-1]
            others = ", ".join(x.describe() for x in live_set if x is not last)
            raise PsumCapacityError(
                f"nl.ndarray{_fmt_shape(last.shape)} {last.dtype.name} in PSUM needs "
                f"{last.banks} banks while {peak - last.banks} banks are live ({others}): "
                f"{peak} banks > {t.name} capacity {t.psum_banks} banks")
        self.check_psum_placement()

    def check_psum_placement(self):
        """PSUM tiles placed by address= must not overlap while both are live."""
        placed = [a for a in self.allocations if a.buffer is PSUM and a.address is not None]
        for i, a in enumerate(placed):
            for b in placed[i + 1:]:
                if a.address < b.address + b.bytes_pp and b.address < a.address + a.bytes_pp:
                    if a.first_use <= max(b.last_use, b.first_use) and \
                            b.first_use <= max(a.last_use, a.first_use):
                        raise PsumPlacementError(
                            f"{a.describe()} at PSUM byte {a.address} and {b.describe()} at "
                            f"byte {b.address} overlap while both are live")


# Staging area of spilled bytes, per partition: a reload is skipped while the bytes are
# still among the most recently staged ranges of their tensor (an assumption: the docs give
# no size; 8 KiB holds a few tiles' rows).
SPILL_STAGING_BYTES = 8 * 1024


def _peak(allocs, size):
    """(peak of the summed sizes of live allocations, the live set at the peak, in
    allocation order with the one that made the peak last)."""
    events = []
    for a in allocs:
        events.append((a.first_use, 1, a))
        events.append((max(a.last_use, a.first_use) + 1, 0, a))
    events.sort(key=lambda e: (e[0], e[1]))
    live, peak, peak_set, cur = 0, 0, [], {}
    for _, kind, a in events:
        if kind:
            live += size(a)
            cur[a] = True
            if live > peak:
                peak = live
                peak_set = [x for x in cur if x is not a] + [a]
        else:
            live -= size(a)
            cur.pop(a, None)
    return peak, peak_set


def spill_plan(allocations, capacity):
    """{index in `allocations`: bytes per partition kept on chip}: while the SBUF peak
    exceeds `capacity` less the staging area (SPILL_STAGING_BYTES, where reloaded and
    saved bytes pass), the largest live tensor at the peak gives up the excess (its
    trailing bytes per partition)."""
    sbuf = [a for a in allocations if a.buffer is SBUF]
    capacity -= SPILL_STAGING_BYTES
    keep = {a: a.bytes_pp for a in sbuf}
    for _ in range(10 * len(sbuf) + 10):
        peak, live = _peak(sbuf, keep.__getitem__)
        if peak <= capacity:
            break
        victim = max(live, key=lambda a: keep[a])
        keep[victim] -= min(keep[victim], peak - capacity)
    index = {a: i for i, a in enumerate(allocations)}
    return {index[a]: k for a, k in keep.items() if k < a.bytes_pp}


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

    __slots__ = ("buffer", "dtype", "shape", "array", "written", "bytes_pp", "banks", "name",
                 "uid", "address", "first_use", "last_use", "loop", "depth", "cell",
                 "hbm_written", "strides", "keep", "staged")

    def __init__(self, ctx: Context, shape, dtype, buffer: Buffer, name="", array=None,
                 address=None):
        self.buffer = buffer
        self.dtype = dtype
        self.shape = tuple(int(s) for s in shape)
        self.name = name
        self.uid = next(_alloc_ids)
        self.written = None
        self.bytes_pp = 0
        self.banks = 0
        self.address = None
        self.hbm_written = False
        self.keep = None               # bytes per partition kept on chip when spilled
        self.staged = []               # spilled byte ranges in the staging area, oldest first
        self.strides = tuple(math.prod(self.shape[d + 1:]) for d in range(len(self.shape)))
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
                bank = ctx.target.psum_bank_bytes
                self.banks = max(1, -(-self.bytes_pp // bank))
                if address is not None:
                    self.address = _psum_address(self, address, ctx.target)
            self.cell = CELL_BYTES
        else:
            self.cell = max(CELL_BYTES, -(-math.prod(self.shape) * dtype.itemsize // HBM_CELLS))
        ctx.register(self)
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

    def describe(self):
        name = f" '{self.name}'" if self.name else ""
        return f"nl.ndarray{_fmt_shape(self.shape)}{name}"


def _psum_address(alloc, address, target):
    """address=(partition_offset, byte_offset) of a PSUM tile: whole banks, inside PSUM."""
    try:
        part, off = address
    except (TypeError, ValueError):
        raise PsumPlacementError(f"{alloc.describe()}: address must be (partition_offset, "
                                 f"byte_offset), got {address!r}") from None
    bank = target.psum_bank_bytes
    if part != 0 or off % bank:
        raise PsumPlacementError(f"{alloc.describe()}: PSUM address {address!r} must start a bank "
                                 f"(partition 0, a multiple of {bank} bytes)")
    if off + alloc.banks * bank > target.psum_bytes_per_partition:
        raise PsumPlacementError(
            f"{alloc.describe()}: banks {off // bank}..{off // bank + alloc.banks - 1} do not "
            f"exist ({target.psum_banks} banks of {bank} B)")
    return off


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

    __slots__ = ("_alloc", "_index", "_shape", "_indirect")

    def __init__(self, alloc: Allocation, index=None, indirect=None):
        self._alloc = alloc
        self._index = index if index is not None else tuple(range(s) for s in alloc.shape)
        self._shape = tuple(len(r) for r in self._index if r.__class__ is range)
        self._indirect = indirect      # base dim addressed through a register (see `ap`)

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
            if dim == self._indirect and not (k.__class__ is slice and k == slice(None)):
                raise IndirectViewError(
                    f"{self!r}: dim {dim} is addressed through a register (.ap(scalar_offset=...)); "
                    f"an indirect view's indirect dimension cannot be sliced or selected again "
                    f"(NkiTensor.is_indirect, nki/api/nki/language)")
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
        return NkiTensor(self._alloc, tuple(new), self._indirect)

    def ap(self, pattern, offset=None, scalar_offset=None, vector_offset=None, indirect_dim=0,
           dtype=None):
        """Access pattern view (`NkiTensor.ap`, nki/deep-dives/nki-aps.rst): `pattern` is
        [[step, num], ...] in elements, `offset` a compile-time element offset, and
        `scalar_offset` a register (a `nl.dynamic_range` loop variable) counting elements
        of dimension `indirect_dim` of the pattern. The emulator accepts patterns whose
        steps are the strides of distinct dims of the tensor (row-major, outermost first),
        which is every rectangular block."""
        if vector_offset is not None or dtype is not None:
            raise UnsupportedError(".ap: vector_offset and dtype are not emulated")
        if self._index != tuple(range(s) for s in self._alloc.shape):
            raise UnsupportedError(".ap is emulated on whole tensors only")
        alloc = self._alloc
        strides = alloc.strides
        base = int(offset or 0)
        dims = []
        d = 0
        for step, num in pattern:
            while d < len(strides) and strides[d] != step:
                d += 1
            if d == len(strides):
                raise UnsupportedError(f".ap pattern {pattern} does not follow the dims of "
                                       f"{alloc.describe()} (strides {list(strides)})")
            dims.append((d, int(num)))
            d += 1
        indirect = None
        if scalar_offset is not None:
            if not (0 <= indirect_dim < len(dims)):
                raise UnsupportedError(f".ap: indirect_dim {indirect_dim} out of range")
            base += _register_value(scalar_offset) * pattern[indirect_dim][0]
            indirect = dims[indirect_dim][0]
        starts = []
        rem = base
        for st in strides:
            starts.append(rem // st)
            rem %= st
        index = [starts[d] for d in range(len(strides))]
        for d, num in dims:
            index[d] = range(starts[d], starts[d] + num)
            if starts[d] + num > alloc.shape[d]:
                raise IndexError(f".ap: dim {d} elements {starts[d]}..{starts[d] + num - 1} "
                                 f"outside {alloc.describe()}")
        return NkiTensor(alloc, tuple(index), indirect)

    def is_indirect(self):
        return self._indirect is not None

    def byte_span(self):
        """(first, last) byte touched: within one partition for on-chip tiles, in the
        flat tensor for HBM."""
        alloc = self._alloc
        strides = alloc.strides
        first = last = 0
        for d in range(1 if alloc.buffer.on_chip else 0, len(strides)):
            r = self._index[d]
            if r.__class__ is int:
                first += r * strides[d]
                last += r * strides[d]
            elif len(r):
                first += r[0] * strides[d]
                last += r[-1] * strides[d]
        e = alloc.dtype.itemsize
        return first * e, last * e + e - 1

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

    def element_stride_bytes(self):
        """Bytes between consecutive elements of the view's innermost varying dim (the
        partition dim of an on-chip tile excluded): the itemsize when it is contiguous."""
        alloc = self._alloc
        lo = 1 if alloc.buffer.on_chip else 0
        for d in range(len(alloc.shape) - 1, lo - 1, -1):
            r = self._index[d]
            if r.__class__ is range and len(r) > 1:
                return r.step * alloc.strides[d] * alloc.dtype.itemsize
        return alloc.dtype.itemsize

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


def _register_value(reg):
    value = getattr(reg, "_value", None)
    if value is None:
        raise UnsupportedError(f".ap: scalar_offset must be a register (a nl.dynamic_range loop "
                               f"variable), got {type(reg).__name__}")
    return value
