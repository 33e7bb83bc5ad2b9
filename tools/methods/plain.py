"""`plain`: truncated SVD of each weight, no calibration (the weak baseline)."""
from __future__ import annotations

from typing import Dict, List

from vllm_neuronmlp.tools import progress as pg
from vllm_neuronmlp.tools import streaming as st
from vllm_neuronmlp.tools.methods.base import Capabilities, Context, MemoryTerms, Method, weights_io
from vllm_neuronmlp.tools.whitening import factorize, whitened_spectrum


class Plain(Method):
    name = "plain"
    # its spectra are the weights' own (no Gram matrices), so they add no stage to the memory estimate
    capabilities = Capabilities(needs_calibration=False, attention_allocations=("uniform", "adaptive"),
                                streams_state=False, memory=MemoryTerms(spectra_allocations=()))

    def statistics_key(self, opts):
        return ("spectra", "plain") if opts.rank_allocation == "adaptive" else None

    def statistics(self, ctx: Context) -> Dict[str, List[float]]:
        """Singular values of every weight (adaptive allocation only)."""
        spectra = {}
        for i in pg.bar(range(ctx.sk.num_layers), ctx.opts.progress, desc="spectra (adaptive ranks)", unit="layer"):
            layer = st.materialize_layer(ctx.sk, ctx.src, i)
            for role, name in ctx.sk.module_names(i).items():
                spectra[name] = whitened_spectrum(ctx.sk.projection(layer, role).weight.T, None).tolist()
            st.release_layer(ctx.sk, i)
        return spectra

    def choose(self, ctx, stats, candidates):
        if len(candidates) == 1:
            return super().choose(ctx, stats, candidates)
        return self.unscored(candidates, "not scored (plain method)")

    def factorizer(self, ctx: Context, stats):
        def layer_factors(i, layer, todo):
            w = weights_io(ctx, layer)
            return {role: _f32(factorize(w[role], r)) for role, r in todo.items()}
        return layer_factors


def _f32(f):
    return f.u.float(), f.v.float()


METHOD = Plain()
