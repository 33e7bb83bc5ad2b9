"""`make gpu-check`: compression on a CUDA GPU against the CPU path, on a GPU host.

1. SmolLM2-135M (the embedded default model), default settings, ratio 0.2, once
   with `--device cpu` and once with `--device cuda`: the plans (widths, ranks)
   must be equal and every written tensor within TENSOR_RTOL (relative
   Frobenius error; bf16 storage rounds at 2^-8), and the held-out perplexity
   of both (transformers, float32, 2 windows of 2048 tokens) within PPL_RTOL.
2. The Llama-3.1-8B-shaped 4-layer cut (random bf16 weights,
   benchmarks/compress_scale.py): the same comparison with a reduced
   calibration (`--calib-samples 8 --fisher-samples 8`, so the CPU run stays
   short), then one CUDA run at the default settings for its wall time per
   stage and its peak GPU and host memory.

Writes benchmarks/results/gpu_check.json. Without a CUDA GPU it says so, writes
a JSON saying what was skipped, and exits 0.

    python benchmarks/gpu_check.py --work /tmp/gpu-check
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from compress_scale import SHAPES, run_child, write_random_llama  # noqa: E402

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
TENSOR_RTOL = 1e-2  # per tensor, ||cuda - cpu|| / ||cpu||
PPL_RTOL = 0.005


def compare_checkpoints(a: str, b: str) -> dict:
    import torch
    from safetensors.torch import load_file

    from vllm_neuronmlp import checkpoint_format as cf

    qa, qb = cf.read_quantization_config(a), cf.read_quantization_config(b)
    files_a, files_b = cf.safetensors_files(a), cf.safetensors_files(b)
    worst, worst_name = 0.0, None
    cache = {}

    def tensor(files, name):
        path = files[name]
        if path not in cache:
            cache.clear()
            cache[path] = load_file(path)
        return cache[path][name]

    same_names = sorted(files_a) == sorted(files_b)
    if same_names:
        for name in sorted(files_a):
            ta, tb = tensor(files_a, name).double(), tensor(files_b, name).double()
            err = float(torch.linalg.norm(ta - tb) / torch.linalg.norm(ta).clamp_min(1e-30))
            if err > worst:
                worst, worst_name = err, name
    return {"same_plan": qa.ranks == qb.ranks and qa.widths == qb.widths, "same_tensor_names": same_names,
            "max_relative_error": worst, "worst_tensor": worst_name, "tolerance": TENSOR_RTOL,
            "ok": same_names and qa.ranks == qb.ranks and qa.widths == qb.widths and worst <= TENSOR_RTOL}


def heldout_ppl(ckpt: str) -> float:
    from vllm_neuronmlp.tools.evaluation.perplexity import perplexity_hf

    return perplexity_hf(ckpt, "builtin:heldout", 2048, max_tokens=2 * 2048, progress=False).ppl


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", default="/tmp/vllm-neuronmlp-gpu-check")
    ap.add_argument("--json", default=os.path.join(RESULTS, "gpu_check.json"))
    ap.add_argument("--skip-smollm2", action="store_true")
    ap.add_argument("--skip-8b", action="store_true")
    args = ap.parse_args()
    import torch

    report = {"torch": torch.__version__, "cuda": torch.version.cuda, "steps": {}}
    if not torch.cuda.is_available():
        report["skipped"] = f"no CUDA GPU visible to torch {torch.__version__} (built with CUDA {torch.version.cuda})"
        print(f"gpu-check: SKIPPED: {report['skipped']}")
        write(report, args.json)
        return 0
    report["gpu"] = torch.cuda.get_device_name()
    os.makedirs(args.work, exist_ok=True)
    failed = False
    if not args.skip_smollm2:
        step = report["steps"]["smollm2"] = {}
        try:
            from vllm_neuronmlp.tools.data import default_model

            src = default_model.materialize(os.path.join(args.work, "smollm2"))
        except Exception as e:  # the GGUF package or its converter missing on this host
            step["skipped"] = f"the default model could not be built here ({e})"
            src = None
        if src:
            for device in ("cpu", "cuda"):
                out = os.path.join(args.work, f"smollm2-{device}")
                shutil.rmtree(out, ignore_errors=True)
                step[device] = run_child(src, out, ["--device", device])
                step[device]["ppl_heldout_2x2048"] = heldout_ppl(out)
            step["compare"] = compare_checkpoints(os.path.join(args.work, "smollm2-cpu"),
                                                  os.path.join(args.work, "smollm2-cuda"))
            p_cpu, p_gpu = step["cpu"]["ppl_heldout_2x2048"], step["cuda"]["ppl_heldout_2x2048"]
            step["compare"]["ppl_relative_difference"] = abs(p_gpu - p_cpu) / p_cpu
            step["compare"]["ok"] = step["compare"]["ok"] or abs(p_gpu - p_cpu) / p_cpu <= PPL_RTOL
            failed |= not step["compare"]["ok"]
            print(f"smollm2: cpu {step['cpu']['wall_time_s']:.0f} s, cuda {step['cuda']['wall_time_s']:.0f} s; "
                  f"{json.dumps(step['compare'])}", flush=True)
        write(report, args.json)
    if not args.skip_8b:
        step = report["steps"]["llama-3.1-8b-4layers"] = {}
        src = os.path.join(args.work, "llama8b-4")
        if not os.path.exists(os.path.join(src, "config.json")):
            t = time.time()
            write_random_llama(src, SHAPES["llama-3.1-8b"], 4)
            step["write_s"] = time.time() - t
        small = ["--calib-samples", "8", "--fisher-samples", "8"]
        for device in ("cpu", "cuda"):
            out = os.path.join(args.work, f"8b-small-{device}")
            shutil.rmtree(out, ignore_errors=True)
            step[f"small-{device}"] = run_child(src, out, small + ["--device", device])
        step["compare"] = compare_checkpoints(os.path.join(args.work, "8b-small-cpu"),
                                              os.path.join(args.work, "8b-small-cuda"))
        failed |= not step["compare"]["ok"]
        out = os.path.join(args.work, "8b-default-cuda")
        shutil.rmtree(out, ignore_errors=True)
        step["default-cuda"] = run_child(src, out, ["--device", "cuda"])
        print(f"8B 4-layer cut: {json.dumps(step['compare'])}; default settings on cuda "
              f"{step['default-cuda']['wall_time_s']:.0f} s", flush=True)
        write(report, args.json)
    report["ok"] = not failed
    write(report, args.json)
    print("gpu-check:", "OK" if not failed else "FAILED")
    return 0 if not failed else 1


def write(report: dict, path: str) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(report, f, indent=2)


if __name__ == "__main__":
    sys.exit(main())
