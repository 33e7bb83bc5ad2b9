"""The calibration windows and their random subsets (Fisher pass, validation):
every subset is a seeded random draw from the whole set, never its first rows."""
import pytest
import torch

from vllm_neuronmlp import checkpoint_format as cf
from vllm_neuronmlp.tools import calibration as cal
from vllm_neuronmlp.tools import compressor as C
from vllm_neuronmlp.tools import selection, sensitivity
from vllm_neuronmlp.tools.data import tiny
from vllm_neuronmlp.tools.cli import main as cli_main
from vllm_neuronmlp.tools.errors import UserError

from test_compress import SMALL, write_text

pytestmark = pytest.mark.slow  # end-to-end runs of seconds each: `make test-fast` leaves them out


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    d = tmp_path_factory.mktemp("calib")
    return {"dir": d, "llama": tiny.make_model(str(d / "llama"), layers=2), "calib": write_text(d / "calib.txt", 4000)}


def rows_in(sub, windows):
    """Index of each row of `sub` in `windows` (asserts it is there)."""
    idx = []
    for row in sub:
        hits = (windows == row).all(dim=1).nonzero().flatten().tolist()
        assert hits, "subset row is not a calibration window"
        idx.append(hits[0])
    return idx


def test_random_subset_is_seeded_and_spread_over_the_whole_set():
    windows = torch.arange(64 * 3).view(64, 3)
    sub = cal.random_subset(windows, 32, seed=0, stream=cal.FISHER_STREAM)
    assert sub.shape == (32, 3)
    idx = rows_in(sub, windows)
    assert len(set(idx)) == 32  # no window twice
    assert max(idx) >= 40 and idx != list(range(32))  # not the first half of the text
    assert torch.equal(sub, cal.random_subset(windows, 32, seed=0, stream=cal.FISHER_STREAM))  # seeded
    assert not torch.equal(sub, cal.random_subset(windows, 32, seed=0, stream=cal.VALIDATION_STREAM))
    # over many seeds every window is equally likely: mean position near the middle
    mean = torch.stack([cal.random_subset(windows, 8, s, cal.FISHER_STREAM).float().mean() for s in range(200)]).mean()
    assert abs(float(mean) - float(windows.float().mean())) < 4.0
    assert cal.random_subset(windows, 100, 0, cal.FISHER_STREAM).shape[0] == 64  # capped at the set


def test_fisher_and_validation_windows_are_random_draws(work, monkeypatch):
    seen = {}
    real_sens, real_sel = sensitivity.sensitivity_pass, selection.selection_pass

    def sens(sk, src, ids, *a, **k):
        seen["fisher"] = ids.clone()
        return real_sens(sk, src, ids, *a, **k)

    def sel(ctx, val, candidates):
        seen["val"] = val.clone()
        return real_sel(ctx, val, candidates)

    monkeypatch.setattr(sensitivity, "sensitivity_pass", sens)
    monkeypatch.setattr(selection, "selection_pass", sel)
    opts = {**SMALL, "calib_text": [work["calib"]], "calib_samples": 16}
    chosen, unused, _ = cal.calibration_tokens(work["llama"], [work["calib"]], 16, 64, 0)
    res = C.compress(work["llama"], str(work["dir"] / "f"), 0.5, fisher_samples=5, **opts)
    idx = rows_in(seen["fisher"], chosen)
    assert len(idx) == 5 and idx != list(range(5))
    assert res.calibration["fisher_samples"] == 5
    assert cf.read_quantization_config(str(work["dir"] / "f")).provenance["calibration"]["fisher_samples"] == 5
    C.compress(work["llama"], str(work["dir"] / "w"), 0.5, method="whiten", **opts)
    vidx = rows_in(seen["val"], unused)
    assert len(vidx) == cal.VALIDATION_WINDOWS and vidx != list(range(cal.VALIDATION_WINDOWS))


def test_fisher_samples_option(work, capsys):
    with pytest.raises(UserError, match="--fisher-samples"):
        C.compress(work["llama"], str(work["dir"] / "x"), 0.5, fisher_samples=0,
                   **{**SMALL, "calib_text": [work["calib"]]})
    code = cli_main(["compress", work["llama"], str(work["dir"] / "cli"), "--ratio", "0.5", "--block-size", "32",
                     "--calib-text", work["calib"], "--calib-samples", "8", "--calib-seq-len", "64",
                     "--fisher-samples", "3", "--no-progress"])
    assert code == 0
    prov = cf.read_quantization_config(str(work["dir"] / "cli")).provenance
    assert prov["calibration"]["fisher_samples"] == 3
    code = cli_main(["compress", work["llama"], str(work["dir"] / "cli2"), "--ratio", "0.5", "--fisher-samples", "-1"])
    assert code == 2 and "--fisher-samples" in capsys.readouterr().err
