"""Registration on Neuron stacks: a no-op without vllm-neuron; the native line gets our
hooks; 0.2.x (NxD Inference) or an unknown layout refuses svd_neuron checkpoints with a
message naming the stack, the version found and what is supported.

The vllm-neuron packages here are stand-ins written into a temporary directory: just the
files our detection looks at (tag 0.2.0 of vllm-project/vllm-neuron for 0.2.x; tag
v0.21.0.1.0.0 layout for the native line) and a platform class with the attributes we
touch (`supported_quantization`, `check_and_update_config`). Unit tests, not integration
tests."""
import importlib
import sys
import textwrap
from types import SimpleNamespace

import pytest

from vllm_neuronmlp import checkpoint_format as fmt
from vllm_neuronmlp.neuron import integrate, stack
from vllm_neuronmlp.neuron.sharding import SVDShardingError

PLATFORM = textwrap.dedent('''
    class NeuronPlatform:
        supported_quantization = {quant}
        checked = []

        @classmethod
        def check_and_update_config(cls, vllm_config):
            cls.checked.append(vllm_config)
''')


def _fake_vllm_neuron(root, version, files, quant=("neuron_quant", "fbgemm_fp8")):
    pkg = root / "vllm_neuron"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "platform.py").write_text(PLATFORM.format(quant=list(quant)))
    for rel, text in files.items():
        path = pkg / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        for parent in path.relative_to(pkg).parents:   # every directory on the way is a package
            init = pkg / parent / "__init__.py"
            if not init.exists():
                init.write_text("")
        path.write_text(text)
    dist = root / f"vllm_neuron-{version}.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text(f"Metadata-Version: 2.1\nName: vllm-neuron\nVersion: {version}\n")
    return pkg


@pytest.fixture
def on_path(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(tmp_path))
    importlib.invalidate_caches()
    before = list(sys.meta_path)
    yield tmp_path
    sys.meta_path[:] = before
    for name in [m for m in sys.modules if m == "vllm_neuron" or m.startswith("vllm_neuron.")]:
        del sys.modules[name]


def _vllm_config(architectures=("LlamaForCausalLM",), quant=True, tp=1, intermediate=200, quantization=None,
                 widths=None):
    qc = fmt.QuantizationConfig(block_size=4, ranks={}, widths=dict(widths or {})).to_dict()
    hf = SimpleNamespace(architectures=list(architectures),
                         to_dict=lambda: {"hidden_size": 64, "intermediate_size": intermediate, "num_hidden_layers": 2,
                                          **({fmt.QUANTIZATION_CONFIG_KEY: qc} if quant else {})})
    if quant:
        hf.quantization_config = qc
    model = SimpleNamespace(hf_config=hf, quantization=quantization or ("svd_neuron" if quant else None), model="ckpt")
    return SimpleNamespace(model_config=model, parallel_config=SimpleNamespace(tensor_parallel_size=tp),
                           additional_config={})


def test_no_op_without_vllm_neuron():
    assert stack.detect_stack() == stack.NeuronStack(stack.ABSENT)
    finders = list(sys.meta_path)
    assert integrate.install() == integrate.ABSENT
    assert sys.meta_path == finders and "vllm_neuron" not in sys.modules


def test_installed_but_not_the_active_platform_is_left_alone(on_path):
    _fake_vllm_neuron(on_path, "0.21.0", {"functional/__init__.py": "", "model/registry.py": ""})
    assert integrate.install() == integrate.INACTIVE    # vLLM's current platform here is the CPU one
    assert "vllm_neuron" not in sys.modules


def test_0_2_x_refuses_svd_neuron_checkpoints(on_path):
    _fake_vllm_neuron(on_path, "0.2.0", {"worker/neuronx_distributed_model_loader.py": ""})
    found = stack.detect_stack()
    assert (found.line, found.version) == (stack.NXDI, "0.2.0")
    from vllm_neuron.platform import NeuronPlatform

    assert integrate.install(platform_cls=NeuronPlatform) == integrate.REFUSING
    assert integrate.install(platform_cls=NeuronPlatform) == integrate.REFUSING   # idempotent
    assert "svd_neuron" in NeuronPlatform.supported_quantization   # so the refusal below is ours, not vLLM's
    with pytest.raises(stack.NeuronStackError) as err:
        NeuronPlatform.check_and_update_config(_vllm_config())
    message = str(err.value)
    assert "vllm-neuron 0.2.0" in message and "the 0.2.x line (models from NxD Inference)" in message
    assert "would load as a dense model" in message and "Supported: vllm-neuron >= 0.21 (the native line" in message
    assert NeuronPlatform.checked == []
    dense = _vllm_config(quant=False)
    NeuronPlatform.check_and_update_config(dense)          # dense models pass through to the stock check
    assert NeuronPlatform.checked == [dense]


def test_unknown_layout_refuses(on_path):
    _fake_vllm_neuron(on_path, "0.30.0", {})
    found = stack.detect_stack()
    assert found.line == stack.UNKNOWN
    from vllm_neuron.platform import NeuronPlatform

    assert integrate.install(platform_cls=NeuronPlatform) == integrate.REFUSING
    with pytest.raises(stack.NeuronStackError, match=r"vllm-neuron 0\.30\.0 at .*a vllm-neuron layout this plugin "
                                                     r"does not recognise: .*Supported: vllm-neuron >= 0\.21"):
        NeuronPlatform.check_and_update_config(_vllm_config(quantization="svd_neuron"))


NATIVE_MODEL = textwrap.dedent('''
    from neuron_standins import StandinLlamaForCausalLM

    class LlamaForCausalLM(StandinLlamaForCausalLM):
        pass
''')


def test_native_line_gets_the_variant(on_path):
    _fake_vllm_neuron(on_path, "0.21.0.1.0.0", {"functional/__init__.py": "", "model/registry.py": "",
                                                "model/llama3/model.py": NATIVE_MODEL},
                      quant=("neuron_quant", "compressed-tensors", "modelopt", "fp8"))
    assert stack.detect_stack().line == stack.NATIVE
    from vllm_neuron.platform import NeuronPlatform

    assert integrate.install(platform_cls=NeuronPlatform) == integrate.NATIVE
    assert NeuronPlatform.supported_quantization[-1] == "svd_neuron"
    from vllm_neuron.model.llama3.model import LlamaForCausalLM   # patched as it is imported

    assert LlamaForCausalLM.__dict__.get("_vllm_neuronmlp_patched") is True
    ok = _vllm_config(tp=2)
    NeuronPlatform.check_and_update_config(ok)
    assert NeuronPlatform.checked == [ok]
    with pytest.raises(stack.NeuronStackError, match=r"architecture \['GptOssForCausalLM'\] has no svd_neuron variant; "
                                                     r"supported: \['LlamaForCausalLM', 'Qwen3ForCausalLM'\]"):
        NeuronPlatform.check_and_update_config(_vllm_config(architectures=["GptOssForCausalLM"]))
    with pytest.raises(stack.NeuronStackError, match=r"vllm_neuron\.model\.qwen3\.model .* does not exist"):
        NeuronPlatform.check_and_update_config(_vllm_config(architectures=["Qwen3ForCausalLM"]))
    with pytest.raises(SVDShardingError, match=r"intermediate_size 200 does not divide by the MLP's tensor-parallel degree 16"):
        NeuronPlatform.check_and_update_config(_vllm_config(tp=16))
    # format v2: each narrowed layer is split by its own width, the CPU path's TensorParallelError
    v2 = _vllm_config(tp=4, widths={"model.layers.0.mlp": 100, "model.layers.1.mlp": 96})
    NeuronPlatform.check_and_update_config(v2)
    assert NeuronPlatform.checked[-1] is v2
    with pytest.raises(fmt.TensorParallelError, match=r"ckpt: config.json \(the MLP's tensor-parallel degree is "
                                                      r"tensor_parallel_size 8 x mlp_dp_size 1\): "
                                                      r"quantization_config\.widths\['model\.layers\.0\.mlp'\] is 100, "
                                                      r"which does not split over tensor parallel size 8"):
        NeuronPlatform.check_and_update_config(_vllm_config(tp=8, widths={"model.layers.0.mlp": 100}))
    with pytest.raises(fmt.CheckpointFormatError, match=r"--quantization svd_neuron was given, but .* dense checkpoint"):
        NeuronPlatform.check_and_update_config(_vllm_config(quant=False, quantization="svd_neuron"))


def test_version_tuple():
    assert stack.version_tuple("0.21.0.1.0.0") == (0, 21, 0, 1, 0, 0)
    assert stack.version_tuple("0.2.0rc1") == (0, 2, 0)
    assert stack.version_tuple(None) == ()
