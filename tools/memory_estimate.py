"""How much memory a `compress` run will need, said before any work starts.

The passes stream the model one decoder layer at a time, so the peak is set by
one stage of one layer. For each stage the estimate adds what is alive at its
worst moment, from the model config and the options alone:

- the layer's weights in float32 (materialized from the source's tensors);
- the hidden states of the calibration windows (float32, tokens x hidden) and,
  in the Fisher pass, their gradient;
- one chunk of activations (streaming.CHUNK_TOKENS tokens): without autograd
  in the forward passes, with it in the Fisher pass's backward;
- the float64 Gram matrices of the targeted projections' inputs (hidden^2 and
  intermediate^2 entries; with --scope all also the attention's, hidden^2 and
  (heads x head_dim)^2), their Cholesky factors and the whitened targets of the
  spectra;
- the channel order and loss curve of methods/nystrom.py (float64 work arrays
  of intermediate^2 and intermediate x hidden entries);
- the LM head in float32 and one window's logits (the Fisher pass's top);
- the process itself (Python, torch, transformers): BASE_BYTES.

With `--device cuda` the same stages are split between the GPU (layer,
activations, Grams, factorizations) and the host (the process, the tensors
read from the source before they move, the writer's buffer).

`check` refuses a run whose estimated peak exceeds the memory available
(the cgroup limit or MemAvailable, or `--memory-limit`), naming the stage
and the options that lower it. The constants below were fitted to the peaks
measured by benchmarks/compress_scale.py (the test compares the estimate with
those measurements).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Dict, List, Optional, Tuple

from vllm_neuronmlp.tools.errors import UserError
from vllm_neuronmlp.tools.progress import proc_status_bytes

GIB = 1024 ** 3
BASE_BYTES = int(0.6 * GIB)  # Python + torch + transformers + the skeleton on the meta device
# float32 activations per token of one chunk, in units of (intermediate, hidden) entries
FORWARD_ACTIVATIONS = (3, 8)   # no autograd: gate, up, their product; q/k/v/attention/residual
BACKWARD_ACTIVATIONS = (9, 20)  # autograd keeps the MLP's and attention's intermediates and their gradients
ORDER_WORK_I2 = 4              # float64 I x I arrays alive in the channel order / loss curve (with C itself)
ORDER_WORK_IH = 3              # float64 I x H arrays alive there


class MemoryBudgetError(UserError):
    """The estimated peak memory of a run exceeds what is available."""


@dataclass
class Estimate:
    stages: Dict[str, int]             # bytes at the worst moment of each stage (host + device on CPU runs)
    device_stages: Dict[str, int]      # the GPU's share with --device cuda, else empty
    peak_stage: str
    peak_bytes: int                    # host peak
    device_peak_bytes: int = 0
    device: str = "cpu"
    inputs: Dict[str, int] = field(default_factory=dict)  # what it was computed from
    disk_bytes: Dict[str, int] = field(default_factory=dict)  # resume state and output on disk

    def to_dict(self) -> Dict:
        return asdict(self)


@dataclass
class ModelShape:
    """What the estimate needs to know of a model."""

    hidden: int
    intermediate: int
    layers: int
    vocab: int
    heads: int
    kv_heads: int
    head_dim: int
    layer_params: int          # parameters of one decoder layer (all its tensors)
    source_bytes_per_param: int  # 2 for a bf16 checkpoint
    source_bytes: int          # all tensors of the source


def model_shape(sk, src) -> ModelShape:
    cfg = sk.config
    heads = int(getattr(cfg, "num_attention_heads"))
    down = f"{sk.layer_prefix}.0.mlp.{sk.attr('down')}.weight"
    return ModelShape(hidden=sk.hidden, intermediate=sk.intermediate, layers=sk.num_layers, vocab=int(cfg.vocab_size),
                      heads=heads, kv_heads=int(getattr(cfg, "num_key_value_heads", None) or heads),
                      head_dim=int(getattr(cfg, "head_dim", None) or sk.hidden // heads),
                      layer_params=sum(src.numel(n) for n in src.with_prefix(f"{sk.layer_prefix}.0.")),
                      source_bytes_per_param=max(1, src.nbytes(down) // max(1, src.numel(down))),
                      source_bytes=int(src.nbytes()))


def estimate(shp: ModelShape, opts, method_name: str, device: str = "cpu", attention: bool = False) -> Estimate:
    """The memory a run of the registered method `method_name` with `opts` needs
    on a model of shape `shp` (see the module docstring), from the stages its
    `capabilities.memory` declare; `attention` when --scope all targets the
    attention projections too. Stage names are those of the run's StageMeter."""
    from vllm_neuronmlp.tools import methods

    caps = methods.get(method_name).capabilities
    terms, needs_calibration = caps.memory, caps.needs_calibration
    h, i_, n_layers, vocab = shp.hidden, shp.intermediate, shp.layers, shp.vocab
    p_layer, b_src = shp.layer_params, shp.source_bytes_per_param
    seq = opts.calib_seq_len
    n_calib = opts.calib_samples * seq if needs_calibration else 0
    n_fisher = min(opts.fisher_samples, opts.calib_samples) * seq
    chunk = max(1, 4096 // seq) * seq
    layer = 4 * p_layer
    grams = 8 * (h * h + i_ * i_)
    if attention:  # the attention inputs' Grams (q/k/v share one; o reads heads x head_dim)
        grams += 8 * (h * h + (shp.heads * shp.head_dim) ** 2)
    fwd_act = 4 * chunk * (FORWARD_ACTIVATIONS[0] * i_ + FORWARD_ACTIVATIONS[1] * h)
    bwd_act = 4 * chunk * (BACKWARD_ACTIVATIONS[0] * i_ + BACKWARD_ACTIVATIONS[1] * h)
    head = 4 * vocab * h + b_src * vocab * h + 3 * 4 * seq * vocab
    embed = b_src * vocab * h
    spectra = grams + 8 * (h * h + 2 * i_ * i_) + 2 * 8 * i_ * h  # Grams, factors, Cholesky work copy, targets
    order = 8 * (ORDER_WORK_I2 * i_ * i_ + ORDER_WORK_IH * i_ * h)
    writer = 2 * p_layer  # one layer's output tensors, buffered until the layer's shard is flushed
    factor_work = 8 * (2 * i_ * i_ + 3 * i_ * h)  # Nystrom refit / whitened targets of one projection

    dev: Dict[str, int] = {}
    with_spectra = opts.rank_allocation in terms.spectra_allocations
    if terms.fisher_pass:
        x_f = 4 * n_fisher * h
        dev["fisher_forward"] = max(layer + x_f + fwd_act, head + 2 * x_f)  # the layers, then the LM head
        dev["fisher_backward"] = layer + 2 * x_f + bwd_act + grams
        if with_spectra:
            dev["spectra"] = layer + x_f + spectra
        if terms.channel_order:
            dev["channel_order"] = layer + x_f + order + grams
    elif needs_calibration and with_spectra:
        dev["spectra"] = layer + 4 * n_calib * h + fwd_act + spectra
    x_c = 4 * n_calib * h * terms.hidden_streams
    dev["factor_pass"] = layer + x_c + fwd_act + grams + factor_work
    host_only = {"calibration": embed + 4 * max(n_calib, n_fisher) * h}

    if device.startswith("cuda"):
        transient = b_src * p_layer + writer  # a layer's source tensors before they move; the writer's buffer
        stages = {**host_only, **{k: transient + 4 * max(n_calib, n_fisher) * h for k in dev}}
        device_stages = dev
    else:
        stages = {**host_only, **{k: v + (writer if k == "factor_pass" else 0) for k, v in dev.items()}}
        device_stages = {}
    stages = {k: BASE_BYTES + v for k, v in stages.items()}
    peak_stage = max(stages, key=stages.get)
    disk = {"fisher_inputs": 4 * n_fisher * h * (n_layers + 1) if terms.fisher_pass else 0,
            "layers": shp.source_bytes}
    return Estimate(stages=stages, device_stages=device_stages, peak_stage=peak_stage, peak_bytes=stages[peak_stage],
                    device_peak_bytes=max(device_stages.values(), default=0), device=device,
                    inputs={**asdict(shp), "calibration_tokens": n_calib, "fisher_tokens": n_fisher,
                            "chunk_tokens": chunk},
                    disk_bytes=disk)


# ---------------------------------------------------------------- what is available
def available_memory(limit_gib: Optional[float] = None) -> Tuple[int, str]:
    """(bytes this process may still use, where that figure comes from): the
    explicit limit, else the tighter of the cgroup's limit and MemAvailable,
    both counting what this process already holds."""
    if limit_gib is not None:
        return int(limit_gib * GIB), f"--memory-limit {limit_gib:g}"
    own = _own_rss()
    candidates: List[Tuple[int, str]] = []
    mem_available = _meminfo("MemAvailable")
    if mem_available is not None:
        candidates.append((mem_available + own, "MemAvailable"))
    cg = _cgroup_headroom()
    if cg is not None:
        candidates.append((cg + own, "the cgroup memory limit"))
    if not candidates:
        return 1 << 62, "unknown (no /proc/meminfo)"
    return min(candidates)


def _meminfo(key: str) -> Optional[int]:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def _own_rss() -> int:
    return proc_status_bytes("VmRSS")


def _cgroup_headroom() -> Optional[int]:
    """limit - usage of this process's cgroup (v2, or v1's memory controller), None without a limit."""
    for limit_path, usage_path in (("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
                                   ("/sys/fs/cgroup/memory/memory.limit_in_bytes",
                                    "/sys/fs/cgroup/memory/memory.usage_in_bytes")):
        try:
            with open(limit_path) as f:
                raw = f.read().strip()
            if raw == "max":
                return None
            limit = int(raw)
            if limit >= 1 << 60:  # v1's "no limit"
                return None
            with open(usage_path) as f:
                usage = int(f.read().strip())
            return max(0, limit - usage)
        except (OSError, ValueError):
            continue
    return None


def _device_available() -> Tuple[int, str]:
    import torch

    free, _total = torch.cuda.mem_get_info()
    return int(free), f"free memory of {torch.cuda.get_device_name()}"


# ---------------------------------------------------------------- the check
LOWER_IT = {
    "calibration": "--calib-samples / --calib-seq-len (the calibration hidden states)",
    "fisher_forward": "--fisher-samples (the hidden states and their gradient; the LM head's logits)",
    "fisher_backward": "--fisher-samples (hidden states, their gradient); --device cuda",
    "spectra": "--device cuda (float64 Gram matrices of the layer's projection inputs)",
    "channel_order": "--device cuda (float64 intermediate x intermediate work arrays); --method fisher has none",
    "factor_pass": "--calib-samples / --calib-seq-len (its hidden states); --device cuda",
}


def check(est: Estimate, opts) -> None:
    """MemoryBudgetError when the estimate does not fit (unless the check is off)."""
    if not opts.memory_check:
        return
    limit, where = available_memory(opts.memory_limit_gib)
    if est.peak_bytes > limit:
        raise MemoryBudgetError(
            f"estimated peak memory {est.peak_bytes / GIB:.1f} GiB (stage '{est.peak_stage}') exceeds the "
            f"{limit / GIB:.1f} GiB available ({where}); lower it with {LOWER_IT[est.peak_stage]}, or pass "
            f"--skip-memory-check to run anyway (`compress --dry-run` prints every stage)")
    if est.device_stages:
        free, where = _device_available()
        if est.device_peak_bytes > free:
            stage = max(est.device_stages, key=est.device_stages.get)
            raise MemoryBudgetError(
                f"estimated GPU memory {est.device_peak_bytes / GIB:.1f} GiB (stage '{stage}') exceeds the "
                f"{free / GIB:.1f} GiB {where}; lower it with {LOWER_IT[stage]} (or --device cpu), or pass "
                f"--skip-memory-check")


def planned_work(sk, opts, method, out_path: str) -> List[str]:
    """The dry run's description of what a run would do."""
    from vllm_neuronmlp.tools.run_state import state_dir_for

    seq = opts.calib_seq_len
    scope = "every decoder linear's parameters" if opts.scope == "all" else "the MLP parameters"
    lines = [f"model: {sk.num_layers} decoder layers, hidden {sk.hidden}, intermediate {sk.intermediate}, "
             f"vocab {sk.config.vocab_size} ({sk.family.name} family); computing on {sk.device}",
             f"method {method.name}, ratio {opts.ratio} of {scope}, block size {opts.block_size}"]
    caps = method.capabilities
    if caps.needs_calibration:
        lines.append(f"calibration: {opts.calib_samples} windows x {seq} tokens of {', '.join(opts.calib_text)}")
    if caps.memory.fisher_pass:
        k = min(opts.fisher_samples, opts.calib_samples)
        lines.append(f"pass 1, Fisher: forward over {k} windows storing each layer's input on disk, then backward "
                     f"layer by layer from the top" + (" with the channel order of every layer"
                                                       if caps.memory.channel_order else ""))
    elif caps.needs_calibration and opts.rank_allocation in caps.memory.spectra_allocations:
        lines.append("pass 1: whitened spectra of every projection")
    lines.append("allocation: " + (caps.allocation_summary or opts.rank_allocation))
    lines.append("pass 2, factor: every layer narrowed and/or factored, written as it finishes")
    lines.append(f"resume state: {state_dir_for(out_path)} (kept if the run is interrupted)")
    lines.append(f"output: {out_path}")
    return lines


def format_dry_run(dry) -> str:
    est = dry.estimate
    lines = ["dry run: nothing was written", *("  " + w for w in dry.work), "  estimated peak memory by stage:"]
    for stage, b in est["stages"].items():
        mark = "  <- peak" if stage == est["peak_stage"] else ""
        gpu = f" (GPU {est['device_stages'][stage] / GIB:.2f} GiB)" if stage in est["device_stages"] else ""
        lines.append(f"    {stage:<16} {b / GIB:6.2f} GiB{gpu}{mark}")
    lines.append(f"  available: {dry.available_bytes / GIB:.1f} GiB ({dry.available_from})")
    disk = est["disk_bytes"]
    lines.append(f"  disk: about {(disk['fisher_inputs'] + disk['layers']) / GIB:.1f} GiB beside the output while "
                 f"it runs (stored layer inputs {disk['fisher_inputs'] / GIB:.1f} GiB, layers up to the source's "
                 f"{disk['layers'] / GIB:.1f} GiB)")
    return "\n".join(lines)
