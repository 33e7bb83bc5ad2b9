"""When the real Neuron SDK (`nki` with nki.jit / nki.simulate) is importable, run
every kernel under AWS's own CPU simulator and compare with the project's emulator.
Here (no SDK: PyPI only has placeholders) these tests skip with that reason; a
stand-in package checks that the emulator still runs the kernels when an SDK is
importable."""
import ml_dtypes
import numpy as np
import pytest

from vllm_neuronmlp.kernels import baselines, blocking, nki_compat, sim

needs_sdk = pytest.mark.skipif(
    not nki_compat.REAL_NKI,
    reason="real `nki` package (Neuron SDK 2.29+, NKI 0.3+) not importable: it is not "
           "installable on this machine, so nki.simulate cannot be compared")

BF16 = ml_dtypes.bfloat16


def _arrays(shapes, dtype, seed=0):
    rng = np.random.default_rng(seed)
    return [(rng.standard_normal(s) / np.sqrt(s[0])).astype(dtype) for s in shapes]


CASES = [
    (blocking.fused_xuv, [(130, 200), (200, 96), (96, 300)], {}),
    (blocking.fused_xuv, [(130, 200), (200, 96), (96, 300)], {"transpose_out": True}),
    (blocking.up_gate, [(70, 128), (128, 64), (64, 256), (128, 32), (32, 256)], {}),
    (blocking.down, [(256, 70), (256, 64), (64, 128)], {}),
    (baselines.dense_xw, [(130, 200), (200, 300)], {}),
    (baselines.sequential_xuv, [(130, 200), (200, 96), (96, 300)], {}),
]


@needs_sdk
@pytest.mark.parametrize("dtype", [np.float32, BF16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("kernel,shapes,kwargs", CASES,
                         ids=[f"{c[0].__name__}{'-T' if c[2] else ''}" for c in CASES])
def test_emulator_agrees_with_nki_simulate(kernel, shapes, kwargs, dtype):
    import nki
    arrays = _arrays(shapes, dtype)
    ours, _ = sim.run(kernel, *arrays, target="trn2", **kwargs)
    theirs = np.asarray(nki.simulate(kernel.nki_kernel)(*arrays, **kwargs))
    tol = 1e-5 if dtype == np.float32 else 2e-2
    np.testing.assert_allclose(ours.astype(np.float64), theirs.astype(np.float64),
                               rtol=tol, atol=tol * np.abs(theirs.astype(np.float64)).max())


FAKE_SDK = {
    "__init__.py": (
        "class _Jit:\n"
        "    def __init__(self, fn):\n"
        "        self.fn = fn\n"
        "    def __call__(self, *a, **k):\n"
        "        raise RuntimeError('fake SDK: device launch')\n"
        "def jit(fn=None, **kw):\n"
        "    return _Jit(fn)\n"
        "def simulate(kernel):\n"
        "    raise RuntimeError('fake SDK: simulate')\n"),
    "language.py": (
        "float32 = 'float32'\nbfloat16 = 'bfloat16'\n"
        "class tile_size:\n    pmax = 128\n    gemm_stationary_fmax = 128\n"
        "    gemm_moving_fmax = 512\n    psum_bank_fmax = 512\n"
        "def ndarray(*a, **k):\n    raise RuntimeError('fake SDK: nl.ndarray')\n"),
    "isa.py": (
        "def nc_matmul(*a, **k):\n    raise RuntimeError('fake SDK: nc_matmul')\n"
        "def get_nc_version():\n    raise RuntimeError('fake SDK: get_nc_version')\n"),
}


@pytest.mark.skipif(nki_compat.REAL_NKI, reason="a real SDK is installed")
def test_emulator_runs_the_kernels_while_an_sdk_is_importable(tmp_path):
    """With an `nki` package importable, kernels bind nl/nisa to it; sim.run must still
    execute them in the emulator (and put the SDK's names back afterwards). A stand-in
    package whose every call raises proves no SDK function is reached."""
    import subprocess
    import sys
    pkg = tmp_path / "nki"
    pkg.mkdir()
    for name, text in FAKE_SDK.items():
        (pkg / name).write_text(text)
    code = f"""
import sys; sys.path.insert(0, {str(tmp_path)!r})
import numpy as np
from vllm_neuronmlp.kernels import blocking, nki_compat, sim, xuv
import nki.language
assert nki_compat.REAL_NKI and xuv.nl is nki.language
rng = np.random.default_rng(0)
x, u, v = (rng.standard_normal(s).astype(np.float32) for s in [(9, 40), (40, 24), (24, 50)])
y, st = sim.run(blocking.fused_xuv, x, u, v)
assert np.allclose(y, x.astype(np.float64) @ u @ v, rtol=1e-4, atol=1e-4)
assert xuv.nl is nki.language and nki_compat.nisa.__name__ == 'nki.isa'
assert type(xuv.fused_xuv.nki_kernel).__name__ == '_Jit'
print('ok', st.matmul_count)
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("ok")
