"""cuDNN attention over a packed batch's rows right-padded into a grid (llama.grid_attention): the grid's
index maps, the model's packed forward through the grid against flash attention's varlen reference, and
Scorer's scores with that kernel against transformers. On a CPU the grid runs SDPA, so every index and
layout is checked here; the CUDA test runs cuDNN itself against flash attention."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import scorer.api
import scorer.model.llama as llama
from tiny import TEXTS
from scorer.api import Scorer
from scorer.batching import grid_layout, pack
from scorer.model.llama import Grid, Packed


@pytest.mark.parametrize("multiple", [1, 16, 64])
def test_grid_layout_maps_every_token_once(multiple):
    rng = np.random.default_rng()
    lengths = rng.integers(1, 90, rng.integers(1, 12))
    src, dst = grid_layout(lengths, multiple)
    B, W = src.shape
    assert B == len(lengths) and W % multiple == 0 and W - multiple < lengths.max() <= W
    n = int(lengths.sum())
    np.testing.assert_array_equal(src.reshape(-1)[dst], np.arange(n))  # each token's slot holds it
    starts = np.cumsum(lengths) - lengths
    row_of = np.repeat(np.arange(B), lengths)
    assert (row_of[src] == np.arange(B)[:, None]).all()  # pad slots repeat a token of their own row
    np.testing.assert_array_equal(dst // W, row_of)
    np.testing.assert_array_equal(dst % W, np.arange(n) - starts[row_of])  # real tokens fill the left


def test_grid_layout_rejects_empty_rows():
    with pytest.raises(ValueError, match="at least one token"):
        grid_layout([3, 0, 2])


def _grid(lengths, device="cpu"):
    src, dst = grid_layout(lengths, 16)
    return Grid(torch.from_numpy(src).to(device), torch.from_numpy(dst).to(device))


def test_grid_forward_equals_the_varlen_forward(make_dir):
    path = make_dir(num_labels=3, attention_bias=True)
    sc = Scorer.from_pretrained(path, device="cpu", attention="packed")
    enc = sc.encode(TEXTS + ["x", "a longer row of several words, so the grid has a wide pad"])
    b = pack(enc.ids, np.arange(len(enc)))
    lm = sc.model.model
    keep = torch.randint(0, b.real_tokens, (5,))
    with torch.inference_mode():
        for k in (None, keep):
            want = lm.forward_packed(b.input_ids, b.position_ids, Packed(b.cu_seqlens, b.max_len), keep=k)
            got = lm.forward_packed(b.input_ids, b.position_ids,
                                    Packed(b.cu_seqlens, b.max_len, _grid(b.lengths)), keep=k)
            torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("task", ["classify", "embed"])
def test_scorer_with_the_grid_kernel_matches_transformers(make_dir, hf, monkeypatch, task):
    calls = []
    real = llama.grid_attention
    monkeypatch.setattr(llama, "grid_attention", lambda *a: calls.append(1) or real(*a))
    monkeypatch.setattr(scorer.api, "GRID_MAX_SLOTS", 1e9)  # every batch through the grid, however ragged
    path = make_dir(num_labels=3)
    texts = TEXTS + ["<pad> inside <pad>", "x"]
    sc = Scorer.from_pretrained(path, device="cpu", attention="packed", attention_kernel="cudnn", task=task,
                                pooling="mean", max_batch_tokens=60, max_rows=4, normalize=False,
                                return_logits=True)
    table = sc.score(texts)
    assert sc.last_stats.batches > 1 and len(calls) == sc.last_stats.batches * sc.cfg.num_layers
    ids = [list(r) for r in sc.encode(texts).ids]
    if task == "classify":
        want = torch.stack(hf.classify_logits(path, ids)).numpy()
        np.testing.assert_allclose(np.array(table["logits"].to_pylist()), want, atol=1e-5)
    else:
        want = torch.stack([h.mean(0) for h in hf.hidden(path, ids, causal=True)]).numpy()
        np.testing.assert_allclose(np.array(table["embedding"].to_pylist()), want, atol=1e-5)


def test_a_ragged_batch_falls_back_to_flash(make_dir):
    path = make_dir(num_labels=3)
    sc = Scorer.from_pretrained(path, device="cpu", attention="packed", attention_kernel="cudnn")
    assert sc._grid(np.array([40, 40, 40])) is not None
    assert sc._grid(np.array([40, 3, 3])) is None  # a 3 x 48 grid for 46 tokens: flash varlen
    flash = Scorer.from_pretrained(path, device="cpu", attention="packed", attention_kernel="flash")
    assert flash._grid(np.array([40, 40, 40])) is None


def test_attention_kernel_is_checked(make_dir):
    with pytest.raises(ValueError, match="attention_kernel must be auto, flash or cudnn"):
        Scorer.from_pretrained(make_dir(num_labels=3), device="cpu", attention_kernel="fa3")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("compile", [False, True])
def test_cudnn_grid_matches_flash_varlen_on_cuda(make_dir, dtype, compile):
    """cuDNN over the grid against flash attention varlen, whole model, eager and compiled as Scorer runs
    it; fresh random row lengths each run, some far from a multiple of 16."""
    path = make_dir(num_labels=3)
    sc = Scorer.from_pretrained(path, device="cuda", dtype=dtype, attention="packed", attention_kernel="cudnn",
                                compile=compile)
    rng = np.random.default_rng()
    ids = [rng.integers(4, sc.cfg.vocab_size, int(n)).tolist() for n in rng.integers(20, 200, 9)]
    b = pack(ids, np.arange(len(ids))).to(sc.device)
    lm = sc.model.model
    with torch.inference_mode():
        want = lm.forward_packed(b.input_ids, b.position_ids, Packed(b.cu_seqlens, b.max_len))
        got = lm.forward_packed(b.input_ids, b.position_ids, Packed(b.cu_seqlens, b.max_len, _grid(b.lengths, "cuda")))
    torch.testing.assert_close(got.float(), want.float(), atol=3e-2, rtol=3e-2)
    assert (got.float() - want.float()).abs().mean() < 3e-3


def test_a_cudnn_failure_reruns_the_batch_on_flash(make_dir, monkeypatch, caplog):
    """cuDNN refusing a shape must not fail a job: that batch and every later one run flash varlen, and the
    scores are those of a flash-only Scorer, row for row."""
    path = make_dir(num_labels=3)
    texts = TEXTS + ["a longer row of several words", "x"]
    want = Scorer.from_pretrained(path, device="cpu", attention="packed", attention_kernel="flash",
                                  max_batch_tokens=60, max_rows=4, return_logits=True).score(texts)
    calls = []

    def refuse(*a):
        calls.append(1)
        raise RuntimeError("cuDNN Frontend error: [cudnn_frontend] Error: No valid execution plans built.")

    monkeypatch.setattr(llama, "grid_attention", refuse)
    monkeypatch.setattr(scorer.api, "GRID_MAX_SLOTS", 1e9)
    sc = Scorer.from_pretrained(path, device="cpu", attention="packed", attention_kernel="cudnn",
                                max_batch_tokens=60, max_rows=4, return_logits=True)
    with caplog.at_level("WARNING", logger="scorer.api"):
        got = sc.score(texts)
    assert len(calls) == 1 and sc.grid is False and sc.last_stats.batches > 1
    assert "cuDNN attention failed on a" in caplog.text and "No valid execution plans" in caplog.text
    assert got.num_rows == len(texts)
    np.testing.assert_allclose(np.array(got["logits"].to_pylist()), np.array(want["logits"].to_pylist()), atol=1e-6)
    assert got["label"].to_pylist() == want["label"].to_pylist()


def test_out_of_memory_in_the_grid_is_raised(make_dir, monkeypatch):
    def oom(*a):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(llama, "grid_attention", oom)
    monkeypatch.setattr(scorer.api, "GRID_MAX_SLOTS", 1e9)
    sc = Scorer.from_pretrained(make_dir(num_labels=3), device="cpu", attention="packed", attention_kernel="cudnn")
    with pytest.raises(torch.OutOfMemoryError):
        sc.score(TEXTS)
    assert sc.grid is True


def test_warmup_runs_both_attention_branches(make_dir, monkeypatch):
    """Scorer.warmup traces the compiled layers before a job's first shard; with the grid on it must reach
    both the grid and flash varlen, or a job compiles the other branch in the middle of a shard."""
    seen = []
    grid, varlen = llama.grid_attention, llama.varlen_attention
    monkeypatch.setattr(llama, "grid_attention", lambda *a: seen.append("grid") or grid(*a))
    monkeypatch.setattr(llama, "varlen_attention", lambda *a: seen.append("flash") or varlen(*a))
    sc = Scorer.from_pretrained(make_dir(num_labels=3), device="cpu", attention="packed", attention_kernel="cudnn")
    sc.warmup()
    layers = sc.cfg.num_layers  # two batches a branch: compiled layers trace static, then dynamic shapes
    assert seen.count("grid") >= 2 * layers and seen.count("flash") >= 2 * layers
