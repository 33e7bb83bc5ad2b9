"""`fisher`: whitening on the input side and, on the output side,
each channel weighted by the loss's sensitivity to it (the diagonal empirical
Fisher of the projection's outputs, from one streamed forward/backward pass
over a random subset of the calibration windows; sensitivity.py). The dropped
singular values of the weighted target become loss estimates, comparable
across matrices, so the adaptive allocation is one greedy allocation by
estimated loss reduction per parameter, not scored."""
from __future__ import annotations

from vllm_neuronmlp.tools import allocation as alloc
from vllm_neuronmlp.tools import sensitivity
from vllm_neuronmlp.tools.methods.base import Capabilities, Context, MemoryTerms, Method
from vllm_neuronmlp.tools.methods.whiten import DensePathFactorizer


class Fisher(Method):
    name = "fisher"
    capabilities = Capabilities(attention_allocations=("uniform", "adaptive"), memory=MemoryTerms(fisher_pass=True))

    def statistics_key(self, opts):
        return ("fisher", opts.rank_allocation == "adaptive", opts.fisher_samples)

    def statistics(self, ctx: Context):
        """(Fisher diagonal per module, Fisher-weighted spectra or {})."""
        ids = ctx.calib.fisher_windows(ctx.opts.fisher_samples)
        sens = sensitivity.sensitivity_pass(ctx.sk, ctx.src, ids, ctx.opts.progress,
                                            ctx.opts.rank_allocation == "adaptive", ctx.opts.damping,
                                            state=ctx.state, meter=ctx.meter)
        return sens.fisher, sens.spectra

    def spectra(self, stats):
        return stats[1]

    def candidates(self, ctx: Context, stats):
        ctx.calib.info["fisher_samples"] = min(ctx.opts.fisher_samples, int(ctx.calib.windows.shape[0]))
        if ctx.opts.rank_allocation != "adaptive":
            return super().candidates(ctx, stats)
        o = ctx.opts
        return {"fisher-greedy": alloc.allocate_adaptive(ctx.matrices(), self.spectra(stats), o.ratio, o.block_size,
                                                      normalize=False, power=1.0)}

    def choose(self, ctx, stats, candidates):
        ranks, info = super().choose(ctx, stats, candidates)
        if info:
            info["note"] = "greedy by estimated loss (Fisher-weighted spectra); not scored"
        return ranks, info

    def factorizer(self, ctx: Context, stats):
        fisher = stats[0]
        return DensePathFactorizer(ctx, {name: sensitivity.output_weights(f) for name, f in fisher.items()})


METHOD = Fisher()
