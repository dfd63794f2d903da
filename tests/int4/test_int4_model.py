"""Whole model on the CPU: a tiny Llama classifier whose linears are GPTQ-packed by hand scores the same as
the dense model that carries the dequantized weights, through scorer.model.load and scorer.api.Scorer."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

import tiny
from int4_cases import pack_words, rng
from scorer.api import Scorer
from scorer.model.linear import Int4Linear
from scorer.model.quantize import LINEAR_GROUPS

TEXTS = ["The quick brown fox jumps over the lazy dog.", "Debian", "数据 湖 分类 模型 🙂 emoji",
         "A library for parsing and writing Parquet files in Python. " * 2, "0123456789 +-*/="]
PROJ = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def rtn_gptq(w: np.ndarray, gs: int, act: bool, v1: bool, gen,
             order: np.ndarray | None = None) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Round-to-nearest asym GPTQ of an nn.Linear weight (N, K): (checkpoint tensors, dequantized (N, K)).
    Under act-order the columns are taken in `order` (a random one if not given)."""
    n, k = w.shape
    gsz = k if gs == -1 else gs
    g = -(-k // gsz)
    if order is None:
        order = gen.permutation(k) if act else np.arange(k)
    g_idx = np.empty(k, dtype=np.int32)
    g_idx[order] = np.arange(k) // gsz
    wt = w.T  # (K, N)
    scales = np.zeros((g, n), dtype=np.float16)
    zeros = np.zeros((g, n), dtype=np.int64)
    for gi in range(g):
        rows = wt[g_idx == gi]
        lo, hi = np.minimum(rows.min(0), 0), np.maximum(rows.max(0), 0)
        s = np.maximum((hi - lo) / 15, 1e-6).astype(np.float16)
        scales[gi] = s
        zeros[gi] = np.clip(np.round(-lo / s.astype(np.float32)), 0, 15)
    s_k = scales.astype(np.float32)[g_idx]
    q = np.clip(np.round(wt / s_k) + zeros[g_idx], 0, 15).astype(np.int64)
    deq = (s_k * (q - zeros[g_idx])).astype(np.float16)  # fp16 W, one rounding
    qzeros = pack_words(zeros.reshape(g, n // 8, 8))
    if v1:
        qzeros = qzeros - np.uint32(0x11111111)
    ck = {"qweight": pack_words(q.reshape(k // 8, 8, n).transpose(0, 2, 1)).view(np.int32),
          "qzeros": qzeros.view(np.int32), "scales": scales, "g_idx": g_idx}
    return ck, deq.T


# projections that read one input; GPTQ quantizes each group from one Hessian, so under act-order they
# share one column order (g_idx) in real checkpoints
INPUT_OF = {name.split(".")[-1]: group[0] for group in LINEAR_GROUPS for name in group}


def quantized_pair(tmp: Path, gs: int, act: bool, v1: bool, bias: bool, shared: bool = False) -> tuple[Path, Path]:
    """(GPTQ model dir, dense model dir with the dequantized weights) from one tiny random classifier.
    shared: projections of one input share an act-order column order, as GPTQ writes them; otherwise
    every projection has its own."""
    src = tiny.make_model(tmp / "src", hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, num_labels=3,
                          attention_bias=bias, mlp_bias=bias)
    state = load_file(str(src / "model.safetensors"))
    gen = rng()
    qstate, dstate, orders = {}, {}, {}
    for name, t in state.items():
        if name.endswith(".weight") and name.split(".")[-2] in PROJ:
            base = name[: -len(".weight")]
            order = None
            if act and shared:
                key = (base.rsplit(".", 2)[0], INPUT_OF[name.split(".")[-2]])
                order = orders.setdefault(key, gen.permutation(t.shape[1]))
            ck, deq = rtn_gptq(t.float().numpy(), gs, act, v1, gen, order)
            for key, arr in ck.items():
                qstate[f"{base}.{key}"] = torch.from_numpy(np.ascontiguousarray(arr))
            dstate[name] = torch.from_numpy(np.ascontiguousarray(deq.astype(np.float32)))
        else:
            qstate[name] = dstate[name] = t
    cfg = json.loads((src / "config.json").read_text())
    dirs = []
    for which, st in (("gptq", qstate), ("dense", dstate)):
        d = tmp / which
        d.mkdir()
        for f in src.iterdir():
            if f.name not in ("model.safetensors", "config.json"):
                (d / f.name).write_bytes(f.read_bytes())
        c = dict(cfg)
        if which == "gptq":
            c["quantization_config"] = {"quant_method": "gptq", "bits": 4, "group_size": gs, "desc_act": act,
                                        "sym": False, "checkpoint_format": "gptq" if v1 else "gptq_v2"}
        (d / "config.json").write_text(json.dumps(c))
        save_file(st, str(d / "model.safetensors"))
        dirs.append(d)
    return dirs[0], dirs[1]


@pytest.mark.parametrize("gs,act,v1,bias,shared", [(32, True, True, True, False), (32, True, False, True, True),
                                                   (-1, False, False, False, False), (64, False, True, False, False)])
def test_gptq_model_scores_equal_dense_dequantized(tmp_path, gs, act, v1, bias, shared):
    qdir, ddir = quantized_pair(tmp_path, gs, act, v1, bias, shared)
    q = Scorer.from_pretrained(qdir, device="cpu", dtype="float32", return_logits=True)
    d = Scorer.from_pretrained(ddir, device="cpu", dtype="float32", return_logits=True)
    # q/k/v and gate/up fuse into one 4-bit linear each when they share a column order (or have none)
    fused = shared or not act
    attn = [m for m in q.model.modules() if type(m).__name__ == "Attention"]
    assert len(attn) == 2 and all((a.qkv_proj is not None) == fused for a in attn)
    assert all(isinstance(a.qkv_proj if fused else a.q_proj, Int4Linear) for a in attn)
    assert sum(isinstance(m, Int4Linear) for m in q.model.modules()) == 2 * (4 if fused else len(PROJ))
    # under act-order gate/up write their outputs in down's sequential order: down needs no gather
    mlps = [m for m in q.model.modules() if type(m).__name__ == "MLP"]
    assert all(m.down_proj.perm is None for m in mlps)
    tq, td = q.score(TEXTS), d.score(TEXTS)
    for i in range(len(TEXTS)):
        np.testing.assert_allclose(tq["logits"][i].as_py(), td["logits"][i].as_py(), atol=1e-5, rtol=0)
        np.testing.assert_allclose(tq["probs"][i].as_py(), td["probs"][i].as_py(), atol=1e-6, rtol=0)
    assert tq["label"].to_pylist() == td["label"].to_pylist()


@pytest.mark.parametrize("layout,shared", [("reference", False), ("tiles", True), ("tiles", False)])
def test_gptq_model_bf16_close_to_dense_bf16(tmp_path, monkeypatch, layout, shared):
    """bf16 against the dense model; "tiles": the kernels' layout (fused, re-ordered for down) through the
    op's plain-torch kernel, as a GPU runs it."""
    from scorer.model import linear

    monkeypatch.setattr(linear, "TILES_OFF_CUDA", layout == "tiles")
    qdir, ddir = quantized_pair(tmp_path, 32, True, True, False, shared)
    q = Scorer.from_pretrained(qdir, device="cpu", dtype="bfloat16")
    assert all(m.backend == ("cuda" if layout == "tiles" else "reference")
               for m in q.model.modules() if isinstance(m, Int4Linear))
    d = Scorer.from_pretrained(ddir, device="cpu", dtype="bfloat16")
    tq, td = q.score(TEXTS), d.score(TEXTS)
    diff = max(np.abs(np.array(tq["probs"][i].as_py()) - np.array(td["probs"][i].as_py())).max()
               for i in range(len(TEXTS)))
    # bf16 rounding moves these tiny models' probabilities by ~1e-3; a wrong column order by ~2e-2
    assert diff < 6e-3, diff
