"""TextEncoder / load_tokenizer against transformers' AutoTokenizer on the same tokenizer.json: ids, BOS/EOS,
truncation side, and the truncated flag."""

from __future__ import annotations

import pytest

import tiny
from tiny import TEXTS
from scorer.model.load import TextEncoder, load_tokenizer

LONG = "The quick brown fox jumps over the lazy dog. Debian is a free operating system. " * 6


@pytest.fixture(scope="module", params=[(True, False), (False, False), (True, True), (False, True)],
                ids=["bos", "none", "bos+eos", "eos"])
def tok_dir(request, tmp_path_factory):
    bos, eos = request.param
    path = tmp_path_factory.mktemp("tok")
    tiny.make_tokenizer(path, bos=bos, eos=eos)
    return path, bos, eos


@pytest.mark.parametrize("side", ["right", "left"])
@pytest.mark.parametrize("max_length", [8, 64, 4096])
def test_ids_equal_transformers(tok_dir, hf, side, max_length):
    path, bos, eos = tok_dir
    plain = load_tokenizer(path, max_length, side)
    ours = TextEncoder(path, max_length, side)
    ref = hf.tokenizer(path, truncation_side=side)
    texts = TEXTS + [LONG, "a"]
    for text, (ids, truncated) in zip(texts, ours.encode_batch(texts)):
        want = ref(text, truncation=True, max_length=max_length)["input_ids"]
        assert ids == want == plain.encode(text).ids, text
        assert truncated == (len(ref(text)["input_ids"]) > max_length)
        assert (ids[0] == 1) == bos  # BOS added iff the post-processor adds it, and survives left truncation
        assert (ids[-1] == 2) == eos  # likewise EOS, through right truncation


def test_truncation_keeps_the_right_end(tmp_path):
    tiny.make_tokenizer(tmp_path, bos=True)
    [(full, cut)] = TextEncoder(tmp_path, 4096).encode_batch([LONG])
    [(right, rcut)] = TextEncoder(tmp_path, 10, "right").encode_batch([LONG])
    [(left, lcut)] = TextEncoder(tmp_path, 10, "left").encode_batch([LONG])
    assert right == full[:10] and left == [full[0]] + full[-9:]
    assert (cut, rcut, lcut) == (False, True, True)
    [(exact, ecut)] = TextEncoder(tmp_path, len(full)).encode_batch([LONG])  # fits exactly: not truncated
    assert exact == full and not ecut


def test_tokenizer_errors(tmp_path):
    with pytest.raises(ValueError, match="tokenizer.json"):
        load_tokenizer(tmp_path, 10)
    tiny.make_tokenizer(tmp_path, bos=True, eos=True)
    with pytest.raises(ValueError, match="truncation_side"):
        load_tokenizer(tmp_path, 10, "middle")
    with pytest.raises(ValueError, match="no room"):
        load_tokenizer(tmp_path, 2)
    with pytest.raises(ValueError, match="no room"):
        TextEncoder(tmp_path, 2)


@pytest.mark.parametrize("side", ["right", "left"])
@pytest.mark.parametrize("kw", [dict(), dict(eos=True, pad_token_id=2)], ids=["bos", "bos+eos"])
def test_scorer_counts_and_scores_follow_transformers_tokenizer(make_dir, hf, side, kw):
    """Through the Scorer: n_tokens and truncated equal transformers' tokenizer with truncation=True,
    and the truncated row scores like transformers' model on transformers' truncated ids."""
    import numpy as np

    from scorer.api import Scorer

    path = make_dir(**kw)
    texts = TEXTS + [LONG]
    s = Scorer.from_pretrained(path, device="cpu", max_length=12, truncation_side=side, return_logits=True)
    t = s.score(texts)
    ref = hf.tokenizer(path, truncation_side=side)
    want = [ref(x, truncation=True, max_length=12)["input_ids"] for x in texts]
    assert t["n_tokens"].to_pylist() == [len(w) for w in want]
    assert t["truncated"].to_pylist() == [len(ref(x)["input_ids"]) > 12 for x in texts]
    assert 0 < sum(t["truncated"].to_pylist()) < len(texts)
    for i, lg in enumerate(hf.classify_logits(path, want)):
        np.testing.assert_allclose(t["logits"][i].as_py(), lg.numpy(), atol=1e-5, rtol=0)
