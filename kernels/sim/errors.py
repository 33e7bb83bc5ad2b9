"""Exceptions the emulator raises where the hardware (or the NKI compiler) refuses.

Every class derives from `NkiSimError`, so callers can catch them all at once;
each message names the instruction and the shapes involved.
"""


class NkiSimError(Exception):
    """Base class of everything the NKI emulator rejects."""


class PartitionDimError(NkiSimError):
    """An on-chip tile or operand spans more than 128 partitions."""


class StationaryFreeError(NkiSimError):
    """nc_matmul: the stationary operand's free size exceeds 128."""


class MovingFreeError(NkiSimError):
    """nc_matmul: the moving operand's free size exceeds 512."""


class PsumBankError(NkiSimError):
    """A matmul/transpose result does not fit in one 2 KiB PSUM bank per partition."""


class MatmulMemoryError(NkiSimError):
    """Tensor-engine operands not in SBUF, or its result not in PSUM."""


class ShapeMismatchError(NkiSimError):
    """Operand shapes of an instruction do not agree."""


class DmaPsumError(NkiSimError):
    """A DMA touches PSUM (DMA engines cannot read or write PSUM)."""


class DmaTransposeError(NkiSimError):
    """dma_transpose on an unsupported layout or element size."""


class SbufCapacityError(NkiSimError):
    """Live SBUF tiles need more bytes per partition than the target has."""


class PsumCapacityError(NkiSimError):
    """Live PSUM tiles need more than the 8 banks (16 KiB) per partition."""


class EngineAccessError(NkiSimError):
    """An engine reads or writes a memory it is not connected to."""


class UnsupportedError(NkiSimError):
    """An API or argument the emulator does not implement."""


class LoopScopeError(NkiSimError):
    """A tensor allocated inside a nl.dynamic_range body is used after the loop."""


class DynamicIndexError(NkiSimError):
    """A nl.dynamic_range loop variable (a device register) used as a Python value at trace
    time: in `if`, comparisons, arithmetic, `range`, slicing."""


class IndirectViewError(NkiSimError):
    """The indirect dimension of a register-addressed view is sliced again."""


class PsumPlacementError(NkiSimError):
    """A PSUM tile placed by address= outside PSUM, off a bank boundary, or over another
    live tile."""


class LoopBoundsError(NkiSimError):
    """nl.dynamic_range with a step that is not a compile-time positive int, or bounds that
    are not ints/registers."""
