"""Scoring allocation candidates: validation perplexity of each, streamed.

The calibration windows run through the dense layers (whitening statistics,
as in the `whiten` method); the validation windows (calibration windows not
used for the statistics) run through each candidate's compressed layers. At
the end the final norm and LM head turn each candidate's hidden states into a
next-token loss. Memory: one layer, plus one small set of validation
activations per candidate.
"""
from __future__ import annotations

from typing import Dict, Tuple

import torch
from torch import nn

from vllm_neuronmlp.tools.evaluation import nll
from vllm_neuronmlp.tools import progress as pg
from vllm_neuronmlp.tools import allocation as alloc
from vllm_neuronmlp.tools import streaming as st
from vllm_neuronmlp.tools.whitening import factorize


@torch.no_grad()
def selection_pass(ctx, val: torch.Tensor, candidates: Dict[str, Dict[str, int]]) -> Dict[str, float]:
    """{candidate: validation perplexity} (ctx: methods.base.Context)."""
    sk, src = ctx.sk, ctx.src
    ids = ctx.calib.windows
    x = st.embed(sk, src, ids)
    xv = {name: st.embed(sk, src, val) for name in candidates}
    runner = st.LayerRunner(sk, ids.shape[1])
    vrunner = st.LayerRunner(sk, val.shape[1])
    for i in pg.bar(range(sk.num_layers), ctx.opts.progress, desc="select allocation", unit="layer"):
        layer = st.materialize_layer(sk, src, i)
        names = sk.module_names(i)
        chol = ctx.whitening(i, layer, runner, x, record=False)
        cache: Dict[Tuple[str, int], nn.Module] = {}
        for name, ranks in candidates.items():
            swap = {}
            for role in st.ROLES:
                r = ranks[names[role]]
                if r != alloc.DENSE:
                    if (role, r) not in cache:
                        f = factorize(sk.projection(layer, role).weight.T, r, chol[role])
                        # scored as the checkpoint will hold them (bfloat16 factors)
                        cache[(role, r)] = st.factored_module(f.u.to(torch.bfloat16).float(),
                                                              f.v.to(torch.bfloat16).float())
                    swap[role] = cache[(role, r)]
            with st.swapped(sk, layer, swap):
                for sl in st.chunks(xv[name].shape[0], xv[name].shape[1]):
                    xv[name][sl] = vrunner.run(layer, xv[name][sl])["out"]
        st.release_layer(sk, i)
    norm, head = st.materialize_head(sk, src)
    scores = {}
    for name, h in xv.items():
        total = sum(float(nll.next_token_nll(norm(h[k]) @ head.T, val[k])) for k in range(val.shape[0]))
        scores[name] = nll.perplexity(total, nll.scored_tokens(val))
    norm.to("meta")
    return scores
