"""CUDA graphs for small packed batches (scorer.model.graphs): the bucket shapes, the padding, and on a
CPU the whole graphed path (padding, static tensors, reading the real rows back) with the forward run
eagerly on the static tensors instead of replayed: PackedGraphs(capture=False). The capture itself is
checked on a GPU (tests/model/test_model_gpu.py)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tiny import TEXTS
from scorer.api import Scorer
from scorer.batching import GRAPH_ROWS, GRAPH_TOKENS, graph_bucket, pack, pad_packed
from scorer.model.graphs import PackedGraphs


def test_graph_bucket_is_the_batch_shape_or_the_smallest_that_holds_it_and_pad_rows():
    rng = np.random.default_rng(1)
    for _ in range(2000):
        b = int(rng.integers(1, 300))
        lengths = rng.integers(1, int(rng.choice([2, 4, 20, 200])), b)
        n = int(lengths.sum())
        got = graph_bucket(lengths)
        if n in GRAPH_TOKENS and b in GRAPH_ROWS:
            assert got == (n, b)
            continue
        fits = [(t, r) for t in GRAPH_TOKENS for r in GRAPH_ROWS if r > b and t >= n + (r - b)]
        if not fits:
            assert got is None, (b, n)
            continue
        t, r = got
        assert r > b and t >= n + r - b  # every pad row gets a token
        assert r == min(x for x in GRAPH_ROWS if x > b)
        assert t == min(x for x in GRAPH_TOKENS if x >= n + r - b)
    assert graph_bucket([512]) == (512, 1) and graph_bucket([64] * 8) == (512, 8)  # exact shapes, no padding
    assert graph_bucket([511]) == (512, 2) and graph_bucket([512, 1]) == (768, 4)
    assert graph_bucket([GRAPH_TOKENS[-1] + 1]) is None
    assert graph_bucket([1] * (GRAPH_ROWS[-1] + 1)) is None
    assert graph_bucket(np.zeros(0, dtype=np.int64)) is None


def test_pad_packed_appends_pad_rows_and_keeps_the_real_ones():
    rng = np.random.default_rng(2)
    for _ in range(50):
        ids = [rng.integers(5, 100, int(rng.integers(1, 40))).tolist() for _ in range(int(rng.integers(1, 9)))]
        b = pack(ids, np.arange(len(ids)))
        tokens, rows = graph_bucket(b.lengths)
        p = pad_packed(b, tokens, rows, pad_id=3)
        n, nb = b.real_tokens, len(b.lengths)
        assert p.input_ids.shape == (tokens,) and p.position_ids.shape == (tokens,) and p.cu_seqlens.shape == (rows + 1,)
        assert torch.equal(p.input_ids[:n], b.input_ids) and torch.equal(p.position_ids[:n], b.position_ids)
        assert torch.equal(p.cu_seqlens[: nb + 1], b.cu_seqlens)
        assert (p.input_ids[n:] == 3).all() and int(p.cu_seqlens[-1]) == tokens
        assert (p.lengths[nb:] >= 1).all() and p.lengths.sum() == tokens
        assert p.rows[:nb].tolist() == b.rows.tolist() and (p.rows[nb:] == -1).all()
        cu = p.cu_seqlens.numpy()
        for r in range(nb, rows):  # pad rows count their own positions from 0
            assert p.position_ids[cu[r]: cu[r + 1]].tolist() == list(range(cu[r + 1] - cu[r]))
    b = pack([[5] * 16], [0])
    assert pad_packed(b, 16, 1, 0) is b  # already a bucket's shape
    with pytest.raises(ValueError, match="does not fit"):
        pad_packed(b, 16, 2, 0)


def _graphed(path, **kw):
    s = Scorer.from_pretrained(path, device="cpu", attention="packed", **kw)
    s._graphs = PackedGraphs(s.model.model, s.device, capture=False)
    return s


@pytest.mark.parametrize("task,pooling", [("classify", "last"), ("embed", "last"), ("embed", "mean"),
                                          ("embed", "cls"), ("both", "last"), ("both", "mean")])
def test_graphed_path_scores_as_the_eager_one(make_dir, task, pooling):
    path = make_dir(num_labels=4)
    texts = TEXTS * 3 + ["<pad> inside <pad>", "x", None, ""]
    kw = dict(task=task, pooling=pooling, return_logits=True, max_batch_tokens=128, max_rows=6)
    graphed, eager = _graphed(path, **kw), Scorer.from_pretrained(path, device="cpu", attention="packed", **kw)
    a, b = graphed.score(texts), eager.score(texts)
    assert len(graphed._graphs) >= 2, "several buckets"
    assert all(key[0] <= 128 for key in graphed._graphs.entries), "no replay past max_batch_tokens"
    assert graphed.last_stats.batches == eager.last_stats.batches > 2
    assert graphed.last_stats.padded_tokens > graphed.last_stats.real_tokens == eager.last_stats.real_tokens
    assert a["error"].to_pylist() == b["error"].to_pylist()
    cols = [c for c in ("logits", "embedding") if c in a.column_names]
    assert cols
    for col in cols:
        _close(a[col].to_pylist(), b[col].to_pylist())
    again = graphed.score(texts[::-1])  # the same buckets' static tensors take other rows
    for col in cols:
        _close(again[col].to_pylist()[::-1], a[col].to_pylist())


def _close(x, y):
    assert [v is None for v in x] == [v is None for v in y]
    np.testing.assert_allclose(np.array([v for v in x if v is not None]), np.array([v for v in y if v is not None]),
                               atol=2e-5, rtol=0)


def test_graphed_path_leaves_large_batches_to_the_eager_one(make_dir):
    path = make_dir()
    s = _graphed(path, max_batch_tokens=4 * GRAPH_TOKENS[-1])
    long = [" ".join(["word"] * 700)] * 6  # > GRAPH_TOKENS[-1] tokens in one batch
    s.score(long)
    assert len(s._graphs) == 0 and s.last_stats.padded_tokens == s.last_stats.real_tokens > GRAPH_TOKENS[-1]
    s.score(TEXTS)
    assert len(s._graphs) == 1


def test_cuda_graphs_option_is_checked(make_dir):
    path = make_dir()
    with pytest.raises(ValueError, match="cuda_graphs must be"):
        Scorer.from_pretrained(path, device="cpu", cuda_graphs="yes")
    with pytest.raises(ValueError, match="needs the packed path on a CUDA device"):
        Scorer.from_pretrained(path, device="cpu", cuda_graphs=True)
    assert Scorer.from_pretrained(path, device="cpu", attention="packed")._graphs is None  # auto: CUDA only


def test_warmup_traces_the_eager_paths_and_keeps_the_graphs(make_dir):
    s = _graphed(make_dir())
    graphs = s._graphs
    s.warmup()
    assert s._graphs is graphs and len(graphs) == 0  # warmup's batches ran eagerly
    s.score(TEXTS)
    assert len(graphs) == 1
