"""The memory estimate against the peaks measured by benchmarks/compress_scale.py
(benchmarks/results/compress_scale.json), and the check that uses it."""
import json
import os
import sys

import pytest

from vllm_neuronmlp.tools import memory_estimate as me
from vllm_neuronmlp.tools.options import CompressOptions

BENCHMARKS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "benchmarks")
sys.path.insert(0, BENCHMARKS)
import compress_scale  # noqa: E402  (the shape and options a recorded run was made with)

RESULTS = os.path.join(BENCHMARKS, "results", "compress_scale.json")
TOLERANCE = 0.25


with open(RESULTS) as _f:
    MEASURED = json.load(_f)
RUNS = MEASURED["runs"]


def test_the_benchmark_measured_what_the_estimate_is_held_to():
    kinds = {(r["shape"], r["method"], r["preset"]) for r in RUNS}
    assert ("llama-3.1-8b", "hybrid", "default") in kinds and ("smollm2", "hybrid", "default") in kinds


@pytest.mark.parametrize("run", RUNS, ids=["-".join(str(r[k]) for k in ("shape", "layers", "method", "preset", "scope"))
                                         for r in RUNS])
def test_estimate_is_within_25_percent_of_the_measured_peak(run):
    est = me.estimate(compress_scale.recorded_shape(run), compress_scale.run_options(run), run["method"],
                      device=run["device"], attention=run["scope"] == "all")
    measured = run["peak_rss_bytes"]
    assert abs(est.peak_bytes - measured) <= TOLERANCE * measured, (
        f"{run['shape']} {run['layers']} layers {run['method']} {run['preset']}: estimate "
        f"{est.peak_bytes / me.GIB:.2f} GiB ({est.peak_stage}) vs measured {measured / me.GIB:.2f} GiB")


def test_available_memory_takes_the_tighter_limit_and_an_explicit_one():
    limit, where = me.available_memory(1.5)
    assert limit == int(1.5 * me.GIB) and where == "--memory-limit 1.5"
    limit, where = me.available_memory()
    meminfo = me._meminfo("MemAvailable")
    assert where in ("MemAvailable", "the cgroup memory limit") and limit <= meminfo + me._own_rss()


def test_the_check_names_the_stage_the_estimate_and_what_lowers_it():
    shp = me.ModelShape(hidden=4096, intermediate=14336, layers=32, vocab=128256, heads=32, kv_heads=8,
                        head_dim=128, layer_params=218_112_000, source_bytes_per_param=2, source_bytes=16 << 30)
    opts = CompressOptions(ratio=0.2, memory_limit_gib=4.0)
    est = me.estimate(shp, opts, "hybrid")
    with pytest.raises(me.MemoryBudgetError, match=rf"estimated peak memory {est.peak_bytes / me.GIB:.1f} GiB "
                                                   rf"\(stage '{est.peak_stage}'\) exceeds the 4\.0 GiB available "
                                                   rf"\(--memory-limit 4\); lower it with .*--device cuda"):
        me.check(est, opts)
    me.check(est, CompressOptions(ratio=0.2, memory_limit_gib=4.0, memory_check=False))  # the check is off
    # fewer calibration windows lower the factor pass's hidden states
    small = me.estimate(shp, CompressOptions(ratio=0.2, calib_samples=8), "hybrid")
    assert small.stages["factor_pass"] < est.stages["factor_pass"]
