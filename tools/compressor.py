"""SVD compression of the decoder linears of a Hugging Face checkpoint (the MLP
projections, and with --scope all the attention's q/k/v/o; channel-selecting
methods also narrow MLPs), streamed layer by layer: the orchestration
(docs/architecture.md).

1. Read config and tensor headers; build the model skeleton on the `meta`
   device (streaming.py) and find the model's MLP family (mlp_families.py).
2. Calibration windows, drawn at random (seeded) from the tokenized text, and
   their random subsets (calibration.py).
3. The method (methods/, one module each, registered in methods/__init__.py)
   computes its ratio-independent statistics, proposes allocations meeting the
   budget (allocation/) and chooses one.
4. Factor pass: for each decoder layer, materialize it alone (on CPU or the
   GPU, `--device`), let the method factor it, write the layer's tensors,
   drop the layer. Peak memory is one layer plus the calibration activations
   plus the Gram matrices (memory_estimate.py says how much, before any work).
5. Optional LoRA recovery (loads the whole compressed model; lora.py).
6. config.json with `quantization_config` (format v1-v3 + provenance),
   tokenizer and other files copied, and the staging directory renamed to OUT.

Everything expensive is kept in the run's resume state (OUT.resume,
run_state.py) as it is computed, so an interrupted run (SIGINT, SIGTERM,
interrupt.py) continues with `--resume`; a finished run removes it.
"""
from __future__ import annotations

import logging
import os
import shutil
import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Dict, List, Optional, Tuple

import torch

from vllm_neuronmlp import __version__ as TOOL_VERSION
from vllm_neuronmlp import checkpoint_format as cf
from vllm_neuronmlp.tools import allocation as alloc
from vllm_neuronmlp.tools import calibration
from vllm_neuronmlp.tools import memory_estimate
from vllm_neuronmlp.tools import methods
from vllm_neuronmlp.tools import progress as pg
from vllm_neuronmlp.tools import streaming as st
from vllm_neuronmlp.tools.errors import UserError
from vllm_neuronmlp.tools.interrupt import Interrupted, SignalGuard, Terminated
from vllm_neuronmlp.tools.methods.base import Context
from vllm_neuronmlp.tools.options import CompressOptions
from vllm_neuronmlp.tools.run_state import RunState, cache_key, statistics_key
from vllm_neuronmlp.tools.source import SourceCheckpoint
from vllm_neuronmlp.tools.whitening import FactorizationError
from vllm_neuronmlp.tools.writer import ShardWriter, StagingDir, check_output_path, write_json

log = logging.getLogger("vllm_neuronmlp.compress")


@dataclass
class CompressResult:
    out: str
    ranks: Dict[str, int]  # factored modules only
    dense_modules: List[str]
    ratio_requested: float
    ratio_mlp: float  # of the MLP projections' parameters
    ratio_model: float
    params_before: int
    params_after: int
    mlp_params_before: int
    mlp_params_after: int
    bytes_before: int
    bytes_after: int
    wall_time_s: float
    method: str
    allocation: str
    num_layers: int
    calibration: Dict = field(default_factory=dict)
    jitter_modules: List[str] = field(default_factory=list)
    lora: Dict = field(default_factory=dict)
    warnings: List[str] = field(default_factory=list)
    selection: Dict = field(default_factory=dict)
    widths: Dict[int, int] = field(default_factory=dict)  # {layer: intermediate width} of narrowed layers
    intermediate_size: int = 0  # the model's full MLP width
    device: str = "cpu"
    stages: Dict[str, Dict] = field(default_factory=dict)  # wall seconds and peak memory per stage (StageMeter)
    resumed: List[str] = field(default_factory=list)  # what a --resume run took over from the earlier one
    memory_estimate: Dict = field(default_factory=dict)  # memory_estimate.Estimate.to_dict()
    mix: Dict = field(default_factory=dict)  # allocation_mix: what the removed parameters came from
    scope: str = "mlp"  # what --ratio counted: the MLP projections, or every decoder linear ("all")
    ratio_linears: float = 0.0  # of every decoder linear's parameters (q, k, v, o, gate, up, down)
    linear_params_before: int = 0
    linear_params_after: int = 0

    def to_dict(self) -> Dict:
        return asdict(self)


def compress(src_path: str, out_path: str, ratio: float, **kwargs) -> CompressResult:
    """Compress the decoder linears (`scope`) of the dense HF checkpoint `src_path` into `out_path`.

    Keyword arguments are the fields of CompressOptions (options.py). Raises
    UserError or CheckpointFormatError for bad input, Interrupted on SIGINT or
    SIGTERM (its resume state kept); never leaves a partial `out_path`. With
    `dry_run` it returns a DryRun (the estimate and the plan) and writes nothing.
    """
    return compress_with_options(src_path, out_path, CompressOptions(ratio=ratio, **kwargs))


def compress_with_options(src_path: str, out_path: str, opts: CompressOptions,
                          on_layer: Optional[Callable[[int], None]] = None,
                          spectra_cache: Optional[Dict] = None):
    """`compress` with a CompressOptions. `on_layer(i)` is called after layer i
    is written (tests use it to interrupt); `spectra_cache`, a dict shared
    between calls on the same source and calibration, keeps the methods'
    ratio-independent statistics across calls (benchmarks sweep ratios with it)."""
    try:
        return _compress(src_path, out_path, opts, on_layer, spectra_cache)
    except FactorizationError as e:
        raise UserError(str(e)) from None


@dataclass
class DryRun:
    """What `compress --dry-run` reports: the memory estimate and the planned work."""

    estimate: Dict
    work: List[str]
    available_bytes: int
    available_from: str

    def to_dict(self) -> Dict:
        return asdict(self)


def _compress(src_path: str, out_path: str, opts: CompressOptions, on_layer, cache):
    t0 = time.time()
    opts.validate()
    device = opts.resolved_device()
    if not opts.dry_run:
        check_output_path(out_path, opts.overwrite, src_path)
    method = methods.get(opts.method)
    src = SourceCheckpoint(src_path)
    sk = st.build_skeleton(src, device, attention=opts.scope == "all")
    try:  # an impossible ratio is refused before any pass
        method.check_budget(Context(sk, src, opts, None))
    except alloc.BudgetError as e:
        raise UserError(f"--ratio: {e}") from None
    estimate = memory_estimate.estimate(memory_estimate.model_shape(sk, src), opts, method.name, str(sk.device),
                                        sk.targets_attention)
    if opts.dry_run:
        return DryRun(estimate.to_dict(), memory_estimate.planned_work(sk, opts, method, out_path),
                      *memory_estimate.available_memory(opts.memory_limit_gib))
    memory_estimate.check(estimate, opts)
    meter = pg.StageMeter()
    with meter.measure("total"):
        calib = None
        if method.capabilities.needs_calibration or opts.lora_steps > 0:
            with meter.measure("calibration"), pg.stage("calibration: tokenize the text and draw the windows",
                                                           opts.progress):
                calib = calibration.load(src_path, opts.calib_text, opts.calib_samples, opts.calib_seq_len, opts.seed)
        state = RunState.open(out_path, statistics_key(src, opts, method), layers_key(opts), opts.resume)
        for line in state.reused:
            pg.note(f"--resume: reusing {line} from {state.path}", opts.progress)
        ctx = Context(sk, src, opts, calib, state=state, meter=meter)

        def interrupted_message() -> str:
            return (f"interrupted; nothing was written to {out_path}. The work done so far is kept in {state.path}: "
                    f"run the same command with --resume to continue")

        try:
            with SignalGuard(interrupted_message) as guard:
                result = _compress_planned(ctx, method, out_path, cache, on_layer, guard)
        except KeyboardInterrupt as e:
            if _nothing_computed(state):
                state.discard()
                raise Interrupted(f"interrupted before any work was kept; nothing was written to {out_path}",
                                  143 if isinstance(e, Terminated) else 130) from None
            raise Interrupted(interrupted_message(), 143 if isinstance(e, Terminated) else 130) from None
        except BaseException:
            if _nothing_computed(state):
                state.discard()
            else:
                pg.note(f"the work done so far is kept in {state.path} (the same command with --resume continues "
                        f"from it)", True)
            raise
    state.discard()
    result.wall_time_s = time.time() - t0
    result.stages = meter.as_dict()
    result.resumed = list(state.reused)
    result.memory_estimate = estimate.to_dict()
    return result


def _nothing_computed(state: RunState) -> bool:
    return not (state.get("statistics_layers") or state.get("statistics_done") or state.get("layers_done"))


RUN_ONLY_OPTIONS = ("progress", "overwrite", "resume", "dry_run", "device", "memory_check",
                    "memory_limit_gib")


def layers_key(opts: CompressOptions) -> Dict:
    """What the written layers depend on: every option but the ones that only steer the run."""
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(opts).items() if k not in RUN_ONLY_OPTIONS}


@dataclass
class ParamCounts:
    """Parameters before and after compression: the MLP projections, every decoder linear, the whole model."""

    mlp_before: int
    mlp_after: int
    linear_before: int
    linear_after: int
    model_before: int
    model_after: int

    @property
    def ratio_mlp(self) -> float:
        return 1 - self.mlp_after / self.mlp_before

    @property
    def ratio_linears(self) -> float:
        return 1 - self.linear_after / self.linear_before

    @property
    def ratio_model(self) -> float:
        return 1 - self.model_after / self.model_before


def _compress_planned(ctx: Context, method, out_path: str, cache, on_layer, guard: SignalGuard) -> CompressResult:
    """Plan, factor every layer into the resume state, then assemble OUT."""
    sk, src, opts, calib, state = ctx.sk, ctx.src, ctx.opts, ctx.calib, ctx.state
    stats, ranks, selection = _plan_of_every_matrix(ctx, method, cache)
    widths = ctx.widths
    mats = ctx.matrices()
    warnings = _allocation_warnings(sk, mats, ranks, opts, widths)
    out_dtype = _out_dtype(src, sk, opts)
    cast = out_dtype if out_dtype != src.torch_dtype(cf.weight_name(sk.module_names(0)[st.GATE])) else None

    writer = ShardWriter.restore(state.subdir("layers"), opts.max_shard_bytes, state.get("writer"))
    _write_outside_layers(ctx, writer, cast)
    with ctx.meter.measure("factor_pass"):
        factor_pass(ctx, method, stats, ranks, writer, out_dtype, cast, on_layer)

    counts = param_counts(sk, src, mats, ranks, widths)
    mix = allocation_mix(sk, mats, ranks, widths)
    provenance = _provenance(opts, src, counts, selection, mix, calib, writer.total_bytes, out_dtype)
    factored = {n: r for n, r in ranks.items() if r != alloc.DENSE}
    lora_info, bytes_after = _assemble(ctx, out_path, guard, writer, factored, provenance, out_dtype if cast else None)
    src.close()
    return CompressResult(
        out=os.path.abspath(out_path), ranks=factored, dense_modules=sorted(n for n, r in ranks.items()
                                                                            if r == alloc.DENSE),
        ratio_requested=opts.ratio, ratio_mlp=counts.ratio_mlp, ratio_model=counts.ratio_model,
        params_before=counts.model_before, params_after=counts.model_after, mlp_params_before=counts.mlp_before,
        mlp_params_after=counts.mlp_after, bytes_before=src.total_bytes_on_disk(), bytes_after=bytes_after,
        wall_time_s=0.0, method=opts.method, allocation=opts.rank_allocation, num_layers=sk.num_layers,
        calibration=calib.info if calib else {}, jitter_modules=ctx.jitter_modules, lora=lora_info,
        warnings=warnings, selection=selection, widths=dict(widths), intermediate_size=sk.intermediate,
        device=str(sk.device), mix=mix, scope=opts.scope, ratio_linears=counts.ratio_linears,
        linear_params_before=counts.linear_before, linear_params_after=counts.linear_after)


def _plan_of_every_matrix(ctx: Context, method, cache) -> Tuple[object, Dict[str, int], Dict]:
    """(statistics, {module: rank} of every targeted matrix, selection record); a
    narrowing method's widths go to `ctx.widths`. --export dense is refused here,
    before the factor pass, when the plan cannot be written as a dense model."""
    stats, chosen, selection = plan(ctx, method, cache)
    ranks = chosen
    if method.capabilities.narrows:  # its allocation is a Plan: ranks, and the narrowed layers' widths (format v2)
        ctx.widths = dict(chosen.widths)
        ranks = {m.name: chosen.ranks.get(m.name, alloc.DENSE) for m in ctx.matrices()}
    if ctx.opts.export == "dense":
        from vllm_neuronmlp.tools.export import check_exportable

        check_exportable({n: r for n, r in ranks.items() if r != alloc.DENSE}, ctx.widths, ctx.sk.num_layers)
    return stats, ranks, selection


def _write_outside_layers(ctx: Context, writer: ShardWriter, cast: Optional[torch.dtype]) -> None:
    """Copy everything outside the decoder layers (embeddings, final norm, lm_head)
    into the resume state, once."""
    state, src = ctx.state, ctx.src
    if state.get("outside_layers_done"):
        return
    layer_prefix = ctx.sk.layer_prefix + "."
    for name in sorted(n for n in src.names() if not n.startswith(layer_prefix)):
        writer.add(name, _cast(src.get(name), cast))
    writer.flush()
    state.set(writer=writer.state(), outside_layers_done=True)


def param_counts(sk: st.Skeleton, src: SourceCheckpoint, mats: List[alloc.Matrix], ranks: Dict[str, int],
                 widths: Dict[int, int]) -> ParamCounts:
    """Parameters before and after the plan `ranks` / `widths` of the targeted matrices `mats`."""
    mlp = [m for m in mats if not cf.is_attention_module(m.name)]
    linears = alloc.matrices_from_shapes(sk.shapes(st.ROLES + st.ATTENTION_ROLES))
    linear_before, linear_after = sum(m.dense for m in linears), alloc.plan_cost(linears, ranks, widths)
    model_before = sum(src.numel(n) for n in src.names())
    return ParamCounts(mlp_before=sum(m.dense for m in mlp), mlp_after=alloc.plan_cost(mlp, ranks, widths),
                       linear_before=linear_before, linear_after=linear_after, model_before=model_before,
                       model_after=model_before - (linear_before - linear_after))


def _provenance(opts: CompressOptions, src: SourceCheckpoint, counts: ParamCounts, selection: Dict, mix: Dict,
                calib, bytes_after: int, out_dtype: torch.dtype) -> Dict:
    """The `provenance` entry of quantization_config: how the checkpoint was made."""
    return {
        "tool": "vllm-neuronmlp compress",
        "tool_version": TOOL_VERSION,
        "source_model": source_name(src.path),  # the name, not this machine's path
        "ratio_requested": opts.ratio,
        "scope": opts.scope,
        "ratio_achieved_mlp": round(counts.ratio_mlp, 6),
        "ratio_achieved_linears": round(counts.ratio_linears, 6),
        "ratio_achieved_model": round(counts.ratio_model, 6),
        "method": opts.method,
        "rank_allocation": opts.rank_allocation,
        "allocation_selection": selection,
        "allocation_mix": mix,
        "rounding_threshold": opts.rounding_threshold,
        "calibration": calib.info if calib else {},
        "seed": opts.seed,
        "params_before": counts.model_before,
        "params_after": counts.model_after,
        "bytes_before": src.nbytes(),
        "bytes_after": bytes_after,
        "dtype": str(out_dtype).replace("torch.", ""),
    }


def _assemble(ctx: Context, out_path: str, guard: SignalGuard, writer: ShardWriter, factored: Dict[str, int],
              provenance: Dict, cast_to: Optional[torch.dtype]) -> Tuple[Dict, int]:
    """Assemble the checkpoint in a staging directory beside OUT (the layer shards,
    config.json, LoRA recovery, the source's other files), validate it and rename it
    into place; (LoRA record, bytes of its safetensors files)."""
    sk, src, opts, calib = ctx.sk, ctx.src, ctx.opts, ctx.calib
    lora_info: Dict = {}
    with ctx.meter.measure("write"), StagingDir(out_path, opts.overwrite) as stage:
        guard.temporary(stage.path)
        writer.finish(stage.path)
        config = dict(src.config)
        if cast_to is not None:
            for key in ("torch_dtype", "dtype"):
                if key in config or key == "torch_dtype":
                    config[key] = str(cast_to).replace("torch.", "")

        def write_config() -> None:
            qc = cf.QuantizationConfig(block_size=opts.block_size, ranks=factored, provenance=provenance,
                                       widths={cf.mlp_module(sk.module_names(i)[st.DOWN]): k
                                               for i, k in sorted(ctx.widths.items())})
            write_json(os.path.join(stage.path, cf.CONFIG_FILE), {**config, cf.QUANTIZATION_CONFIG_KEY: qc.to_dict()})

        if opts.lora_steps > 0:
            from vllm_neuronmlp.tools import lora

            write_config()
            with ctx.meter.measure("lora"):
                lora_info = lora.recover(stage.path, calib.windows, calib.validation, steps=opts.lora_steps,
                                         rank=opts.lora_rank, lr=opts.lora_lr, batch=opts.lora_batch,
                                         seed=opts.seed, progress=opts.progress, max_shard_bytes=opts.max_shard_bytes)
            provenance["lora"] = lora_info
        write_config()
        for entry in src.other_files():
            shutil.copy2(os.path.join(src.path, entry), os.path.join(stage.path, entry))
        with pg.stage("validate the written checkpoint", opts.progress):
            cf.validate(stage.path, check_values=False)  # never publish a checkpoint that breaks the format
        if opts.export == "dense":
            from vllm_neuronmlp.tools.export import export_dense

            export_dense(stage.path, sk.num_layers)
        bytes_after = sum(os.path.getsize(os.path.join(stage.path, f)) for f in os.listdir(stage.path)
                          if f.endswith(".safetensors"))
        stage.commit()
        guard.forget(stage.path)
    return lora_info, bytes_after


def plan(ctx: Context, method, cache: Optional[Dict]) -> Tuple[object, Dict[str, int], Dict]:
    """(the method's statistics, the chosen ranks, how they were chosen). The
    statistics do not depend on the ratio; `cache` keeps them across calls."""
    opts, state = ctx.opts, ctx.state
    stats = None
    if method.statistics_key(opts) is not None:
        cache = cache if cache is not None else {}
        key = cache_key(statistics_key(ctx.src, opts, method))
        if key not in cache:
            if state is not None and state.get("statistics_done"):
                cache[key] = state.load("statistics", "all.pt")
            else:
                with ctx.meter.measure("statistics"):
                    cache[key] = method.statistics(ctx)
                if state is not None:  # the whole result, then the per-layer pieces are no longer needed
                    state.put(cache[key], "statistics", "all.pt")
                    state.set(statistics_done=True, statistics_layers=[])
                    for name in os.listdir(state.subdir("statistics")):
                        if name != "all.pt":
                            state.remove("statistics", name)
        stats = cache[key]
    with ctx.meter.measure("allocation"):
        try:
            candidates = method.candidates(ctx, stats)
        except alloc.BudgetError as e:
            raise UserError(f"--ratio: {e}") from None
        ranks, selection = method.choose(ctx, stats, candidates)
    return stats, ranks, selection


def factor_pass(ctx: Context, method, stats, ranks: Dict[str, int], writer: ShardWriter, out_dtype: torch.dtype,
                cast: Optional[torch.dtype], on_layer: Optional[Callable[[int], None]] = None) -> None:
    """Factor every layer with the chosen ranks and write its tensors; each
    finished layer is recorded in the run state (with the factorizer's streamed
    hidden states), so a resumed pass starts after the last one."""
    sk, src, state = ctx.sk, ctx.src, ctx.state
    factorizer = method.factorizer(ctx, stats)
    done = list(state.get("layers_done", [])) if state is not None else []
    if done:
        if method.capabilities.streams_state:
            factorizer.restore_stream(state.load("layers", f"stream-{done[-1]:05d}.pt"))
        ctx.jitter_modules[:] = state.get("jitter_modules", [])
    for i in pg.bar(range(len(done), sk.num_layers), ctx.opts.progress, desc=f"factor ({method.name})",
                    unit="layer", total=sk.num_layers, initial=len(done)):
        layer = st.materialize_layer(sk, src, i)
        names = sk.module_names(i)
        todo = {role: ranks[n] for role, n in names.items() if ranks.get(n, alloc.DENSE) != alloc.DENSE}
        drop, add = method.layer_tensors(names, factorizer(i, layer, todo))
        for name in sorted(src.with_prefix(f"{sk.layer_prefix}.{i}.")):
            if name not in drop:
                writer.add(name, _cast(src.get(name), cast))
        for name, t in add.items():
            writer.add(name, t.to(out_dtype))
        st.release_layer(sk, i)
        writer.flush()
        if state is not None:  # the layer's shard and stream first, then the state that lists them
            if method.capabilities.streams_state:
                state.put(factorizer.stream_state(), "layers", f"stream-{i:05d}.pt")
            state.set(layers_done=done + [i], writer=writer.state(), jitter_modules=list(ctx.jitter_modules))
            if done:
                state.remove("layers", f"stream-{done[-1]:05d}.pt")
        done.append(i)
        if on_layer is not None:
            on_layer(i)


def source_name(src_path: str) -> str:
    """What the provenance calls the source: its directory name."""
    return os.path.basename(os.path.normpath(os.path.abspath(src_path)))


def allocation_mix(sk: st.Skeleton, mats: List[alloc.Matrix], ranks: Dict[str, int], widths: Dict[int, int]) -> Dict:
    """How the removed parameters split between narrowing (MLP channels), MLP
    ranks and attention ranks, as fractions of the targeted parameters, in all
    and per layer."""
    dense = sum(m.dense for m in mats)

    def removed(group: List[alloc.Matrix]) -> Dict[str, int]:
        channels = sum(m.dense - alloc.narrowed(m, widths.get(m.layer)).dense for m in group)
        by_rank = {True: 0, False: 0}
        for m in group:
            n = alloc.narrowed(m, widths.get(m.layer))
            by_rank[cf.is_attention_module(m.name)] += n.dense - n.cost(ranks.get(m.name, alloc.DENSE))
        return {"channels": channels, "mlp_ranks": by_rank[False], "attention_ranks": by_rank[True]}

    total = removed(mats)
    per_layer = {}
    for i in range(sk.num_layers):
        r = removed([m for m in mats if m.layer == i])
        per_layer[str(i)] = {"width": widths.get(i, sk.intermediate), **{k: v for k, v in r.items()}}
    return {"layers_narrowed": len(widths), "factored_modules": sum(1 for r in ranks.values() if r != alloc.DENSE),
            "ratio_by_channels": round(total["channels"] / dense, 6),
            "ratio_by_ranks": round((total["mlp_ranks"] + total["attention_ranks"]) / dense, 6),
            "ratio_by_mlp_ranks": round(total["mlp_ranks"] / dense, 6),
            "ratio_by_attention_ranks": round(total["attention_ranks"] / dense, 6),
            "widths": {str(i): k for i, k in sorted(widths.items())}, "intermediate_size": sk.intermediate,
            "removed_per_layer": per_layer}


def _allocation_warnings(sk: st.Skeleton, mats: List[alloc.Matrix], ranks: Dict[str, int], opts,
                         widths: Optional[Dict[int, int]] = None) -> List[str]:
    warnings = []
    shapes = {m.name: (m.m, m.n) for m in mats}
    never = [m.name for m in mats if m.max_rank(opts.block_size) == 0]
    if never:
        warnings.append(f"{len(never)} projection(s) stay dense: no multiple of block size {opts.block_size} "
                        f"saves parameters for their shape (e.g. {never[0]} {list(shapes[never[0]])})")
    achieved = alloc.plan_ratio(mats, ranks, widths or {})
    if abs(achieved - opts.ratio) > 0.03:
        warnings.append(f"achieved ratio {achieved:.4f} (of the {opts.scope} scope) is more than 0.03 from the "
                        f"requested {opts.ratio} "
                        f"(block size {opts.block_size} is coarse for these shapes)")
    for w in warnings:
        log.warning(w)
    return warnings


def _out_dtype(src: SourceCheckpoint, sk: st.Skeleton, opts: CompressOptions) -> torch.dtype:
    if opts.dtype != "auto":
        return getattr(torch, opts.dtype)
    return src.torch_dtype(cf.weight_name(sk.module_names(0)[st.GATE]))


def _cast(t: torch.Tensor, dtype: Optional[torch.dtype]) -> torch.Tensor:
    return t.to(dtype) if (dtype is not None and t.is_floating_point()) else t
