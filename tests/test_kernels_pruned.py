"""The NKI MLP kernels at the pruned intermediate widths of format v2 (emulator):
a layer narrowed to k channels (and each tensor-parallel rank's k / tp share)
computes what its full-width dense twin computes, whose dropped channels feed
zero rows of the down projection."""
import numpy as np
import pytest

from vllm_neuronmlp.kernels import blocking, sim


def silu(z):
    return z / (1.0 + np.exp(-z))


@pytest.mark.parametrize("S,H,I,k,r", [
    (16, 576, 1536, 1152, 256),  # SmolLM2's MLP narrowed by three blocks of 128
    (5, 576, 1536, 576, 128),    # one of two tensor-parallel ranks of a layer narrowed to 1152
    (9, 192, 384, 160, 64),      # a width that is not a multiple of the kernels' 128-row tiles
])
def test_narrowed_mlp_equals_its_full_width_twin(S, H, I, k, r):
    rng = np.random.default_rng(0)
    f = lambda *s: (rng.standard_normal(s) / np.sqrt(s[0])).astype(np.float32)  # noqa: E731
    x = rng.standard_normal((S, H)).astype(np.float32)
    ug, vg, uu, vu, ud, vd = f(H, r), f(r, I), f(H, r), f(r, I), f(I, r), f(r, H)
    ud[k:] = 0  # the twin's dropped channels reach nothing
    xd = x.astype(np.float64)
    h_full = silu(xd @ ug @ vg) * (xd @ uu @ vu)
    y_full = h_full @ ud.astype(np.float64) @ vd
    h_t, _ = sim.run(blocking.up_gate, x, ug, np.ascontiguousarray(vg[:, :k]), uu, np.ascontiguousarray(vu[:, :k]))
    assert h_t.shape == (k, S)
    np.testing.assert_allclose(h_t.T, h_full[:, :k], rtol=2e-5, atol=2e-5 * np.abs(h_full).max())
    y, _ = sim.run(blocking.down, h_t, np.ascontiguousarray(ud[:k]), vd)
    assert y.shape == (S, H)
    assert np.linalg.norm(y - y_full) <= 2e-5 * np.linalg.norm(y_full)
