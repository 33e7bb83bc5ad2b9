"""How much each output channel of every targeted projection (the MLP's, and
with --scope all the attention's q/k/v/o) matters to the loss: the diagonal of
the empirical Fisher information of each projection's outputs, streamed.

For a projection with outputs `y_t` (token t) and loss gradients
`g_t = dL/dy_t`, a perturbation `dy` raises the loss by about
`1/2 sum_t (g_t . dy_t)^2` (Gauss-Newton / empirical Fisher); keeping only
the diagonal, `F_j = sum_t g_tj^2` weighs the squared error of output
channel j. The `fisher` method (whitening.py) fits each factorization in the
metric `sum_j F_j ||X (W - W_r) e_j||^2`, so errors in channels the model is
sensitive to cost more, and the adaptive allocation compares matrices in one
unit, estimated loss.

Gradients need a backward pass through the whole network, but the model is
never loaded whole, and nothing held in memory grows with depth. Forward:
layer by layer, each layer's input hidden states are written to disk
(float32, `tokens x hidden` per layer: 38 MiB for SmolLM2, 256 MiB at the
8B shape at 32 x 512 tokens, the default `--fisher-samples`), in the run's
resume state when there is one (run_state.py), else in a temporary directory.
Head: the final norm and LM head give `dL/dh` for the last hidden states
(summed token NLL). Backward: layer by layer from the top, each layer is
materialized again, its stored input read back and re-run with autograd, and
`dL/dh` is pulled back through it, while hooks on the targeted projections collect `F`.
Peak memory: one layer with its autograd activations for one chunk of tokens,
the hidden states and their gradient, and (for the spectra) the layer's Gram
matrices. With a run state every finished layer is kept on disk, so an
interrupted pass resumes at the layer it reached.

The re-run also sees every targeted projection's input, so the same sweep accumulates the
input Gram matrices and returns the whitened, Fisher-weighted spectra the
adaptive allocation needs (no separate spectra pass), and `on_layer` lets a
method compute more per-layer statistics from them (the channel order of
methods/nystrom.py) while the layer is in memory. The factor pass later
recomputes the Grams from all calibration windows in float64.
"""
from __future__ import annotations

import contextlib
import tempfile
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional

import torch

from vllm_neuronmlp.tools import progress as pg
from vllm_neuronmlp.tools import streaming as st
from vllm_neuronmlp.tools.evaluation import nll
from vllm_neuronmlp.tools.run_state import ActivationStore, RunState
from vllm_neuronmlp.tools.whitening import GramAccumulator, robust_cholesky, whitened_spectrum

FISHER_FLOOR = 1e-3  # weight floor relative to the mean Fisher: every channel keeps some weight

# (layer index, materialized layer, {role: its input's Gram}, {module: F}) -> per-layer results
LayerHook = Callable[[int, torch.nn.Module, Dict[str, GramAccumulator], Dict[str, torch.Tensor]], Any]


@dataclass
class Sensitivity:
    fisher: Dict[str, torch.Tensor] = field(default_factory=dict)  # {module: F [out]}, float64
    spectra: Dict[str, List[float]] = field(default_factory=dict)  # {module: singular values of L^T W D}
    per_layer: Dict[int, Any] = field(default_factory=dict)  # {layer: what on_layer returned}
    # {"<layer>.self_attn.qkv": singular values of [W_q W_k W_v] whitened and Fisher-weighted} (--scope all)
    fused_qkv_spectra: Dict[str, List[float]] = field(default_factory=dict)


def sensitivity_pass(sk: st.Skeleton, src, ids: torch.Tensor, progress: bool = True, with_spectra: bool = True,
                     damping: float = 0.0, on_layer: Optional[LayerHook] = None, state: Optional[RunState] = None,
                     meter: Optional[pg.StageMeter] = None) -> Sensitivity:
    """Fisher diagonals {module name: F [out] (float64)} of every targeted
    projection (`sk.roles`), from the calibration windows `ids` [n, seq_len] (the caller's
    random subset, `--fisher-samples` of them) through the dense model; with
    `with_spectra`, the singular values of `L^T W D` for every projection
    (input-whitened, output-weighted by `output_weights(F)`); with `on_layer`,
    its result for every layer. `state` makes the pass resumable."""
    meter = meter or pg.StageMeter()
    with contextlib.ExitStack() as stack:
        if state is not None:
            store = ActivationStore(state.subdir("statistics", "fisher"))
        else:
            store = ActivationStore(stack.enter_context(tempfile.TemporaryDirectory(prefix="vllm-neuronmlp-fisher-")))
        return _sensitivity(sk, src, ids, progress, with_spectra, damping, on_layer, state, store, meter)


def _sensitivity(sk, src, ids, progress, with_spectra, damping, on_layer, state, store, meter) -> Sensitivity:
    runner = st.LayerRunner(sk, ids.shape[1])
    chunks = st.chunks(ids.shape[0], ids.shape[1])
    n_layers = sk.num_layers
    done_layers = set(state.get("statistics_layers", [])) if state is not None else set()
    result = Sensitivity()
    for i in sorted(done_layers):
        _merge(result, state.load("statistics", f"layer-{i:05d}.pt"), i)

    # forward, storing every layer's input (input of layer i under key "in-i"; "in-L" is the top)
    if not store.has(f"grad-{n_layers}") and not done_layers:
        with meter.measure("fisher_forward"):
            start = max([i for i in range(n_layers + 1) if store.has(f"in-{i}")], default=-1)
            if start < 0:
                x = st.embed(sk, src, ids)
                store.put("in-0", x)
                start = 0
            else:
                x = store.get(f"in-{start}", sk.device)
            for i in pg.bar(range(start, n_layers), progress, desc="sensitivity: forward", unit="layer",
                            total=n_layers, initial=start):
                layer = st.materialize_layer(sk, src, i)
                with torch.no_grad():
                    for sl in chunks:
                        x[sl] = runner.forward(layer, x[sl])
                st.release_layer(sk, i)
                store.put(f"in-{i + 1}", x)

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
            store.put(f"grad-{n_layers}", grad)
            store.drop(f"in-{n_layers}")
            st.return_freed_memory()

    # backward, layer by layer from the top (a resumed pass starts below the last finished layer)
    top = min(done_layers, default=n_layers)
    grad = store.get(f"grad-{top}", sk.device)
    for i in pg.bar(reversed(range(top)), progress, desc="sensitivity: backward", unit="layer", total=n_layers,
                    initial=n_layers - top):
        with meter.measure("fisher_backward"):
            layer = st.materialize_layer(sk, src, i)
            layer.requires_grad_(False)
            names = sk.module_names(i)
            fisher: Dict[str, torch.Tensor] = {}
            hooks = [sk.projection(layer, role).register_forward_hook(_collect(fisher, names[role]))
                     for role in sk.roles]
            grams = {}
            if with_spectra or on_layer is not None:
                grams, gram_hooks = st.attach_input_grams(sk, layer)
                hooks += gram_hooks
            x_in = store.get(f"in-{i}", sk.device)
            try:
                for sl in chunks:
                    h = x_in[sl].clone().requires_grad_(True)
                    with torch.enable_grad():
                        out = runner.forward(layer, h)
                        out.backward(grad[sl])
                    grad[sl] = h.grad
            finally:
                for hk in hooks:
                    hk.remove()
            del x_in
        layer_result: Dict[str, Any] = {"fisher": {n: f.cpu() for n, f in fisher.items()}, "spectra": {}}
        if with_spectra:
            with meter.measure("spectra"):
                layer_result["spectra"], fused = _spectra(sk, layer, names, grams, fisher, damping)
                if fused is not None:
                    layer_result["fused_qkv_spectra"] = {fused[0]: fused[1]}
        if on_layer is not None:
            layer_result["extra"] = on_layer(i, layer, grams, fisher)
        del grams
        st.release_layer(sk, i)
        _merge(result, layer_result, i)
        if state is not None:  # the layer's results, then its input gradient, then the state that lists them
            state.put(layer_result, "statistics", f"layer-{i:05d}.pt")
            store.put(f"grad-{i}", grad)
            state.set(statistics_layers=sorted(done_layers | {i}))
            done_layers.add(i)
            store.drop(f"grad-{i + 1}")
        store.drop(f"in-{i}")
    return result


def _spectra(sk: st.Skeleton, layer, names: Dict[str, str], grams, fisher, damping: float):
    """Singular values of `L^T W D` for every targeted projection of a layer (L the
    factor of its input's Gram, shared by the roles reading one input; D from the
    Fisher weights of its outputs), and, when attention is targeted, those of q,
    k and v stacked as one matrix (what one shared U would truncate: measured
    against separate factors, methods/hybrid.py)."""
    chol: Dict[str, torch.Tensor] = {}
    out: Dict[str, List[float]] = {}
    for role, name in names.items():
        first = st.SHARED_INPUT[role]
        if first not in chol:
            chol[first] = robust_cholesky(grams[role].matrix, f"{names[first]} input", damping).factor
        w = sk.projection(layer, role).weight.detach().T
        out[name] = whitened_spectrum(w, chol[first], out_scale=output_weights(fisher[name])).tolist()
    fused = None
    if sk.targets_attention:
        qkv = (st.Q, st.K, st.V)
        w = torch.cat([sk.projection(layer, r).weight.detach().T for r in qkv], 1)
        d = torch.cat([output_weights(fisher[names[r]]) for r in qkv])
        fused = (names[st.Q].rpartition(".")[0] + ".qkv", whitened_spectrum(w, chol[st.Q], out_scale=d).tolist())
    return out, fused


def _merge(result: Sensitivity, layer_result: Dict[str, Any], i: int) -> None:
    result.fisher.update(layer_result["fisher"])
    result.spectra.update(layer_result["spectra"])
    result.fused_qkv_spectra.update(layer_result.get("fused_qkv_spectra", {}))
    if "extra" in layer_result:
        result.per_layer[i] = layer_result["extra"]


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
