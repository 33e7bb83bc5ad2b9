"""CPU emulator of the subset of NKI (Neuron Kernel Interface, NKI 0.3+ API) that the
project's kernels use. It knows nothing about SVD.

    from vllm_neuronmlp.kernels import sim
    outputs, stats = sim.run(kernel, x, w, target="trn1", count_only=False, **kwargs)

* values: numpy, bf16 rounding wherever a tile is bf16 (ml_dtypes), fp32 PSUM;
* checks: partition dim <= 128, matmul stationary free <= 128 and moving free <= 512,
  results within one 2 KiB PSUM bank, tensor-engine operands in SBUF and results in
  PSUM, no DMA to or from PSUM, SBUF/PSUM capacity per partition -- each refusal its
  own exception class under `NkiSimError`;
* loops: `nl.dynamic_range` is a hardware loop (body compiled once, variable a device
  register addressing tensors through `.ap`); affine/sequential/static_range unroll;
* counts: HBM bytes, DMAs and their sizes, matmuls and FLOPs, per-engine cycles, peak
  SBUF/PSUM bytes per partition (compile-time allocation, `core`), static and dynamic
  instruction counts; a modelled latency and MFU for trn1 or trn2 from a timeline of
  the instruction stream (`timeline`, `runner`);
* `nki_api` is the emulator's `nki` package (`jit`, `simulate`, `run`); while a run
  is active, kernel modules bound to a real SDK see the emulator instead;
* `count_only=True` skips all arithmetic (shapes only) for large shapes.
"""
from . import isa, language, nki_api
from .errors import (DmaPsumError, DmaTransposeError, DynamicIndexError, EngineAccessError,
                     IndirectViewError, LoopBoundsError, LoopScopeError, MatmulMemoryError,
                     MovingFreeError, NkiSimError, PartitionDimError, PsumBankError,
                     PsumCapacityError, PsumPlacementError, SbufCapacityError,
                     ShapeMismatchError, StationaryFreeError, UnsupportedError)
from .nki_api import SimKernel, jit, run, simulate
from .runner import Stats, model_stats, spec
from .targets import TARGETS, TRN1, TRN2, Target, get_target

__all__ = [
    "run", "spec", "Stats", "jit", "simulate", "SimKernel", "model_stats",
    "Target", "TARGETS", "TRN1", "TRN2", "get_target", "isa", "language", "nki_api",
    "NkiSimError", "PartitionDimError", "StationaryFreeError", "MovingFreeError",
    "PsumBankError", "MatmulMemoryError", "ShapeMismatchError", "DmaPsumError",
    "DmaTransposeError", "SbufCapacityError", "PsumCapacityError", "EngineAccessError",
    "UnsupportedError", "LoopScopeError", "DynamicIndexError", "IndirectViewError",
    "PsumPlacementError", "LoopBoundsError",
]
