"""Registration on Neuron stacks: a no-op without vllm-neuron; the native line gets our
hooks; 0.2.x (NxD Inference) or an unknown layout refuses svd_neuron checkpoints with a
message naming the stack, the version found and what is supported.

The vllm-neuron packages here are stand-ins written into a temporary directory: the files
our detection looks at (tag 0.2.0 of vllm-project/vllm-neuron for 0.2.x; the native line's
layout), a platform class with the attributes we touch (`supported_quantization`,
`check_and_update_config`), and for the native line the model registry and model packages
as vllm_neuron/model/registry.py imports them, with the classes of tests/neuron_standins.py.
Unit tests, not integration tests."""
import importlib
import sys
import textwrap
from types import SimpleNamespace

import pytest

from vllm_neuronmlp import checkpoint_format as cf
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
                 widths=None, ranks=None):
    qc = cf.QuantizationConfig(block_size=4, ranks=dict(ranks or {}), widths=dict(widths or {})).to_dict()
    hf = SimpleNamespace(architectures=list(architectures),
                         to_dict=lambda: {"hidden_size": 64, "intermediate_size": intermediate, "num_hidden_layers": 2,
                                          "num_attention_heads": 8, "num_key_value_heads": 2,
                                          **({cf.QUANTIZATION_CONFIG_KEY: qc} if quant else {})})
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


# The native line's model packages as the registry imports them (vllm_neuron/model/registry.py:
# `from .llama3 import LlamaForCausalLM`, `from .qwen3 import Qwen3ForCausalLM`), each class a
# stand-in of tests/neuron_standins.py. Qwen3 as jinhuang12/vllm-neuron ed3580d lays it out:
# the package exports qwen3/factory.py's class, which builds qwen3/model.py's.
REGISTRY = textwrap.dedent('''
    from .llama3 import LlamaForCausalLM
    from .qwen3 import Qwen3ForCausalLM

    def get_models():
        return [("LlamaForCausalLM", LlamaForCausalLM), ("Qwen3ForCausalLM", Qwen3ForCausalLM)]
''')
LLAMA_ONLY_REGISTRY = textwrap.dedent('''
    from .llama3 import LlamaForCausalLM

    def get_models():
        return [("LlamaForCausalLM", LlamaForCausalLM)]
''')
NATIVE_FILES = {
    "functional/__init__.py": "",
    "model/registry.py": REGISTRY,
    "model/llama3/__init__.py": "from .model import LlamaForCausalLM\n",
    "model/llama3/model.py": "from neuron_standins import StandinLlamaForCausalLM\n\n"
                             "class LlamaForCausalLM(StandinLlamaForCausalLM):\n    pass\n",
    "model/qwen3/__init__.py": "from .factory import Qwen3ForCausalLM\n",
    "model/qwen3/factory.py": "from neuron_standins import StandinQwen3Factory\n"
                              "from .model import Qwen3ForCausalLM as _Impl\n\n"
                              "class Qwen3ForCausalLM(StandinQwen3Factory):\n    implementation = _Impl\n",
    "model/qwen3/model.py": "from neuron_standins import StandinQwen3ForCausalLM\n\n"
                            "class Qwen3ForCausalLM(StandinQwen3ForCausalLM):\n    pass\n",
    "model/qwen3/model_bf16.py": "from neuron_standins import StandinQwen3Bf16ForCausalLM\n\n"
                                 "class Qwen3ForCausalLM(StandinQwen3Bf16ForCausalLM):\n    pass\n",
}
NATIVE_QUANT = ("neuron_quant", "compressed-tensors", "modelopt")


def _native(on_path, **replace):
    _fake_vllm_neuron(on_path, "0.21.0.1.0.0", {**NATIVE_FILES, **replace}, quant=NATIVE_QUANT)
    assert stack.detect_stack().line == stack.NATIVE
    from vllm_neuron.platform import NeuronPlatform

    assert integrate.install(platform_cls=NeuronPlatform) == integrate.NATIVE
    return NeuronPlatform


def test_native_line_gets_the_variant(on_path):
    NeuronPlatform = _native(on_path)
    assert NeuronPlatform.supported_quantization[-1] == "svd_neuron"
    from vllm_neuron.model.registry import get_models   # the classes are patched as their packages load

    resolved = dict(get_models())
    for arch in ("LlamaForCausalLM", "Qwen3ForCausalLM"):
        assert resolved[arch].__dict__.get("_vllm_neuronmlp_patched") is True, arch
    ok = _vllm_config(tp=2)
    NeuronPlatform.check_and_update_config(ok)
    assert NeuronPlatform.checked == [ok]
    NeuronPlatform.check_and_update_config(_vllm_config(architectures=["Qwen3ForCausalLM"]))
    with pytest.raises(stack.NeuronStackError, match=r"architecture \['GptOssForCausalLM'\] has no svd_neuron variant; "
                                                     r"supported: \['LlamaForCausalLM', 'Qwen3ForCausalLM'\]"):
        NeuronPlatform.check_and_update_config(_vllm_config(architectures=["GptOssForCausalLM"]))
    with pytest.raises(SVDShardingError, match=r"intermediate_size \(split over the MLP's "
                                               r"tensor-parallel degree, tensor_parallel_size x mlp_dp_size\) is 200, "
                                               r"which does not split over tensor parallel size 16"):
        NeuronPlatform.check_and_update_config(_vllm_config(tp=16))
    # format v2: each narrowed layer is split by its own width, the CPU path's TensorParallelError
    v2 = _vllm_config(tp=4, widths={"model.layers.0.mlp": 100, "model.layers.1.mlp": 96})
    NeuronPlatform.check_and_update_config(v2)
    assert NeuronPlatform.checked[-1] is v2
    with pytest.raises(cf.TensorParallelError, match=r"ckpt: config.json \(the MLP's tensor-parallel degree is "
                                                      r"tensor_parallel_size 8 x mlp_dp_size 1\): "
                                                      r"quantization_config\.widths\['model\.layers\.0\.mlp'\] is 100, "
                                                      r"which does not split over tensor parallel size 8"):
        NeuronPlatform.check_and_update_config(_vllm_config(tp=8, widths={"model.layers.0.mlp": 100}))
    with pytest.raises(cf.CheckpointFormatError, match=r"--quantization svd_neuron was given, but .* dense checkpoint"):
        NeuronPlatform.check_and_update_config(_vllm_config(quant=False, quantization="svd_neuron"))


def test_the_class_the_registry_resolves_is_the_one_patched(on_path):
    """qwen3/ has two implementations (model.py, and model_bf16.py "for vLLM-Neuron
    0.21.0"); whichever the package exports, and so the registry resolves, gets the hooks."""
    NeuronPlatform = _native(on_path, **{"model/qwen3/__init__.py": "from .model_bf16 import Qwen3ForCausalLM\n"})
    from vllm_neuron.model import registry
    from vllm_neuron.model.qwen3 import model_bf16

    resolved = dict(registry.get_models())["Qwen3ForCausalLM"]
    assert resolved is model_bf16.Qwen3ForCausalLM and resolved.__dict__.get("_vllm_neuronmlp_patched") is True
    NeuronPlatform.check_and_update_config(_vllm_config(architectures=["Qwen3ForCausalLM"]))
    assert integrate.resolved_classes()["Qwen3ForCausalLM"] == "vllm_neuron.model.qwen3.model_bf16.Qwen3ForCausalLM"


def test_a_renamed_upstream_method_is_refused_with_class_path_and_version(on_path):
    renamed = ("from neuron_standins import StandinQwen3ForCausalLM\n\n"
               "class Qwen3ForCausalLM(StandinQwen3ForCausalLM):\n    load_weights = None\n\n"
               "    def load_checkpoint(self, checkpoint_path, device, cache_dir):\n        pass\n")
    NeuronPlatform = _native(on_path, **{"model/qwen3/__init__.py": "from .model import Qwen3ForCausalLM\n",
                                         "model/qwen3/model.py": renamed})
    with pytest.raises(stack.NeuronStackError) as err:
        NeuronPlatform.check_and_update_config(_vllm_config(architectures=["Qwen3ForCausalLM"]))
    message = str(err.value)
    assert "vllm_neuron.model.qwen3.model.Qwen3ForCausalLM has no callable `load_weights`" in message
    assert "vllm-neuron 0.21.0.1.0.0" in message
    NeuronPlatform.check_and_update_config(
        _vllm_config(architectures=["Qwen3ForCausalLM"], quant=False))  # dense: stock
    NeuronPlatform.check_and_update_config(_vllm_config())                                                # Llama: fine


def test_a_registry_without_the_architecture_is_refused(on_path):
    """Some native-line registries list no Qwen3ForCausalLM at all."""
    NeuronPlatform = _native(on_path, **{"model/registry.py": LLAMA_ONLY_REGISTRY})
    with pytest.raises(stack.NeuronStackError, match=r"vllm_neuron\.model\.registry\.get_models\(\) resolves no "
                                                     r"Qwen3ForCausalLM .*vllm-neuron 0\.21\.0\.1\.0\.0.*registered: "
                                                     r"\['LlamaForCausalLM'\]"):
        NeuronPlatform.check_and_update_config(_vllm_config(architectures=["Qwen3ForCausalLM"]))
    NeuronPlatform.check_and_update_config(_vllm_config())


def test_factored_attention_is_served_where_the_tp_degree_splits_its_heads(on_path):
    """Format v3 (factored q/k/v/o) passes the platform check (issue 22); a degree that cannot
    split the heads the way vllm-neuron's attention does (heads divisible by it, KV heads
    divisible by it or dividing it) is refused before anything is built, naming the counts."""
    NeuronPlatform = _native(on_path)
    ranks = {"model.layers.0.mlp.down_proj": 4, **{f"model.layers.1.self_attn.{p}_proj": 4 for p in "qkvo"}}
    for tp in (1, 2, 4, 8):                       # 8 heads, 2 KV heads: at 4 and 8 each KV head is replicated
        v3 = _vllm_config(ranks=ranks, tp=tp, intermediate=64)
        NeuronPlatform.check_and_update_config(v3)
        assert NeuronPlatform.checked[-1] is v3
    with pytest.raises(SVDShardingError, match=r"ckpt: the factored attention: 8 attention heads and 2 KV heads cannot "
                                               r"be split over tensor-parallel degree 16 the way vllm-neuron's "
                                               r"attention splits them"):
        NeuronPlatform.check_and_update_config(_vllm_config(ranks=ranks, tp=16, intermediate=64))


def test_gemma3_is_refused_by_name(on_path):
    """vllm-neuron has no Gemma 3 model, so neither has the variant: a Gemma 3 svd_neuron
    checkpoint (`Gemma3ForCausalLM`, model type gemma3_text) is refused before anything is
    built, the message naming the architecture and what is supported."""
    NeuronPlatform = _native(on_path)
    with pytest.raises(stack.NeuronStackError, match=r"architecture \['Gemma3ForCausalLM'\] has no svd_neuron variant; "
                                                     r"supported: \['LlamaForCausalLM', 'Qwen3ForCausalLM'\]"):
        NeuronPlatform.check_and_update_config(_vllm_config(architectures=["Gemma3ForCausalLM"]))
    assert NeuronPlatform.checked == []


def test_version_tuple():
    assert stack.version_tuple("0.21.0.1.0.0") == (0, 21, 0, 1, 0, 0)
    assert stack.version_tuple("0.2.0rc1") == (0, 2, 0)
    assert stack.version_tuple(None) == ()
