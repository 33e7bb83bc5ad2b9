"""`error-aware`: the calibration text also runs through the already-compressed
layers; each factorization is fit so that the compressed layer, fed the inputs
it will really see, reproduces the original layer's outputs (closed form with
the cross-covariance `X_c^T X_o`, whitening.py). Measured on SmolLM2 it loses
to `whiten` (the least-squares fit on shifted inputs overfits the calibration
windows at aggressive ranks), so it is not the default."""
from __future__ import annotations

from vllm_neuronmlp.tools import streaming as st
from vllm_neuronmlp.tools.methods.base import Capabilities, Context, MemoryTerms, Method, weights_io
from vllm_neuronmlp.tools.methods.whiten import whitened_spectra
from vllm_neuronmlp.tools.whitening import GramAccumulator, factorize


class ErrorAware(Method):
    name = "error-aware"
    capabilities = Capabilities(memory=MemoryTerms(hidden_streams=2))  # the original and the compressed path

    def statistics_key(self, opts):
        return ("spectra", "whitened") if opts.rank_allocation == "adaptive" else None

    def statistics(self, ctx: Context):
        return whitened_spectra(ctx)

    def factorizer(self, ctx: Context, stats):
        return TwoPathFactorizer(ctx)


class TwoPathFactorizer:
    """Streams two sets of hidden states: `x_o` through the original layers and
    `x_c` through the compressed ones (they coincide until the first factored layer)."""

    def __init__(self, ctx: Context):
        self.ctx = ctx
        self.x_o = st.embed(ctx.sk, ctx.src, ctx.calib.windows)
        self.x_c = self.x_o
        self.diverged = False
        self.runner = st.LayerRunner(ctx.sk, ctx.calib.windows.shape[1])

    def stream_state(self):
        """Both streams after the last layer (one tensor while they coincide)."""
        return {"x_o": self.x_o.cpu(), "x_c": self.x_c.cpu() if self.diverged else None}

    def restore_stream(self, state) -> None:
        self.x_o = state["x_o"].to(self.x_o.device)
        self.diverged = state["x_c"] is not None
        self.x_c = state["x_c"].to(self.x_o.device) if self.diverged else self.x_o

    def __call__(self, i, layer, todo):
        sk, run = self.ctx.sk, self.runner.run
        names = sk.module_names(i)
        if todo and not self.diverged:
            self.x_c = self.x_o.clone()
            self.diverged = True
        x_o, x_c = self.x_o, self.x_c
        w = weights_io(self.ctx, layer)
        chunks = st.chunks(x_o.shape[0], x_o.shape[1])
        factors = {}
        gu = [role for role in (st.GATE, st.UP) if role in todo]
        if gu:
            # stage A: inputs of gate/up on both paths -> fit gate/up
            acc_cc, acc_co = (GramAccumulator(w[st.GATE].shape[0], device=x_o.device) for _ in range(2))
            for sl in chunks:
                a_o = run(layer, x_o[sl], stop_at="mlp")["mlp_in"]
                a_c = run(layer, x_c[sl], stop_at="mlp")["mlp_in"] if self.diverged else a_o
                acc_cc.add(a_c)
                acc_co.add(a_c, a_o)
            l_a = self.ctx.cholesky(acc_cc, names[st.GATE])
            for role in gu:
                f = factorize(w[role], todo[role], l_a, acc_co.matrix)
                factors[role] = (f.u.float(), f.v.float())
            del acc_cc, acc_co
        if st.DOWN in todo:
            # stage B: input of down on both paths (gate/up already compressed on the c path)
            acc_cc, acc_co = (GramAccumulator(w[st.DOWN].shape[0], device=x_o.device) for _ in range(2))
            gu_mods = {role: st.factored_module(*factors[role]) for role in gu}
            for sl in chunks:
                got_o = run(layer, x_o[sl], want_down_in=True)
                with st.swapped(sk, layer, gu_mods):
                    z_c = run(layer, x_c[sl], stop_at="down")["down_in"]
                acc_cc.add(z_c)
                acc_co.add(z_c, got_o["down_in"])
                x_o[sl] = got_o["out"]
            l_z = self.ctx.cholesky(acc_cc, names[st.DOWN])
            f = factorize(w[st.DOWN], todo[st.DOWN], l_z, acc_co.matrix)
            factors[st.DOWN] = (f.u.float(), f.v.float())
            del acc_cc, acc_co
        else:
            for sl in chunks:
                x_o[sl] = run(layer, x_o[sl])["out"]
        if self.diverged:
            # stage C: the compressed path moves on through the compressed layer
            with st.swapped(sk, layer, {role: st.factored_module(*uv) for role, uv in factors.items()}):
                for sl in chunks:
                    x_c[sl] = run(layer, x_c[sl])["out"]
        else:
            self.x_c = self.x_o
        return factors


METHOD = ErrorAware()
