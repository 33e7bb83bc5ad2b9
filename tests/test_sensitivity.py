"""The streamed output-Fisher pass against whole-model autograd in transformers."""
import pytest
import torch
from transformers import AutoModelForCausalLM

from vllm_neuronmlp import mlp_families
from vllm_neuronmlp.tools import sensitivity
from vllm_neuronmlp.tools.data import tiny
from vllm_neuronmlp.tools.streaming import build_skeleton
from vllm_neuronmlp.tools.source import SourceCheckpoint
from vllm_neuronmlp.tools.whitening import robust_cholesky, whitened_spectrum

pytestmark = pytest.mark.slow  # end-to-end runs of seconds each: `make test-fast` leaves them out


def reference_fisher(path, ids):
    """(sum over tokens of (dL/dy)^2 per output channel, L = summed next-token NLL,
    by one backward through the whole model; each projection's input Gram; weights [in, out])."""
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    outs, grams, weights = {}, {}, {}
    hooks = []

    def keep(name):
        def hook(_mod, args, out):
            out.retain_grad()
            outs[name] = out
            a = args[0].detach().reshape(-1, args[0].shape[-1]).double()
            grams[name] = a.T @ a
        return hook

    for name, mod in model.named_modules():
        if mlp_families.role_of(name) is not None:
            hooks.append(mod.register_forward_hook(keep(name)))
            weights[name] = mod.weight.detach().T
    logits = model(input_ids=ids).logits
    loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1),
                                             reduction="sum")
    loss.backward()
    for h in hooks:
        h.remove()
    return {n: o.grad.double().pow(2).sum(dim=(0, 1)) for n, o in outs.items()}, grams, weights


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_streamed_fisher_matches_whole_model_backward(tmp_path, arch):
    path = tiny.make_model(str(tmp_path / arch), arch=arch, layers=3)
    src = SourceCheckpoint(path)
    sk = build_skeleton(src)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, sk.config.vocab_size, (5, 48), generator=g)
    sens = sensitivity.sensitivity_pass(sk, src, ids, progress=False)
    got, spectra = sens.fisher, sens.spectra
    ref, grams, weights = reference_fisher(path, ids)
    assert sorted(got) == sorted(ref) == sorted(spectra) and len(got) == 3 * 3
    for name in ref:
        assert got[name].shape == ref[name].shape
        rel = float((got[name] - ref[name]).norm() / ref[name].norm())
        assert rel < 0.03, (name, rel)  # hidden states are stored in bf16 between the passes
        # the spectra the allocation uses: singular values of L^T W D from the reference statistics
        expect = whitened_spectrum(weights[name], robust_cholesky(grams[name]).factor,
                                   out_scale=sensitivity.output_weights(ref[name]))
        torch.testing.assert_close(torch.tensor(spectra[name], dtype=torch.float64), expect, rtol=0.03,
                                   atol=0.03 * float(expect[0]))


def test_output_weights_floor_and_scale():
    f = torch.tensor([0.0, 1.0, 4.0, 95.0], dtype=torch.float64)
    d = sensitivity.output_weights(f)
    floor = sensitivity.FISHER_FLOOR * 25.0
    torch.testing.assert_close(d, (f + floor).sqrt())
    assert bool((d > 0).all())
    torch.testing.assert_close(sensitivity.output_weights(torch.zeros(3)), torch.ones(3, dtype=torch.float64))
