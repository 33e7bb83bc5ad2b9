"""What a compression method is (docs/architecture.md).

A method is one class in its own module, registered once in
`methods/__init__.py`. The orchestrator (compressor.py) asks it, in order:

1. `statistics(ctx)`: ratio-independent numbers from a streamed pass over the
   dense model (spectra, Fisher weights, ...), cached across calls under
   `statistics_key(opts)`; None when the method needs none.
2. `candidates(ctx, stats)`: allocations {module: rank} that meet the budget.
3. `choose(ctx, stats, candidates)`: the one to use, and a record of why.
4. `factorizer(ctx, stats)`: a callable run once per decoder layer, in order,
   on the materialized layer, returning the factors of the projections to
   compress; it may keep streaming state (hidden states) across layers, and
   then has `stream_state()` / `restore_stream(state)` so that an interrupted
   factor pass resumes after its last finished layer.
5. `layer_tensors(names, factors)`: the tensors that replace the layer's dense
   weights in the output (by default the `svd_u`/`svd_v` pairs of format v1).

The defaults below give the whitened-spectrum behaviour; a method overrides
what it does differently.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Mapping, Optional, Set, Tuple

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
LayerFactorizer = Callable[[int, nn.Module, Dict[str, int]], Factors]  # (layer index, layer, {role: rank})


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
    needs_calibration = True

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

    def layer_tensors(self, names: Mapping[str, str], factors: Factors) -> Tuple[Set[str], Dict[str, torch.Tensor]]:
        """(source tensor names not written, new tensors) for one layer: format v1
        replaces each factored `.weight` by its `svd_u` and `svd_v`."""
        drop = {cf.weight_name(names[role]) for role in factors}
        add = {}
        for role, (u, v) in factors.items():
            add[cf.u_name(names[role])] = u
            add[cf.v_name(names[role])] = v
        return drop, add


def weights_io(ctx: Context, layer: nn.Module) -> Dict[str, torch.Tensor]:
    """{role: W as [in, out]} of a materialized layer's targeted projections."""
    return {role: ctx.sk.projection(layer, role).weight.detach().T.contiguous() for role in ctx.sk.roles}
