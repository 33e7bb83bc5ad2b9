"""docs/results.md is generated from benchmarks/results/*.json by benchmarks/report.py."""
import importlib.util
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def load_report():
    spec = importlib.util.spec_from_file_location("results_report", ROOT / "benchmarks" / "report.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up
    spec.loader.exec_module(mod)
    return mod


report = load_report()


def test_results_md_is_what_the_script_writes_now():
    written = (ROOT / "docs" / "results.md").read_text()
    assert written == report.render(), "docs/results.md is stale: run python benchmarks/report.py"


def test_every_results_json_has_a_section():
    results = ROOT / "benchmarks" / "results"
    files = {str(p.relative_to(results)) for p in results.rglob("*.json")}
    covered = {s.file for s in report.SECTIONS}
    assert files <= covered, f"results without a section in benchmarks/report.py: {sorted(files - covered)}"


def serving_json(tmp_path, date=None):
    run = {"completed": 4, "failed": 0, "output_throughput": 10.0, "median_tpot_ms": 50.0}
    fast = dict(run, output_throughput=15.0, median_tpot_ms=40.0)
    d = {"settings": {"models": {"dense": "a", "svd": "b"}, "reference": "dense", "repeats": 1, "num_prompts": 4,
                      "input_len": 8, "output_len": 4, "concurrency": 2},
         "runs": {"dense": [run], "svd": [fast]},
         "median": {"dense": {"output_throughput": 10.0, "median_tpot_ms": 50.0},
                    "svd": {"output_throughput": 15.0, "median_tpot_ms": 40.0}},
         "command": "python benchmarks/serving.py --model dense=a --model svd=b"}
    if date:
        d["date"] = date
    (tmp_path / "serving_x.json").write_text(json.dumps(d))


def test_a_run_under_an_older_default_is_archived_and_says_so(tmp_path):
    serving_json(tmp_path, date="2026-01-02")
    section = report.Section("serving_x.json", "Serving", "unused", report.render_serving, ("fisher", "mlp"))
    archived, lines = report.render_section(section, ("hybrid", "all"), tmp_path)
    text = "\n".join(lines)
    assert archived
    assert "older default (`--method fisher --scope mlp`; today's is `--method hybrid --scope all`)" in text
    # the command and date come from the JSON, the numbers from its runs
    assert "`python benchmarks/serving.py --model dense=a --model svd=b` — 2026-01-02" in text
    assert "| svd | 15.0 | 15.0 | 1.50× | 40 ms | 0 |" in text
    archived, lines = report.render_section(section, ("fisher", "mlp"), tmp_path)
    assert not archived and "older default" not in "\n".join(lines)


def test_a_missing_results_file_names_the_command_that_makes_it(tmp_path):
    section = report.Section("absent.json", "Absent", "python benchmarks/absent.py --work W", report.render_serving)
    archived, lines = report.render_section(section, ("hybrid", "all"), tmp_path)
    assert not archived
    assert "`benchmarks/results/absent.json` is missing: run `python benchmarks/absent.py --work W`." in lines


def test_the_current_default_is_read_from_the_tool():
    from vllm_neuronmlp.tools.methods import DEFAULT_METHOD

    method, scope = report.current_default()
    assert method == DEFAULT_METHOD and scope in ("mlp", "all")
