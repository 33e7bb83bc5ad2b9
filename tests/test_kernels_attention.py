"""benchmarks/attention_kernels.py (fused XUV vs dense at Llama-3.1-8B's attention shapes,
modelled on the emulator) and its neuron_check steps: the rank set is eq. 5 at block 128,
the numbers are the emulator's own count-only runs of the very launches with HBM bytes
equal to hand counts, and the break-even rank is where the curve crosses dense. Decode
shapes only (count-only runs of a few milliseconds); the prefill table is the benchmark's."""
import json
import os
import sys

import ml_dtypes
import numpy as np
import pytest

from vllm_neuronmlp.kernels import baselines, blocking, sim, strip_plan, xuv

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
import attention_kernels  # noqa: E402
import neuron_check  # noqa: E402

BF = "bfloat16"


def test_rank_set_is_the_block_aligned_eq5_rank():
    """By hand: qkv 4096 -> 6144 has m n / (m + n) = 2457.6, o_proj 4096 -> 4096 has 2048;
    times (1 - ratio), in blocks of 128, rounded to the nearest block."""
    qkv = attention_kernels.rank_set(4096, 6144)
    o = attention_kernels.rank_set(4096, 4096)
    assert {q: v["rank"] for q, v in qkv.items()} == {"0.1": 2176, "0.2": 1920, "0.3": 1664, "0.5": 1280}
    assert {q: v["rank"] for q, v in o.items()} == {"0.1": 1792, "0.2": 1664, "0.3": 1408, "0.5": 1024}
    for name, ranks, (m, n) in (("qkv", qkv, (4096, 6144)), ("o", o, (4096, 4096))):
        for ratio, v in ranks.items():
            assert v["matrix_ratio"] == pytest.approx(1 - v["rank"] * (m + n) / (m * n))
            # within half a block of rank of the asked ratio
            assert abs(v["matrix_ratio"] - float(ratio)) <= 64 * (m + n) / (m * n) + 1e-12, (name, ratio)
            assert f"ratio={ratio}" in v["chosen_by"]
    assert attention_kernels.SHAPES["qkv_proj"]["out"] == 4096 + 2 * 8 * 128


def test_break_even_reads_the_whole_curve():
    be = attention_kernels.break_even({128: 1.0, 256: 2.0, 384: 3.0, 512: 2.0, 640: 4.0}, 2.5)
    assert be["rank"] == 384 and be["order_flips_at"] == [384, 512, 640]
    assert attention_kernels.break_even({128: 1.0, 256: 2.0}, 5.0) == \
        {"rank": None, "order_flips_at": [], "ranks_run": "128..256 step 128"}
    assert attention_kernels.break_even({128: 9.0, 256: 9.5}, 5.0)["rank"] == 128


def test_decode_point_is_the_emulators_runs_of_the_same_launches():
    """o_proj at S=1 on trn2: dense and fused rows equal count-only runs of dense_xw and
    fused_xuv (at the selector's block) made here, HBM bytes equal the hand count, and the
    break-even rank is the first rank of the scan where fused is no faster."""
    S, m, n, target = 1, 4096, 4096, "trn2"
    p = attention_kernels.point("o_proj", S, target)
    _, dense = sim.run(baselines.dense_xw, sim.spec((S, m), BF), sim.spec((m, n), BF), target=target,
                       count_only=True)
    assert p["dense"]["latency_ms"] == pytest.approx(dense.modeled_latency_s * 1e3, rel=1e-12)
    # x^T is read once per 1024-column block of w, w once (one M block), y written once
    assert dense.hbm_bytes == 2 * (S * m * (n // 1024) + m * n + S * n)
    assert p["dense"]["hbm_gb"] == pytest.approx(dense.hbm_bytes / 1e9)

    def fused(r):
        bm = blocking.select_block_m(strip_plan.xuv_shape(S, m, r, n, x_transpose="dma"), target)
        return sim.run(xuv.fused_xuv, sim.spec((S, m), BF), sim.spec((m, r), BF), sim.spec((r, n), BF),
                       block_m=bm, target=target, count_only=True)[1]

    f = p["fused"]["0.3"]
    st = fused(f["rank"])
    assert f["rank"] == 1408 and f["latency_ms"] == pytest.approx(st.modeled_latency_s * 1e3, rel=1e-12)
    assert st.hbm_bytes == 2 * (S * m + m * f["rank"] + f["rank"] * n + S * n)   # one strip
    assert f["speedup_vs_dense"] == pytest.approx(dense.modeled_latency_s / st.modeled_latency_s)
    assert f["mfu"] == pytest.approx(2 * S * f["rank"] * (m + n) / (st.peak_flops * st.modeled_latency_s))
    r_even = p["break_even"]["rank"]
    assert r_even is not None and r_even % 128 == 0
    assert fused(r_even).modeled_latency_s >= dense.modeled_latency_s
    assert fused(r_even - 128).modeled_latency_s < dense.modeled_latency_s
    assert len(p["scan_ms"]) == 4096 // 128


def test_benchmark_writes_modelled_json_png_and_table(tmp_path, capsys):
    out = str(tmp_path / "attention")
    attention_kernels.main(["--targets", "trn2", "--seqs", "1", "--out", out])
    res = json.loads(open(out + ".json").read())
    assert res["modelled"] and "not measured" in res["note"] and "eq. 5" in res["rank_rule"]
    assert set(res["targets"]["trn2"]) == {"qkv_proj", "o_proj"}
    p = res["targets"]["trn2"]["qkv_proj"]["1"]
    assert set(p["fused"]) == {"0.1", "0.2", "0.3", "0.5"}
    assert [p["fused"][q]["rank"] for q in ("0.1", "0.2", "0.3", "0.5")] == [2176, 1920, 1664, 1280]
    assert os.path.getsize(out + ".png") > 0
    capsys.readouterr()
    attention_kernels.main(["--table", "--out", out])
    table = capsys.readouterr().out
    assert "| qkv_proj 4096→6144 | 1 |" in table and "r=1280" in table


def test_neuron_check_attention_value_case_matches_numpy():
    """The attention-shaped case of neuron-check's emulator-kernels step (every mode, CI
    included): 8B qkv_proj weights at the ratio-0.5 rank, 4 tokens, bf16, against float64."""
    label, kernel, shapes, kw = neuron_check.attention_case()
    assert shapes == [(4, 4096), (4096, 1280), (1280, 6144)] and kernel is blocking.fused_xuv
    assert label in [c[0] for c in neuron_check.kernel_cases(paper=False)]
    arrays = neuron_check._arrays(shapes, ml_dtypes.bfloat16)
    y, _ = sim.run(kernel, *arrays, target="trn2", **kw)
    assert neuron_check.rel_err(y, neuron_check.numpy_reference(kernel, arrays, kw)) <= neuron_check.TOL["bfloat16"]
    ref = np.asarray(arrays[0], np.float64) @ np.asarray(arrays[1], np.float64) @ np.asarray(arrays[2], np.float64)
    assert np.allclose(neuron_check.numpy_reference(kernel, arrays, kw), ref)


def test_neuron_check_attention_step(monkeypatch):
    monkeypatch.setattr(neuron_check, "ATTENTION_QUICK", {"targets": ["trn2"], "seqs": [1]})
    report = {"emulator": {}}
    summary = neuron_check.step_emulator_attention(report, quick=True)
    res = report["emulator"]["attention"]
    assert res["modelled"] and list(res["targets"]) == ["trn2"]
    p = res["targets"]["trn2"]["qkv_proj"]["1"]
    assert f"fused r=1664 (ratio 0.3) {p['fused']['0.3']['latency_ms'] * 1e3:.0f} us" in summary
    assert summary.endswith("modelled") and f"break-even rank {p['break_even']['rank']}" in summary
