"""`vllm-neuronmlp compress SRC OUT --ratio R`: SVD-compress the decoder linears of a checkpoint."""
from __future__ import annotations

import argparse

from vllm_neuronmlp.tools.cli.common import add_json_argument, emit

DESCRIPTION = """\
Compress the dense Hugging Face checkpoint SRC and write an `svd_neuron`
checkpoint to OUT that vLLM loads directly (`vllm serve OUT`): each MLP keeps
some of its intermediate channels (a narrower layer) and/or has projections
factored into two block-aligned low-rank factors, W ~ U V, and so may the
attention projections (factors only).

The model is streamed one decoder layer at a time (memory ~ one layer plus the
calibration activations). Calibration text runs through the model. The default
--method hybrid spends one budget on both kinds of cut: blocks of channels (kept
in the order that loses least of the layer's output, the down projection refit
on the kept ones by the Nystrom formula) and blocks of rank (factors whitened by
their inputs and weighted, per output channel, by how sensitive the loss is to
it: the diagonal Fisher from one streamed backward pass over --fisher-samples
windows drawn at random), greedily by estimated loss per parameter. fisher
factors only (no narrowed layers: checkpoint format version 1); nystrom keeps
channels only, ranked by ridge leverage (MoDeGPT); whiten is SVD-LLM's input
whitening alone, error-aware fits each layer to the inputs the compressed
model really feeds it, and plain skips calibration. Ranks and widths are
multiples of --block-size; the budget (--ratio) is met globally. By default
(--scope auto) the methods that can factor attention projections (hybrid,
fisher, whiten with uniform allocation, plain) count every decoder linear
(q, k, v, o, gate, up, down; embeddings and the LM head are not counted) and
factor the attention projections too, the hybrid choosing per block where a
parameter is cheapest to remove (checkpoint format version 3); nystrom,
error-aware and whiten's adaptive mode count and cut the MLPs only, as
--scope mlp does for every method. Both formats serve on vLLM and on the
Trainium variant.

--rank-allocation adaptive (default): with hybrid and fisher, one greedy
allocation by estimated loss per parameter, not scored; with nystrom, widths
by the same loss estimate; with whiten and error-aware, the uniform allocation
and greedy ones from the whitened spectra are scored on held-aside calibration
windows and the one with the lowest perplexity is kept; with plain (no
calibration), the greedy one on squared relative error is used unscored.
uniform gives every matrix the paper's eq.-5 rank (nystrom: every layer the
same width), meeting the budget by mixing neighbouring block multiples; the
hybrid has no uniform mode.

--lora-steps N trains LoRA adapters on every projection the compression
changed (the factors of factored ones, the weights of narrowed layers' dense
ones) with the calibration windows and merges them back (same ranks, widths
and format).

Long runs: before any work the peak memory is estimated from the config and
these options and a run that would not fit is refused, naming the options that
lower it (--dry-run prints the estimate and the planned work and writes
nothing). --device picks where the passes compute: a CUDA GPU keeps the same
float64 statistics and is much faster. Everything expensive (the statistics,
each finished layer) is kept in OUT.resume beside OUT as it is computed;
Ctrl-C or SIGTERM ends the run within seconds (exit 130 / 143) leaving only
that directory, and the same command with --resume continues where it
stopped (statistics are reused even when --ratio or other allocation options
changed). OUT itself is assembled in a temporary sibling directory and renamed
at the end: OUT never holds half a checkpoint. SRC is only read.
"""

EPILOG = """\
examples:
  vllm-neuronmlp default-model smollm2
  vllm-neuronmlp compress smollm2 smollm2-svd20 --ratio 0.2                # 20 % of the decoder linears
  vllm-neuronmlp compress smollm2 smollm2-mlp --ratio 0.2 --scope mlp      # the MLP projections only
  vllm-neuronmlp compress smollm2 out --ratio 0.05 --rank-allocation uniform --method whiten
  vllm-neuronmlp compress smollm2 out --ratio 0.2 --lora-steps 100 --lora-batch 1 --lora-lr 3e-4
  vllm-neuronmlp compress llama-8b llama-8b-svd --ratio 0.2 --dry-run     # memory and work, nothing written
  vllm-neuronmlp compress llama-8b llama-8b-svd --ratio 0.2 --resume      # after an interruption
"""


def add_parser(subparsers) -> None:
    from vllm_neuronmlp import checkpoint_format as cf
    from vllm_neuronmlp.tools.methods import ALLOCATIONS, DEFAULT_ALLOCATION, DEFAULT_METHOD, REGISTRY
    from vllm_neuronmlp.tools.options import (DEFAULT_CALIB_TEXT, DEFAULT_FISHER_SAMPLES, DEVICES, DTYPE_CHOICES,
                                              EXPORTS, LORA_BATCH, LORA_LR, LORA_RANK, SCOPES)

    p = subparsers.add_parser("compress",
                              help="compress a Hugging Face checkpoint (MLP channels and/or low-rank factors)",
                              description=DESCRIPTION, epilog=EPILOG,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("src", metavar="SRC", help="dense Hugging Face checkpoint directory (config.json + safetensors)")
    p.add_argument("out", metavar="OUT", help="output directory (must not exist unless --overwrite)")
    p.add_argument("--ratio", type=float, required=True,
                   help="fraction of the parameters to remove (of every decoder linear with --scope all, of the "
                        "MLP projections with --scope mlp), strictly between 0 and 1 (e.g. 0.2)")
    p.add_argument("--scope", choices=SCOPES, default="auto",
                   help="what --ratio counts and compress may cut: mlp (gate/up/down) or all (also the attention "
                        "projections q/k/v/o, factored; embeddings and the LM head are never counted); auto = all "
                        "for the methods that can factor attention (hybrid, fisher, plain, whiten with uniform "
                        "allocation), mlp for the others (default %(default)s)")
    p.add_argument("--block-size", type=int, default=cf.DEFAULT_BLOCK_SIZE,
                   help="every rank is a multiple of this (the kernels' tile); positive multiple of 32 "
                        "(default %(default)s)")
    p.add_argument("--rounding-threshold", type=float, default=0.5,
                   help="theta of eq. 5: a rank rounds up to the next block when its fractional part is >= theta "
                        "(default %(default)s = ordinary rounding)")
    p.add_argument("--calib-text", nargs="+", default=[DEFAULT_CALIB_TEXT], metavar="FILE",
                   help="UTF-8 text file(s) for calibration, or builtin:calibration, the bundled Wikipedia split "
                        "(default %(default)s)")
    p.add_argument("--calib-samples", type=int, default=64,
                   help="number of calibration windows, drawn at random from the text (default %(default)s)")
    p.add_argument("--calib-seq-len", type=int, default=512,
                   help="tokens per calibration window (default %(default)s)")
    p.add_argument("--fisher-samples", type=int, default=DEFAULT_FISHER_SAMPLES,
                   help="calibration windows of the Fisher pass (hybrid, fisher, nystrom), drawn at random from the "
                        "--calib-samples ones (at most that many are used); memory of the pass grows with "
                        "them (default %(default)s)")
    p.add_argument("--seed", type=int, default=0,
                   help="seed for picking calibration windows and their random subsets (default %(default)s)")
    p.add_argument("--rank-allocation", choices=ALLOCATIONS, default=DEFAULT_ALLOCATION,
                   help="adaptive: spend the budget where the estimated loss grows least (see above); "
                        "uniform: eq.-5 ranks, or one width for nystrom (default %(default)s)")
    p.add_argument("--method", choices=tuple(REGISTRY), default=DEFAULT_METHOD,
                   help="; ".join(f"{name}: {text}" for name, (_module, text) in REGISTRY.items())
                        + " (default %(default)s)")
    p.add_argument("--damping", type=float, default=0.0,
                   help="ridge added to each activation covariance, relative to its mean diagonal "
                        "(default %(default)s)")
    p.add_argument("--lora-steps", type=int, default=0,
                   help="LoRA recovery steps on the calibration windows after compressing, merged back into the "
                        "changed tensors (0 = off, the default)")
    p.add_argument("--lora-rank", type=int, default=LORA_RANK, help="LoRA rank (default %(default)s)")
    p.add_argument("--lora-lr", type=float, default=LORA_LR, help="LoRA peak learning rate (default %(default)s)")
    p.add_argument("--lora-batch", type=int, default=LORA_BATCH,
                   help="calibration windows per LoRA step (default %(default)s)")
    p.add_argument("--dtype", choices=DTYPE_CHOICES, default="auto",
                   help="dtype of the written tensors; auto = the source's (default %(default)s)")
    p.add_argument("--export", choices=EXPORTS, default="svd_neuron",
                   help="svd_neuron: the plugin's format; dense: a plain model with a smaller intermediate_size "
                        "that stock vLLM serves without the plugin (only --method nystrom with every layer at one "
                        "width; refused otherwise) (default %(default)s)")
    p.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    p.add_argument("--max-shard-size", type=float, default=0.5, metavar="GIB",
                   help="safetensors shard size in GiB; output is buffered in memory up to this size "
                        "(default %(default)s)")
    p.add_argument("--device", choices=DEVICES, default="auto",
                   help="where the statistics, the Fisher pass, the factorizations and the channel order run: "
                        "cuda (a GPU torch sees), cpu, or auto = cuda when there is one (default %(default)s)")
    p.add_argument("--resume", action="store_true",
                   help="continue an interrupted run from OUT.resume (statistics and finished layers are reused "
                        "as far as the options match)")
    p.add_argument("--dry-run", action="store_true",
                   help="print the memory estimate and the planned work, write nothing")
    p.add_argument("--memory-limit", type=float, default=None, metavar="GIB",
                   help="memory the run may use, for the check before it starts (default: the cgroup limit or "
                        "MemAvailable, whichever is lower)")
    p.add_argument("--skip-memory-check", action="store_true",
                   help="run even when the estimated peak memory exceeds what is available")
    add_json_argument(p, "the summary")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=run)


def run(args) -> int:
    from vllm_neuronmlp.tools.compressor import compress_with_options
    from vllm_neuronmlp.tools.options import CompressOptions
    from vllm_neuronmlp.tools.summary import format_summary

    opts = CompressOptions(
        ratio=args.ratio, block_size=args.block_size, rounding_threshold=args.rounding_threshold,
        calib_text=tuple(args.calib_text), calib_samples=args.calib_samples, calib_seq_len=args.calib_seq_len,
        fisher_samples=args.fisher_samples, seed=args.seed, rank_allocation=args.rank_allocation,
        method=args.method, scope=args.scope, damping=args.damping, lora_steps=args.lora_steps,
        lora_rank=args.lora_rank, lora_lr=args.lora_lr, lora_batch=args.lora_batch, dtype=args.dtype,
        export=args.export, overwrite=args.overwrite, max_shard_bytes=int(args.max_shard_size * 1024 ** 3),
        progress=not args.no_progress, device=args.device, resume=args.resume, dry_run=args.dry_run,
        memory_check=not args.skip_memory_check, memory_limit_gib=args.memory_limit)
    res = compress_with_options(args.src, args.out, opts)
    if opts.dry_run:
        from vllm_neuronmlp.tools.memory_estimate import format_dry_run

        emit(args, format_dry_run(res), res.to_dict())
    else:
        emit(args, format_summary(res), res.to_dict())
    return 0
