"""scorer against transformers on random tiny checkpoints: classifier probabilities and pooled embeddings.

The reference scores each text alone, unpadded; scorer scores them together in left-padded batches, so
these tests also cover padding and batch composition."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from tiny import TEXTS
from scorer.api import Scorer

# head_dim 16, theta 5e5: wavelengths 6.3, 32.4, 167, ... With original_max_position_embeddings 64 the
# llama3 rule keeps the first frequency (wavelength < 64/4), smooths the second (between 16 and 64) and
# divides the rest by `factor`: all three branches are exercised (test_llama3_case_has_all_three_bands).
LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 64}

CLASSIFIERS = {
    "gqa": {},
    "mha": dict(num_attention_heads=4, num_key_value_heads=4),
    "mqa-headdim": dict(num_attention_heads=4, num_key_value_heads=1, head_dim=24),
    "llama3-rope": dict(rope_scaling=LLAMA3, rope_theta=500000.0),
    "linear-rope": dict(rope_scaling={"type": "linear", "factor": 2.0}),
    # max_position_embeddings 16 < the longer texts, so the NTK base really changes for those rows
    # (scored with max_length 64, see MAX_LENGTH; the reference is a fresh model per row, see _reference)
    "dynamic-rope": dict(rope_scaling={"type": "dynamic", "factor": 2.0}, max_position_embeddings=16),
    "bias-tied": dict(attention_bias=True, mlp_bias=True, tie_word_embeddings=True),
    "2-labels": dict(num_labels=2),
    "7-labels": dict(num_labels=7, num_hidden_layers=3),
    "multi-label": dict(num_labels=5, problem_type="multi_label_classification"),
    "regression": dict(num_labels=1),
    "regression-3": dict(num_labels=3, problem_type="regression"),  # the `scores` column
}
# Scorer's max_length defaults to max_position_embeddings; the dynamic case must score past it.
MAX_LENGTH = {"dynamic-rope": 64}


def _reference(hf, path, ids, name):
    """transformers' logits per row. Dynamic RoPE in transformers caches the largest base it has seen
    (a row after a longer one keeps the longer row's base), so that case loads a fresh model per row:
    the row scored alone, which is what scorer reproduces in any batch."""
    if name == "dynamic-rope":
        return [hf.classify_logits(path, [row])[0] for row in ids]
    return hf.classify_logits(path, ids)


def _ref_probs(logits: torch.Tensor, problem_type: str) -> np.ndarray:
    if problem_type == "single_label_classification":
        return logits.softmax(-1).numpy()
    if problem_type == "multi_label_classification":
        return logits.sigmoid().numpy()
    return logits.numpy()


@pytest.mark.parametrize("name", list(CLASSIFIERS))
def test_classifier_fp32_matches_transformers(name, make_dir, hf):
    path = make_dir(**CLASSIFIERS[name])
    s = Scorer.from_pretrained(path, device="cpu", max_batch_tokens=64, return_logits=True,
                               max_length=MAX_LENGTH.get(name))
    table = s.score(TEXTS)
    assert table.num_rows == len(TEXTS) and s.last_stats.batches > 1  # several mixed-length batches
    ids = s.encode(TEXTS).ids
    if name == "dynamic-rope":  # some rows, not all, run past max_position_embeddings
        assert 0 < sum(len(r) > s.cfg.max_position_embeddings for r in ids) < len(ids)
    ref = _reference(hf, path, ids, name)
    pt = s.cfg.problem_type
    for i, lg in enumerate(ref):
        want = _ref_probs(lg, pt)
        np.testing.assert_allclose(table["logits"][i].as_py(), lg.numpy(), atol=1e-5, rtol=0)
        if pt == "single_label_classification":
            np.testing.assert_allclose(table["probs"][i].as_py(), want, atol=1e-5, rtol=0)
            assert table["label_id"][i].as_py() == int(want.argmax())
            assert table["label"][i].as_py() == f"label_{chr(97 + int(want.argmax()))}"
            assert table["score"][i].as_py() == pytest.approx(float(want.max()), abs=1e-5)
        elif pt == "multi_label_classification":
            np.testing.assert_allclose(table["probs"][i].as_py(), want, atol=1e-5, rtol=0)
            assert table["labels"][i].as_py() == [f"label_{chr(97 + j)}" for j in np.flatnonzero(want >= 0.5)]
        elif s.cfg.num_labels == 1:
            assert table["score"][i].as_py() == pytest.approx(float(want[0]), abs=1e-5)
        else:
            np.testing.assert_allclose(table["scores"][i].as_py(), want, atol=1e-5, rtol=0)


def test_llama3_case_has_all_three_bands(make_dir):
    """The llama3 case above keeps, smooths and divides frequencies: a wrong branch would show."""
    from scorer.model.config import LlamaConfig
    from scorer.model.llama import rope_inv_freq

    cfg = LlamaConfig.from_hf_dir(make_dir(**CLASSIFIERS["llama3-rope"]))
    d = cfg.head_dim
    plain = 1.0 / (cfg.rope_theta ** (torch.arange(0, d, 2).float() / d))
    ratio = (rope_inv_freq(cfg) / plain).numpy()
    factor = cfg.rope_scaling.factor
    assert ratio[0] == pytest.approx(1.0)  # high frequency kept
    assert np.isclose(ratio, 1 / factor).any()  # low frequencies divided by factor
    assert ((ratio > 1 / factor + 1e-3) & (ratio < 1 - 1e-3)).any()  # the smoothed band


@pytest.mark.parametrize("arch", ["llama", "mistral"])
def test_config_variants_match_transformers(arch, make_dir, hf, tmp_path):
    """The same weights under a rewritten config.json: a Mistral config that is Llama math (sliding_window
    null), and an rms_norm_eps far from the default, both read by scorer and by transformers."""
    import json
    import shutil

    path = shutil.copytree(make_dir(head_dim=24, rope_theta=50000.0, seed=4), tmp_path / arch)
    cfg = json.loads((path / "config.json").read_text())
    cfg["rms_norm_eps"] = 3e-3  # hidden states here have mean square ~1e-3: eps changes every norm
    if arch == "mistral":
        cfg.update(architectures=["MistralForSequenceClassification"], model_type="mistral", sliding_window=None)
        for key in ("attention_bias", "mlp_bias", "pretraining_tp"):
            cfg.pop(key, None)
    (path / "config.json").write_text(json.dumps(cfg))
    s = Scorer.from_pretrained(path, device="cpu", max_batch_tokens=64, return_logits=True)
    assert s.cfg.model_type == arch and s.cfg.rms_norm_eps == 3e-3 and s.cfg.head_dim == 24
    table = s.score(TEXTS)
    for i, lg in enumerate(hf.classify_logits(path, s.encode(TEXTS).ids)):
        np.testing.assert_allclose(table["logits"][i].as_py(), lg.numpy(), atol=1e-5, rtol=0)
        np.testing.assert_allclose(table["probs"][i].as_py(), lg.softmax(-1).numpy(), atol=1e-5, rtol=0)


# Probability tolerance of a low-precision run (CPU, measured max deviation: bf16 1.7e-2, fp16 2.1e-3 on the
# sharpened heads, ~5e-4 / 7e-5 on the near-uniform random ones).
LOW_PRECISION_ATOL = {"bfloat16": 3e-2, "float16": 5e-3}


def _sharpened(path, tmp_path, scale=30.0):
    """A copy of a classifier whose score head is `scale` times larger: decisive probabilities, so the
    label rule is checked on rows that are far from a tie, and logit errors are magnified."""
    import shutil

    from safetensors.torch import load_file, save_file

    out = shutil.copytree(path, tmp_path / "sharp")
    sd = load_file(out / "model.safetensors")
    sd["score.weight"] = sd["score.weight"] * scale
    save_file(sd, out / "model.safetensors", metadata={"format": "pt"})
    return out


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
@pytest.mark.parametrize("name", ["gqa", "llama3-rope", "7-labels", "gqa-sharp", "7-labels-sharp"])
def test_classifier_low_precision_within_tolerance(name, dtype, make_dir, hf, tmp_path):
    path = make_dir(**CLASSIFIERS[name.removesuffix("-sharp")])
    if name.endswith("-sharp"):
        path = _sharpened(path, tmp_path)
    texts = TEXTS * 3
    s = Scorer.from_pretrained(path, device="cpu", dtype=dtype, max_batch_tokens=64)
    assert s.settings.dtype == dtype and s.model.score.weight.dtype == getattr(torch, dtype)
    table = s.score(texts)
    ref = hf.classify_logits(path, s.encode(texts).ids)
    checked = 0
    for i, lg in enumerate(ref):
        want = lg.softmax(-1).numpy()
        got = np.array(table["probs"][i].as_py())
        np.testing.assert_allclose(got, want, atol=LOW_PRECISION_ATOL[dtype], rtol=0)
        top2 = np.sort(want)[-2:]
        if top2[1] - top2[0] > 1e-2:  # identical labels wherever the reference is not near a tie
            assert table["label_id"][i].as_py() == int(want.argmax()), (i, want)
            checked += 1
    assert checked >= len(texts) // 3  # the label rule was really exercised


def test_classifier_reads_transformers_token_when_pad_id_is_in_the_text(make_dir, hf):
    """pad id == eos id and the tokenizer appends eos: transformers skips trailing pad-id tokens."""
    path = make_dir(eos=True, pad_token_id=2)
    s = Scorer.from_pretrained(path, device="cpu", return_logits=True)
    texts = ["The quick brown fox", "Debian </s> is free", "fox </s></s>", "</s>", "a <pad> b", TEXTS[2]]
    enc = s.encode(texts)
    assert enc.ids[2][-3:] == [2, 2, 2] and enc.ids[1].count(2) == 2  # pad id inside and at the end
    table = s.score(texts)
    for i, lg in enumerate(hf.classify_logits(path, enc.ids)):
        np.testing.assert_allclose(table["logits"][i].as_py(), lg.numpy(), atol=1e-5, rtol=0)


def test_classifier_all_pad_row_and_no_bos(make_dir, hf):
    """Every token is the pad id (no BOS): transformers reads column 0, so does scorer."""
    path = make_dir(bos=False, pad_token_id=3, seed=1)
    s = Scorer.from_pretrained(path, device="cpu", return_logits=True)
    texts = ["<pad><pad>", "<pad> fox", "fox <pad>", "The quick brown fox jumps"]
    enc = s.encode(texts)
    assert enc.ids[0] == [3, 3]
    table = s.score(texts)
    for i, lg in enumerate(hf.classify_logits(path, enc.ids)):
        np.testing.assert_allclose(table["logits"][i].as_py(), lg.numpy(), atol=1e-5, rtol=0)


def _pool(h: torch.Tensor, how: str) -> torch.Tensor:
    return {"last": h[-1], "mean": h.mean(0), "cls": h[0]}[how]


@pytest.mark.parametrize(
    "kw,pooling,normalize,dimensions",
    [
        (dict(task="embed"), "last", True, None),
        (dict(task="embed", num_attention_heads=4, num_key_value_heads=4, head_dim=8), "mean", False, None),
        (dict(task="embed", rope_scaling=LLAMA3), "cls", True, 24),
        (dict(task="causal", tie_word_embeddings=True), "last", True, None),  # no lm_head.weight saved
        (dict(task="causal", tie_word_embeddings=False), "mean", True, 16),  # lm_head.weight present, dropped
    ],
)
def test_embedding_matches_transformers_backbone(kw, pooling, normalize, dimensions, make_dir, hf):
    path = make_dir(**kw)
    s = Scorer.from_pretrained(path, task="embed", device="cpu", pooling=pooling, normalize=normalize,
                               dimensions=dimensions, max_batch_tokens=64)
    table = s.score(TEXTS)
    d = dimensions or s.cfg.hidden_size
    assert table.schema.field("embedding").type.list_size == d
    for i, h in enumerate(hf.hidden(path, s.encode(TEXTS).ids, causal=kw["task"] == "causal")):
        want = _pool(h, pooling)[:d]  # sentence-transformers' truncate_dim: cut first ...
        want = F.normalize(want, dim=-1) if normalize else want  # ... then normalize
        got = np.array(table["embedding"][i].as_py())
        np.testing.assert_allclose(got, want.numpy(), atol=1e-5, rtol=1e-5)
        if normalize:
            assert np.linalg.norm(got) == pytest.approx(1.0, abs=1e-5)


def test_both_tasks_share_one_forward(make_dir, hf):
    path = make_dir()
    s = Scorer.from_pretrained(path, task="both", device="cpu", pooling="mean")
    table = s.score(TEXTS)
    names = table.schema.names
    assert names == ["label", "label_id", "score", "probs", "embedding", "n_tokens", "truncated", "error"]
    ids = s.encode(TEXTS).ids
    for i, (lg, h) in enumerate(zip(hf.classify_logits(path, ids), hf.hidden(path, ids))):
        np.testing.assert_allclose(table["probs"][i].as_py(), lg.softmax(-1).numpy(), atol=1e-5, rtol=0)
        np.testing.assert_allclose(table["embedding"][i].as_py(), F.normalize(h.mean(0), dim=-1).numpy(), atol=1e-5)
