"""The `svd_neuron` checkpoint format, versions 1 to 3: the one place that spells it.

A checkpoint is an ordinary Hugging Face directory (config.json + safetensors,
sharded with `model.safetensors.index.json` when large). Its config.json carries

    "quantization_config": {
        "quant_method": "svd_neuron",
        "format_version": 1,
        "block_size": 128,
        "ranks": {"<layer prefix>.0.mlp.<gate projection>": 512, ...},
        ... provenance under other keys ...
    }

Every module named in `ranks` is stored as two factors and no `.weight`:

    <module>.svd_u   [in_features, r]    applied first
    <module>.svd_v   [r, out_features]   applied second     y = (x @ svd_u) @ svd_v

Modules not in `ranks` stay dense. Version 2 adds
`"widths": {"<layer prefix>.3.mlp": k, ...}`: that layer keeps k < intermediate_size
intermediate channels, so its gate/up outputs and down inputs are k wide (dense
`.weight` or factors alike); version 1 is version 2 without widths. Version 3
lets `ranks` list attention projections as well (`<layer prefix>.0.self_attn.q_proj`
..., stored as factors like the MLP's, shapes from the config's heads and head_dim;
q, k and v of one layer factored together, each at its own rank, o alone; a
projection's `.bias` stays dense beside its factors); it is written exactly when
one is factored, and may carry `widths` too.
The gate and up projections of one layer are
factored together or not at all (vLLM runs them as one merged linear), and so
are q, k and v (vLLM's qkv_proj). Module
names are the model's Hugging Face names; `mlp_families` spells them per model
family. docs/checkpoint_format.md describes the format for readers.

This module imports only `mlp_families` of the project (no torch at import), so
the plugin, the tool and the kernels' tests can all use it.
"""
from __future__ import annotations

import json
import math
import os
import struct
from dataclasses import dataclass, field
from typing import Any, Dict, Iterable, List, Mapping, Optional, Tuple

from vllm_neuronmlp import mlp_families as families

QUANT_METHOD = "svd_neuron"
FORMAT_VERSION = 1
WIDTHS_FORMAT_VERSION = 2  # per-layer intermediate widths
ATTENTION_FORMAT_VERSION = 3  # attention projections (q, k, v, o) may be factored too
SUPPORTED_FORMAT_VERSIONS = (1, 2, 3)
DEFAULT_BLOCK_SIZE = 128

# config.json keys
QUANTIZATION_CONFIG_KEY = "quantization_config"
KEY_QUANT_METHOD = "quant_method"
KEY_FORMAT_VERSION = "format_version"
KEY_BLOCK_SIZE = "block_size"
KEY_RANKS = "ranks"
KEY_WIDTHS = "widths"
KEY_PROVENANCE = "provenance"

# tensor leaf names (chosen not to collide with vLLM's quantization suffixes such
# as `_scale`, `_zero_point` or `g_idx`)
U_SUFFIX = "svd_u"
V_SUFFIX = "svd_v"
WEIGHT_SUFFIX = "weight"
BIAS_SUFFIX = "bias"

# How the shape of each MLP projection (by its role, see mlp_families) follows
# from the model config: (in_features key, out_features key).
_ROLE_SHAPE_KEYS = {
    families.GATE: ("hidden_size", "intermediate_size"),
    families.UP: ("hidden_size", "intermediate_size"),
    families.DOWN: ("intermediate_size", "hidden_size"),
}

# Attention projection shapes (format v3) follow from these config keys; head_dim
# is `head_dim` when the config has one (Qwen3, Gemma), else hidden / heads.
KEY_HIDDEN, KEY_HEADS, KEY_KV_HEADS, KEY_HEAD_DIM = ("hidden_size", "num_attention_heads", "num_key_value_heads",
                                                    "head_dim")

SAFETENSORS_SINGLE_FILE = "model.safetensors"
SAFETENSORS_INDEX_FILE = "model.safetensors.index.json"
CONFIG_FILE = "config.json"


class CheckpointFormatError(ValueError):
    """A checkpoint breaks the format. The message names the file, the tensor or
    key, and what was expected."""


class TensorParallelError(CheckpointFormatError):
    """A checkpoint's intermediate widths cannot be split over the tensor parallel ranks."""


# ---------------------------------------------------------------- names
def u_name(module: str) -> str:
    return f"{module}.{U_SUFFIX}"


def v_name(module: str) -> str:
    return f"{module}.{V_SUFFIX}"


def weight_name(module: str) -> str:
    return f"{module}.{WEIGHT_SUFFIX}"


def bias_name(module: str) -> str:
    return f"{module}.{BIAS_SUFFIX}"


def mlp_module(module: str) -> str:
    """The MLP a projection belongs to: `a.3.mlp.down_proj` -> `a.3.mlp` (the key of `widths`)."""
    return module.rpartition(".")[0]


def is_attention_module(module: str) -> bool:
    """True for an attention projection name (`...layers.3.self_attn.q_proj`; format v3)."""
    return families.attention_role_of(module) is not None


def split_factor_name(tensor_name: str) -> Optional[Tuple[str, str]]:
    """`a.b.svd_u` -> (`a.b`, `svd_u`); None for a tensor that is not a factor."""
    module, _, leaf = tensor_name.rpartition(".")
    if leaf in (U_SUFFIX, V_SUFFIX) and module:
        return module, leaf
    return None


# ---------------------------------------------------------------- config
@dataclass
class QuantizationConfig:
    """The parsed `quantization_config` of a checkpoint. `widths` {MLP module:
    k} only in version 2 (written as version 2 exactly when it is not empty)."""

    block_size: int
    ranks: Dict[str, int]
    format_version: int = FORMAT_VERSION
    provenance: Dict[str, Any] = field(default_factory=dict)
    widths: Dict[str, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if any(is_attention_module(m) for m in self.ranks):
            self.format_version = ATTENTION_FORMAT_VERSION
        elif self.widths:
            self.format_version = WIDTHS_FORMAT_VERSION

    def attention_ranks(self) -> Dict[str, int]:
        """{attention projection: rank} of the factored attention projections (format v3)."""
        return {m: r for m, r in self.ranks.items() if is_attention_module(m)}

    def width_of(self, module: str) -> Optional[int]:
        """The intermediate width of an MLP projection's layer, None when full (and
        for attention projections, which widths never narrow)."""
        return None if is_attention_module(module) else self.widths.get(mlp_module(module))

    def to_dict(self) -> Dict[str, Any]:
        out: Dict[str, Any] = {
            KEY_QUANT_METHOD: QUANT_METHOD,
            KEY_FORMAT_VERSION: self.format_version,
            KEY_BLOCK_SIZE: self.block_size,
            KEY_RANKS: dict(self.ranks),
        }
        if self.widths:
            out[KEY_WIDTHS] = dict(self.widths)
        if self.provenance:
            out[KEY_PROVENANCE] = dict(self.provenance)
        return out

    @classmethod
    def from_dict(cls, qc: Mapping[str, Any], source: str = CONFIG_FILE) -> "QuantizationConfig":
        """Parse and check the keys; errors name `source` and the key."""
        if not isinstance(qc, Mapping):
            raise CheckpointFormatError(f"{source}: '{QUANTIZATION_CONFIG_KEY}' must be an object, "
                                        f"got {type(qc).__name__}")
        method = qc.get(KEY_QUANT_METHOD)
        if method != QUANT_METHOD:
            raise CheckpointFormatError(
                f"{source}: {QUANTIZATION_CONFIG_KEY}.{KEY_QUANT_METHOD} is {method!r}, expected {QUANT_METHOD!r}")
        version = qc.get(KEY_FORMAT_VERSION)
        if version not in SUPPORTED_FORMAT_VERSIONS:
            raise CheckpointFormatError(
                f"{source}: {QUANTIZATION_CONFIG_KEY}.{KEY_FORMAT_VERSION} is {version!r}; this version of "
                f"vllm-neuronmlp reads format versions {list(SUPPORTED_FORMAT_VERSIONS)}")
        block = qc.get(KEY_BLOCK_SIZE)
        if not isinstance(block, int) or isinstance(block, bool) or block <= 0:
            raise CheckpointFormatError(
                f"{source}: {QUANTIZATION_CONFIG_KEY}.{KEY_BLOCK_SIZE} is {block!r}, expected a positive integer")
        ranks = qc.get(KEY_RANKS)
        if not isinstance(ranks, Mapping):
            raise CheckpointFormatError(
                f"{source}: {QUANTIZATION_CONFIG_KEY}.{KEY_RANKS} is missing or not an object "
                f"(expected {{module name: rank}})")
        _check_block_multiples(source, KEY_RANKS, ranks, block)
        for module in ranks:
            other = families.gate_up_partner(module)
            if other is not None and other not in ranks:
                raise CheckpointFormatError(
                    f"{source}: {module} is factored but {other} is not; the gate and up projections of one "
                    f"layer must be factored together (vLLM merges them into one linear)")
        _check_attention_ranks(source, ranks, version)
        widths = qc.get(KEY_WIDTHS, {})
        if version < WIDTHS_FORMAT_VERSION and KEY_WIDTHS in qc:
            raise CheckpointFormatError(
                f"{source}: {QUANTIZATION_CONFIG_KEY}.{KEY_WIDTHS} needs {KEY_FORMAT_VERSION} "
                f"{WIDTHS_FORMAT_VERSION}, the config says {version}")
        if not isinstance(widths, Mapping):
            raise CheckpointFormatError(
                f"{source}: {QUANTIZATION_CONFIG_KEY}.{KEY_WIDTHS} is not an object (expected {{MLP module: width}})")
        _check_block_multiples(source, KEY_WIDTHS, widths, block)
        provenance = {k: v for k, v in qc.items()
                      if k not in (KEY_QUANT_METHOD, KEY_FORMAT_VERSION, KEY_BLOCK_SIZE, KEY_RANKS, KEY_WIDTHS)}
        if KEY_PROVENANCE in provenance and isinstance(provenance[KEY_PROVENANCE], Mapping):
            provenance = {**{k: v for k, v in provenance.items() if k != KEY_PROVENANCE},
                          **provenance[KEY_PROVENANCE]}
        return cls(block_size=block, ranks={str(k): int(v) for k, v in ranks.items()},
                   format_version=version, provenance=provenance, widths={str(k): int(v) for k, v in widths.items()})


def _check_block_multiples(source: str, key: str, values: Mapping[str, Any], block: int) -> None:
    """Every value of `quantization_config[key]` (ranks, widths) is a positive multiple of the block size."""
    for module, value in values.items():
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0 or value % block:
            raise CheckpointFormatError(
                f"{source}: {QUANTIZATION_CONFIG_KEY}.{key}[{module!r}] is {value!r}, expected a "
                f"positive multiple of block_size {block}")


def _check_attention_ranks(source: str, ranks: Mapping[str, Any], version: Any) -> None:
    """Attention projections in `ranks` need format v3, and q, k, v of one layer are listed together."""
    attention = sorted(m for m in ranks if is_attention_module(m))
    if attention and version < ATTENTION_FORMAT_VERSION:
        raise CheckpointFormatError(
            f"{source}: {QUANTIZATION_CONFIG_KEY}.{KEY_RANKS} lists the attention projection {attention[0]}, which "
            f"needs {KEY_FORMAT_VERSION} {ATTENTION_FORMAT_VERSION}; the config says {version}")
    for module in attention:
        missing = [p for p in families.qkv_partners(module) if p not in ranks]
        if missing:
            raise CheckpointFormatError(
                f"{source}: {QUANTIZATION_CONFIG_KEY}.{KEY_RANKS} factors {module} but not {' and '.join(missing)}; "
                f"the q, k and v projections of one layer must be factored together (vLLM merges them into "
                f"one linear, qkv_proj)")


def narrowed_dense_modules(quant: QuantizationConfig, model_config: Mapping[str, Any]) -> List[str]:
    """The projections of narrowed layers (format v2 `widths`) stored dense: every
    projection of an MLP in `widths` that is not in `ranks`, by MLP, then gate, up, down."""
    projections = families.family_for_config(model_config).projections
    return [f"{mlp}.{proj}" for mlp in sorted(quant.widths) for proj in projections
            if f"{mlp}.{proj}" not in quant.ranks]


def has_svd_config(config: Mapping[str, Any]) -> bool:
    qc = config.get(QUANTIZATION_CONFIG_KEY)
    return isinstance(qc, Mapping) and qc.get(KEY_QUANT_METHOD) == QUANT_METHOD


def read_config(checkpoint_dir: str) -> Dict[str, Any]:
    path = os.path.join(checkpoint_dir, CONFIG_FILE)
    if not os.path.isfile(path):
        raise CheckpointFormatError(f"{path}: not found (a checkpoint directory needs {CONFIG_FILE})")
    try:
        with open(path) as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise CheckpointFormatError(f"{path}: not valid JSON ({e})") from None


def read_quantization_config(checkpoint_dir: str) -> QuantizationConfig:
    config = read_config(checkpoint_dir)
    path = os.path.join(checkpoint_dir, CONFIG_FILE)
    if QUANTIZATION_CONFIG_KEY not in config:
        raise CheckpointFormatError(f"{path}: has no '{QUANTIZATION_CONFIG_KEY}'; it is not an {QUANT_METHOD} "
                                    f"checkpoint")
    return QuantizationConfig.from_dict(config[QUANTIZATION_CONFIG_KEY], source=path)


def expected_shape(model_config: Mapping[str, Any], module: str, width: Optional[int] = None) -> Tuple[int, int]:
    """(in_features, out_features) of an MLP or (format v3) attention projection, from
    the model's config; `width` (format v2) replaces intermediate_size for an MLP
    projection's layer."""
    text = model_config.get("text_config", model_config)
    if is_attention_module(module):
        return _attention_shape(text, module)
    role = families.role_of(module)
    if role is None:
        raise CheckpointFormatError(
            f"{module}: not an MLP projection ({', '.join(families.all_projection_names())}) or an attention "
            f"projection (q/k/v/o under self_attn); the format factors only those")
    in_key, out_key = _ROLE_SHAPE_KEYS[role]
    shape = _config_int(text, in_key, module), _config_int(text, out_key, module)
    if width is None:
        return shape
    return (width, shape[1]) if in_key == "intermediate_size" else (shape[0], width)


def _config_int(text: Mapping[str, Any], key: str, module: str) -> int:
    try:
        return int(text[key])
    except KeyError:
        raise CheckpointFormatError(f"{CONFIG_FILE}: missing {key!r}, needed for the shape of {module}") from None


def head_dim(model_config: Mapping[str, Any]) -> int:
    """The attention head size: the config's `head_dim` when set, else hidden_size / num_attention_heads."""
    text = model_config.get("text_config", model_config)
    explicit = text.get(KEY_HEAD_DIM)
    if explicit:
        return int(explicit)
    return _config_int(text, KEY_HIDDEN, "the attention") // _config_int(text, KEY_HEADS, "the attention")


def _attention_shape(text: Mapping[str, Any], module: str) -> Tuple[int, int]:
    hidden, heads = _config_int(text, KEY_HIDDEN, module), _config_int(text, KEY_HEADS, module)
    kv_heads = int(text.get(KEY_KV_HEADS) or heads)  # absent: multi-head attention
    q_out, kv_out = heads * head_dim(text), kv_heads * head_dim(text)
    role = families.attention_role_of(module)
    if role == families.Q:
        return hidden, q_out
    if role == families.O:
        return q_out, hidden
    return hidden, kv_out


def _shape_origin(model_config: Mapping[str, Any], module: str) -> str:
    """How expected_shape derived a projection's shape, for error messages."""
    if not is_attention_module(module):
        return ""
    text = model_config.get("text_config", model_config)
    role = families.attention_role_of(module)
    heads_key = KEY_KV_HEADS if role in (families.K, families.V) and text.get(KEY_KV_HEADS) else KEY_HEADS
    return f", {heads_key} {int(text[heads_key])} x head_dim {head_dim(text)}"


def check_tensor_parallel(quant: QuantizationConfig, tp_size: int, source: str = CONFIG_FILE) -> None:
    """Each rank holds width / tp channels of a narrowed layer (column-parallel
    gate/up, row-parallel down): every width must divide evenly."""
    for module, width in sorted(quant.widths.items()):
        tp_part(width, tp_size, f"{source}: {QUANTIZATION_CONFIG_KEY}.{KEY_WIDTHS}[{module!r}]")


# ---------------------------------------------------------------- shapes and tensor-parallel shards
# The one home of this arithmetic: the vLLM linear method (linear_method.py) and the
# Trainium MLP (neuron/) call it. A column-parallel projection (gate, up, q, k, v) splits
# its outputs over the ranks, a row-parallel one (down, o) its inputs (partial sums reduced
# by the caller). For the checkpoint's tensors (HF layout) that means:
#
#     column parallel   weight [out, in] rows split    U [in, r] whole       V [r, out] columns split
#     row parallel      weight [out, in] columns split U [in, r] rows split  V [r, out] whole
#
# so sum_k (x_k U_k) V = x U V over the row-parallel ranks is exact.
COLUMN_PARALLEL = "column"
ROW_PARALLEL = "row"


def parallelism(role: str) -> str:
    """COLUMN_PARALLEL or ROW_PARALLEL for a projection role (mlp_families' MLP or attention roles)."""
    return ROW_PARALLEL if role in (families.DOWN, families.O) else COLUMN_PARALLEL


def split_dim(parallel: str, leaf: str) -> Optional[int]:
    """The dimension of a checkpoint tensor (`leaf`: WEIGHT_SUFFIX, U_SUFFIX or
    V_SUFFIX) that the ranks of a `parallel` projection split; None when every
    rank holds it whole (the table above)."""
    if leaf == WEIGHT_SUFFIX:
        return 0 if parallel == COLUMN_PARALLEL else 1
    if leaf == U_SUFFIX:
        return 0 if parallel == ROW_PARALLEL else None
    return 1 if parallel == COLUMN_PARALLEL else None


def tp_part(size: int, tp_size: int, what: str, error: type = TensorParallelError) -> int:
    """size / tp_size, each rank's part of a dimension split over `tp_size`
    ranks; `error` (a TensorParallelError) naming `what` and the degrees that
    would divide it when tp_size does not."""
    if tp_size < 1:
        raise error(f"{what}: tensor-parallel degree must be >= 1, got {tp_size}")
    if size % tp_size:
        divisors = [d for d in range(1, min(size, 64) + 1) if size % d == 0]
        raise error(f"{what} is {size}, which does not split over tensor parallel size {tp_size}; tensor "
                    f"parallel sizes that divide it (up to 64): {divisors}")
    return size // tp_size


def tp_slice(size: int, tp_rank: int, tp_size: int) -> Tuple[int, int]:
    """(first index, length) of rank `tp_rank`'s part of a dimension of `size`
    split evenly over `tp_size` ranks (tp_part checks that it divides)."""
    part = size // tp_size
    return tp_rank * part, part


def projection_shape(role: str, hidden: int, intermediate: int) -> Tuple[int, int]:
    """(in_features, out_features) of an MLP projection role at `intermediate`
    channels (a narrowed layer's width, format v2, or the config's)."""
    sizes = {"hidden_size": hidden, "intermediate_size": intermediate}
    in_key, out_key = _ROLE_SHAPE_KEYS[role]
    return sizes[in_key], sizes[out_key]


def leaf_shape(in_features: int, out_features: int, leaf: str, rank: Optional[int] = None) -> Tuple[int, int]:
    """Shape of a projection's checkpoint tensor: weight [out, in], U [in, r], V [r, out]."""
    if leaf == WEIGHT_SUFFIX:
        return out_features, in_features
    u, v = factor_shapes(in_features, out_features, rank)
    return u if leaf == U_SUFFIX else v


def mlp_params(hidden: int, intermediate: int) -> int:
    """Parameters of one dense gated MLP: its projections (mlp_families.ROLES), each hidden x intermediate."""
    return len(families.ROLES) * hidden * intermediate


def factor_shapes(in_features: int, out_features: int, rank: int) -> Tuple[Tuple[int, int], Tuple[int, int]]:
    return (in_features, rank), (rank, out_features)


def dense_params(in_features: int, out_features: int) -> int:
    return in_features * out_features


def factored_params(in_features: int, out_features: int, rank: int) -> int:
    return rank * (in_features + out_features)


# ---------------------------------------------------------------- safetensors files
def safetensors_files(checkpoint_dir: str) -> Dict[str, str]:
    """tensor name -> file path (relative names resolved), from the index or the
    single file. Reads headers only."""
    index_path = os.path.join(checkpoint_dir, SAFETENSORS_INDEX_FILE)
    if os.path.isfile(index_path):
        try:
            with open(index_path) as f:
                weight_map = json.load(f)["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise CheckpointFormatError(f"{index_path}: not a valid safetensors index ({e!r})") from None
        out = {}
        for name, fname in weight_map.items():
            path = os.path.join(checkpoint_dir, fname)
            if not os.path.isfile(path):
                raise CheckpointFormatError(f"{index_path}: tensor {name} is mapped to {fname}, which does not exist")
            out[name] = path
        return out
    single = os.path.join(checkpoint_dir, SAFETENSORS_SINGLE_FILE)
    if os.path.isfile(single):
        return {name: single for name in read_safetensors_header(single)}
    raise CheckpointFormatError(
        f"{checkpoint_dir}: no {SAFETENSORS_SINGLE_FILE} or {SAFETENSORS_INDEX_FILE} found")


def read_safetensors_header(path: str) -> Dict[str, Dict[str, Any]]:
    """name -> {"dtype", "shape", "data_offsets"}; a clear error for a corrupt file."""
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            raw = f.read(8)
            if len(raw) < 8:
                raise ValueError("file shorter than the 8-byte header length")
            (n,) = struct.unpack("<Q", raw)
            if n <= 0 or 8 + n > size:
                raise ValueError(f"header length {n} does not fit in a file of {size} bytes")
            header = json.loads(f.read(n))
    except (OSError, ValueError, UnicodeDecodeError) as e:
        raise CheckpointFormatError(f"{path}: not a readable safetensors file ({e})") from None
    header.pop("__metadata__", None)
    for name, info in header.items():
        end = info.get("data_offsets", [0, 0])[1]
        if 8 + n + end > size:
            raise CheckpointFormatError(f"{path}: tensor {name} runs past the end of the file (truncated?)")
    return header


# ---------------------------------------------------------------- validation
@dataclass
class ValidationReport:
    checkpoint_dir: str
    quant: QuantizationConfig
    model_config: Dict[str, Any]
    factored: Dict[str, Tuple[int, int, int]]  # module -> (in, out, rank)
    tensor_bytes: int

    @property
    def mlp_factored(self) -> Dict[str, Tuple[int, int, int]]:
        """The factored MLP projections of `factored`."""
        return {m: s for m, s in self.factored.items() if not is_attention_module(m)}

    @property
    def attention_factored(self) -> Dict[str, Tuple[int, int, int]]:
        """The factored attention projections of `factored` (format v3)."""
        return {m: s for m, s in self.factored.items() if is_attention_module(m)}

    @property
    def mlp_dense_params(self) -> int:
        """Parameters the factored MLP projections would have dense."""
        return sum(dense_params(i, o) for i, o, _ in self.mlp_factored.values())

    @property
    def mlp_factored_params(self) -> int:
        return sum(factored_params(i, o, r) for i, o, r in self.mlp_factored.values())

    @property
    def attention_dense_params(self) -> int:
        """Parameters the factored attention projections would have dense."""
        return sum(dense_params(i, o) for i, o, _ in self.attention_factored.values())

    @property
    def attention_factored_params(self) -> int:
        return sum(factored_params(i, o, r) for i, o, r in self.attention_factored.values())


def validate(checkpoint_dir: str, check_values: bool = True) -> ValidationReport:
    """Check a checkpoint against the format (versions 1 to 3) and return what it holds.

    Checks: a known `format_version`; every module in `ranks` (MLP projections, and
    in version 3 attention projections) has both factors, with shapes `[in, r]` and
    `[r, out]` matching the model config (and a `.bias`, if any, of `[out]`); ranks
    are positive multiples of `block_size`; no `.weight` remains for a factored
    module; gate and up, and q, k and v, are factored together; (version 2) narrowed
    layers have the narrowed shapes; (with `check_values`) every factor is finite.
    Raises CheckpointFormatError naming the file and tensor.
    """
    config_path = os.path.join(checkpoint_dir, CONFIG_FILE)
    model_config = read_config(checkpoint_dir)
    quant = read_quantization_config(checkpoint_dir)
    files = safetensors_files(checkpoint_dir)
    headers: Dict[str, Dict[str, Dict[str, Any]]] = {}
    for path in set(files.values()):
        headers[path] = read_safetensors_header(path)

    def header_of(name: str) -> Dict[str, Any]:
        return headers[files[name]][name]

    text = model_config.get("text_config", model_config)
    for mlp, width in sorted(quant.widths.items()):
        full = int(text.get("intermediate_size", 0))
        if not width < full:
            raise CheckpointFormatError(
                f"{config_path}: {QUANTIZATION_CONFIG_KEY}.{KEY_WIDTHS}[{mlp!r}] is {width}, expected less than "
                f"intermediate_size {full} (full-width layers are not listed)")
    for module in narrowed_dense_modules(quant, model_config):  # factored ones are checked below
        mlp, width = mlp_module(module), quant.width_of(module)
        name = weight_name(module)
        if name not in files:
            raise CheckpointFormatError(
                f"{checkpoint_dir}: tensor {name} is missing; {mlp} is listed in "
                f"{QUANTIZATION_CONFIG_KEY}.{KEY_WIDTHS} but {module} is neither dense nor factored")
        n_in, n_out = expected_shape(model_config, module, width)
        got = list(header_of(name)["shape"])
        if got != [n_out, n_in]:
            raise CheckpointFormatError(
                f"{files[name]}: tensor {name} has shape {got}, expected {[n_out, n_in]} "
                f"(width {width} of {mlp} from {config_path})")

    factored: Dict[str, Tuple[int, int, int]] = {}
    for module, rank in sorted(quant.ranks.items()):
        n_in, n_out = expected_shape(model_config, module, quant.width_of(module))
        want_u, want_v = factor_shapes(n_in, n_out, rank)
        for name, want in ((u_name(module), want_u), (v_name(module), want_v)):
            if name not in files:
                raise CheckpointFormatError(
                    f"{checkpoint_dir}: tensor {name} is missing; {module} is listed in "
                    f"{QUANTIZATION_CONFIG_KEY}.{KEY_RANKS} with rank {rank}, so it needs {name} of shape {list(want)}")
            got = list(header_of(name)["shape"])
            if got != list(want):
                raise CheckpointFormatError(
                    f"{files[name]}: tensor {name} has shape {got}, expected {list(want)} "
                    f"(in_features={n_in}, rank={rank}, out_features={n_out} from {config_path}"
                    f"{', width of ' + mlp_module(module) if quant.width_of(module) else ''}"
                    f"{_shape_origin(model_config, module)})")
        bias = bias_name(module)
        if bias in files and list(header_of(bias)["shape"]) != [n_out]:
            raise CheckpointFormatError(
                f"{files[bias]}: tensor {bias} has shape {list(header_of(bias)['shape'])}, expected {[n_out]} "
                f"(the dense bias beside the factors of {module}, out_features={n_out} from {config_path})")
        if weight_name(module) in files:
            raise CheckpointFormatError(
                f"{files[weight_name(module)]}: tensor {weight_name(module)} is present although {module} is factored; "
                f"a factored module must have no .weight")
        factored[module] = (n_in, n_out, rank)

    for name in files:
        split = split_factor_name(name)
        if split and split[0] not in quant.ranks:
            raise CheckpointFormatError(
                f"{files[name]}: tensor {name} is a factor of {split[0]}, which is not listed in "
                f"{config_path} {QUANTIZATION_CONFIG_KEY}.{KEY_RANKS}")

    if check_values:
        _check_finite(files, [n for m in factored for n in (u_name(m), v_name(m))])

    total = 0
    for path, header in headers.items():
        for info in header.values():
            a, b = info["data_offsets"]
            total += b - a
    return ValidationReport(checkpoint_dir, quant, model_config, factored, total)


def _check_finite(files: Mapping[str, str], names: Iterable[str]) -> None:
    import torch  # lazy: keeps this module importable anywhere
    from safetensors import safe_open

    by_file: Dict[str, List[str]] = {}
    for name in names:
        by_file.setdefault(files[name], []).append(name)
    for path, group in by_file.items():
        with safe_open(path, framework="pt") as f:
            for name in group:
                t = f.get_tensor(name)
                if not torch.isfinite(t).all():
                    bad = int((~torch.isfinite(t)).sum())
                    raise CheckpointFormatError(f"{path}: tensor {name} has {bad} non-finite values (NaN or Inf)")


def mlp_ratio(model_config: Mapping[str, Any], ranks: Mapping[str, int], num_layers: Optional[int] = None,
              widths: Optional[Mapping[str, int]] = None) -> float:
    """Fraction of all MLP projection parameters removed (paper eq. 4); modules
    left dense count as kept whole, at their layer's width (format v2 `widths`).
    Factored attention projections in `ranks` (format v3) are not MLP parameters
    and are left out."""
    text = model_config.get("text_config", model_config)
    layers = int(num_layers if num_layers is not None else text["num_hidden_layers"])
    h, i = int(text["hidden_size"]), int(text["intermediate_size"])
    dense = mlp_params(h, i) * layers
    widths = widths or {}
    removed = sum(mlp_params(h, i - k) for k in widths.values())  # narrowing, as if the layer stayed dense
    for m, r in ranks.items():
        if is_attention_module(m):
            continue
        shape = expected_shape(model_config, m, widths.get(mlp_module(m)))
        removed += dense_params(*shape) - factored_params(*shape, r)
    return removed / dense
