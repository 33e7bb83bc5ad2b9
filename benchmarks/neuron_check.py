"""`make neuron-check`: verify the Trainium path on a Trainium host, and what can be on any machine.

Steps (each reported as ran / skipped, with the reason / failed, with the error):

  emulator-kernels   every kernel in the project's CPU NKI emulator against numpy (float64),
                     shapes from a decode step to a few hundred tokens            [any machine]
  emulator-predict   the emulator's modelled latency of fused_xuv, sequential_xuv and dense_xw
                     at the paper's DeepSeek-V3 shapes (K=7168, r=4096, N=18432) and the
                     block-size sweep at S=4096                                    [any machine]
  emulator-attention the modelled-time table of benchmarks/attention_kernels.py: fused_xuv at
                     Llama-3.1-8B's qkv_proj (4096 -> 6144) and o_proj (4096 -> 4096) at the
                     eq.-5 ranks of ratios 0.1-0.5 against dense_xw, and the break-even
                     rank; S = 1, 32, 1024, 4096 on trn1 and trn2 (quick: S=32, trn2) [any machine]
  device-kernels     every kernel compiled with the real `nki` and run on the NeuronCore
                     through kernels/launch.py (TorchNeuron wrap_nki), compared with numpy
                     and with the emulator; tiny shapes to the paper's (S=1024)     [Trainium]
  device-timing      fused_xuv, sequential_xuv, dense_xw timed on the device at the paper's
                     shapes and the block-size sweep, beside the emulator's predictions [Trainium]
  device-attention   fused_xuv at the same attention shapes and ranks, and dense_xw, timed on
                     the device (the S of emulator-attention)                       [Trainium]
  serve-accuracy     the default model compressed twice, with compress's defaults (format v3:
                     MLPs narrowed, attention factored) and with --scope mlp; the dense model
                     and both checkpoints each served by `vllm serve` on vllm-neuron (native
                     line) at TP 1 and the smallest TP > 1 that splits the model's heads the way
                     vllm-neuron's attention does (2; 3 for SmolLM2's 9 heads); greedy
                     completions and prompt logprobs against the CPU torch path (transformers
                     + our SVDLinear, float32), the dense model's own deviation beside them as
                     the control; prints, per layer and projection, whether the NKI kernel or
                     the fallback ran (the variant's load logs it)                  [Trainium]
  serve-variant      from the TP > 1 server logs of serve-accuracy: the classes the variant's
                     hooks took (registry class, model class) and each rank's shard checksum;
                     fails unless every rank loaded, with different split shards and equal
                     replicated factors                                             [Trainium]
  serve-bench        `vllm bench serve` on the dense and both compressed models (input 256,
                     output 128, concurrency 16, alternating rounds): decode throughput and
                     TPOT against dense                                             [Trainium]

The header line says how this process would launch NKI kernels (kernels/launch.py: which
TorchNeuron runtime's `wrap_nki`, and the grid), or why it cannot.

Writes one JSON and one PNG to benchmarks/results/neuron/ (or --out). Exits non-zero only
if a step that ran failed; skipped steps are listed with their reason.

`--quick` (what CI runs, about ten seconds): emulator predictions at S=1024 on trn2 only
and a 3-point block sweep at S=1024; the full run covers S=1K..32K on trn1 and trn2 and
the paper's whole sweep at S=4096 (several minutes on two CPU cores).

The device and serving steps have NOT run anywhere yet: the Neuron SDK cannot be installed
on the development machines. Their code follows the documented APIs (docs/trainium.md).

    python benchmarks/neuron_check.py [--quick] [--out DIR] [--dense DIR --compressed DIR --compressed-mlp DIR]
                                      [--tp 1,2]
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import platform
import statistics
import sys
import time
import traceback

import numpy as np

from vllm_neuronmlp.kernels import baselines, blocking, launch, nki_compat, sim, xuv
from vllm_neuronmlp.neuron import stack as neuron_stack

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import kernel_study  # noqa: E402  (the paper's shapes and the count-only runner, one definition)
import attention_kernels  # noqa: E402  (Llama-3.1-8B attention shapes, their rank set, the table)

OUT_DIR = os.path.join(HERE, "results", "neuron")
K, R, N = kernel_study.K, kernel_study.R, kernel_study.N
FULL_SEQS, QUICK_SEQS = kernel_study.SEQS, [1024]
FULL_SWEEP, QUICK_SWEEP = kernel_study.SWEEP_BM, [128, 512, 1024]
FULL_SWEEP_S, QUICK_SWEEP_S = kernel_study.SWEEP_S, 1024   # the paper sweeps at S=4096
TOL = {"float32": 1e-5, "bfloat16": 2e-2}     # relative Frobenius error against float64 numpy
# serving accuracy, bf16 on the device against float32 on CPU (stated in the report):
LOGPROB_MEDIAN_NATS, LOGPROB_P99_NATS, GREEDY_TOKENS, GREEDY_AGREE = 0.05, 0.5, 16, 0.75
PROMPTS = [
    "The capital of France is",
    "Low-rank factorization of a weight matrix means",
    "In 1969, the first humans to walk on the Moon were",
    "A good recipe for bread starts with",
    "The main difference between a CPU and a GPU is",
    "Photosynthesis is the process by which",
    "The tallest mountain in the world is",
    "To sort a list in Python you can",
]


# ---------------------------------------------------------------- machine facts
def neuron_devices():
    return sorted(glob.glob("/dev/neuron*"))


def environment():
    found = neuron_stack.detect_stack()
    device_ok, device_reason = True, ""
    if not nki_compat.REAL_NKI:
        device_ok, device_reason = False, ("the Neuron SDK's `nki` is not importable (PyPI only has a placeholder; "
                                           "install the Neuron SDK, see README 'On Trainium')")
    elif not neuron_devices():
        device_ok, device_reason = False, "no /dev/neuron* device on this machine"
    else:
        try:
            launch._torch_neuron_api()
        except launch.DeviceUnavailable as e:
            device_ok, device_reason = False, str(e)
    serve_ok, serve_reason = device_ok, device_reason
    if serve_ok and found.line != neuron_stack.NATIVE:
        serve_ok, serve_reason = False, (f"vllm-neuron's native line is needed; found "
                                         f"{found.describe() if found.installed else 'no vllm-neuron'}")
    return {
        "machine": {"python": platform.python_version(), "platform": platform.platform(),
                    "cpus": os.cpu_count(), "neuron_devices": neuron_devices()},
        "sdk": {"real_nki": nki_compat.REAL_NKI, "vllm_neuron": found.describe() if found.installed else None,
                "nki_entry_point": launch.entry_point()},
        "device_ok": device_ok, "device_reason": device_reason, "serve_ok": serve_ok, "serve_reason": serve_reason,
    }


# ---------------------------------------------------------------- kernel cases
def kernel_cases(paper: bool):
    """(label, kernel, shapes, kwargs) from a decode step up; with `paper`, S=1024 at the
    paper's shapes (device only: the emulator's value mode is too slow for them). The
    fused kernels run at the block-size selector's block (`blocking.*`)."""
    cases = [
        ("fused_xuv S=1", blocking.fused_xuv, [(1, 256), (256, 128), (128, 384)], {}),
        ("fused_xuv S=130 ragged", blocking.fused_xuv, [(130, 200), (200, 96), (96, 300)], {}),
        ("fused_xuv S=130 transposed", blocking.fused_xuv, [(130, 200), (200, 96), (96, 300)], {"transpose_out": True}),
        ("up_gate S=1", blocking.up_gate, [(1, 256), (256, 64), (64, 512), (256, 128), (128, 512)], {}),
        ("up_gate S=70", blocking.up_gate, [(70, 256), (256, 64), (64, 512), (256, 128), (128, 512)], {}),
        ("down S=70", blocking.down, [(512, 70), (512, 128), (128, 256)], {}),
        ("dense_xw S=130", baselines.dense_xw, [(130, 200), (200, 300)], {}),
        ("sequential_xuv S=130", baselines.sequential_xuv, [(130, 200), (200, 96), (96, 300)], {}),
        attention_case(),
    ]
    if paper:
        cases += [
            ("fused_xuv paper S=1024", blocking.fused_xuv, [(1024, K), (K, R), (R, N)], {}),
            ("sequential_xuv paper S=1024", baselines.sequential_xuv, [(1024, K), (K, R), (R, N)], {}),
            ("dense_xw paper S=1024", baselines.dense_xw, [(1024, K), (K, N)], {}),
        ]
    return cases


def attention_case(S=4, shape="qkv_proj", ratio="0.5"):
    """Llama-3.1-8B's fused qkv projection at its eq.-5 rank, a few decode tokens: small
    enough for the emulator's value mode, attention-shaped in every weight dimension."""
    m, n = attention_kernels.SHAPES[shape]["in"], attention_kernels.SHAPES[shape]["out"]
    r = attention_kernels.rank_set(m, n)[ratio]["rank"]
    return (f"fused_xuv {shape} 8B S={S} r={r}", blocking.fused_xuv, [(S, m), (m, r), (r, n)], {})


def _arrays(shapes, dtype, seed=0):
    rng = np.random.default_rng(seed)
    return [(rng.standard_normal(s) / np.sqrt(s[0])).astype(dtype) for s in shapes]


def numpy_reference(kernel, arrays, kwargs):
    a = [np.asarray(t, dtype=np.float64) for t in arrays]
    if kernel is blocking.up_gate:
        g = a[0] @ a[1] @ a[2]
        return ((g / (1 + np.exp(-g))) * (a[0] @ a[3] @ a[4])).T
    if kernel is blocking.down:
        return a[0].T @ a[1] @ a[2]
    if kernel is baselines.dense_xw:
        return a[0] @ a[1]
    y = a[0] @ a[1] @ a[2]
    return y.T if kwargs.get("transpose_out") else y


def rel_err(y, ref):
    y = np.asarray(y, dtype=np.float64)
    return float(np.linalg.norm(y - ref) / np.linalg.norm(ref))


def cases_by_dtype(paper: bool):
    """(label, kernel, kwargs, dtype name, input arrays) for every case in fp32 and bf16."""
    import ml_dtypes

    for label, kernel, shapes, kw in kernel_cases(paper):
        for dtype in (np.float32, ml_dtypes.bfloat16):
            yield label, kernel, kw, np.dtype(dtype).name, _arrays(shapes, dtype)


def step_emulator_kernels(report):
    rows = []
    for label, kernel, kw, name, arrays in cases_by_dtype(paper=False):
        t = time.time()
        y, st = sim.run(kernel, *arrays, target="trn2", **kw)
        err = rel_err(y, numpy_reference(kernel, arrays, kw))
        rows.append({"case": label, "dtype": name, "rel_err_vs_numpy": err, "tolerance": TOL[name],
                     "ok": err <= TOL[name], "seconds": round(time.time() - t, 3),
                     "modeled_latency_us": st.modeled_latency_s * 1e6})
    report["emulator"]["kernel_checks"] = rows
    bad = [r for r in rows if not r["ok"]]
    if bad:
        raise AssertionError(f"emulator disagrees with numpy beyond tolerance: {bad}")
    return f"{len(rows)} kernel/dtype cases within tolerance (fp32 {TOL['float32']}, bf16 {TOL['bfloat16']})"


def _stats_row(st):
    row = {"latency_ms": st.modeled_latency_s * 1e3, "mfu": st.mfu, "hbm_gb": st.hbm_bytes / 1e9,
           "gflop": st.flops / 1e9, "matmul_count": st.matmul_count}
    for extra in ("static_instructions", "dynamic_instructions"):   # newer emulator fields, when present
        if hasattr(st, extra):
            row[extra] = getattr(st, extra)
    return row


def _sweep_point(S, target, block_m):
    """One forced block size; a block whose strip does not fit on chip is an answer of the
    sweep (the paper's spills), recorded as such, not a failure of the step."""
    try:
        return _stats_row(kernel_study.run("fused_xuv", S, target, block_m=block_m))
    except Exception as e:
        if not type(e).__name__.endswith("CapacityError"):
            raise
        return {"does_not_fit": f"{type(e).__name__}: {str(e)[:200]}"}


def step_emulator_predict(report, quick):
    seqs = QUICK_SEQS if quick else FULL_SEQS
    targets = ["trn2"] if quick else ["trn1", "trn2"]
    pred = {}
    for target in targets:
        pred[target] = {name: {str(S): _stats_row(kernel_study.run(name, S, target)) for S in seqs}
                        for name in ("dense_xw", "sequential_xuv", "fused_xuv")}
        sweep_s = QUICK_SWEEP_S if quick else FULL_SWEEP_S
        pred[target]["sweep"] = {"S": sweep_s, "by_block": {
            str(bm): _sweep_point(sweep_s, target, bm) for bm in (QUICK_SWEEP if quick else FULL_SWEEP)}}
    report["emulator"]["predictions"] = {"shapes": {"K": K, "r": R, "N": N, "S": seqs}, "by_target": pred,
                                         "paper_trn1": kernel_study.PAPER}
    t = targets[-1]
    f, d = pred[t]["fused_xuv"][str(seqs[-1])], pred[t]["dense_xw"][str(seqs[-1])]
    return (f"{t} S={seqs[-1]}: fused_xuv {f['latency_ms']:.2f} ms (MFU {f['mfu']:.2f}) vs dense_xw "
            f"{d['latency_ms']:.2f} ms, modelled")


ATTENTION_QUICK = {"targets": ["trn2"], "seqs": [32]}
ATTENTION_FULL = {"targets": list(attention_kernels.TARGETS),
                  "seqs": attention_kernels.DECODE + attention_kernels.PREFILL}


def step_emulator_attention(report, quick):
    plan = ATTENTION_QUICK if quick else ATTENTION_FULL
    res = attention_kernels.study(plan["targets"], plan["seqs"], log=lambda msg: None)
    report["emulator"]["attention"] = res
    t, S = plan["targets"][-1], plan["seqs"][-1]
    p = res["targets"][t]["qkv_proj"][str(S)]
    f = p["fused"]["0.3"]
    return (f"{t} qkv_proj S={S}: fused r={f['rank']} (ratio 0.3) {f['latency_ms'] * 1e3:.0f} us vs dense_xw "
            f"{p['dense']['latency_ms'] * 1e3:.0f} us, break-even rank {p['break_even']['rank']}, modelled")


# ---------------------------------------------------------------- device steps (Trainium only)
def _to_device(arrays):
    import torch

    device = torch.device(os.environ.get("VLLM_NEURONMLP_NEURON_DEVICE", "neuron"))
    out = []
    for a in arrays:
        t = torch.from_numpy(a.view(np.int16)).view(torch.bfloat16) if a.dtype.name == "bfloat16" \
            else torch.from_numpy(a)
        out.append(t.to(device))
    return out


def _to_numpy(t):
    import torch

    t = t.detach().to("cpu")
    return (t.float() if t.dtype == torch.bfloat16 else t).numpy()


def _sync():
    try:
        import torch_neuronx
        torch_neuronx.synchronize()
    except Exception:   # the result copy to the host synchronises anyway
        pass


def step_device_kernels(report):
    rows = []
    for label, kernel, kw, name, arrays in cases_by_dtype(paper=True):
        y = _to_numpy(launch.wrap_for_device(kernel)(*_to_device(arrays), **kw))
        row = {"case": label, "dtype": name, "rel_err_vs_numpy": rel_err(y, numpy_reference(kernel, arrays, kw)),
               "tolerance": TOL[name]}
        if "paper" not in label:
            row["rel_err_vs_emulator"] = rel_err(y, np.asarray(sim.run(kernel, *arrays, target="trn2", **kw)[0],
                                                               dtype=np.float64))
        row["ok"] = row["rel_err_vs_numpy"] <= TOL[name] and row.get("rel_err_vs_emulator", 0) <= TOL[name]
        rows.append(row)
    report["device"]["kernel_checks"] = rows
    bad = [r for r in rows if not r["ok"]]
    if bad:
        raise AssertionError(f"device kernels disagree beyond tolerance: {bad}")
    return f"{len(rows)} kernel/dtype cases on the device within tolerance"


def _time_device(kernel, arrays, kw, repeats=10):
    fn = launch.wrap_for_device(kernel)
    tensors = _to_device(arrays)
    fn(*tensors, **kw)   # compile + warm-up
    _sync()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn(*tensors, **kw)
        _sync()
        times.append(time.perf_counter() - t)
    return statistics.median(times) * 1e3


def step_device_timing(report, quick):
    import ml_dtypes

    bf = ml_dtypes.bfloat16
    seqs = QUICK_SEQS if quick else FULL_SEQS
    sweep_s = QUICK_SWEEP_S if quick else FULL_SWEEP_S
    measured = {"dense_xw": {}, "sequential_xuv": {}, "fused_xuv": {}, "sweep": {"S": sweep_s, "by_block": {}}}
    for S in seqs:
        x, u, v, w = _arrays([(S, K), (K, R), (R, N), (K, N)], bf)
        measured["dense_xw"][str(S)] = _time_device(baselines.dense_xw, [x, w], {})
        measured["sequential_xuv"][str(S)] = _time_device(baselines.sequential_xuv, [x, u, v], {})
        measured["fused_xuv"][str(S)] = _time_device(blocking.fused_xuv, [x, u, v], {})
    x, u, v = _arrays([(sweep_s, K), (K, R), (R, N)], bf)
    for bm in (QUICK_SWEEP if quick else FULL_SWEEP):
        measured["sweep"]["by_block"][str(bm)] = _time_device(xuv.fused_xuv, [x, u, v], {"block_m": bm})
    report["device"]["timing_ms"] = measured
    return f"timed {len(seqs)} sequence lengths and {len(measured['sweep']['by_block'])} block sizes at S={sweep_s}"


def step_device_attention(report, quick):
    import ml_dtypes

    bf = ml_dtypes.bfloat16
    seqs = (ATTENTION_QUICK if quick else ATTENTION_FULL)["seqs"]
    measured = {}
    for name, s in attention_kernels.SHAPES.items():
        m, n = s["in"], s["out"]
        measured[name] = {}
        for S in seqs:
            x, w = _arrays([(S, m), (m, n)], bf)
            row = {"dense_xw": _time_device(baselines.dense_xw, [x, w], {}), "fused_xuv": {}}
            for ratio, chosen in attention_kernels.rank_set(m, n).items():
                r = chosen["rank"]
                u, v = _arrays([(m, r), (r, n)], bf, seed=1)
                row["fused_xuv"][ratio] = {"rank": r, "ms": _time_device(blocking.fused_xuv, [x, u, v], {})}
            measured[name][str(S)] = row
    report["device"]["attention_timing_ms"] = measured
    return (f"timed {len(attention_kernels.SHAPES)} attention shapes at S={seqs}, "
            f"dense and {len(attention_kernels.RATIOS)} ranks each")


def _cpu_reference(model_dir):
    """Greedy completions and prompt logprobs from transformers on CPU (float32); our
    SVDLinear runs the factored modules (vllm_neuronmlp.hf_quantizer)."""
    import torch
    import vllm_neuronmlp  # noqa: F401  (registers the svd_neuron quantizer with transformers)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    out = []
    for prompt in PROMPTS:
        ids = tok(prompt, return_tensors="pt").input_ids
        with torch.no_grad():
            logp = torch.log_softmax(model(ids).logits[0].float(), -1)
            gen = model.generate(ids, max_new_tokens=GREEDY_TOKENS, do_sample=False)
        prompt_lp = [float(logp[i - 1, ids[0, i]]) for i in range(1, ids.shape[1])]
        out.append({"prompt_ids": ids[0].tolist(), "prompt_logprobs": prompt_lp,
                    "greedy_ids": gen[0, ids.shape[1]:].tolist()})
    return out


def _server_outputs(server, reference):
    import urllib.request

    out = []
    for ref in reference:
        body = json.dumps({"model": server.served_name, "prompt": ref["prompt_ids"], "max_tokens": GREEDY_TOKENS,
                           "temperature": 0, "echo": True, "logprobs": 0, "return_tokens_as_token_ids": True,
                           "ignore_eos": True}).encode()
        req = urllib.request.Request(f"{server.url}/v1/completions", data=body,
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=600) as r:
            choice = json.load(r)["choices"][0]
        lp = choice["logprobs"]
        n = len(ref["prompt_ids"])
        tokens = [int(t.split(":")[-1]) for t in lp["tokens"]]
        out.append({"prompt_logprobs": lp["token_logprobs"][1:n], "greedy_ids": tokens[n:]})
    return out


def _compare(reference, served):
    diffs, agree, first = [], 0, 0
    for ref, got in zip(reference, served):
        diffs += [abs(a - b) for a, b in zip(ref["prompt_logprobs"], got["prompt_logprobs"])]
        agree += ref["greedy_ids"][:GREEDY_TOKENS] == got["greedy_ids"][:GREEDY_TOKENS]
        first += ref["greedy_ids"][:1] == got["greedy_ids"][:1]
    d = sorted(diffs)
    res = {"logprob_abs_diff_median": statistics.median(d), "logprob_abs_diff_p99": d[int(0.99 * (len(d) - 1))],
           "greedy_full_agreement": agree / len(reference), "greedy_first_token_agreement": first / len(reference)}
    res["ok"] = (res["logprob_abs_diff_median"] <= LOGPROB_MEDIAN_NATS
                 and res["logprob_abs_diff_p99"] <= LOGPROB_P99_NATS
                 and res["greedy_full_agreement"] >= GREEDY_AGREE and res["greedy_first_token_agreement"] == 1.0)
    return res


CHECKPOINTS = ("dense", "compressed-v3", "compressed-mlp")


def _checkpoints(args, work):
    """{"dense", "compressed-v3" (compress's defaults: --method hybrid --scope auto), "compressed-mlp"
    (--scope mlp)} at ratio 0.2, made from the default model unless given."""
    from vllm_neuronmlp.tools import compress, materialize_default_model

    dense = args.dense or os.path.join(work, "dense")
    if not os.path.isdir(dense):
        materialize_default_model(dense)
    out = {"dense": dense}
    for name, given, scope in (("compressed-v3", args.compressed, None),
                               ("compressed-mlp", args.compressed_mlp, "mlp")):
        path = given or os.path.join(work, f"{name}-0.2")
        if not os.path.isdir(path):
            compress(dense, path, ratio=0.2, **({"scope": scope} if scope else {}))
        out[name] = path
    return out


def serve_degrees(model_dir: str, requested: str = "auto"):
    """([degrees], note): 1 and the smallest degree > 1 that splits the model's heads the way
    vllm-neuron's attention does (heads divisible by it; KV heads divisible by it or
    dividing it), or the comma-separated `requested` ones."""
    from vllm_neuronmlp import checkpoint_format as cf
    from vllm_neuronmlp.neuron.attention import HeadSharding
    from vllm_neuronmlp.neuron.sharding import SVDShardingError

    if requested != "auto":
        return [int(t) for t in requested.split(",")], f"--tp {requested}"
    cfg = cf.read_config(model_dir)
    heads = int(cfg["num_attention_heads"])
    kv, hd = int(cfg.get("num_key_value_heads") or heads), int(cfg.get("head_dim") or cfg["hidden_size"] // heads)

    def splits(tp):
        try:
            HeadSharding.checked(heads, kv, hd, tp, 0, model_dir)
            return True
        except SVDShardingError:
            return False
    second = next(t for t in range(2, heads + 1) if splits(t))
    note = "" if second == 2 else (f"TP 2 cannot split {heads} heads / {kv} KV heads (vllm-neuron's attention "
                                   f"refuses it for the dense model too): TP {second} instead")
    return [1, second], note


def _serve_log(work, name, tp):
    return os.path.join(work, f"serve_{name}_tp{tp}.log")


def layer_paths(log_text: str) -> dict:
    """{rank: {module: {projection: path}}} from the variant's per-layer line in a server log."""
    from vllm_neuronmlp.neuron import integrate

    out = {}
    for line in log_text.splitlines():
        parsed = integrate.parse_paths_line(line)
        if parsed is not None:
            out[parsed["rank"]] = parsed["modules"]
    return out


def print_layer_paths(name, tp, paths):
    for rank in sorted(paths)[:1]:          # the ranks run the same paths; the JSON keeps them all
        print(f"    {name} TP {tp}, rank {rank}: per layer, what ran (kernels = NKI kernel, torch = fallback)")
        for module, projections in paths[rank].items():
            print(f"      {module:28s} {' '.join(f'{k}={v}' for k, v in projections.items())}")


def step_serve_accuracy(report, args, work):
    from vllm_neuronmlp.tools.evaluation.serving import VllmServer

    models = _checkpoints(args, work)
    degrees, note = serve_degrees(models["dense"], args.tp)
    result = {"tolerance": {"logprob_abs_diff_median_nats": LOGPROB_MEDIAN_NATS,
                            "logprob_abs_diff_p99_nats": LOGPROB_P99_NATS, "greedy_tokens": GREEDY_TOKENS,
                            "greedy_full_agreement_at_least": GREEDY_AGREE, "greedy_first_token_agreement": 1.0},
              "tp": degrees, "tp_note": note, "checkpoints": dict(models), "by_tp": {}}
    if note:
        print(f"    {note}")
    references = {name: _cpu_reference(path) for name, path in models.items()}
    failures = []
    for tp in degrees:
        row = result["by_tp"][str(tp)] = {}
        served = {}
        for name, path in models.items():
            with VllmServer(path, _serve_log(work, name, tp), served_name=name,
                            extra_args=["--max-model-len", "512", "--tensor-parallel-size", str(tp)]) as server:
                served[name] = _server_outputs(server, references[name])
                log_text = server.log_text()
            row[name] = _compare(references[name], served[name])
            if name != "dense":
                row[name]["layer_paths"] = paths = layer_paths(log_text)
                print_layer_paths(name, tp, paths)
                if not paths:
                    failures.append(f"{name} at TP {tp}: no per-layer line in the server log (the variant's "
                                    f"load_weights hook did not run)")
                row[name]["greedy_agreement_with_dense_served"] = sum(
                    a["greedy_ids"] == b["greedy_ids"] for a, b in zip(served[name], served["dense"])) / len(PROMPTS)
                if not row[name]["ok"]:
                    failures.append(f"{name} at TP {tp} vs CPU torch beyond tolerance: "
                                    f"{ {k: v for k, v in row[name].items() if k != 'layer_paths'} }")
    report["serving"]["accuracy"] = result
    if failures:
        raise AssertionError("; ".join(failures))
    median = {n: max(result["by_tp"][str(tp)][n]["logprob_abs_diff_median"] for tp in degrees) for n in models}
    return (f"{len(models)} checkpoints at TP {degrees}: compressed median |dlogprob| <= "
            f"{max(v for n, v in median.items() if n != 'dense'):.3f} nats (dense control {median['dense']:.3f})")


def variant_report(log_text: str, tp: int) -> dict:
    """What the server log says about the svd_neuron variant: the classes its hooks took
    and each rank's shard checksum (vllm_neuronmlp/neuron/integrate.py SHARD_LINE), and
    whether that shows a working variant: `tp` ranks, split shards that differ between
    ranks, replicated factors equal on all, one model class."""
    from vllm_neuronmlp.neuron import integrate

    ranks = {}
    for line in log_text.splitlines():
        parsed = integrate.parse_shard_line(line)
        if parsed is not None:
            ranks[parsed["rank"]] = parsed
    rows = [ranks[r] for r in sorted(ranks)]
    problems = []
    if sorted(ranks) != list(range(tp)):
        problems.append(f"shard lines from ranks {sorted(ranks)}, expected ranks 0..{tp - 1} (no line: the variant's "
                        f"load_weights hook did not run there)")
    if len({r["split"] for r in rows}) != len(rows):
        problems.append("two ranks report the same split-shard checksum: they loaded the same shard")
    if len({r["replicated"] for r in rows}) > 1:
        problems.append("the replicated factors differ between ranks")
    if len({(r["implementation"], r["resolved"]) for r in rows}) > 1:
        problems.append("ranks report different model classes")
    return {"tp": tp, "ranks": rows, "classes": sorted({(r["resolved"], r["implementation"]) for r in rows}),
            "problems": problems, "ok": not problems}


def step_serve_variant(report, args, work):
    from vllm_neuronmlp.tools.evaluation.serving import VllmServer

    models = _checkpoints(args, work)
    tp = max(serve_degrees(models["dense"], args.tp)[0])
    results, problems = {}, []
    for name in ("compressed-v3", "compressed-mlp"):
        log = _serve_log(work, name, tp)
        if not os.path.exists(log):        # serve-accuracy did not serve it at this degree
            with VllmServer(models[name], log, served_name=name,
                            extra_args=["--max-model-len", "512", "--tensor-parallel-size", str(tp)]):
                pass
        with open(log, errors="replace") as f:
            result = results[name] = variant_report(f.read(), tp)
        for resolved, implementation in result["classes"]:
            print(f"    {name}: registry class {resolved} -> model class {implementation}")
        for row in result["ranks"]:
            print(f"    {name}: rank {row['rank']}/{row['tp']}: {row['mlps']} MLPs, checksum split={row['split']!r} "
                  f"replicated={row['replicated']!r}")
        problems += [f"{name}: {p} (log {log})" for p in result["problems"]]
    report["serving"]["variant"] = results
    if problems:
        raise AssertionError(f"the svd_neuron variant at TP {tp}: {'; '.join(problems)}")
    return f"both checkpoints: {tp} ranks loaded their own shards"


def step_serve_bench(report, args, work, quick):
    import serving

    models = _checkpoints(args, work)
    result = serving.run(models, repeats=2 if quick else 3, num_prompts=64, input_len=256, output_len=128,
                         concurrency=16, log_dir=work)
    report["serving"]["bench"] = result
    ratios = result["ratio_to_reference"]
    return "; ".join(f"{name}: output throughput x{ratios[name]['output_throughput']:.2f}, TPOT "
                     f"x{ratios[name]['median_tpot_ms']:.2f} of dense" for name in models if name != "dense")


# ---------------------------------------------------------------- report
def plot(report, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pred = (report["emulator"].get("predictions") or {}).get("by_target", {})
    measured = report["device"].get("timing_ms") or {}
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for target, rows in pred.items():
        for name in ("dense_xw", "sequential_xuv", "fused_xuv"):
            s = sorted(int(k) for k in rows[name])
            axes[0].plot(s, [rows[name][str(k)]["latency_ms"] for k in s], "--", marker="o",
                         label=f"{name} ({target}, emulator)")
        sweep = {k: v for k, v in rows["sweep"]["by_block"].items() if "latency_ms" in v}
        bms = sorted(int(k) for k in sweep)
        axes[1].plot(bms, [sweep[str(b)]["latency_ms"] for b in bms], "--", marker="o",
                     label=f"emulator {target}, S={rows['sweep']['S']}")
    for name in ("dense_xw", "sequential_xuv", "fused_xuv"):
        if measured.get(name):
            s = sorted(int(k) for k in measured[name])
            axes[0].plot(s, [measured[name][str(k)] for k in s], "-", marker="s", label=f"{name} (device)")
    if measured.get("sweep"):
        sweep = measured["sweep"]["by_block"]
        bms = sorted(int(k) for k in sweep)
        axes[1].plot(bms, [sweep[str(b)] for b in bms], "-", marker="s", label=f"device, S={measured['sweep']['S']}")
    axes[0].set(xscale="log", yscale="log", xlabel="tokens S", ylabel="ms",
                title=f"K={K}, r={R}, N={N}, bf16")
    axes[1].set(xscale="log", xlabel="block BM", ylabel="ms", title="fused_xuv block sweep")
    for ax in axes:
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
    ran = [s["name"] for s in report["steps"] if s["status"] == "ran"]
    fig.suptitle(f"neuron-check ({report['mode']}): ran {', '.join(ran) or 'nothing'}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true",
                    help="CI mode: emulator predictions at S=1024 on trn2 and a 3-point block sweep at S=1024 "
                         "(seconds, not minutes); device and serving steps still run when the hardware is there")
    ap.add_argument("--out", default=OUT_DIR, help="where the JSON and PNG go (default benchmarks/results/neuron)")
    ap.add_argument("--work", default=os.path.join("work", "neuron-check"), help="checkpoints and server logs")
    ap.add_argument("--dense", help="dense checkpoint to serve (default: the embedded default model)")
    ap.add_argument("--compressed", help="its svd_neuron checkpoint from compress's defaults (default: compress "
                                         "--ratio 0.2, format v3)")
    ap.add_argument("--compressed-mlp", help="its svd_neuron checkpoint with the MLP only (default: compress "
                                             "--ratio 0.2 --scope mlp)")
    ap.add_argument("--tp", default="auto", help="tensor-parallel degrees to serve at, e.g. 1,2 (default: 1 and the "
                                                 "smallest degree > 1 that splits the model's attention heads)")
    args = ap.parse_args(argv)

    env = environment()
    report = {"mode": "quick" if args.quick else "full", "started": time.strftime("%Y-%m-%dT%H:%M:%S"),
              **{k: env[k] for k in ("machine", "sdk")}, "steps": [], "emulator": {}, "device": {}, "serving": {}}
    os.makedirs(args.out, exist_ok=True)
    os.makedirs(args.work, exist_ok=True)
    steps = [
        ("emulator-kernels", True, "", lambda: step_emulator_kernels(report)),
        ("emulator-predict", True, "", lambda: step_emulator_predict(report, args.quick)),
        ("emulator-attention", True, "", lambda: step_emulator_attention(report, args.quick)),
        ("device-kernels", env["device_ok"], env["device_reason"], lambda: step_device_kernels(report)),
        ("device-timing", env["device_ok"], env["device_reason"], lambda: step_device_timing(report, args.quick)),
        ("device-attention", env["device_ok"], env["device_reason"], lambda: step_device_attention(report, args.quick)),
        ("serve-accuracy", env["serve_ok"], env["serve_reason"], lambda: step_serve_accuracy(report, args, args.work)),
        ("serve-variant", env["serve_ok"], env["serve_reason"], lambda: step_serve_variant(report, args, args.work)),
        ("serve-bench", env["serve_ok"], env["serve_reason"],
         lambda: step_serve_bench(report, args, args.work, args.quick)),
    ]
    print(f"neuron-check ({report['mode']} mode"
          f"{': emulator predictions at S=1024 on trn2 only, block sweep at S=1024' if args.quick else ''})")
    print(f"  NKI kernels are launched through: {env['sdk']['nki_entry_point']}")
    for name, can_run, reason, fn in steps:
        t = time.time()
        if not can_run:
            entry = {"name": name, "status": "skipped", "reason": reason}
        else:
            try:
                entry = {"name": name, "status": "ran", "summary": fn()}
            except Exception as e:   # report it and go on: one JSON says what passed and what did not
                entry = {"name": name, "status": "failed", "error": f"{type(e).__name__}: {e}",
                         "traceback": traceback.format_exc(limit=8)}
        entry["seconds"] = round(time.time() - t, 1)
        report["steps"].append(entry)
        detail = entry.get("summary") or entry.get("reason") or entry.get("error")
        print(f"  {name:18s} {entry['status'].upper():8s} {detail}", flush=True)
    json_path = os.path.join(args.out, "neuron_check.json")
    with open(json_path, "w") as f:
        json.dump(report, f, indent=1)
    plot(report, os.path.join(args.out, "neuron_check.png"))
    print(f"wrote {json_path} and neuron_check.png")
    return 1 if any(s["status"] == "failed" for s in report["steps"]) else 0


if __name__ == "__main__":
    sys.exit(main())
