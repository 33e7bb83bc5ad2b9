"""Running a kernel in the emulator, and turning its counts into a modelled latency.

Latency model
-------------
Each engine's busy time is the sum of its instructions' costs (see `isa` and `targets`
for the per-instruction rules and the AWS documentation each number comes from):
* tensor: cycles / tensor clock; vector, scalar, gpsimd: cycles / their own clock
  (VectorE two-input instructions such as tensor_tensor at ~2 cycles per element);
* psum_port (NeuronCore-v2 only): VectorE and ScalarE cannot access PSUM in parallel, so
  the time of their PSUM-touching instructions adds up on one shared port;
* DMA: max(sum over DMAs of (bytes / (sustained engine rate x efficiency) + 1.3 us)
           / 16 engines,  HBM bytes / HBM bandwidth).
  Sustained engine rate 17 B/ns (trn1) / 23 B/ns (trn2); efficiency from the documented
  throughput-vs-bytes-per-partition curve at the copy's contiguous run (1.0 from 4 KiB,
  0.84 at 2 KiB, 0.43 at 1 KiB, 0.105 at 256 B), 0.9 for a DMA transpose.
  The fixed 1.3 us is charged once per DMA instruction (dma_copy / dma_transpose),
  to one engine's time, while its bytes are striped over all engines.
The engines run concurrently and are assumed to overlap perfectly (the kernel
double-buffers its streamed tiles), so the busiest one bounds the time; the first
load and the last store cannot overlap anything, which adds two fixed DMA costs:

    latency = max(tensor, vector, scalar, gpsimd, psum_port, dma) + 2 * 1.3 us  (if any DMA)

MFU = matmul FLOPs / (peak bf16 FLOP/s * latency). Not modelled: dependency stalls
between engines, semaphore waits, instruction issue overhead beyond the 64-cycle floors,
the ~60-cycle SBUF/PSUM access overhead the docs say engines "can typically hide",
strided (> 16 B) engine access penalties, SBUF bank conflicts. The LoadStationary cost
(~M/4 = 32 cycles for a 128-column stationary with fast LoadStationary, nki_perf_guide.rst
Opt #7) runs in the background and is below the 64-cycle matmul floor, so it never binds.
"""
import sys
from dataclasses import dataclass, field, asdict

import numpy as np

from . import core, isa, language
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
    instructions: dict
    engine_cycles: dict
    engine_time_s: dict
    sbuf_peak_bytes: int        # per partition
    psum_peak_bytes: int        # per partition (whole banks)
    psum_peak_banks: int
    sbuf_capacity_bytes: int
    psum_capacity_bytes: int
    modeled_latency_s: float
    mfu: float
    bound_by: str
    peak_flops: float = field(default=0.0)

    @property
    def hbm_bytes(self) -> int:
        return self.hbm_read_bytes + self.hbm_write_bytes

    @property
    def arithmetic_intensity(self) -> float:
        return self.flops / self.hbm_bytes if self.hbm_bytes else float("inf")

    def __getitem__(self, key):
        if key in ("hbm_bytes", "arithmetic_intensity"):
            return getattr(self, key)
        return asdict(self)[key]

    def as_dict(self) -> dict:
        d = asdict(self)
        d["hbm_bytes"] = self.hbm_bytes
        d["arithmetic_intensity"] = self.arithmetic_intensity
        d["dma_size_hist"] = {str(k): v for k, v in sorted(self.dma_size_hist.items())}
        return d


def model_stats(ctx: core.Context) -> Stats:
    """Combine a finished context's counts with its target's numbers."""
    t: Target = ctx.target
    c = ctx.counters
    times = {
        "tensor": c.cycles["tensor"] / t.pe_hz,
        "vector": c.cycles["vector"] / t.vector_hz,
        "scalar": c.cycles["scalar"] / t.scalar_hz,
        "gpsimd": c.cycles["gpsimd"] / t.gpsimd_hz,
    }
    if t.psum_shared_vector_scalar:
        times["psum_port"] = c.psum_port_s
    hbm = c.hbm_read_bytes + c.hbm_write_bytes
    times["dma"] = max(c.dma_engine_s / t.dma_engines, hbm / t.hbm_bytes_per_s)
    bound = max(times, key=times.get)
    latency = times[bound] + (2 * t.dma_fixed_s if c.dma_count else 0.0)
    mfu = c.matmul_flops / (t.peak_flops * latency) if latency > 0 else 0.0
    cycles = dict(c.cycles)
    cycles["dma"] = int(round(times["dma"] * t.pe_hz))   # DMA time in tensor-engine cycles
    return Stats(
        target=t.name, count_only=ctx.count_only,
        hbm_read_bytes=c.hbm_read_bytes, hbm_write_bytes=c.hbm_write_bytes,
        dma_count=c.dma_count, dma_transpose_count=c.dma_transpose_count,
        dma_bytes=c.dma_bytes, dma_min_bytes=c.dma_min_bytes or 0,
        dma_max_bytes=c.dma_max_bytes, dma_size_hist=dict(c.dma_size_hist),
        dma_min_run_bytes=c.dma_min_run_bytes or 0,
        matmul_count=c.matmul_count, flops=c.matmul_flops,
        pe_transpose_count=c.pe_transpose_count, instructions=dict(c.instructions),
        engine_cycles=cycles, engine_time_s=times,
        sbuf_peak_bytes=ctx.sbuf_peak,
        psum_peak_bytes=ctx.psum_peak_banks * t.psum_bank_bytes,
        psum_peak_banks=ctx.psum_peak_banks,
        sbuf_capacity_bytes=t.sbuf_bytes_per_partition,
        psum_capacity_bytes=t.psum_bytes_per_partition,
        modeled_latency_s=latency, mfu=mfu, bound_by=bound, peak_flops=t.peak_flops,
    )


def python_function(kernel):
    """The plain Python function behind a kernel object (ours, or a bare function)."""
    fn = getattr(kernel, "__nki_python_fn__", None)
    if fn is not None:
        return fn
    if callable(kernel):
        return kernel
    raise TypeError(f"not a kernel: {kernel!r}")


class _EmulatedGlobals:
    """When the real Neuron SDK is importable, kernel modules bind `nl`/`nisa`/`nki` to
    it; for an emulated run those names are pointed at the emulator and restored after."""

    def __enter__(self):
        self.saved = []
        real = {name: sys.modules.get(name) for name in ("nki", "nki.language", "nki.isa")}
        if real["nki"] is None:
            return self
        from . import nki_api
        reals = [m for m in real.values() if m is not None]
        repl = {id(real["nki"]): nki_api, id(real.get("nki.language")): language,
                id(real.get("nki.isa")): isa}
        own = __name__.rsplit(".", 1)[0]
        for mod in list(sys.modules.values()):
            name = getattr(mod, "__name__", "") or ""
            if name == "nki" or name.startswith("nki.") or name.startswith(own):
                continue
            d = getattr(mod, "__dict__", None)
            if not isinstance(d, dict):
                continue
            for k, v in list(d.items()):
                for m in reals:
                    if v is m:
                        self.saved.append((d, k, v))
                        d[k] = repl[id(m)]
        return self

    def __exit__(self, *exc):
        for d, k, v in self.saved:
            d[k] = v
        return False


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


def run(kernel, *arrays, target="trn1", count_only=False, **kernel_kwargs):
    """Execute `kernel` in the emulator.

    arrays: numpy float32 / bfloat16 arrays (or `sim.spec` placeholders when
    count_only); kernel_kwargs are passed to the kernel unchanged.
    Returns (outputs, stats): outputs as numpy arrays (a tuple when the kernel returns
    several; None in count-only mode), stats a `Stats`.
    """
    ctx = core.Context(get_target(target), bool(count_only))
    prev = core.push(ctx)
    try:
        with _EmulatedGlobals():
            args = [_to_hbm(ctx, a, i) for i, a in enumerate(arrays)]
            out = python_function(kernel)(*args, **kernel_kwargs)
            outputs = _from_hbm(ctx, out)
            del args, out
    finally:
        core.pop(prev)
    return outputs, model_stats(ctx)


class SimKernel:
    """What the emulator's `nki.jit` returns: calling it runs the kernel (values mode,
    target trn1 unless a run is already active) and returns its outputs."""

    def __init__(self, fn, target="trn1"):
        self.__nki_python_fn__ = fn
        self.target = target
        self.__name__ = getattr(fn, "__name__", "kernel")
        self.__doc__ = getattr(fn, "__doc__", None)

    def __call__(self, *args, **kwargs):
        if getattr(core._state, "ctx", None) is not None:
            return self.__nki_python_fn__(*args, **kwargs)
        outputs, _ = run(self.__nki_python_fn__, *args, target=self.target, **kwargs)
        return outputs


def jit(fn=None, **options):
    if fn is None:
        return lambda f: SimKernel(f)
    return SimKernel(fn)


def simulate(kernel):
    """Like `nki.simulate(kernel)`: a callable running it on numpy arrays."""
    fn = python_function(kernel)
    return lambda *args, **kwargs: run(fn, *args, **kwargs)[0]
