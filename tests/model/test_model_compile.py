"""Compiled decoder layers: after Scorer.warmup, no batch shape a job can meet compiles again (a retrace
mid-shard costs seconds, and past torch's recompile limit a shape class runs eager for good). The layers
are compiled with dynamo's "eager" backend here: the guards and traces are dynamo's, whichever backend
runs the graphs, and no C++ compiler is needed on a CPU."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from scorer import Scorer
from scorer.api import Encoded
from scorer.model import llama


def _batches(rng: np.random.Generator, vocab: int) -> list[list[list[int]]]:
    """Row lengths a job meets: single rows (short, long, grid-filling or not), ragged pairs, full mixes."""
    shapes = [(1,), (7,), (16,), (19,), (96,), (130,), (2, 2), (31, 9), (64, 64), (5, 40, 41, 3), (100, 97, 99),
              tuple(rng.integers(1, 60, 17))]
    return [[rng.integers(4, vocab, n).tolist() for n in lens] for lens in shapes]


@pytest.mark.parametrize("kernel", ["cudnn", "flash"])
@pytest.mark.parametrize("task,pooling", [("classify", "last"), ("embed", "mean")])
def test_warmup_leaves_nothing_to_compile(make_dir, kernel, task, pooling):
    torch._dynamo.reset()  # traces of earlier tests would count against the limit
    kw = dict(device="cpu", attention="packed", attention_kernel=kernel, task=task, pooling=pooling, compile=False,
              max_batch_tokens=160)
    sc, eager = (Scorer.from_pretrained(make_dir(num_labels=3), **kw) for _ in range(2))
    llama.compile_layers(sc.model, backend="eager")
    assert torch._dynamo.config.recompile_limit >= llama.RECOMPILE_LIMIT
    sc.warmup()
    col = "probs" if task == "classify" else "embedding"
    with torch.compiler.set_stance("fail_on_recompile"):
        for ids in _batches(np.random.default_rng(1), sc.cfg.vocab_size):
            enc = Encoded.from_ids(ids)
            got = sc.score_encoded(enc)
            want = eager.score_encoded(enc)
            np.testing.assert_allclose(np.array(got[col].to_pylist()), np.array(want[col].to_pylist()),
                                       atol=1e-5, rtol=0)
    # a retrace on the grid branch would raise inside Scorer._forward_packed, which turns the grid off and
    # reruns the batch on flash varlen: the grid must still be on
    assert sc.grid == (kernel == "cudnn")


def test_compile_errors_are_raised_not_taken_for_cudnn_refusals(make_dir):
    """A backend that fails on a new trace of the grid branch is torch.compile's error, not cuDNN's: it
    reaches the caller and the grid stays on (the cuDNN fallback used to swallow it, turn the grid off
    for good and fail again on flash)."""
    refuse = []

    def backend(gm, example_inputs):  # compiles the traces of the first batch, refuses later ones
        if refuse:
            refuse.append(gm)
            raise ValueError("backend refuses")
        return gm.forward

    torch._dynamo.reset()
    sc = Scorer.from_pretrained(make_dir(num_labels=3), device="cpu", attention="packed", attention_kernel="cudnn",
                                compile=False, max_batch_tokens=160)
    llama.compile_layers(sc.model, backend=backend)
    rng = np.random.default_rng(2)
    # a full grid
    sc.score_encoded(Encoded.from_ids([rng.integers(4, sc.cfg.vocab_size, n).tolist() for n in (32, 32)]))
    refuse.append(None)
    with pytest.raises(torch._dynamo.exc.BackendCompilerFailed, match="backend refuses"):
        # one row on the grid: a new trace
        sc.score_encoded(Encoded.from_ids([rng.integers(4, sc.cfg.vocab_size, 45).tolist()]))
    assert sc.grid and len(refuse) == 2  # one refused trace, and no rerun on flash after it
