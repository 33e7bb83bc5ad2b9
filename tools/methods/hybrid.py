"""`hybrid`: channel selection (nystrom.py) and Fisher-weighted factors (fisher.py)
under one loss-based budget.

Both kinds of cut are estimated in one unit, the Fisher-weighted output error
of the layer: a block of intermediate channels by the Nyström loss curve of
its layer (channels ordered by the loss itself, `nystrom.loss_aware_order`),
a block of rank by the dropped squared singular values of the
input-whitened, Fisher-weighted projection. One greedy allocation
(allocation/hybrid.py) spends the budget on whichever cut costs the least
estimated loss per parameter; the factor pass narrows each layer, refits its
down projection, then factors the chosen projections at the reduced width."""
from __future__ import annotations

from vllm_neuronmlp.tools import allocation as alloc
from vllm_neuronmlp.tools import sensitivity
from vllm_neuronmlp.tools.methods.base import Capabilities, Context, LayerWeights, MemoryTerms
from vllm_neuronmlp.tools.methods.nystrom import ChannelStats, Nystrom, NystromFactorizer


class Hybrid(Nystrom):
    name = "hybrid"
    capabilities = Capabilities(
        allocations=("adaptive",),
        allocations_note="the hybrid has one allocation (adaptive, one greedy over channels and ranks); for the "
                         "same width in every layer use --method nystrom --rank-allocation uniform",
        attention_allocations=("adaptive",), narrows=True, factorizer_returns=LayerWeights,
        memory=MemoryTerms(fisher_pass=True, spectra_allocations=("uniform", "adaptive"), channel_order=True),
        allocation_summary="one greedy over channel and rank blocks")
    loss_aware = True  # channels ordered by nystrom.loss_aware_order, not by leverage

    def check_budget(self, ctx: Context) -> None:
        alloc.hybrid_budget(ctx.matrices(), ctx.sk.intermediate, ctx.opts.ratio, ctx.opts.block_size)

    def candidates(self, ctx: Context, stats: ChannelStats):
        o = ctx.opts
        ctx.calib.info["fisher_samples"] = min(o.fisher_samples, int(ctx.calib.windows.shape[0]))
        plan = alloc.allocate_hybrid(ctx.matrices(), stats.spectra, stats.losses, ctx.sk.intermediate, o.ratio,
                                  o.block_size)
        return {"hybrid-greedy": plan}

    def choose(self, ctx, stats, candidates):
        (name, plan), = candidates.items()
        return plan, {"chosen": name, "note": "one greedy over channel blocks (Nyström loss) and rank blocks "
                                              "(Fisher-weighted spectra) by estimated loss per parameter; not scored"}

    def factorizer(self, ctx: Context, stats: ChannelStats):
        return NystromFactorizer(ctx, stats, {n: sensitivity.output_weights(f) for n, f in stats.fisher.items()})


METHOD = Hybrid()
