"""A compression method is one module plus one registry line, and the rest of the
tool reads what it can do from its `capabilities` (tools/methods/base.py).

The method below is defined here, in the test module, and registered with one
line; it compresses a tiny model end to end. Its factors are checked against an
independent reference: by Eckart-Young, the best rank-r approximation of W leaves
exactly the dropped singular values, sqrt(sum_{j>=r} s_j^2), as its error."""
import ast
import json
import os

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from vllm_neuronmlp import checkpoint_format as cf
from vllm_neuronmlp.tools import compressor as C
from vllm_neuronmlp.tools import memory_estimate as me
from vllm_neuronmlp.tools import methods
from vllm_neuronmlp.tools.data import tiny
from vllm_neuronmlp.tools.errors import UserError
from vllm_neuronmlp.tools.methods.base import Capabilities, Method, MemoryTerms, weights_io
from vllm_neuronmlp.tools.options import CompressOptions

NAME = "truncate-in-test"
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class TruncateInTest(Method):
    """Plain truncated SVD by torch.linalg.svd, uniform ranks only, MLP and attention."""

    name = NAME
    capabilities = Capabilities(needs_calibration=False, allocations=("uniform",),
                                attention_allocations=("uniform",), streams_state=False,
                                scope_note="this test method has no other mode",
                                memory=MemoryTerms(spectra_allocations=()))

    def factorizer(self, ctx, stats):
        def layer_factors(i, layer, todo):
            w = weights_io(ctx, layer)
            out = {}
            for role, r in todo.items():
                u, s, vh = torch.linalg.svd(w[role].double(), full_matrices=False)
                out[role] = ((u[:, :r] * s[:r]).float(), vh[:r].float())
            return out
        return layer_factors


METHOD = TruncateInTest()


@pytest.fixture
def registered(monkeypatch):
    monkeypatch.setitem(methods.REGISTRY, NAME, (__name__, "truncated SVD, defined in tests/test_methods.py"))


@pytest.mark.slow
def test_a_method_defined_here_compresses_a_model_with_one_registry_line(registered, tmp_path):
    src = tiny.make_model(str(tmp_path / "src"), layers=2)
    opts = dict(method=NAME, rank_allocation="uniform", block_size=32, progress=False)
    dry = C.compress(src, str(tmp_path / "dry"), 0.3, dry_run=True, **opts)
    assert f"method {NAME}, ratio 0.3 of every decoder linear's parameters" in dry.work[1]  # --scope auto -> all
    assert not any(w.startswith("calibration") or w.startswith("pass 1") for w in dry.work)
    assert sorted(dry.estimate["stages"]) == ["calibration", "factor_pass"]  # its declared terms: no statistics pass
    assert dry.estimate["inputs"]["calibration_tokens"] == 0 and dry.estimate["disk_bytes"]["fisher_inputs"] == 0

    res = C.compress(src, str(tmp_path / "out"), 0.3, **opts)
    assert res.method == NAME and res.scope == "all" and res.calibration == {}
    cf.validate(res.out)
    qc = cf.read_quantization_config(res.out)
    assert qc.provenance["method"] == NAME and qc.attention_ranks()  # the attention was factored too
    dense = load_file(os.path.join(src, "model.safetensors"))
    out = {}
    for f in os.listdir(res.out):
        if f.endswith(".safetensors"):
            out.update(load_file(os.path.join(res.out, f)))
    assert len(qc.ranks) >= 6  # every MLP projection and o_proj of both layers (q/k/v are too small at 0.3)
    for module, r in qc.ranks.items():
        w = dense[cf.weight_name(module)].double().numpy()  # [out, in]
        u, v = out[cf.u_name(module)].double().numpy(), out[cf.v_name(module)].double().numpy()
        assert u.shape == (w.shape[1], r) and v.shape == (r, w.shape[0]) and cf.weight_name(module) not in out
        s = np.linalg.svd(w, compute_uv=False)
        err = np.linalg.norm(w.T - u @ v)
        # the output is written in the source's dtype (bf16 rounding of U and V), so the error is close, not exact
        assert err == pytest.approx(np.sqrt(np.square(s[r:]).sum()), rel=0.02), module
    config = json.load(open(os.path.join(res.out, "config.json")))
    assert config[cf.QUANTIZATION_CONFIG_KEY]["provenance"]["allocation_mix"]["ratio_by_channels"] == 0


def test_the_options_ask_the_method_what_it_supports(registered):
    opts = CompressOptions(ratio=0.3, method=NAME, rank_allocation="uniform")
    opts.validate()
    assert opts.scope == "all"  # auto: it factors attention with its allocation
    with pytest.raises(UserError, match=rf"^--rank-allocation adaptive: --method {NAME} accepts uniform$"):
        CompressOptions(ratio=0.3, method=NAME, rank_allocation="adaptive").validate()
    with pytest.raises(UserError, match=rf"^--export dense needs --method nystrom \(only channel selection keeps "
                                        rf"the model's architecture\), got --method {NAME}$"):
        CompressOptions(ratio=0.3, method=NAME, rank_allocation="uniform", export="dense").validate()
    with pytest.raises(UserError, match=r"^--method must be one of plain, whiten, fisher, error-aware, nystrom, "
                                        rf"hybrid, {NAME}, got 'nope'$"):
        CompressOptions(ratio=0.3, method="nope").validate()


def test_a_partly_attention_capable_method_is_refused_with_its_own_reason(registered, monkeypatch):
    caps = Capabilities(attention_allocations=("adaptive",), scope_note="its uniform mode is MLP only")
    monkeypatch.setattr(TruncateInTest, "capabilities", caps)
    opts = CompressOptions(ratio=0.3, method=NAME, rank_allocation="uniform")
    opts.validate()
    assert opts.scope == "mlp"
    with pytest.raises(UserError, match=rf"^--scope all with --method {NAME} needs --rank-allocation adaptive "
                                        r"\(its uniform mode is MLP only\)$"):
        CompressOptions(ratio=0.3, method=NAME, rank_allocation="uniform", scope="all").validate()
    monkeypatch.setattr(TruncateInTest, "capabilities", Capabilities(scope_note="it reads MLP inputs only"))
    with pytest.raises(UserError, match=rf"^--scope all factors the attention projections, which --method {NAME} "
                                        r"cannot \(it reads MLP inputs only\); use one of plain, whiten, fisher, "
                                        r"hybrid$"):
        CompressOptions(ratio=0.3, method=NAME, scope="all").validate()


def test_the_memory_estimate_reads_the_declared_terms(registered, monkeypatch):
    shp = me.ModelShape(hidden=2048, intermediate=8192, layers=16, vocab=32000, heads=32, kv_heads=8, head_dim=64,
                        layer_params=60_000_000, source_bytes_per_param=2, source_bytes=2 << 30)
    opts = CompressOptions(ratio=0.3, rank_allocation="uniform", calib_samples=16, calib_seq_len=256)
    plain = me.estimate(shp, opts, NAME)
    assert sorted(plain.stages) == ["calibration", "factor_pass"]
    two = Capabilities(memory=MemoryTerms(hidden_streams=2, spectra_allocations=("uniform",)))
    monkeypatch.setattr(TruncateInTest, "capabilities", two)
    est = me.estimate(shp, opts, NAME)
    hidden_states = 4 * 16 * 256 * shp.hidden  # float32 calibration hidden states, tokens x hidden
    # with calibration, the factor pass carries two copies of the hidden states instead of none
    assert est.stages["factor_pass"] - plain.stages["factor_pass"] == 2 * hidden_states
    assert "spectra" in est.stages and "fisher_forward" not in est.stages
    fisher = Capabilities(memory=MemoryTerms(fisher_pass=True, channel_order=True))
    monkeypatch.setattr(TruncateInTest, "capabilities", fisher)
    est = me.estimate(shp, opts, NAME)
    assert {"fisher_forward", "fisher_backward", "channel_order"} <= set(est.stages) and "spectra" not in est.stages
    assert est.disk_bytes["fisher_inputs"] == 4 * 16 * 256 * shp.hidden * (shp.layers + 1)


@pytest.mark.parametrize("name", list(methods.REGISTRY))
def test_every_registered_method_declares_consistent_capabilities(name):
    caps = methods.get(name).capabilities
    assert set(caps.allocations) <= set(methods.ALLOCATIONS) and caps.allocations
    assert set(caps.attention_allocations) <= set(caps.allocations)
    assert caps.factorizer_returns in (dict, methods.base.LayerWeights)
    assert caps.narrows == (caps.factorizer_returns is methods.base.LayerWeights)  # only narrowed layers need it
    assert not caps.keeps_architecture or caps.narrows
    assert caps.needs_calibration or not caps.memory.fisher_pass


def _capability_tests(path):
    """Comparisons with a registered method's name, and hasattr/isinstance on a method,
    a factorizer or an allocation, in one file."""
    tree = ast.parse(open(path).read(), path)
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Compare):
            consts = [c for c in ast.walk(node) if isinstance(c, ast.Constant) and isinstance(c.value, str)]
            found += [f"{path}:{node.lineno}: compares with {c.value!r}" for c in consts if c.value in methods.REGISTRY]
        elif isinstance(node, ast.Call) and getattr(node.func, "id", "") in ("hasattr", "isinstance") and node.args:
            text = ast.unparse(node.args[0])
            if any(w in text for w in ("method", "factorizer", "ranks", "plan")):
                found.append(f"{path}:{node.lineno}: {ast.unparse(node)}")
    return found


def test_nothing_outside_the_methods_tests_a_method_by_name_or_attribute():
    found = []
    for base, dirs, names in os.walk(os.path.join(ROOT, "tools")):
        dirs[:] = [d for d in dirs if d not in ("__pycache__", "methods")]
        found += [f for n in names if n.endswith(".py") for f in _capability_tests(os.path.join(base, n))]
    assert not found, "\n".join(found)
