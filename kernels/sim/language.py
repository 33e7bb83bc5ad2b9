"""Emulated `nki.language` (as `nl`): tensor creation, memory regions, dtypes, operator
identifiers, tile-size constants, loop ranges, and the load/store/copy conveniences."""
import numpy as np

from . import core, isa
from .core import BF16, FP16, FP32, NkiTensor, as_dtype
from .errors import UnsupportedError

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
    """Hardware tile-size limits (`nl.tile_size.*`)."""

    pmax = 128
    gemm_stationary_fmax = 128
    gemm_moving_fmax = 512
    psum_fmax = 512
    bn_stats_fmax = 512

    @property
    def total_available_sbuf_size(self):
        return core.current().target.sbuf_bytes_per_partition


tile_size = _TileSize()


def ndarray(shape, dtype, buffer=sbuf, name="", address=None):
    """Allocate an uninitialised tensor on `buffer` (default SBUF)."""
    if address is not None:
        raise UnsupportedError("nl.ndarray(address=...): manual placement is not emulated")
    if isinstance(buffer, str):
        raise UnsupportedError("nl.ndarray: pass a buffer object (nl.sbuf, nl.psum, "
                               "nl.shared_hbm), not a string")
    ctx = core.current()
    alloc = core.Allocation(ctx, tuple(shape), as_dtype(dtype), buffer, name=name)
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


def affine_range(*args):
    return range(*args)


def sequential_range(*args):
    return range(*args)


def static_range(*args):
    return range(*args)


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
