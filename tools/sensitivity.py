"""How much each MLP output channel matters to the loss: the diagonal of the
empirical Fisher information of every projection's outputs, streamed.

For a projection with outputs `y_t` (token t) and loss gradients
`g_t = dL/dy_t`, a perturbation `dy` raises the loss by about
`1/2 sum_t (g_t . dy_t)^2` (Gauss-Newton / empirical Fisher); keeping only
the diagonal, `F_j = sum_t g_tj^2` weighs the squared error of output
channel j. The `fisher` method (whitening.py) fits each factorization in the
metric `sum_j F_j ||X (W - W_r) e_j||^2`, so errors in channels the model is
sensitive to cost more, and the adaptive allocation compares matrices in one
unit, estimated loss.

Gradients need a backward pass through the whole network, but the model is
never loaded whole. Forward: layer by layer, keeping each layer's input
hidden states (bfloat16, `layers x tokens x hidden`: about 0.5 GiB for
SmolLM2 at 32 x 512 tokens, the default `--fisher-samples`). Head: the final norm and LM head give
`dL/dh` for the last hidden states (summed token NLL). Backward: layer by
layer from the top, each layer is materialized again, re-run on its stored
input with autograd, and `dL/dh` is pulled back through it, while hooks on
gate/up/down collect `F`. Peak memory: one layer with its autograd
activations for one chunk of tokens, plus the stored hidden states.

The re-run also sees every MLP input, so the same sweep accumulates the
input Gram matrices and returns the whitened, Fisher-weighted spectra the
adaptive allocation needs (no separate spectra pass). The factor pass later
recomputes the Grams from all calibration windows in float64.
"""
from __future__ import annotations

from typing import Dict, List, Tuple

import torch

from vllm_neuronmlp.tools.evaluation import nll
from vllm_neuronmlp.tools import progress as pg
from vllm_neuronmlp.tools import streaming as st
from vllm_neuronmlp.tools.whitening import GramAccumulator, robust_cholesky, whitened_spectrum

FISHER_FLOOR = 1e-3  # weight floor relative to the mean Fisher: every channel keeps some weight


def sensitivity_pass(sk: st.Skeleton, src, ids: torch.Tensor, progress: bool = True, with_spectra: bool = True,
                     damping: float = 0.0) -> Tuple[Dict[str, torch.Tensor], Dict[str, List[float]]]:
    """({module name: F [out] (float64)} for every gate/up/down projection, from
    the calibration windows `ids` [n, seq_len] (the caller's random subset,
    `--fisher-samples` of them) through the dense model; and,
    `with_spectra`, the singular values of `L^T W D` for every projection:
    input-whitened, output-weighted by `output_weights(F)`)."""
    runner = st.LayerRunner(sk, ids.shape[1])
    chunks = st.chunks(ids.shape[0], ids.shape[1])

    # forward, keeping every layer's input
    x = st.embed(sk, src, ids)
    stored = []
    for i in pg.bar(range(sk.num_layers), progress, desc="sensitivity: forward", unit="layer"):
        layer = st.materialize_layer(sk, src, i)
        stored.append(x.to(torch.bfloat16))
        with torch.no_grad():
            for sl in chunks:
                x[sl] = runner.forward(layer, x[sl])
        st.release_layer(sk, i)

    # dL/dh at the top: summed next-token NLL through the final norm and LM head
    norm, head = st.materialize_head(sk, src)
    grad = torch.empty_like(x)
    for k in range(ids.shape[0]):
        h = x[k].clone().requires_grad_(True)
        with torch.enable_grad():
            nll.next_token_nll(norm(h) @ head.T, ids[k]).backward()
        grad[k] = h.grad
    norm.to("meta")
    del head, x

    # backward, layer by layer from the top
    fisher: Dict[str, torch.Tensor] = {}
    spectra: Dict[str, List[float]] = {}
    for i in pg.bar(reversed(range(sk.num_layers)), progress, desc="sensitivity: backward", unit="layer",
                    total=sk.num_layers):
        layer = st.materialize_layer(sk, src, i)
        layer.requires_grad_(False)
        names = sk.module_names(i)
        hooks = [sk.projection(layer, role).register_forward_hook(_collect(fisher, names[role])) for role in st.ROLES]
        grams = {}
        if with_spectra:
            grams = {"a": GramAccumulator(sk.hidden), "z": GramAccumulator(sk.projection(layer, st.DOWN).in_features)}
            hooks.append(layer.mlp.register_forward_pre_hook(_gram(grams["a"])))
            hooks.append(sk.projection(layer, st.DOWN).register_forward_pre_hook(_gram(grams["z"])))
        try:
            for sl in chunks:
                h = stored[i][sl].to(torch.float32).requires_grad_(True)
                with torch.enable_grad():
                    out = runner.forward(layer, h)
                    out.backward(grad[sl])
                grad[sl] = h.grad
        finally:
            for hk in hooks:
                hk.remove()
        stored[i] = None
        if with_spectra:
            chol_a = robust_cholesky(grams["a"].matrix, f"{names[st.GATE]} input", damping).factor
            chol_z = robust_cholesky(grams["z"].matrix, f"{names[st.DOWN]} input", damping).factor
            for role, name in names.items():
                w = sk.projection(layer, role).weight.detach().T
                spectra[name] = whitened_spectrum(w, chol_z if role == st.DOWN else chol_a,
                                                  out_scale=output_weights(fisher[name])).tolist()
        st.release_layer(sk, i)
    return fisher, spectra


def _gram(acc: GramAccumulator):
    def hook(_mod, args):
        acc.add(args[0].detach())
    return hook


def _collect(fisher: Dict[str, torch.Tensor], name: str):
    def hook(_mod, _args, out):
        def on_grad(g):
            sq = g.reshape(-1, g.shape[-1]).to(torch.float64).pow(2).sum(0)
            fisher[name] = fisher[name] + sq if name in fisher else sq
        out.register_hook(on_grad)
    return hook


def output_weights(fisher: torch.Tensor) -> torch.Tensor:
    """`d = sqrt(F + floor * mean(F))`: the output-channel weights of the fit
    (whitening.factorize's `out_scale`). The floor keeps D invertible where a
    channel never received gradient."""
    f = fisher.to(torch.float64).clamp_min(0)
    mean = float(f.mean())
    if not mean > 0:
        return torch.ones_like(f)
    return (f + FISHER_FLOOR * mean).sqrt()
