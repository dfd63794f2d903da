"""The last layer on the kept tokens only (LlamaModel's `keep`): the heads read one token a row, so the last
layer's output projection, MLP and final norm run on those tokens alone. Checked against the full
forward, padded and packed, and through Scorer against transformers for every task and pooling."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tiny import TEXTS
from scorer.api import Scorer
from scorer.batching import collate, pack
from scorer.model.llama import Packed


def _batch(sc, texts):
    enc = sc.encode(texts)
    return enc, np.arange(len(texts))


@pytest.mark.parametrize("attention", ["padded", "packed"])
def test_keep_equals_the_full_forward_at_those_tokens(make_dir, attention):
    path = make_dir(num_labels=3, attention_bias=True, mlp_bias=True)
    sc = Scorer.from_pretrained(path, device="cpu", attention=attention)
    enc, rows = _batch(sc, TEXTS + ["x", "a longer row of several words for the padding"])
    lm = sc.model.model
    gen = torch.Generator().manual_seed(int(torch.seed() % 2**31))
    with torch.inference_mode():
        if attention == "packed":
            b = pack(enc.ids, rows)
            full = lm.forward_packed(b.input_ids, b.position_ids, Packed(b.cu_seqlens, b.max_len))  # (N, H)
            keep = torch.randint(0, full.shape[0], (7,), generator=gen)
            keep[:2] = keep[2]  # duplicates are fine
            got = lm.forward_packed(b.input_ids, b.position_ids, Packed(b.cu_seqlens, b.max_len), keep=keep)
            want = full[keep]
        else:
            b = collate(enc.ids, rows, sc.pad_id)
            full = lm(b.input_ids, b.attention_mask, b.position_ids)  # (B, T, H)
            B, T, H = full.shape
            keep = torch.randint(0, B * T, (9,), generator=gen)  # padding positions too: any token
            got = lm(b.input_ids, b.attention_mask, b.position_ids, keep=keep)
            want = full.reshape(-1, H)[keep]
    assert got.shape == want.shape
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("task,pooling", [("classify", "last"), ("embed", "last"), ("embed", "cls"), ("both", "last"),
                                          ("both", "cls"), ("both", "mean")])
@pytest.mark.parametrize("attention", ["padded", "packed"])
def test_scores_with_keep_match_transformers(make_dir, hf, task, pooling, attention):
    """Scorer prunes the last layer whenever every output reads one token a row (not for mean pooling);
    its classifier rule (rightmost non-pad real token) and pooled vectors still match transformers'."""
    path = make_dir(num_labels=3)
    texts = TEXTS + ["<pad> inside <pad>", "x"]
    sc = Scorer.from_pretrained(path, device="cpu", attention=attention, task=task, pooling=pooling,
                                max_batch_tokens=60, max_rows=4, normalize=False, return_logits=True)
    table = sc.score(texts)
    assert sc.last_stats.batches > 1
    ids = [list(r) for r in sc.encode(texts).ids]
    if task in ("classify", "both"):
        want = torch.stack(hf.classify_logits(path, ids)).numpy()
        np.testing.assert_allclose(np.array(table["logits"].to_pylist()), want, atol=1e-5)
    if task in ("embed", "both"):
        hidden = hf.hidden(path, ids, causal=True)
        pick = {"last": lambda h: h[-1], "cls": lambda h: h[0], "mean": lambda h: h.mean(0)}[pooling]
        want = torch.stack([pick(h) for h in hidden]).numpy()
        np.testing.assert_allclose(np.array(table["embedding"].to_pylist()), want, atol=1e-5)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_keep_on_cuda_flash_varlen(make_dir, dtype):
    """The packed path on CUDA (flash attention varlen core), compiled as Scorer runs it: the kept tokens'
    hidden states match the full forward's at those tokens."""
    path = make_dir(num_labels=3)
    sc = Scorer.from_pretrained(path, device="cuda", dtype=dtype, attention="packed", compile=False)
    enc, rows = _batch(sc, TEXTS * 2 + ["x"])
    lm = sc.model.model
    b = pack(enc.ids, rows).to(sc.device)
    ctx = Packed(b.cu_seqlens, b.max_len)
    with torch.inference_mode():
        full = lm.forward_packed(b.input_ids, b.position_ids, ctx)
        keep = torch.cat([b.cu_seqlens[1:].long() - 1, b.cu_seqlens[:-1].long()])
        got = lm.forward_packed(b.input_ids, b.position_ids, ctx, keep=keep)
    torch.testing.assert_close(got.float(), full[keep].float(), atol=2e-2, rtol=2e-2)
