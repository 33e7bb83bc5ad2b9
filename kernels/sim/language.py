"""Emulated `nki.language` (as `nl`): tensor creation, memory regions, dtypes, operator
identifiers, tile-size constants, loop ranges, and the load/store/copy conveniences."""
import numpy as np

from . import core, isa
from .core import BF16, FP16, FP32, NkiTensor, as_dtype
from .errors import DynamicIndexError, LoopBoundsError, UnsupportedError

# memory regions
sbuf = core.SBUF
psum = core.PSUM
hbm = core.HBM
shared_hbm = core.SHARED_HBM
private_hbm = core.PRIVATE_HBM

# dtypes (numpy dtypes; bfloat16 from ml_dtypes)
bfloat16 = BF16
float32 = FP32
float16 = FP16
int32 = np.dtype(np.int32)
uint8 = np.dtype(np.uint8)


class _TileSize:
    """Hardware tile-size limits (`nl.tile_size.*`, nki/api/nki.language.tile_size.rst)."""

    pmax = 128
    gemm_stationary_fmax = 128
    gemm_moving_fmax = 512
    psum_fmax = 512                 # deprecated in 0.4.0 for psum_bank_fmax
    psum_bank_fmax = 512
    psum_bank_fmax_bytes = 2048
    bn_stats_fmax = 512

    @property
    def psum_num_banks(self):
        return core.current().target.psum_banks

    @property
    def sbuf_fmax_bytes(self):
        return core.current().target.sbuf_bytes_per_partition

    @property
    def total_available_sbuf_size(self):
        return core.current().target.sbuf_bytes_per_partition


tile_size = _TileSize()


def ndarray(shape, dtype, buffer=sbuf, name="", address=None):
    """Allocate an uninitialised tensor on `buffer` (default SBUF). `address` places a
    PSUM tile: (0, byte offset of its first bank). Inside a `dynamic_range` body the
    same call returns the same tensor in every iteration (compile-time allocation)."""
    if isinstance(buffer, str):
        raise UnsupportedError("nl.ndarray: pass a buffer object (nl.sbuf, nl.psum, "
                               "nl.shared_hbm), not a string")
    if address is not None and buffer is not psum:
        raise UnsupportedError("nl.ndarray(address=...): only PSUM placement is emulated")
    ctx = core.current()
    dt = as_dtype(dtype)
    alloc = ctx.reused_allocation(tuple(int(d) for d in shape), dt, buffer)
    if alloc is None:
        alloc = core.Allocation(ctx, tuple(shape), dt, buffer, name=name, address=address)
    return NkiTensor(alloc)


def zeros(shape, dtype, buffer=sbuf, name=""):
    t = ndarray(shape, dtype, buffer=buffer, name=name)
    if buffer.on_chip:
        isa.memset(dst=t, value=0)
    elif not core.current().count_only:
        t.write(np.zeros(t.shape))
    return t


def load(src, dtype=None):
    """HBM -> new SBUF tile with the same shape."""
    t = ndarray(src.shape, dtype if dtype is not None else src.dtype, buffer=sbuf)
    isa.dma_copy(dst=t, src=src)
    return t


def store(dst, value):
    """SBUF tile -> HBM."""
    isa.dma_copy(dst=dst, src=value)


# Loops. affine_range, sequential_range and static_range are, in NKI 0.3+, aliases of
# Python's range: fully unrolled at trace time (nki/api/nki/language: "This function is an
# alias for Python's range()"; nki/deep-dives/nki-dynamic-loops.rst, table "Comparison
# with Other Range Iterators"). Only dynamic_range emits a hardware loop whose body is
# compiled once and whose variable is a device register.

def affine_range(start, stop=None, step=1):
    return range(start, stop, step) if stop is not None else range(start)


def sequential_range(start, stop=None, step=1):
    return range(start, stop, step) if stop is not None else range(start)


def static_range(start, stop=None, step=1):
    return range(start, stop, step) if stop is not None else range(start)


class Register:
    """A device register (NKI's VirtualRegister): the variable of a dynamic loop. It
    addresses tensors through `.ap(..., scalar_offset=reg)`; any use as a Python value at
    trace time is what the compiler rejects ("The loop variable is a device register, not
    a Python int. You cannot use it in host-side Python expressions (e.g., if i == 0:)",
    nki/deep-dives/nki-dynamic-loops.rst)."""

    __slots__ = ("_value",)

    def __init__(self, value):
        self._value = value

    def _refuse(self, *_args, **_kw):
        raise DynamicIndexError(
            "a nl.dynamic_range loop variable is a device register, not a Python int: it "
            "cannot be used in trace-time Python (if/compare/arithmetic/range/slicing); "
            "address tensors with .ap(pattern, offset=..., scalar_offset=reg)")

    __bool__ = __int__ = __index__ = __float__ = _refuse
    __lt__ = __le__ = __gt__ = __ge__ = __eq__ = __ne__ = _refuse
    __add__ = __radd__ = __sub__ = __rsub__ = __mul__ = __rmul__ = _refuse
    __floordiv__ = __rfloordiv__ = __mod__ = __rmod__ = __truediv__ = __neg__ = _refuse
    __hash__ = object.__hash__

    def __repr__(self):
        return "<NKI register>"


def dynamic_range(start, stop=None, step=1):
    """A hardware loop (`nl.dynamic_range`): the body is compiled once, its variable is a
    device register, tensors allocated in the body are allocated once. Values mode runs
    the body once per iteration; count-only mode traces it once and replays its
    instruction stream through the timeline for the other iterations."""
    if stop is None:
        start, stop = 0, start
    for name, v in (("start", start), ("stop", stop)):
        if not isinstance(v, (int, np.integer)) or isinstance(v, bool):
            raise LoopBoundsError(f"nl.dynamic_range: {name} must be an int here, got {v!r}")
    if not isinstance(step, (int, np.integer)) or isinstance(step, bool) or step <= 0:
        raise LoopBoundsError(f"nl.dynamic_range: step must be a compile-time positive int, "
                              f"got {step!r} (nki/deep-dives/nki-dynamic-loops.rst)")
    return _dynamic_loop(int(start), int(stop), int(step))


def _dynamic_loop(start, stop, step):
    ctx = core.current()
    values = range(start, stop, step)
    loop = core.DynamicLoop(len(ctx.loops))
    ctx.loops.append(loop)
    try:
        if not values:
            return
        tape_mode = ctx.count_only
        if tape_mode:
            snap = ctx.counters.snapshot()
            loop.tape = []
            ctx.timeline.tapes.append(loop.tape)
        yield Register(values[0])
        if tape_mode:
            ctx.timeline.tapes.pop()
            rest = len(values) - 1
            ctx.counters.add_since(snap, rest)
            ctx.timeline.replay(loop.tape, rest)
        else:
            for v in values[1:]:
                loop.iteration += 1
                loop.cursor = 0
                ctx.update_tracing()
                yield Register(v)
    finally:
        ctx.loops.pop()
        ctx.update_tracing()
        ctx.close_loop(loop)


class _Op:
    """An operator identifier usable as `op=` of ISA calls; calling it on tiles runs
    the matching instruction into a new SBUF tile."""

    def __init__(self, name, fn, kind):
        self.name = name
        self.fn = fn
        self.kind = kind

    def __repr__(self):
        return f"nl.{self.name}"

    def __call__(self, *args, dtype=None):
        if self.kind == "binary":
            a, b = args
            out = ndarray(a.shape, dtype or a.dtype, buffer=sbuf)
            isa.tensor_tensor(dst=out, data1=a, data2=b, op=self)
            return out
        (x,) = args
        out = ndarray(x.shape, dtype or x.dtype, buffer=sbuf)
        if self.kind == "copy":
            isa.tensor_copy(dst=out, src=x)
        else:
            isa.activation(dst=out, op=self, data=x)
        return out


def _silu(x):
    with np.errstate(over="ignore"):
        return x / (1.0 + np.exp(-x))


def _sigmoid(x):
    with np.errstate(over="ignore"):
        return 1.0 / (1.0 + np.exp(-x))


def _gelu_tanh(x):
    return 0.5 * x * (1.0 + np.tanh(0.7978845608028654 * (x + 0.044715 * x ** 3)))


add = _Op("add", np.add, "binary")
subtract = _Op("subtract", np.subtract, "binary")
multiply = _Op("multiply", np.multiply, "binary")
maximum = _Op("maximum", np.maximum, "binary")
minimum = _Op("minimum", np.minimum, "binary")
divide = _Op("divide", np.divide, "binary")

copy = _Op("copy", lambda x: x, "copy")
silu = _Op("silu", _silu, "act")
sigmoid = _Op("sigmoid", _sigmoid, "act")
exp = _Op("exp", np.exp, "act")
tanh = _Op("tanh", np.tanh, "act")
relu = _Op("relu", lambda x: np.maximum(x, 0.0), "act")
gelu_apprx_tanh = _Op("gelu_apprx_tanh", _gelu_tanh, "act")

for _op in (add, subtract, multiply, maximum, minimum, divide):
    isa._register_binary(_op, _op.fn)
for _op in (copy, silu, sigmoid, exp, tanh, relu, gelu_apprx_tanh):
    isa._register_activation(_op, _op.fn)
