"""A GPTQ checkpoint written by `scorer quantize` loads through load_model/Scorer (CPU reference backend):
integer buffers stay integer, each Int4Linear is prepared once, and scores stay close to the fp32 model."""

from __future__ import annotations

import numpy as np
import torch

from tiny import TEXTS
from scorer.api import Scorer
from scorer.model.gptq import QuantSpec
from scorer.model.linear import Int4Linear
from scorer.model.quantize import quantize_model


def test_rtn_checkpoint_scores_like_the_source(make_dir, tmp_path):
    src = make_dir(hidden_size=128, intermediate_size=256, num_labels=3, seed=3)
    out = tmp_path / "q"
    quantize_model(src, out, TEXTS * 2, TEXTS[:4], spec=QuantSpec(group_size=32), method="rtn", max_length=32,
                   device="cpu", progress=False, calib_source="test")
    q = Scorer.from_pretrained(out, device="cpu", return_logits=True)
    layers = [m for m in q.model.modules() if isinstance(m, Int4Linear)]
    assert len(layers) == 4 * q.cfg.num_layers  # q|k|v and gate|up fused (static groups: no permutation)
    assert all(m.backend == "reference" and m.qweight.dtype == torch.int32 for m in layers)
    assert q.model.model.embed_tokens.weight.dtype == torch.float32 and q.cfg.quant.group_size == 32
    fp = Scorer.from_pretrained(src, device="cpu", return_logits=True)
    got, want = (np.array(s.score(TEXTS)["probs"].to_pylist()) for s in (q, fp))
    assert np.abs(got - want).max() < 0.05
    assert q.fingerprint != fp.fingerprint
