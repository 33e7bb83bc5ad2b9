"""LoRA recovery of a compressed checkpoint, merged back into the factors.

The compressed checkpoint is loaded through transformers (hf_model.py): every
factored projection is an `SVDLinear` with parameters `svd_u` [in, r] and
`svd_v` [r, out]. peft attaches one LoRA adapter to each of the two factor
parameters (`target_parameters`), the adapters are trained with the causal-LM
loss on the calibration windows, then merged: `U + dU`, `V + dV` are the new
factors, at the same rank, so the checkpoint format does not change. This
step loads the whole compressed model (in float32); the streamed compression
does not.
"""
from __future__ import annotations

import math
import os
import time
from typing import Dict, Optional

import torch

from vllm_neuronmlp import checkpoint_format as cf
from vllm_neuronmlp.tools import nll
from vllm_neuronmlp.tools import progress as pg
from vllm_neuronmlp.tools.errors import UserError
from vllm_neuronmlp.tools.writer import ShardWriter


def _ppl(model, windows: torch.Tensor, batch: int = 2) -> float:
    return nll.perplexity(*nll.windows_nll(lambda ids: model(input_ids=ids).logits, windows, batch))


def recover(ckpt_dir: str, train: torch.Tensor, val: Optional[torch.Tensor], steps: int, rank: int = 8,
            lr: float = 2e-4, batch: int = 2, seed: int = 0, progress: bool = True,
            max_shard_bytes: int = 2 * 1024 ** 3, val_windows: int = 8) -> Dict:
    """Train LoRA on `train` windows for `steps` steps, merge into the factors
    of the checkpoint in `ckpt_dir` (rewritten in place; call it on a staging
    directory). Returns {"steps", "ppl_before", "ppl_after", ...}; perplexity is
    measured on `val` windows (a random subset of the calibration windows not
    used for training; calibration.py)."""
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError:
        raise UserError("--lora-steps needs the PyPI package 'peft'") from None
    from vllm_neuronmlp.tools.hf_model import load_model

    t0 = time.time()
    with pg.stage("LoRA: load the compressed model", progress):
        model, ranks = load_model(ckpt_dir, dtype=torch.float32)
    if not ranks:
        return {"steps": 0, "note": "nothing factored"}
    if val is None or val.shape[0] == 0:
        val = train[-min(val_windows, train.shape[0]):]
        val_note = "calibration windows also used for training (no unused windows)"
    else:
        val = val[:val_windows]
        val_note = "unused calibration windows (random subset)"
    with pg.stage(f"LoRA: validation perplexity before ({val.shape[0]} windows)", progress):
        ppl_before = _ppl(model, val)

    # one adapter per factor parameter of every factored module (SVDLinear is not an nn.Linear)
    config = LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=0.0, target_modules=[],
                        target_parameters=[cf.U_SUFFIX, cf.V_SUFFIX], bias="none")
    peft_model = get_peft_model(model, config)
    params = [p for p in peft_model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    g = torch.Generator().manual_seed(seed)
    peft_model.train()
    it = pg.bar(range(steps), progress, desc="LoRA recovery", unit="step")
    losses = []
    warm = max(1, steps // 10)
    for step in it:
        ids = train[torch.randint(0, train.shape[0], (batch,), generator=g)]
        # cosine decay after a short warm-up
        scale = (step + 1) / warm if step < warm else 0.5 * (1 + math.cos(math.pi * (step - warm) / max(1, steps - warm)))
        for group in opt.param_groups:
            group["lr"] = lr * scale
        loss = nll.next_token_nll(peft_model(input_ids=ids).logits, ids) / nll.scored_tokens(ids)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
        if hasattr(it, "set_postfix"):
            it.set_postfix(loss=f"{losses[-1]:.3f}")
    peft_model.eval()
    with pg.stage("LoRA: merge the adapters into U and V", progress):
        merged = peft_model.merge_and_unload()
    with pg.stage(f"LoRA: validation perplexity after ({val.shape[0]} windows)", progress):
        ppl_after = _ppl(merged, val)

    with pg.stage("LoRA: rewrite the checkpoint's factors", progress):
        _rewrite_factors(ckpt_dir, merged, ranks, max_shard_bytes)
    return {"steps": steps, "rank": rank, "lr": lr, "batch": batch, "seq_len": int(train.shape[1]),
            "ppl_before": ppl_before, "ppl_after": ppl_after, "eval_windows": int(val.shape[0]),
            "eval_tokens": int(val.shape[0] * (val.shape[1] - 1)), "eval_text": val_note,
            "final_loss": losses[-1] if losses else None, "seconds": time.time() - t0}


def _rewrite_factors(ckpt_dir: str, merged, ranks: Dict[str, int], max_shard_bytes: int) -> None:
    """Replace the checkpoint's svd_u/svd_v by the merged ones (dtype as stored)."""
    from safetensors import safe_open

    files = cf.safetensors_files(ckpt_dir)
    tensors: Dict[str, torch.Tensor] = {}
    for path in sorted(set(files.values())):
        with safe_open(path, framework="pt") as h:
            for name in h.keys():
                tensors[name] = h.get_tensor(name)
    for name in ranks:
        mod = merged.get_submodule(name)
        for leaf, tname in ((cf.U_SUFFIX, cf.u_name(name)), (cf.V_SUFFIX, cf.v_name(name))):
            tensors[tname] = getattr(mod, leaf).detach().to(tensors[tname].dtype).contiguous()
    for path in set(files.values()):
        os.remove(path)
    index = os.path.join(ckpt_dir, cf.SAFETENSORS_INDEX_FILE)
    if os.path.exists(index):
        os.remove(index)
    writer = ShardWriter(ckpt_dir, max_shard_bytes)
    for name in sorted(tensors):
        writer.add(name, tensors[name])
    writer.finish()
