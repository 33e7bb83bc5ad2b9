"""`whiten`: SVD-LLM's whitening. Each projection is factored in the metric of
its input activations, `min ||X (W - U V)||`, via the Cholesky factor of
`X^T X` (whitening.py); the activations come from the dense model, streamed
layer by layer (gate and up share one input covariance)."""
from __future__ import annotations

from typing import Dict, List, Mapping, Optional

import torch

from vllm_neuronmlp.tools import progress as pg
from vllm_neuronmlp.tools import streaming as st
from vllm_neuronmlp.tools.methods.base import Capabilities, Context, Method, weights_io
from vllm_neuronmlp.tools.whitening import factorize, whitened_spectrum


class Whiten(Method):
    name = "whiten"
    capabilities = Capabilities(attention_allocations=("uniform",),
                                scope_note="its adaptive mode scores MLP allocations only; --method fisher or hybrid "
                                           "allocate all seven projections by estimated loss")

    def statistics_key(self, opts):
        return ("spectra", "whitened") if opts.rank_allocation == "adaptive" else None

    def statistics(self, ctx: Context) -> Dict[str, List[float]]:
        return whitened_spectra(ctx)

    def factorizer(self, ctx: Context, stats):
        return DensePathFactorizer(ctx)


def whitened_spectra(ctx: Context) -> Dict[str, List[float]]:
    """Whitened singular values of every projection, from the dense model."""
    sk, src = ctx.sk, ctx.src
    ids = ctx.calib.windows
    x = st.embed(sk, src, ids)
    runner = st.LayerRunner(sk, ids.shape[1])
    spectra: Dict[str, List[float]] = {}
    for i in pg.bar(range(sk.num_layers), ctx.opts.progress, desc="spectra (adaptive ranks)", unit="layer"):
        layer = st.materialize_layer(sk, src, i)
        chol = ctx.whitening(i, layer, runner, x, record=False)
        for role, name in sk.module_names(i).items():
            spectra[name] = whitened_spectrum(sk.projection(layer, role).weight.T, chol[role]).tolist()
        st.release_layer(sk, i)
    return spectra


class DensePathFactorizer:
    """Streams the calibration windows through the dense layers; each layer's
    projections are factored whitened by their inputs, with output-channel
    weights `out_scales` {module: d} when given (the fisher method)."""

    def __init__(self, ctx: Context, out_scales: Optional[Mapping[str, torch.Tensor]] = None):
        self.ctx = ctx
        self.out_scales = out_scales or {}
        self.x = st.embed(ctx.sk, ctx.src, ctx.calib.windows)
        self.runner = st.LayerRunner(ctx.sk, ctx.calib.windows.shape[1])

    def stream_state(self) -> Dict[str, torch.Tensor]:
        """The streamed hidden states after the last layer (what a resumed pass needs)."""
        return {"x": self.x.cpu()}

    def restore_stream(self, state: Dict[str, torch.Tensor]) -> None:
        self.x = state["x"].to(self.x.device)

    def __call__(self, i, layer, todo):
        sk = self.ctx.sk
        names = sk.module_names(i)
        if not todo:
            for sl in st.chunks(self.x.shape[0], self.x.shape[1]):
                self.x[sl] = self.runner.run(layer, self.x[sl])["out"]
            return {}
        grams = st.input_grams(sk, self.runner, layer, self.x)
        chol = self.ctx.cholesky_factors(i, grams, todo)
        w = weights_io(self.ctx, layer)
        out = {}
        for role, r in todo.items():
            f = factorize(w[role], r, chol[role], out_scale=self.out_scales.get(names[role]))
            out[role] = (f.u.float(), f.v.float())
        return out


METHOD = Whiten()
