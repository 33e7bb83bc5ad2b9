"""What the Trainium variant's forward executes must compile the way vllm-neuron compiles it
(issue 22, points 3 and 4), checked on the stand-ins of tests/neuron_standins.py:

* the forward on the Neuron path traces into aten ops plus the NKI launch, with no opaque
  `vllm_neuronmlp::` custom op (`make_fx`), and runs under `torch.compile(fullgraph=True)`;
* the model runner's sequence (build on meta, `load_weights`, `.to(device)`, compile): every
  value derived from the loaded weights (side-by-side factors, shard checksums) is computed
  on the host, so no eager op touches a tensor on the device. The device here is the meta
  device: a tensor there has no values, so an eager op on it computes nothing usable, and
  a copy out of it fails.

UNIT tests of our logic against stand-ins; the Neuron backend's own compiler does not run here."""
import logging

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch.fx.experimental.proxy_tensor import make_fx
from torch.utils._python_dispatch import TorchDispatchMode

from model_factory import make_dense_and_factored
from neuron_standins import (FakeGroup, StandinLlamaForCausalLM, StandinQwen3ForCausalLM, install_runtimes,
                             pretend_neuron_host, read_config)
from vllm_neuronmlp import checkpoint_format as cf
from vllm_neuronmlp import ops
from vllm_neuronmlp.neuron import integrate
from vllm_neuronmlp.neuron.sharding import fingerprint, shard_tensor

HIDDEN, INTER = 64, 128
STOCK = {"llama": StandinLlamaForCausalLM, "qwen3": StandinQwen3ForCausalLM}


@pytest.fixture(scope="module", params=["llama", "qwen3"])
def checkpoints(request, tmp_path_factory):
    root = tmp_path_factory.mktemp(f"compile-{request.param}")
    dense, factored = make_dense_and_factored(str(root), arch=request.param, hidden=HIDDEN, intermediate=INTER,
                                              layers=2, rank=32, block_size=32, factored_layers=[0])
    return request.param, dense, factored


@pytest.fixture(autouse=True)
def _torch_backend(monkeypatch):
    monkeypatch.setenv(ops.BACKEND_ENV, "torch")


def _patched(base, tp: int = 1, rank: int = 0):
    group = staticmethod(lambda: FakeGroup(tp, rank))
    cls = type(f"{base.__name__}Rank{rank}of{tp}", (base,), {"group_factory": group})
    integrate.patch_model_class(cls)
    return cls


def _dense_mlp(w, i, x):
    p = f"model.layers.{i}.mlp"
    return (F.silu(x @ w[f"{p}.gate_proj.weight"].T) * (x @ w[f"{p}.up_proj.weight"].T)) @ w[f"{p}.down_proj.weight"].T


def _rel(y, ref):
    return ((y - ref).abs().max() / ref.abs().max()).item()


def _called(graph_module):
    return [str(n.target) for n in graph_module.graph.nodes if n.op == "call_function"]


def _ours(targets):
    return [t for t in targets if t.startswith("vllm_neuronmlp.")]


def _loaded(arch, factored):
    model = _patched(STOCK[arch]).from_configs(read_config(factored), None)
    model.load_weights(factored, "cpu", None)
    return model


# ---------------------------------------------------------------- point 3: compilable forward
def test_variant_mlp_traces_to_aten_without_our_custom_op(checkpoints):
    arch, dense, factored = checkpoints
    mlp = _loaded(arch, factored).model.layers[0].mlp
    x = torch.randn(5, HIDDEN, generator=torch.Generator().manual_seed(0))
    graph = make_fx(lambda h: mlp(h, is_prefill=False))(x)
    targets = _called(graph)
    assert targets and not _ours(targets), _ours(targets)
    assert all(t.startswith("aten.") for t in targets), targets
    w = load_file(f"{dense}/{cf.SAFETENSORS_SINGLE_FILE}")
    assert _rel(graph(x), _dense_mlp(w, 0, x)) < 1e-5


def test_variant_mlp_runs_under_torch_compile_fullgraph(checkpoints):
    arch, dense, factored = checkpoints
    mlp = _loaded(arch, factored).model.layers[0].mlp
    torch._dynamo.reset()
    compiled = torch.compile(lambda h: mlp(h, is_prefill=False), backend="aot_eager", fullgraph=True)
    x = torch.randn(7, HIDDEN, generator=torch.Generator().manual_seed(1))
    w = load_file(f"{dense}/{cf.SAFETENSORS_SINGLE_FILE}")
    assert _rel(compiled(x), _dense_mlp(w, 0, x)) < 1e-5


@pytest.mark.parametrize("checkpoints", ["llama"], indirect=True)
def test_kernel_path_traces_to_aten_plus_the_nki_launch(checkpoints, monkeypatch):
    """On a (stand-in) Neuron host with vllm-neuron's lite runtime: the MLP takes the kernel
    path, and its graph holds the two kernel launches (the stand-in runtime's op, as the
    real wrap_nki's higher-order op) and aten ops only; it compiles with fullgraph=True."""
    arch, dense, factored = checkpoints
    monkeypatch.setenv(ops.BACKEND_ENV, "auto")
    pretend_neuron_host(monkeypatch)
    runtime = install_runtimes(monkeypatch, "lite")["lite"]
    mlp = _loaded(arch, factored).model.layers[0].mlp
    assert mlp.compute_path == "kernels"
    x = torch.randn(4, HIDDEN, generator=torch.Generator().manual_seed(2))
    graph = make_fx(lambda h: mlp(h, is_prefill=False))(x)
    targets = _called(graph)
    assert not _ours(targets), _ours(targets)
    assert targets.count("neuron_standin.nki_launch.default") == 2
    assert all(t.startswith("aten.") or t.startswith("neuron_standin.") for t in targets), targets
    w = load_file(f"{dense}/{cf.SAFETENSORS_SINGLE_FILE}")
    torch._dynamo.reset()
    compiled = torch.compile(lambda h: mlp(h, is_prefill=False), backend="aot_eager", fullgraph=True)
    assert _rel(compiled(x), _dense_mlp(w, 0, x)) < 1e-4
    assert set(runtime.launches) == {("up_gate", (2,)), ("down", (2,))}


# ---------------------------------------------------------------- point 4: load-time arithmetic on the host
class _OpsOnDevice(TorchDispatchMode):
    """Records every aten op that reads a tensor on `device` (eager work on the device)."""

    def __init__(self, device="meta"):
        super().__init__()
        self.device, self.seen = device, []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        flat = torch.utils._pytree.tree_leaves((args, kwargs))
        if any(isinstance(a, torch.Tensor) and a.device.type == self.device for a in flat):
            self.seen.append(str(func))
        return func(*args, **kwargs)


class _Lines(logging.Handler):
    def __init__(self):
        super().__init__(logging.INFO)
        self.lines = []

    def emit(self, record):
        self.lines.append(record.getMessage())


def test_runner_sequence_computes_everything_on_the_host(checkpoints):
    """vllm-neuron's runner: `from_configs` under `torch.device("meta")`, `load_weights` (its
    reader puts each tensor on the device it is given), `.to(device)`, then compile. With
    the meta device standing for the Neuron device: no eager op reads a loaded tensor, the
    shard checksums in the server log are those of the checkpoint's shards (computed on the
    host), and the compiled forward still runs."""
    arch, _, factored = checkpoints
    tp, rank = 2, 1
    cls = _patched(STOCK[arch], tp, rank)
    with torch.device("meta"):
        model = cls.from_configs(read_config(factored), None)
    handler, level = _Lines(), integrate.SERVING_LOG.level
    integrate.SERVING_LOG.addHandler(handler)
    integrate.SERVING_LOG.setLevel(logging.INFO)
    try:
        with _OpsOnDevice("meta") as watch:
            model.load_weights(factored, torch.device("meta"), None)
    finally:
        integrate.SERVING_LOG.removeHandler(handler)
        integrate.SERVING_LOG.setLevel(level)
    assert watch.seen == [], f"eager ops on loaded device tensors: {sorted(set(watch.seen))}"
    logged = integrate.parse_shard_line(next(line for line in handler.lines if "svd_neuron shards loaded" in line))
    ckpt = load_file(f"{factored}/{cf.SAFETENSORS_SINGLE_FILE}")
    split = replicated = 0.0
    for proj, role in (("gate_proj", "gate"), ("up_proj", "up"), ("down_proj", "down")):
        for leaf in (cf.U_SUFFIX, cf.V_SUFFIX):
            host = shard_tensor(ckpt[f"model.layers.0.mlp.{proj}.{leaf}"], role, leaf, rank, tp)
            is_split = (leaf == cf.V_SUFFIX) == (role != "down")
            if is_split:
                split += fingerprint(host)
            else:
                replicated += fingerprint(host)
    assert logged["split"] == pytest.approx(split, rel=1e-12)
    assert logged["replicated"] == pytest.approx(replicated, rel=1e-12)
    model = model.to("meta")
    mlp = model.model.layers[0].mlp
    torch._dynamo.reset()
    compiled = torch.compile(lambda h: mlp(h, is_prefill=False), backend="aot_eager", fullgraph=True)
    y = compiled(torch.empty(3, HIDDEN, device="meta"))
    assert y.device.type == "meta" and tuple(y.shape) == (3, HIDDEN)
