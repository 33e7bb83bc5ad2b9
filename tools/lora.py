"""LoRA recovery of a compressed checkpoint, merged back at the same shapes.

Every MLP projection the compression changed gets one adapter; untouched
layers get none. The compressed checkpoint is loaded through transformers
(hf_model.py), where

- a factored projection is an `SVDLinear` with parameters `svd_u` [in, r] and
  `svd_v` [r, out]: peft attaches one LoRA adapter to each of the two factor
  parameters (`target_parameters`), merged as `U + dU`, `V + dV` at the same
  rank;
- a dense projection of a narrowed layer (format v2 `widths`,
  docs/checkpoint_format.md) is a plain `nn.Linear` k wide on the intermediate
  side: it gets an ordinary LoRA (`target_modules`, by exact module name),
  merged as `W + (alpha / r) B A` at the same [out, in] shape.

The adapters are trained with the causal-LM loss on the calibration windows,
merged by peft, and the changed tensors are written back in their stored
dtype, so the checkpoint's format and quantization_config do not change. A
checkpoint with nothing factored and nothing narrowed is left alone, with a
note. This step loads the whole compressed model (in float32); the streamed
compression does not.
"""
from __future__ import annotations

import math
import os
import time
from typing import Dict, List, Optional, Tuple

import torch

from vllm_neuronmlp import checkpoint_format as cf
from vllm_neuronmlp.tools.evaluation import nll
from vllm_neuronmlp.tools import progress as pg
from vllm_neuronmlp.tools.errors import UserError
from vllm_neuronmlp.tools.writer import ShardWriter


NOTHING_TO_ADAPT = "nothing compressed to adapt: no factored projection and no narrowed layer"


def _ppl(model, windows: torch.Tensor, batch: int = 2) -> float:
    return nll.perplexity(*nll.windows_nll(lambda ids: model(input_ids=ids).logits, windows, batch))


def recover(ckpt_dir: str, train: torch.Tensor, val: Optional[torch.Tensor], steps: int, rank: int = 8,
            lr: float = 2e-4, batch: int = 2, seed: int = 0, progress: bool = True,
            max_shard_bytes: int = 2 * 1024 ** 3, val_windows: int = 8) -> Dict:
    """Train LoRA on `train` windows for `steps` steps on every compressed
    projection of the checkpoint in `ckpt_dir`, merge, and rewrite the changed
    tensors in place (call it on a staging directory). Returns {"steps",
    "adapted_factored", "adapted_dense_narrowed", "ppl_before", "ppl_after", ...},
    or {"steps": 0, ..., "note"} when nothing is compressed; perplexity is
    measured on `val` windows (a random subset of the calibration windows not
    used for training; calibration.py)."""
    _peft()  # a missing peft is named before anything is loaded
    from vllm_neuronmlp.tools.evaluation.hf_model import load_model

    t0 = time.time()
    factored, dense = adapted_modules(ckpt_dir)
    counts = {"adapted_factored": len(factored), "adapted_dense_narrowed": len(dense)}
    if not factored and not dense:
        return {"steps": 0, **counts, "note": NOTHING_TO_ADAPT}
    with pg.stage("LoRA: load the compressed model", progress):
        model, _ = load_model(ckpt_dir, dtype=torch.float32)
    if val is None or val.shape[0] == 0:
        val = train[-min(val_windows, train.shape[0]):]
        val_note = "calibration windows also used for training (no unused windows)"
    else:
        val = val[:val_windows]
        val_note = "unused calibration windows (random subset)"
    with pg.stage(f"LoRA: validation perplexity before ({val.shape[0]} windows)", progress):
        ppl_before = _ppl(model, val)

    peft_model = attach(model, factored, dense, rank)
    losses = train_steps(peft_model, train, steps, lr, batch, seed, progress)
    peft_model.eval()
    with pg.stage("LoRA: merge the adapters (factors and narrowed dense weights)", progress):
        merged = peft_model.merge_and_unload()
    with pg.stage(f"LoRA: validation perplexity after ({val.shape[0]} windows)", progress):
        ppl_after = _ppl(merged, val)

    with pg.stage("LoRA: rewrite the checkpoint's adapted tensors", progress):
        _rewrite_adapted(ckpt_dir, merged, factored, dense, max_shard_bytes)
    return {"steps": steps, "rank": rank, "lr": lr, "batch": batch, "seq_len": int(train.shape[1]), **counts,
            "ppl_before": ppl_before, "ppl_after": ppl_after, "eval_windows": int(val.shape[0]),
            "eval_tokens": int(val.shape[0] * (val.shape[1] - 1)), "eval_text": val_note,
            "first_loss": losses[0] if losses else None, "final_loss": losses[-1] if losses else None,
            "seconds": time.time() - t0}


def adapted_modules(ckpt_dir: str) -> Tuple[List[str], List[str]]:
    """(factored projections, dense projections of narrowed layers) of the
    checkpoint: the modules the compression changed, each of which gets an adapter."""
    config = cf.read_config(ckpt_dir)
    if not cf.has_svd_config(config):
        return [], []
    quant = cf.read_quantization_config(ckpt_dir)
    return sorted(quant.ranks), cf.narrowed_dense_modules(quant, config)


def _peft():
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError:
        raise UserError("--lora-steps needs the PyPI package 'peft'") from None
    return LoraConfig, get_peft_model


def attach(model, factored: List[str], dense: List[str], rank: int):
    """The peft model with one LoRA per factor parameter of every factored module
    (SVDLinear is not an nn.Linear) and one per narrowed dense nn.Linear, all by
    exact name; alpha = 2 r."""
    LoraConfig, get_peft_model = _peft()
    config = LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=0.0, target_modules=list(dense),
                        target_parameters=[n for m in factored for n in (cf.u_name(m), cf.v_name(m))], bias="none")
    return get_peft_model(model, config)


def train_steps(peft_model, train: torch.Tensor, steps: int, lr: float, batch: int, seed: int,
                progress: bool) -> List[float]:
    """AdamW on the adapters, causal-LM loss on random `train` windows; the loss of every step."""
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
        scale = ((step + 1) / warm if step < warm
                 else 0.5 * (1 + math.cos(math.pi * (step - warm) / max(1, steps - warm))))
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
    return losses


def _rewrite_adapted(ckpt_dir: str, merged, factored: List[str], dense: List[str], max_shard_bytes: int) -> None:
    """Replace the checkpoint's svd_u/svd_v of `factored` and .weight of `dense`
    by the merged ones, at the stored shape and dtype; every other tensor as stored."""
    from safetensors import safe_open

    files = cf.safetensors_files(ckpt_dir)
    tensors: Dict[str, torch.Tensor] = {}
    for path in sorted(set(files.values())):
        with safe_open(path, framework="pt") as h:
            for name in h.keys():
                tensors[name] = h.get_tensor(name)
    leaves = [(m, cf.U_SUFFIX, cf.u_name(m)) for m in factored] + [(m, cf.V_SUFFIX, cf.v_name(m)) for m in factored]
    leaves += [(m, cf.WEIGHT_SUFFIX, cf.weight_name(m)) for m in dense]
    for module, leaf, tname in leaves:
        new = getattr(merged.get_submodule(module), leaf).detach()
        if tname not in tensors or tuple(new.shape) != tuple(tensors[tname].shape):
            raise cf.CheckpointFormatError(
                f"{ckpt_dir}: merged {tname} has shape {list(new.shape)}, the checkpoint stores "
                f"{list(tensors[tname].shape) if tname in tensors else 'no such tensor'}")
        tensors[tname] = new.to(tensors[tname].dtype).contiguous()
    for path in set(files.values()):
        os.remove(path)
    index = os.path.join(ckpt_dir, cf.SAFETENSORS_INDEX_FILE)
    if os.path.exists(index):
        os.remove(index)
    writer = ShardWriter(ckpt_dir, max_shard_bytes)
    for name in sorted(tensors):
        writer.add(name, tensors[name])
    writer.finish()
