"""<bos> opens every window of a model whose tokenizer adds it (Gemma 3), on the
calibration and the evaluation path; models whose tokenizers add none keep the plain cuts."""
import pytest

from model_factory import make_tokenizer
from vllm_neuronmlp.tools import calibration
from vllm_neuronmlp.tools.data import token_windows
from vllm_neuronmlp.tools.evaluation.perplexity import eval_windows

TEXT = " ".join(f"The quick brown fox {i} jumps over the lazy dog." for i in range(120))


@pytest.fixture(scope="module")
def tokenizers(tmp_path_factory):
    root = tmp_path_factory.mktemp("tok")
    paths = {}
    for add_bos in (True, False):
        paths[add_bos] = str(root / f"bos-{add_bos}")
        make_tokenizer(paths[add_bos], 384, add_bos=add_bos)
    (root / "text.txt").write_text(TEXT)
    return paths, str(root / "text.txt")


def load(path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path)


def test_cut_with_and_without_bos():
    ids = list(range(10, 20))
    assert token_windows.cut(ids, 4, None) == [[10, 11, 12, 13], [14, 15, 16, 17]]
    assert token_windows.cut(ids, 4, 2) == [[2, 10, 11, 12], [2, 13, 14, 15], [2, 16, 17, 18]]
    with pytest.raises(ValueError, match="a window of 1 tokens holds no text token after <bos>"):
        token_windows.cut(ids, 1, 2)


def test_leading_bos_is_what_the_tokenizer_adds(tokenizers):
    paths, _ = tokenizers
    assert token_windows.leading_bos(load(paths[True])) == 0  # <s>
    assert token_windows.leading_bos(load(paths[False])) is None  # <s> exists, but is not added


@pytest.mark.parametrize("add_bos", [True, False])
def test_calibration_and_evaluation_windows_open_with_bos_only_where_the_tokenizer_adds_it(tokenizers, add_bos):
    paths, text = tokenizers
    tok = load(paths[add_bos])
    ids = tok(TEXT, add_special_tokens=False)["input_ids"]
    seq = 32
    body = seq - add_bos
    windows, total = eval_windows(paths[add_bos], text, seq_len=seq)
    assert total == len(ids) and len(windows) == len(ids) // body
    for k, w in enumerate(windows):  # the text runs on across windows, none of it skipped or repeated
        assert w == [0] * add_bos + ids[k * body:(k + 1) * body]
    calib = calibration.load(paths[add_bos], [text], samples=4, seq_len=seq, seed=0)
    all_windows = calib.windows.tolist() + (calib.validation.tolist() if calib.validation is not None else [])
    assert all(w in windows for w in all_windows)
    assert (calib.info.get("bos_first") == 0) if add_bos else "bos_first" not in calib.info
