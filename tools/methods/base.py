"""What a compression method is (docs/architecture.md, "Compression methods").

A method is one class in its own module (`METHOD = ThatClass()` at the end),
registered by one line in `methods/__init__.py`. It declares what it can do
in one `Capabilities` object, `capabilities`, and the rest of the tool reads
that object; nothing outside methods/ tests a method's name or attributes:

- `needs_calibration`: whether it reads calibration text at all;
- `allocations`: the `--rank-allocation` modes it accepts (`allocations_note`
  says why, when it accepts fewer than all);
- `attention_allocations`: the modes with which it can factor the attention
  projections, i.e. `--scope all` (empty: the MLP only; `scope_note` says why);
  `--scope auto` resolves to `all` exactly where the mode is listed;
- `narrows`: its allocation is an `alloc.Plan` (ranks and per-layer MLP
  widths: format v2 narrowing), not bare ranks;
- `keeps_architecture`: its output can be written as a plain smaller model of
  the same architecture (`--export dense`);
- `streams_state`: its factorizer carries hidden states from layer to layer,
  with `stream_state()` / `restore_stream(state)`, so an interrupted factor
  pass saves them and resumes after its last finished layer;
- `factorizer_returns`: what the factorizer gives for one layer, `Factors`
  ({role: (U, V)}) or `LayerWeights` (kept channels, narrowed dense weights
  and factors); `layer_tensors` turns either into the layer's output tensors;
- `memory`: the stages its passes add to the memory estimate
  (`MemoryTerms`, read by memory_estimate.py);
- `allocation_summary`: how the dry run describes its allocation (None: the
  `--rank-allocation` mode).

The orchestrator (compressor.py) then asks it, in order:

1. `check_budget(ctx)`: BudgetError when --ratio is out of reach (shapes only).
2. `statistics(ctx)`: ratio-independent numbers from a streamed pass over the
   dense model (spectra, Fisher weights, ...), cached across calls and kept
   for --resume under `statistics_key(opts)`; None when the method needs none.
3. `candidates(ctx, stats)`: allocations that meet the budget ({module: rank},
   or an `alloc.Plan` when it `narrows`).
4. `choose(ctx, stats, candidates)`: the one to use, and a record of why.
5. `factorizer(ctx, stats)`: a callable run once per decoder layer, in order,
   on the materialized layer, returning `factorizer_returns` for the
   projections to compress.
6. `layer_tensors(names, output)`: the tensors that replace the layer's dense
   weights in the output (`svd_u`/`svd_v` pairs, narrowed `.weight`s).

The defaults below give the whitened-spectrum behaviour; a method overrides
what it does differently. Adding a method is its module plus its registry
line (tests/test_methods.py does it with a method defined in the test).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Mapping, Optional, Set, Tuple, Union

import torch
from torch import nn

from vllm_neuronmlp import checkpoint_format as cf
from vllm_neuronmlp.tools import allocation as alloc
from vllm_neuronmlp.tools import progress as pg
from vllm_neuronmlp.tools import streaming as st
from vllm_neuronmlp.tools.calibration import Calibration
from vllm_neuronmlp.tools.run_state import RunState
from vllm_neuronmlp.tools.source import SourceCheckpoint
from vllm_neuronmlp.tools.streaming import Skeleton
from vllm_neuronmlp.tools.whitening import GramAccumulator, robust_cholesky

log = logging.getLogger("vllm_neuronmlp.compress")

ADAPTIVE_POWERS = (1.0, 2.0, 4.0)  # greedy candidates on (relative truncation error) ** p

Ranks = Dict[str, int]
Factors = Dict[str, Tuple[torch.Tensor, torch.Tensor]]  # {role: (U [in, r], V [r, out])}, float32


@dataclass
class LayerWeights:
    """What one layer becomes: kept channels `keep` (None: all), dense weights
    {role: W [out, in]} and factors {role: (U [in, r], V [r, out])}."""

    keep: Optional[torch.Tensor]
    dense: Dict[str, torch.Tensor]
    factors: Factors


# (layer index, layer, {role: rank}) -> the method's `capabilities.factorizer_returns`
LayerFactorizer = Callable[[int, nn.Module, Dict[str, int]], Union[Factors, LayerWeights]]


@dataclass(frozen=True)
class MemoryTerms:
    """The stages a method's passes add to the memory estimate (memory_estimate.py)."""

    fisher_pass: bool = False  # statistics from the streamed Fisher pass (sensitivity.py), layer inputs on disk
    spectra_allocations: Tuple[str, ...] = ("adaptive",)  # --rank-allocation modes whose statistics hold spectra
    channel_order: bool = False  # each layer's channel order and loss curve (float64 I x I work arrays)
    hidden_streams: int = 1  # copies of the calibration hidden states the factor pass carries


@dataclass(frozen=True)
class Capabilities:
    """What a method supports, writes and costs (the module docstring says what each field steers)."""

    needs_calibration: bool = True
    allocations: Tuple[str, ...] = ("uniform", "adaptive")
    allocations_note: str = ""
    attention_allocations: Tuple[str, ...] = ()
    scope_note: str = "it fits MLPs only"
    narrows: bool = False
    keeps_architecture: bool = False
    streams_state: bool = True
    factorizer_returns: type = dict  # Factors; or LayerWeights
    memory: MemoryTerms = MemoryTerms()
    allocation_summary: Optional[str] = None

    def factors_attention(self, allocation: str) -> bool:
        """Whether, with --rank-allocation `allocation`, it can factor the attention projections."""
        return allocation in self.attention_allocations


@dataclass
class Context:
    """What every pass of a method sees."""

    sk: Skeleton
    src: SourceCheckpoint
    opts: Any  # compressor.CompressOptions
    calib: Optional[Calibration]
    jitter_modules: List[str] = field(default_factory=list)
    widths: Dict[int, int] = field(default_factory=dict)  # {layer: kept intermediate channels} of the chosen plan
    state: Optional[RunState] = None  # the run's resume state (run_state.py); None outside `compress`
    meter: pg.StageMeter = field(default_factory=pg.StageMeter)  # wall time and peak memory per stage

    def cholesky(self, gram: GramAccumulator, module: str, record: bool = True) -> torch.Tensor:
        """Whitening factor of a module's input covariance (damped; jitter recorded
        for the summary when `record`)."""
        res = robust_cholesky(gram.matrix, f"{module} input", self.opts.damping)
        if res.retried and record:
            self.jitter_modules.append(module)
            log.info("%s: input covariance not positive definite; added jitter %.3g", module, res.jitter)
        return res.factor

    def cholesky_factors(self, i: int, grams: Mapping[str, GramAccumulator], roles, record: bool = True
                         ) -> Dict[str, torch.Tensor]:
        """{role: whitening factor} for `roles` of layer i from their input Grams
        (st.input_grams); roles sharing an input share one factor."""
        names = self.sk.module_names(i)
        by_input: Dict[str, torch.Tensor] = {}
        out = {}
        for role in roles:
            first = st.SHARED_INPUT[role]
            if first not in by_input:
                by_input[first] = self.cholesky(grams[role], names[first], record)
            out[role] = by_input[first]
        return out

    def whitening(self, i: int, layer: nn.Module, runner: st.LayerRunner, x: torch.Tensor, record: bool = True
                  ) -> Dict[str, torch.Tensor]:
        """Run `x` through decoder layer `i` in place; {role: Cholesky factor of
        the role's input covariance} for every targeted projection."""
        grams = st.input_grams(self.sk, runner, layer, x)
        return self.cholesky_factors(i, grams, self.sk.roles, record)

    def matrices(self) -> List[alloc.Matrix]:
        """The targeted projections: the MLP's, and the attention's with --scope all."""
        return alloc.matrices_from_shapes(self.sk.shapes())


class Method:
    name = ""  # as registered in methods/__init__.py
    capabilities = Capabilities()

    def statistics_key(self, opts) -> Optional[Tuple]:
        """Cache key of `statistics` (with the calibration's), None when there are none."""
        return None

    def statistics(self, ctx: Context) -> Any:
        return None

    def check_budget(self, ctx: Context) -> None:
        """BudgetError when --ratio cannot be reached at all (shapes only: run
        before the statistics, so an impossible ratio costs no pass)."""
        alloc.rank_budget(ctx.matrices(), ctx.opts.ratio, ctx.opts.block_size)

    def spectra(self, stats: Any) -> Optional[Mapping[str, List[float]]]:
        """Singular spectra per module for the greedy allocations, from `stats`."""
        return stats

    def candidates(self, ctx: Context, stats: Any) -> Dict[str, Ranks]:
        """The uniform allocation, plus (adaptive) greedy ones on the relative
        truncation error of the spectra raised to a power p (larger p spreads
        the cuts more evenly). These spectra are output errors of different
        scales per matrix, so the candidates are scored, not trusted."""
        o = ctx.opts
        mats = ctx.matrices()
        out = {"uniform": alloc.allocate_uniform(mats, o.ratio, o.block_size, o.rounding_threshold)}
        if o.rank_allocation == "adaptive":
            for p in ADAPTIVE_POWERS:
                cand = alloc.allocate_adaptive(mats, self.spectra(stats), o.ratio, o.block_size, power=p)
                if cand not in out.values():
                    out[f"spectral-p{p:g}"] = cand
        return out

    def choose(self, ctx: Context, stats: Any, candidates: Dict[str, Ranks]) -> Tuple[Ranks, Dict]:
        """One candidate: used as is. Several: scored by validation perplexity
        on held-aside calibration windows (selection.py); without such windows
        the `spectral-p2` one is used unscored."""
        if len(candidates) == 1:
            (name, ranks), = candidates.items()
            return ranks, ({} if name == "uniform" else {"chosen": name, "note": "not scored"})
        if ctx.calib is None or ctx.calib.validation is None:
            return self.unscored(candidates, "not scored (no unused calibration windows)")
        from vllm_neuronmlp.tools.selection import selection_pass

        val = ctx.calib.validation
        scores = selection_pass(ctx, val, candidates)
        best = min(scores, key=scores.get)
        return candidates[best], {"chosen": best, "validation_ppl": {k: round(v, 4) for k, v in scores.items()},
                                  "validation_tokens": int(val.numel())}

    @staticmethod
    def unscored(candidates: Dict[str, Ranks], note: str) -> Tuple[Ranks, Dict]:
        spectral = [n for n in candidates if n != "uniform"]
        chosen = "spectral-p2" if "spectral-p2" in candidates else spectral[0]
        return candidates[chosen], {"chosen": chosen, "note": note}

    def factorizer(self, ctx: Context, stats: Any) -> LayerFactorizer:
        raise NotImplementedError

    def layer_tensors(self, names: Mapping[str, str], output) -> Tuple[Set[str], Dict[str, torch.Tensor]]:
        """(source tensor names not written, new tensors) for one layer, from the
        factorizer's `output` (`capabilities.factorizer_returns`)."""
        if self.capabilities.factorizer_returns is not LayerWeights:
            output = LayerWeights(None, {}, output)
        return layer_tensors(names, output)


def layer_tensors(names: Mapping[str, str], out: LayerWeights) -> Tuple[Set[str], Dict[str, torch.Tensor]]:
    """(source tensors not written, new tensors) of a narrowed and/or factored
    layer: each narrowed projection's `.weight` is replaced by its narrowed one,
    each factored projection's by its `svd_u` and `svd_v`."""
    drop, add = set(), {}
    for role, w in out.dense.items():
        drop.add(cf.weight_name(names[role]))
        add[cf.weight_name(names[role])] = w
    for role, (u, v) in out.factors.items():
        drop.add(cf.weight_name(names[role]))
        add[cf.u_name(names[role])] = u
        add[cf.v_name(names[role])] = v
    return drop, add


def weights_io(ctx: Context, layer: nn.Module) -> Dict[str, torch.Tensor]:
    """{role: W as [in, out]} of a materialized layer's targeted projections."""
    return {role: ctx.sk.projection(layer, role).weight.detach().T.contiguous() for role in ctx.sk.roles}
