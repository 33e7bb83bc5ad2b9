"""LoRA recovery of a compressed checkpoint, merged back into the factors.

Every factored projection is held as two bias-free linears, `u` (in -> r) and
`v` (r -> out) (hf_model.FactoredLinearHF). peft attaches LoRA adapters to
both, the adapters are trained with the causal-LM loss on the calibration
windows, then merged: the merged `u`/`v` weights are the new `svd_u`/`svd_v`.
Ranks, shapes and the checkpoint format are unchanged. This step loads the
whole compressed model (in float32); the streamed compression does not.
"""
from __future__ import annotations

import math
import os
import time
from typing import Dict, Optional

import torch

from vllm_neuronmlp import checkpoint_format as cf
from vllm_neuronmlp.tools.cli import UserError


def _ppl(model, windows: torch.Tensor, batch: int = 2) -> float:
    nll, n = 0.0, 0
    with torch.no_grad():
        for k in range(0, windows.shape[0], batch):
            ids = windows[k:k + batch]
            logits = model(input_ids=ids).logits.float()
            lp = torch.log_softmax(logits[:, :-1], dim=-1)
            nll -= float(lp.gather(-1, ids[:, 1:, None]).sum())
            n += ids.shape[0] * (ids.shape[1] - 1)
    return math.exp(nll / n)


def recover(ckpt_dir: str, train: torch.Tensor, val: Optional[torch.Tensor], steps: int, rank: int = 8,
            lr: float = 2e-4, batch: int = 2, seed: int = 0, progress: bool = True,
            max_shard_bytes: int = 2 * 1024 ** 3, val_windows: int = 8) -> Dict:
    """Train LoRA on `train` windows for `steps` steps, merge into the factors
    of the checkpoint in `ckpt_dir` (rewritten in place; call it on a staging
    directory). Returns {"steps", "ppl_before", "ppl_after", ...}; perplexity is
    measured on `val` windows (calibration windows not used for training)."""
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError:
        raise UserError("--lora-steps needs the PyPI package 'peft'") from None
    from vllm_neuronmlp.tools.hf_model import factored_modules, load_model
    from vllm_neuronmlp.tools.writer import ShardWriter

    t0 = time.time()
    model, ranks = load_model(ckpt_dir, dtype=torch.float32)
    if not ranks:
        return {"steps": 0, "note": "nothing factored"}
    if val is None or val.shape[0] == 0:
        val = train[-min(val_windows, train.shape[0]):]
        val_note = "calibration windows also used for training (no unused windows)"
    else:
        val = val[:val_windows]
        val_note = "unused calibration windows"
    ppl_before = _ppl(model, val)

    targets = [f"{name}.{leaf}" for name in ranks for leaf in ("u", "v")]
    config = LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=0.0, target_modules=targets, bias="none")
    peft_model = get_peft_model(model, config)
    params = [p for p in peft_model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    g = torch.Generator().manual_seed(seed)
    peft_model.train()
    it = range(steps)
    if progress:
        from tqdm.auto import tqdm

        it = tqdm(it, desc="LoRA recovery", unit="step")
    losses = []
    for step in it:
        idx = torch.randint(0, train.shape[0], (batch,), generator=g)
        ids = train[idx]
        # cosine decay after a short warm-up
        warm = max(1, steps // 10)
        scale = (step + 1) / warm if step < warm else 0.5 * (1 + math.cos(math.pi * (step - warm) / max(1, steps - warm)))
        for group in opt.param_groups:
            group["lr"] = lr * scale
        out = peft_model(input_ids=ids, labels=ids)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(out.loss.detach()))
        if progress and hasattr(it, "set_postfix"):
            it.set_postfix(loss=f"{losses[-1]:.3f}")
    peft_model.eval()
    merged = peft_model.merge_and_unload()
    ppl_after = _ppl(merged, val)

    # rewrite the checkpoint's tensors with the merged factors (dtype as stored)
    from safetensors import safe_open

    files = cf.safetensors_files(ckpt_dir)
    tensors: Dict[str, torch.Tensor] = {}
    for path in sorted(set(files.values())):
        with safe_open(path, framework="pt") as h:
            for name in h.keys():
                tensors[name] = h.get_tensor(name)
    mods = factored_modules(merged)
    for name in ranks:
        u, v = mods[name].factors()
        tensors[cf.u_name(name)] = u.to(tensors[cf.u_name(name)].dtype)
        tensors[cf.v_name(name)] = v.to(tensors[cf.v_name(name)].dtype)
    for path in set(files.values()):
        os.remove(path)
    index = os.path.join(ckpt_dir, cf.SAFETENSORS_INDEX_FILE)
    if os.path.exists(index):
        os.remove(index)
    writer = ShardWriter(ckpt_dir, max_shard_bytes)
    for name in sorted(tensors):
        writer.add(name, tensors[name])
    writer.finish()
    return {"steps": steps, "rank": rank, "lr": lr, "batch": batch, "seq_len": int(train.shape[1]),
            "ppl_before": ppl_before, "ppl_after": ppl_after, "eval_windows": int(val.shape[0]),
            "eval_tokens": int(val.shape[0] * (val.shape[1] - 1)), "eval_text": val_note,
            "final_loss": losses[-1] if losses else None, "seconds": time.time() - t0}
