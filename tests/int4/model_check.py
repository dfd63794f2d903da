"""Whole-model check on a GPU: a Llama-3-8B-shaped classifier with random weights packed as a real GPTQ
checkpoint (g128, act-order, sym, v1), against the same model carrying the dequantized bf16 weights.

The model is built the way scorer.model.load.load_model builds one (meta device, load_state_dict with
assign=True, Int4Linear.prepare), without writing ~5 GB of safetensors. Used by the GPU test (2 layers)
and by benchmarks/int4.py (all 32 layers, plus timings).
"""

from __future__ import annotations

import time

import torch

from scorer.kernels import reference as ref
from scorer.model.config import LlamaConfig
from scorer.model.heads import ScoringModel
from scorer.model.linear import Int4Linear

QUANT = {"quant_method": "gptq", "bits": 4, "group_size": 128, "desc_act": True, "sym": True,
         "checkpoint_format": "gptq"}


def llama3_8b(layers: int, quant: bool) -> LlamaConfig:
    d = {
        "architectures": ["LlamaForSequenceClassification"], "model_type": "llama", "hidden_size": 4096,
        "intermediate_size": 14336, "num_attention_heads": 32, "num_key_value_heads": 8,
        "num_hidden_layers": layers, "vocab_size": 128256, "max_position_embeddings": 8192,
        "rope_theta": 500000.0, "rms_norm_eps": 1e-5, "hidden_act": "silu",
        "id2label": {"0": "neg", "1": "neu", "2": "pos"}, "bos_token_id": 128000, "eos_token_id": 128001,
    }
    if quant:
        d["quantization_config"] = dict(QUANT)
    return LlamaConfig.from_dict(d, "/nonexistent/llama3-8b-shaped")


def random_gptq(k: int, n: int, device: str) -> dict[str, torch.Tensor]:
    """A random g128 act-order sym v1 GPTQ linear whose weights have std ~0.02."""
    q = torch.randint(0, 16, (k, n), device=device, dtype=torch.int32)
    g = -(-k // 128)
    zeros = torch.full((g, n), 8, device=device, dtype=torch.int32)
    scales = (0.0043 * (0.5 + torch.rand(g, n, device=device))).half()
    order = torch.randperm(k, device=device)
    g_idx = torch.empty(k, dtype=torch.int32, device=device)
    g_idx[order] = (torch.arange(k, device=device) // 128).int()
    return ref.pack_gptq(q, zeros, scales, g_idx, v1=True)


def _nbytes(model: torch.nn.Module, linear_only: bool, cuda_only: bool = False) -> int:
    total = 0
    for mod in model.modules():
        if linear_only and not isinstance(mod, (Int4Linear, torch.nn.Linear)):
            continue
        if linear_only and getattr(mod, "out_features", 0) == 3:  # the score head is never quantized
            continue
        for t in list(mod.parameters(recurse=False)) + list(mod.buffers(recurse=False)):
            if not cuda_only or t.is_cuda:
                total += t.numel() * t.element_size()
    return total


@torch.no_grad()
def build(layers: int, device: str = "cuda", dtype: torch.dtype = torch.bfloat16):
    """(4-bit model, dense model with the dequantized weights); shared embedding/norm/head tensors."""
    with torch.device("meta"):
        qm = ScoringModel(llama3_8b(layers, True), dtype)
        dm = ScoringModel(llama3_8b(layers, False), dtype)
    qstate: dict[str, torch.Tensor] = {}
    for name, mod in qm.named_modules():
        if isinstance(mod, Int4Linear):
            for key, t in random_gptq(mod.in_features, mod.out_features, device).items():
                qstate[f"{name}.{key}"] = t
    shared: dict[str, torch.Tensor] = {}
    for name, t in qm.state_dict().items():
        if name in qstate:
            continue
        if "norm" in name:
            shared[name] = (1.0 + 0.1 * torch.randn(t.shape, device=device)).to(dtype)
        else:  # embeddings and the score head
            shared[name] = (0.02 * torch.randn(t.shape, device=device)).to(dtype)
    qm.load_state_dict({**qstate, **shared}, strict=True, assign=True)
    for mod in qm.modules():
        if isinstance(mod, Int4Linear):
            mod.prepare(dtype)
    dstate = dict(shared)
    for name, mod in qm.named_modules():
        if isinstance(mod, Int4Linear):
            dstate[f"{name}.weight"] = mod.dequantized_weight()
    dm.load_state_dict(dstate, strict=True, assign=True)
    return qm.eval(), dm.eval()


@torch.no_grad()
def probs(model: ScoringModel, ids: torch.Tensor, emb: torch.Tensor | None = None) -> torch.Tensor:
    mask = torch.ones_like(ids, dtype=torch.bool)
    pos = torch.arange(ids.shape[1], device=ids.device).expand_as(ids)
    hidden = model(ids, mask, pos, emb)
    return model.logits(hidden, ids, mask).softmax(-1)


def _time(fn, reps: int = 3) -> float:
    fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(reps):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - t0) / reps


@torch.no_grad()
def run(layers: int = 32, seq: int = 128, rows: int = 8, timing: bool = False, device: str = "cuda") -> dict:
    qm, dm = build(layers, device)
    out: dict = {"layers": layers}
    diffs = []
    for r, s in ((rows, seq), (4, 8), (1, 5)):  # m = rows*seq tokens: dequant path, then the fused path
        ids = torch.randint(0, 128256, (r, s), device=device)
        pq, pd = probs(qm, ids), probs(dm, ids)
        assert torch.isfinite(pq).all() and torch.isfinite(pd).all()
        diffs.append((pq - pd).abs().max().item())
    out["max_prob_diff"] = max(diffs)
    out["prob_diffs_by_m"] = {f"m={r * s}": d for (r, s), d in zip(((rows, seq), (4, 8), (1, 5)), diffs)}
    out["bytes_4bit"], out["bytes_bf16"] = _nbytes(qm, False), _nbytes(dm, False)
    out["weight_bytes_ratio"] = out["bytes_4bit"] / out["bytes_bf16"]
    out["linear_bytes_ratio"] = _nbytes(qm, True) / _nbytes(dm, True)
    if timing:
        for r, s in ((1, 16), (8, 512), (16, 1024)):
            ids = torch.randint(0, 128256, (r, s), device=device)
            tq, td = _time(lambda: probs(qm, ids)), _time(lambda: probs(dm, ids))
            out[f"forward_ms_tokens={r * s}"] = {"4bit": tq * 1e3, "bf16": td * 1e3, "ratio": tq / td}
    # the embedding table in host memory (Scorer's default for 4-bit): the same probabilities, bit for bit
    ids = torch.randint(0, 128256, (rows, seq), device=device)
    before = probs(qm, ids)
    qm.model.embeddings_to_host()
    after = probs(qm, ids, qm.model.host_embeddings(ids.cpu()).to(device))
    out["host_embeddings_identical"] = bool(torch.equal(before, after))
    out["bytes_4bit_gpu_host_table"] = _nbytes(qm, False, cuda_only=True)
    out["gpu_bytes_ratio_host_table"] = out["bytes_4bit_gpu_host_table"] / out["bytes_bf16"]
    del qm, dm
    torch.cuda.empty_cache()
    return out
