"""Scorer behaviour: one row per input in order, error rows, truncation, batch invariance, schema, fingerprint."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pyarrow as pa
import pytest
import torch

from tiny import TEXTS
from scorer.api import Scorer
from scorer.model.load import pad_token_id


@pytest.fixture(scope="module")
def clf(make_dir):
    return Scorer.from_pretrained(make_dir(), device="cpu", max_length=32)


def test_every_input_gets_one_row_with_error_or_truncation(clf):
    long = "The quick brown fox jumps over the lazy dog. " * 50
    texts = [None, "", "   \n\t", long, "数据 湖 🙂 naïve", "ok", 42]
    t = clf.score(texts)
    assert t.num_rows == len(texts) and t.schema == clf.output_schema
    assert t["error"].to_pylist() == ["null text", "empty text", "empty text", None, None, None, "not a string (int)"]
    assert t["truncated"].to_pylist() == [False, False, False, True, False, False, False]
    n = t["n_tokens"].to_pylist()
    assert n[:3] == [0, 0, 0] and n[3] == 32 and 0 < n[4] < 32 and 2 <= n[5] <= 3  # BOS + "ok"
    for col in ("label", "label_id", "score", "probs"):
        assert t[col].is_null().to_pylist() == [True, True, True, False, False, False, True], col
    assert abs(sum(t["probs"][3].as_py()) - 1) < 1e-5


def test_a_lone_surrogate_is_an_error_row_not_a_failed_batch(clf):
    """Half of an emoji (what a JSON string cut mid-pair decodes to) cannot be tokenized: it failed the whole
    call, every row with it."""
    broken = json.loads('"cut emoji \\ud83d"')
    t = clf.score(["first text", broken, "third text"])
    assert t["error"].to_pylist() == [None, "not valid Unicode (a lone surrogate)", None]
    assert t["label"].to_pylist()[0] == clf.score(["first text"])["label"].to_pylist()[0]


def test_no_valid_rows_and_no_rows(clf):
    t = clf.score([None, " "])
    assert t.num_rows == 2 and t["label"].null_count == 2 and clf.last_stats.batches == 0
    empty = clf.score([])
    assert empty.num_rows == 0 and empty.schema == clf.output_schema


def _probs(t: pa.Table) -> np.ndarray:
    return np.array(t["probs"].to_pylist(), dtype=np.float64)


@pytest.mark.parametrize("dtype,atol", [("float32", 1e-5), ("bfloat16", 2e-2)])
def test_batch_invariance(make_dir, dtype, atol):
    """A text's scores do not depend on its batch mates, the padding, or the batch plan."""
    path = make_dir(num_labels=4, seed=2)
    rng = np.random.default_rng(0)
    texts = [TEXTS[i] for i in rng.integers(0, len(TEXTS), size=24)] + ["x", TEXTS[2] * 2]
    alone = np.stack([_probs(Scorer.from_pretrained(path, device="cpu", dtype=dtype).score([t]))[0] for t in texts[:6]])
    for kw in (dict(max_batch_tokens=16384, max_rows=256), dict(max_batch_tokens=80, max_rows=3), dict(max_rows=1)):
        s = Scorer.from_pretrained(path, device="cpu", dtype=dtype, **kw)
        got = _probs(s.score(texts))
        assert not np.isnan(got).any()
        np.testing.assert_allclose(got[:6], alone, atol=atol, rtol=0)
        perm = rng.permutation(len(texts))  # shuffled input: same scores, returned in the new order
        np.testing.assert_allclose(_probs(s.score([texts[i] for i in perm])), got[perm], atol=atol, rtol=0)
        if kw.get("max_rows") == 3:
            assert s.last_stats.batches > 5 and s.last_stats.padded_tokens > s.last_stats.real_tokens


def test_left_padding_never_makes_nan(make_dir):
    from scorer.batching import collate

    s = Scorer.from_pretrained(make_dir(), device="cpu", dtype="bfloat16")
    enc = s.encode(["x", TEXTS[2]])
    b = collate(enc.ids, [0, 1], s.pad_id)
    with torch.inference_mode():
        h = s.model(b.input_ids, b.attention_mask, b.position_ids)
    assert torch.isfinite(h).all()  # padding rows included


def test_multilabel_threshold_and_regression_columns(make_dir):
    ml = Scorer.from_pretrained(make_dir(num_labels=5, problem_type="multi_label_classification"),
                                device="cpu", threshold=0.0, return_logits=True)
    t = ml.score(["fox", None])
    assert t.schema.names == ["labels", "probs", "logits", "n_tokens", "truncated", "error"]
    assert t["labels"].to_pylist() == [[f"label_{c}" for c in "abcde"], None]
    assert t.schema.field("probs").type == pa.list_(pa.float32())
    assert t["probs"][1].as_py() is None and t["logits"][1].as_py() is None
    # a threshold equal to the third-largest probability: exactly the three labels at or above it
    probs = np.array(t["probs"][0].as_py(), dtype=np.float32)
    thr = float(np.sort(probs)[-3])
    mid = Scorer.from_pretrained(ml.cfg.path, device="cpu", threshold=thr).score(["fox"])
    assert mid["labels"][0].as_py() == [f"label_{'abcde'[j]}" for j in np.flatnonzero(probs >= thr)]
    assert len(mid["labels"][0].as_py()) == 3
    reg = Scorer.from_pretrained(make_dir(num_labels=1), device="cpu")
    t = reg.score(["fox", ""])
    assert t.schema.names == ["score", "n_tokens", "truncated", "error"]
    assert t["score"][0].is_valid and not t["score"][1].is_valid
    assert reg.cfg.problem_type == "regression"


def test_schema_types(clf, make_dir):
    sch = clf.output_schema
    assert [(f.name, str(f.type)) for f in sch] == [
        ("label", "string"), ("label_id", "int32"), ("score", "float"), ("probs", "list<item: float>"),
        ("n_tokens", "int32"), ("truncated", "bool"), ("error", "string"),
    ]
    emb = Scorer.from_pretrained(make_dir(task="embed"), task="embed", device="cpu", dimensions=8)
    assert emb.output_schema.field("embedding").type == pa.list_(pa.float32(), 8)
    t = emb.score(["fox", None])
    assert t["embedding"].to_pylist()[1] is None and len(t["embedding"][0].as_py()) == 8


def test_encode_is_thread_safe_and_matches_score(clf):
    texts = TEXTS * 4
    with ThreadPoolExecutor(4) as ex:
        encs = list(ex.map(clf.encode, [texts] * 4))
    assert all(e.ids == encs[0].ids for e in encs)
    np.testing.assert_array_equal(_probs(clf.score_encoded(encs[1])), _probs(clf.score(texts)))


def test_fingerprint_tracks_settings_and_files(make_dir, tmp_path):
    import shutil

    path = make_dir()
    a = Scorer.from_pretrained(path, device="cpu")
    assert a.fingerprint == Scorer.from_pretrained(path, device="cpu", max_batch_tokens=999, max_rows=7).fingerprint
    assert a.fingerprint != Scorer.from_pretrained(path, device="cpu", max_length=64).fingerprint
    assert a.fingerprint != Scorer.from_pretrained(path, device="cpu", truncation_side="left").fingerprint
    assert a.fingerprint != Scorer.from_pretrained(path, device="cpu", dtype="bfloat16").fingerprint
    copy = shutil.copytree(path, tmp_path / "copy")
    assert Scorer.from_pretrained(copy, device="cpu").fingerprint == a.fingerprint  # content, not location
    cfg = json.loads((copy / "config.json").read_text())
    cfg["id2label"]["0"] = "renamed"
    (copy / "config.json").write_text(json.dumps(cfg))
    assert Scorer.from_pretrained(copy, device="cpu").fingerprint != a.fingerprint


def test_stats_and_argument_errors(clf, make_dir):
    clf.score(TEXTS + [None])
    st = clf.last_stats
    assert (st.rows, st.scored_rows) == (len(TEXTS) + 1, len(TEXTS))
    assert 0 < st.padding_efficiency <= 1 and st.seconds > 0
    path = make_dir(task="embed")
    with pytest.raises(ValueError, match="no classification head"):
        Scorer.from_pretrained(path, task="classify", device="cpu")
    with pytest.raises(ValueError, match="task"):
        Scorer.from_pretrained(path, task="generate", device="cpu")
    with pytest.raises(ValueError, match="dimensions"):
        Scorer.from_pretrained(path, task="embed", device="cpu", dimensions=10_000)
    with pytest.raises(ValueError, match="dtype"):
        Scorer.from_pretrained(path, task="embed", device="cpu", dtype="int8")
    s = Scorer.from_pretrained(path, task="embed", device="cpu", dtype=torch.float16)
    assert s.settings.dtype == "float16" and s.settings.max_length == 2048


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-CUDA message")
def test_cuda_asked_for_without_cuda_says_so(make_dir):
    with pytest.raises(ValueError, match="no CUDA GPU"):
        Scorer.from_pretrained(make_dir(), device="cuda")
    assert Scorer.from_pretrained(make_dir(), device="auto").device.type == "cpu"


def test_inputs_embeds_and_host_gather_match_the_lookup(make_dir):
    """The host-resident table's path on a CPU: rows gathered by host_embeddings and passed as
    inputs_embeds give the model's own lookup bit for bit; bad ids and shapes are named."""
    s = Scorer.from_pretrained(make_dir(), device="cpu")
    lm = s.model.model
    assert not lm.embeddings_on_host  # everything is on the CPU: nothing to move
    enc = s.encode(TEXTS)
    from scorer.batching import collate, pack

    valid = [i for i, x in enumerate(enc.ids) if x is not None]
    b = collate(enc.ids, valid, s.pad_id)
    with torch.inference_mode():
        want = s.model(b.input_ids, b.attention_mask, b.position_ids)
        got = s.model(b.input_ids, b.attention_mask, b.position_ids, lm.host_embeddings(b.input_ids))
        assert torch.equal(got, want)
        p = pack(enc.ids, valid)
        from scorer.model.llama import Packed

        ctx = Packed(p.cu_seqlens, p.max_len)
        assert torch.equal(lm.forward_packed(p.input_ids, p.position_ids, ctx, lm.host_embeddings(p.input_ids)),
                           lm.forward_packed(p.input_ids, p.position_ids, ctx))
        with pytest.raises(ValueError, match="vocab_size"):
            lm.host_embeddings(torch.tensor([[0, s.cfg.vocab_size]]))
        with pytest.raises(ValueError, match="inputs_embeds must be"):
            s.model(b.input_ids, b.attention_mask, b.position_ids, lm.host_embeddings(b.input_ids)[:, 1:])
    with pytest.raises(ValueError, match="embeddings must be"):
        Scorer.from_pretrained(make_dir(), device="cpu", embeddings="gpu")


class _Labelled:
    """What a pandas Series is to scorer: iterates its values in order, but [i] looks up index label i."""

    def __init__(self, values: list, labels: list) -> None:
        self.values, self.pos = values, {lb: i for i, lb in enumerate(labels)}

    def __len__(self) -> int:
        return len(self.values)

    def __iter__(self):
        return iter(self.values)

    def __getitem__(self, label):
        return self.values[self.pos[label]]


def test_texts_are_read_by_position_whatever_the_sequence(clf):
    texts = TEXTS[:4] + [None]
    want = clf.score(list(texts))
    got = clf.score(_Labelled(texts, [4, 3, 2, 1, 0]))  # a sorted Series: labels in reverse
    assert got["n_tokens"].to_pylist() == want["n_tokens"].to_pylist()
    assert got["probs"].to_pylist() == want["probs"].to_pylist() and got["error"].to_pylist() == want["error"].to_pylist()
    assert clf.score(pa.array(texts))["probs"].to_pylist() == want["probs"].to_pylist()  # a pyarrow array: strings
    assert clf.score(pa.chunked_array([texts[:2], texts[2:]]))["n_tokens"].to_pylist() == want["n_tokens"].to_pylist()
    with pytest.raises(TypeError, match=r"not one str: pass \[text\]"):
        clf.score("Debian")  # one row a character otherwise


def test_pad_token_id_outside_the_vocabulary(make_dir):
    """Configs that say pad_token_id -1 (or past the vocabulary) score on the padded path as transformers
    does: padded slots carry another id, and no real token is a pad for the classifier-token rule."""
    texts, path = TEXTS[:5], make_dir(pad_token_id=-1)
    padded = Scorer.from_pretrained(path, device="cpu", attention="padded", return_logits=True)
    packed = Scorer.from_pretrained(path, device="cpu", attention="packed", return_logits=True)  # no padding at all
    np.testing.assert_allclose(np.array(padded.score(texts)["logits"].to_pylist()),
                               np.array(packed.score(texts)["logits"].to_pylist()), atol=1e-5, rtol=0)
    sc = Scorer.from_pretrained(make_dir(pad_token_id=None), device="cpu", attention="padded")
    sc.tokenizer.token_to_id = lambda tok: sc.cfg.vocab_size if tok == "<pad>" else None  # added past the table
    assert pad_token_id(sc.cfg, sc.tokenizer) == 0
    sc.tokenizer.token_to_id = lambda tok: 7 if tok == "[PAD]" else None
    assert pad_token_id(sc.cfg, sc.tokenizer) == 7 and pad_token_id(sc.cfg, None) == 0


def test_batch_limits_and_devices_are_checked_at_load(make_dir):
    for kw in (dict(max_batch_tokens=0), dict(max_rows=0)):
        with pytest.raises(ValueError, match="max_batch_tokens and max_rows must be >= 1"):
            Scorer.from_pretrained(make_dir(), device="cpu", **kw)
    with pytest.raises(ValueError, match="device must be auto, cpu, cuda or cuda:N, not 'tpu'"):
        Scorer.from_pretrained(make_dir(), device="tpu")
