"""Executing a kernel in one emulator context, and turning its instruction stream into a
modelled latency (`Stats`). `nki_api` builds `sim.run`, `jit` and `simulate` on `execute`.

Latency model: the timeline (`timeline.Timeline`, docs/kernels.md "The cost model").
Every instruction runs on its engine's in-order queue once the instructions producing its
inputs have finished and the previous users of the storage it overwrites are done; DMA
transfers pay a fixed latency and run in order per queue, sharing the 16 engines'
bandwidth. Per-instruction costs come from `isa` (tensor engine max(64, N) cycles, x4 for
fp32; VectorE N / 2N cycles + 100 for N < 128; DMA bytes at the documented efficiency of
their contiguous run), each with its AWS source in `targets`.

    latency = end of the last instruction;  MFU = matmul FLOPs / (peak bf16 FLOP/s x latency)

Stats also reports each engine's busy time (sum of its instruction costs) and stall time
(waiting on another engine's result with work queued), the static instruction count (the
program the compiler sees: a nl.dynamic_range body once) and the dynamic one (what the
engines execute), tensor-engine transpose FLOPs and the SBUF spill traffic (`core`).
Documented effects with their sources and the brackets of undocumented constants are in
`targets`; not modelled: instruction fetch, SBUF bank conflicts, the compiler's reordering
of independent instructions across engine queues (program order is kept per engine),
write-after-read hazards between different tensors the allocator places at the same SBUF
address.
"""
from dataclasses import dataclass, field, asdict

import numpy as np

from . import core
from .core import Allocation, NkiTensor, as_dtype
from .errors import UnsupportedError
from .targets import Target, get_target


@dataclass(frozen=True)
class spec:
    """Shape/dtype placeholder for a kernel argument in count-only runs (no data)."""
    shape: tuple
    dtype: object = "bfloat16"


@dataclass
class Stats:
    target: str
    count_only: bool
    hbm_read_bytes: int
    hbm_write_bytes: int
    dma_count: int
    dma_transpose_count: int
    dma_bytes: int
    dma_min_bytes: int
    dma_max_bytes: int
    dma_size_hist: dict
    dma_min_run_bytes: int      # smallest contiguous run (DMA buffer) of any DMA copy
    matmul_count: int
    flops: int
    pe_transpose_count: int
    instructions: dict          # dynamic instructions per engine (incl. "dma")
    engine_cycles: dict
    engine_time_s: dict         # busy time per engine (= engine_busy_s)
    sbuf_peak_bytes: int        # per partition
    psum_peak_bytes: int        # per partition (whole banks)
    psum_peak_banks: int
    sbuf_capacity_bytes: int
    psum_capacity_bytes: int
    modeled_latency_s: float
    mfu: float
    bound_by: str               # the engine with the most busy time
    peak_flops: float = field(default=0.0)
    static_instructions: int = 0    # the program the compiler sees (dynamic loop bodies once)
    dynamic_instructions: int = 0   # what the engines execute
    engine_busy_s: dict = field(default_factory=dict)
    engine_stall_s: dict = field(default_factory=dict)
    transpose_flops: int = 0        # identity-matmul FLOPs of tensor-engine transposes
    spill_read_bytes: int = 0       # SBUF spill reloads (part of hbm_read_bytes)
    spill_write_bytes: int = 0      # SBUF spill saves (part of hbm_write_bytes)
    sbuf_spilled_bytes: int = 0     # bytes per partition the spill plan moved to HBM

    @property
    def hbm_bytes(self) -> int:
        return self.hbm_read_bytes + self.hbm_write_bytes

    @property
    def spill_bytes(self) -> int:
        return self.spill_read_bytes + self.spill_write_bytes

    @property
    def arithmetic_intensity(self) -> float:
        return self.flops / self.hbm_bytes if self.hbm_bytes else float("inf")

    def __getitem__(self, key):
        if key in ("hbm_bytes", "arithmetic_intensity", "spill_bytes"):
            return getattr(self, key)
        return asdict(self)[key]

    def as_dict(self) -> dict:
        d = asdict(self)
        d["hbm_bytes"] = self.hbm_bytes
        d["spill_bytes"] = self.spill_bytes
        d["arithmetic_intensity"] = self.arithmetic_intensity
        d["dma_size_hist"] = {str(k): v for k, v in sorted(self.dma_size_hist.items())}
        return d


def model_stats(ctx: core.Context) -> Stats:
    """A finished context's counts and timeline as a report."""
    t: Target = ctx.target
    c = ctx.counters
    tl = ctx.timeline
    busy = {k: v for k, v in tl.busy.items()}
    latency = tl.end
    bound = max(busy, key=busy.get)
    mfu = c.matmul_flops / (t.peak_flops * latency) if latency > 0 else 0.0
    cycles = dict(c.cycles)
    cycles["dma"] = int(round(busy["dma"] * t.pe_hz))   # DMA time in tensor-engine cycles
    return Stats(
        target=t.name, count_only=ctx.count_only,
        hbm_read_bytes=c.hbm_read_bytes, hbm_write_bytes=c.hbm_write_bytes,
        dma_count=c.dma_count, dma_transpose_count=c.dma_transpose_count,
        dma_bytes=c.dma_bytes, dma_min_bytes=c.dma_min_bytes or 0,
        dma_max_bytes=c.dma_max_bytes, dma_size_hist=dict(c.dma_size_hist),
        dma_min_run_bytes=c.dma_min_run_bytes or 0,
        matmul_count=c.matmul_count, flops=c.matmul_flops,
        pe_transpose_count=c.pe_transpose_count, instructions=dict(c.instructions),
        engine_cycles=cycles, engine_time_s=dict(busy),
        sbuf_peak_bytes=ctx.sbuf_peak,
        psum_peak_bytes=ctx.psum_peak_banks * t.psum_bank_bytes,
        psum_peak_banks=ctx.psum_peak_banks,
        sbuf_capacity_bytes=t.sbuf_bytes_per_partition,
        psum_capacity_bytes=t.psum_bytes_per_partition,
        modeled_latency_s=latency, mfu=mfu, bound_by=bound, peak_flops=t.peak_flops,
        static_instructions=c.static_instructions, dynamic_instructions=c.dynamic_instructions,
        engine_busy_s=dict(busy), engine_stall_s=dict(tl.stall),
        transpose_flops=c.pe_transpose_flops, spill_read_bytes=c.spill_read_bytes,
        spill_write_bytes=c.spill_write_bytes, sbuf_spilled_bytes=ctx.sbuf_spilled_bytes,
    )


def python_function(kernel):
    """The plain Python function behind a kernel object (ours, or a bare function)."""
    fn = getattr(kernel, "__nki_python_fn__", None)
    if fn is not None:
        return fn
    if callable(kernel):
        return kernel
    raise TypeError(f"not a kernel: {kernel!r}")


def _to_hbm(ctx, a, i):
    if isinstance(a, spec):
        if not ctx.count_only:
            raise UnsupportedError("sim.spec placeholders need count_only=True")
        alloc = Allocation(ctx, a.shape, as_dtype(a.dtype), core.HBM, name=f"arg{i}")
        return NkiTensor(alloc)
    if isinstance(a, NkiTensor):
        raise UnsupportedError("pass numpy arrays to sim.run, not emulator tensors")
    arr = np.asarray(a)
    if arr.dtype not in (core.FP32, core.BF16, core.FP16):
        raise TypeError(f"argument {i}: expected a float32/bfloat16/float16 array, got {arr.dtype}")
    alloc = Allocation(ctx, arr.shape, arr.dtype, core.HBM, name=f"arg{i}",
                       array=None if ctx.count_only else np.array(arr, copy=True))
    return NkiTensor(alloc)


def _from_hbm(ctx, out):
    if isinstance(out, (tuple, list)):
        return tuple(_from_hbm(ctx, o) for o in out)
    if out is None:
        return None
    if not isinstance(out, NkiTensor):
        raise TypeError(f"kernel returned {type(out).__name__}, expected NKI tensors")
    if out.buffer.on_chip:
        raise UnsupportedError(f"kernel returned an on-chip tensor {out!r}; outputs live in "
                               f"nl.shared_hbm")
    return None if ctx.count_only else out.numpy()


def execute(kernel, *arrays, target="trn1", count_only=False, spill=True, **kernel_kwargs):
    """Execute `kernel` in a fresh emulator context.

    arrays: numpy float32 / bfloat16 arrays (or `spec` placeholders when count_only);
    kernel_kwargs are passed to the kernel unchanged. spill: SBUF beyond capacity is
    spilled (saved and reloaded by DMA, `core`); spill=False refuses it instead
    (SbufCapacityError).
    Returns (outputs, stats): outputs as numpy arrays (a tuple when the kernel returns
    several; None in count-only mode), stats a `Stats`. `sim.run` (nki_api.run) is this
    with the real SDK's module names pointed at the emulator for the duration.
    """
    t = get_target(target)
    plan = None
    while True:
        ctx = core.Context(t, bool(count_only), t.sync_latency_s, spill_plan=plan)
        prev = core.push(ctx)
        try:
            args = [_to_hbm(ctx, a, i) for i, a in enumerate(arrays)]
            out = python_function(kernel)(*args, **kernel_kwargs)
            outputs = _from_hbm(ctx, out)
            del args, out
            ctx.check_capacity(allow_spill=spill)
        except core.SpillNeeded as need:
            # SBUF overflows: run again, the spilled bytes saved and reloaded by DMA
            plan = need.plan
            continue
        finally:
            core.pop(prev)
        return outputs, model_stats(ctx)
