"""Model-only throughput on one GPU: scorer (bf16, 4-bit GPTQ) against transformers and the GEMM ceiling.

The workload is the one of the speed issue: random weights in a Llama-3-8B shape (or 70B), 2048 texts
whose token lengths are log-normal (median 220, sigma 0.9, clamped to 16..2048, mean ~334). Texts are
random token ids of those lengths: tokenizing is not part of model-only throughput.

Every figure comes from the same process, after warm-up:
  ceiling      bf16 cuBLAS on the model's linear shapes at m = 16384 tokens -> tokens/s if only the
               linears ran, at that rate (attention and elementwise work excluded); timed twice: after a
               few warm-ups (the burst clocks), and after 10 s of back-to-back GEMMs (the clocks the
               card's power limit allows under sustained load, which is what a run of 15 s gets)
  transformers LlamaForSequenceClassification, bf16, SDPA, batch 32, in arrival order and length-sorted
  scorer       Scorer.score_encoded on the same ids: bf16 and 4-bit GPTQ (g128, act-order)
Each run is timed on its second pass over the texts (a nightly job's steady state: for scorer every batch
shape's cuDNN plan built, every crossover measured), with the first pass beside it. The passes follow
warm-up: two batches for transformers; Scorer.warmup and 64 texts for scorer.
Columns: real tokens/s, ratio to transformers (length-sorted), MFU against both measured ceilings, padding
efficiency, peak GPU memory, GPU weight memory (a host-resident embedding table is not on the GPU).
"""

from __future__ import annotations

import gc
import json
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

SHAPES: dict[str, dict[str, Any]] = {
    "8b": dict(hidden_size=4096, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
               intermediate_size=14336, vocab_size=128256),
    "tiny": dict(hidden_size=256, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                 intermediate_size=512, vocab_size=8192),  # CPU smoke runs of the benchmark scripts
    "70b": dict(hidden_size=8192, num_hidden_layers=80, num_attention_heads=64, num_key_value_heads=8,
                intermediate_size=28672, vocab_size=128256),
}
NUM_LABELS = 8


def hf_config(shape: str) -> dict[str, Any]:
    s = SHAPES[shape]
    return dict(
        architectures=["LlamaForSequenceClassification"], model_type="llama", hidden_act="silu",
        max_position_embeddings=8192, rms_norm_eps=1e-5, rope_theta=500000.0,
        rope_scaling=dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                          original_max_position_embeddings=8192),
        tie_word_embeddings=False, attention_bias=False, mlp_bias=False, bos_token_id=1, eos_token_id=2,
        pad_token_id=0, torch_dtype="bfloat16", num_labels=NUM_LABELS,
        id2label={str(i): f"class_{i}" for i in range(NUM_LABELS)},
        label2id={f"class_{i}": i for i in range(NUM_LABELS)}, **s,
    )


def synthetic_lengths(n: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.clip(np.round(rng.lognormal(math.log(220), 0.9, n)), 16, 2048).astype(np.int64)


def synthetic_ids(lengths: np.ndarray, vocab: int, seed: int = 1) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [rng.integers(3, vocab, int(n)).tolist() for n in lengths]


def linear_shapes(shape: str) -> list[tuple[int, int]]:
    """(K, N) of one decoder layer's projections (q, k, v, o, gate, up, down)."""
    s = SHAPES[shape]
    h, m, d = s["hidden_size"], s["intermediate_size"], s["hidden_size"] // s["num_attention_heads"]
    kv = s["num_key_value_heads"] * d
    return [(h, h), (h, kv), (h, kv), (h, h), (h, m), (h, m), (m, h)]


def flops_per_token(shape: str) -> float:
    return 2.0 * SHAPES[shape]["num_hidden_layers"] * sum(k * n for k, n in linear_shapes(shape))


def cuda_time(fn: Callable[[], Any], reps: int = 10, warmup: int = 3) -> float:
    """Median seconds of fn() over `reps` runs, timed with CUDA events after `warmup` runs."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) / 1e3)
    return float(np.median(times))


def two_passes(run: Callable[[], Any]) -> tuple[tuple[float, float], Any]:
    """Wall seconds of two back-to-back passes of run(), each ended by a device sync, and the second
    pass's result. The second pass is a run's figure (a long job's steady state), the first beside it."""
    seconds, out = [], None
    for _ in range(2):
        t0 = time.perf_counter()
        out = run()
        torch.cuda.synchronize()
        seconds.append(time.perf_counter() - t0)
    return (seconds[0], seconds[1]), out


def gemm_ceiling(shape: str, m: int = 16384, sustain_s: float = 0.0) -> float:
    """tokens/s of the model's linears alone at bf16 cuBLAS speed (random data, m tokens at a time).

    sustain_s = 0: timed right after a few warm-ups, at the clocks a short burst gets. sustain_s > 0: the
    shapes first run back to back for that long, so the card reaches the clocks its power limit allows
    under load for as long as a benchmark run lasts (an H200 at its 700 W cap: ~1450 MHz instead of 1980)."""
    L = SHAPES[shape]["num_hidden_layers"]
    shapes = sorted(set(linear_shapes(shape)))
    xs = {k: torch.randn(m, k, device="cuda", dtype=torch.bfloat16) for k, _ in shapes}
    ws = {(k, n): torch.randn(k, n, device="cuda", dtype=torch.bfloat16) * 0.02 for k, n in shapes}
    t_end = time.perf_counter() + sustain_s
    while time.perf_counter() < t_end:
        for k, n in shapes:
            for _ in range(4):
                xs[k] @ ws[(k, n)]
        torch.cuda.synchronize()
    total = 0.0
    for k, n in shapes:
        t = cuda_time(lambda: xs[k] @ ws[(k, n)], warmup=1 if sustain_s else 3)
        total += t * linear_shapes(shape).count((k, n))
    del xs, ws
    return m / (total * L)


@dataclass
class Row:
    name: str
    tokens_per_s: float
    padding_efficiency: float
    peak_gib: float
    weight_gib: float
    seconds: float
    first_pass_tokens_per_s: float | None = None  # the first pass over the texts (the figure is the second)

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def _free() -> None:
    gc.collect()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()


def transformers_model(shape: str) -> torch.nn.Module:
    """The peer: transformers' LlamaForSequenceClassification in this shape, bf16, SDPA, random weights, on
    the GPU."""
    import transformers

    cfg = transformers.LlamaConfig(**{k: v for k, v in hf_config(shape).items() if k not in ("architectures",)})
    cfg._attn_implementation = "sdpa"
    with torch.device("cuda"):
        return transformers.LlamaForSequenceClassification(cfg).to(torch.bfloat16).eval()


def bench_transformers(shape: str, ids: list[list[int]], batch: int, sort: bool, warm: int = 2) -> Row:
    model = transformers_model(shape)
    weight = sum(p.numel() * p.element_size() for p in model.parameters()) / 2**30
    order = np.argsort([-len(x) for x in ids], kind="stable") if sort else np.arange(len(ids))
    batches = [order[i : i + batch] for i in range(0, len(order), batch)]

    def run(bs: list[np.ndarray]) -> tuple[int, int]:
        real = padded = 0
        for b in bs:
            T = max(len(ids[r]) for r in b)
            x = torch.zeros(len(b), T, dtype=torch.long)
            mask = torch.zeros(len(b), T, dtype=torch.long)
            for j, r in enumerate(b):  # right padding, transformers' default for this model
                x[j, : len(ids[r])] = torch.tensor(ids[r])
                mask[j, : len(ids[r])] = 1
            with torch.inference_mode():
                out = model(input_ids=x.cuda(non_blocking=True), attention_mask=mask.cuda(non_blocking=True)).logits
            out.float().softmax(-1).cpu()
            real += int(mask.sum())
            padded += x.numel()
        return real, padded

    run(batches[:warm])
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    (first, dt), (real, padded) = two_passes(lambda: run(batches))
    row = Row(f"transformers bf16 sdpa, batch {batch}, {'length-sorted' if sort else 'arrival order'}",
              real / dt, real / padded, torch.cuda.max_memory_allocated() / 2**30, weight, dt, real / first)
    del model
    _free()
    return row


@dataclass(frozen=True)
class Variant:
    """One scorer configuration to time: weights, attention path, projection fusion, torch.compile."""

    quantized: bool = False
    attention: str = "auto"  # auto (packed on CUDA) | packed | padded
    fuse: bool = True
    compile: bool = False
    embeddings: str = "auto"  # auto (host for 4-bit, as Scorer.from_pretrained) | host | device
    kernel: str = "auto"  # packed attention: auto (cuDNN on Hopper) | flash | cudnn
    graphs: bool = True  # small packed batches from CUDA graphs (Scorer's cuda_graphs="auto")
    mid: bool = False  # 4-bit: int4.gemm_mid in the buckets of rows where it timed faster (int4.MID_ENABLED)

    @property
    def host_embeddings(self) -> bool:
        return self.embeddings == "host" or (self.embeddings == "auto" and self.quantized)

    @property
    def name(self) -> str:
        parts = ["4-bit GPTQ g128 act-order" if self.quantized else "bf16", self.attention]
        parts += [] if self.fuse else ["unfused"]
        parts += ["compiled"] if self.compile else []
        parts += ["embedding table in host memory"] if self.host_embeddings else []
        parts += [] if self.kernel == "auto" else [f"{self.kernel} attention"]
        parts += [] if self.graphs else ["no CUDA graphs"]
        parts += ["gemm_mid"] if self.mid else []
        return "scorer " + ", ".join(parts)

    @classmethod
    def parse(cls, spec: str) -> "Variant":
        """e.g. "bf16", "int4+compile", "bf16+padded+unfused", "int4+compile+devemb", "bf16+compile+flash",
        "int4+compile+nographs", "int4+compile+mid"."""
        words = spec.split("+")
        flags = {"padded", "packed", "unfused", "compile", "hostemb", "devemb", "flash", "cudnn", "nographs", "mid"}
        if words[0] not in ("bf16", "int4") or not set(words[1:]) <= flags or ("mid" in words and words[0] != "int4"):
            raise ValueError(f"variant {spec!r}: bf16|int4, then +padded, +packed, +unfused, +compile, "
                             "+hostemb, +devemb, +flash, +cudnn, +nographs, +mid (int4 only)")
        att = "padded" if "padded" in words else "packed" if "packed" in words else "auto"
        emb = "host" if "hostemb" in words else "device" if "devemb" in words else "auto"
        kernel = "flash" if "flash" in words else "cudnn" if "cudnn" in words else "auto"
        return cls(words[0] == "int4", att, "unfused" not in words, "compile" in words, emb, kernel,
                   "nographs" not in words, "mid" in words)


DEFAULT_VARIANTS = "bf16+padded+unfused,bf16,bf16+compile,int4,int4+compile"


def random_scorer(shape: str, v: Variant, max_batch_tokens: int, layers: int | None = None) -> Any:
    """A Scorer over a random-weight model built on the GPU (no checkpoint written: 16 GB of disk saved);
    `layers` overrides the shape's layer count (profiles of a few layers)."""
    from scorer.api import Scorer, Settings
    from scorer.kernels import int4
    from scorer.model.config import LlamaConfig
    from scorer.model.heads import ScoringModel
    from scorer.model.llama import compile_layers, fuse_projections
    from scorer.model.quant_config import QuantConfig
    from scorer.model.quantize import LINEAR_GROUPS

    int4.MID_ENABLED = v.mid  # the dispatch reads it at each call: this Scorer's warmup measures with it
    d = hf_config(shape)
    if layers is not None:
        d["num_hidden_layers"] = layers
    if v.quantized:
        d["quantization_config"] = dict(quant_method="gptq", bits=4, group_size=128, desc_act=True, sym=True,
                                        checkpoint_format="gptq")
    cfg = LlamaConfig.from_dict(d, f"<random {shape}>")
    with torch.device("meta"):
        model = ScoringModel(cfg, torch.bfloat16)
    model = model.to_empty(device="cuda")
    gen = torch.Generator(device="cuda").manual_seed(0)
    with torch.no_grad():
        for name, p in list(model.named_parameters()) + list(model.named_buffers()):
            if p.dtype.is_floating_point and name.endswith("norm.weight"):
                p.fill_(1.0)
            elif p.dtype.is_floating_point and not name.endswith("scales"):
                p.normal_(0.0, 0.02, generator=gen)
        # one act-order g_idx per input, as GPTQ writes them: the quantizer's groups of one Hessian
        group_of = {name: group[0] for group in LINEAR_GROUPS for name in group}
        orders: dict[tuple[str, str], torch.Tensor] = {}
        for name, mod in model.named_modules():
            if hasattr(mod, "prepare") and hasattr(mod, "qweight"):
                proj = ".".join(name.split(".")[-2:])  # "self_attn.k_proj"
                key = (name[: -len(proj)], group_of[proj])
                if key not in orders:
                    orders[key] = random_g_idx(mod.g_idx.shape[0], 128, gen)
                fill_random_gptq(mod, gen, orders[key])
                mod.prepare(torch.bfloat16)
    model.eval()
    if v.host_embeddings:
        model.model.embeddings_to_host()
    if v.fuse:
        fuse_projections(model)
    if v.compile:
        compile_layers(model)
    settings = Settings(task="classify", dtype="bfloat16", max_length=8192, truncation_side="right",
                        pooling="last", normalize=True, dimensions=None, threshold=0.5, return_logits=False,
                        max_batch_tokens=max_batch_tokens, max_rows=1024)
    _ = QuantConfig  # the config above is parsed by the same code a checkpoint's is
    return Scorer(model, cfg, None, settings, torch.device("cuda"), attention=v.attention, attention_kernel=v.kernel,
                  cuda_graphs="auto" if v.graphs else False)


def random_g_idx(k: int, group_size: int, gen: torch.Generator) -> torch.Tensor:
    """An act-order g_idx: rows taken in a random order, group_size at a time."""
    perm = torch.randperm(k, device="cuda", generator=gen)
    g_idx = torch.empty(k, dtype=torch.int32, device="cuda")
    g_idx[perm] = (torch.arange(k, device="cuda") // group_size).to(torch.int32)
    return g_idx


def fill_random_gptq(mod: torch.nn.Module, gen: torch.Generator, g_idx: torch.Tensor | None = None) -> None:
    """Random codes, zeros and scales (W std ~0.02) and an act-order g_idx (`g_idx`, or a random one), as
    a GPTQ file would hold. Projections of one input share theirs in real checkpoints (one Hessian)."""
    mod.qweight.copy_(torch.randint(-(2**31), 2**31 - 1, mod.qweight.shape, device="cuda", generator=gen, dtype=torch.int64).to(torch.int32))
    mod.qzeros.fill_(0x77777777)  # symmetric z = 8, stored v1-style as z - 1 = 7 in each nibble
    mod.scales.copy_((0.004 + 0.002 * torch.rand(mod.scales.shape, device="cuda", generator=gen)).half())
    mod.g_idx.copy_(random_g_idx(mod.g_idx.shape[0], 128, gen) if g_idx is None else g_idx)
    if getattr(mod, "bias", None) is not None:
        mod.bias.zero_()


def weight_gib(model: torch.nn.Module, device_type: str = "cuda") -> float:
    """GiB of the model's parameters and buffers on `device_type` (a host-resident embedding table is not
    GPU memory)."""
    ts = list(model.parameters()) + list(model.buffers())
    return sum(t.numel() * t.element_size() for t in ts if t.device.type == device_type) / 2**30


def bench_scorer(shape: str, ids: list[list[int]], v: Variant, max_batch_tokens: int) -> Row:
    from scorer.api import Encoded

    sc = random_scorer(shape, v, max_batch_tokens)
    weight = weight_gib(sc.model)
    n = len(ids)
    enc, warm = Encoded.from_ids(ids), Encoded.from_ids(ids[:64])
    sc.warmup()  # as a job's worker does before its first shard
    sc.score_encoded(warm)
    sc.score_encoded(warm)  # a second warm-up: compiled layers may recompile once for dynamic shapes
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()

    def score() -> None:
        table = sc.score_encoded(enc)
        assert table.num_rows == n and table.column("error").null_count == n, "every row scored"

    (first, dt), _ = two_passes(score)  # the first pass meets each batch shape once
    st = sc.last_stats
    row = Row(f"{v.name}, budget {max_batch_tokens}",
              st.real_tokens / dt, st.padding_efficiency, torch.cuda.max_memory_allocated() / 2**30, weight, dt,
              st.real_tokens / first)
    del sc
    _free()
    return row


def main(model_shape: str = "8b", n_texts: int = 2048, max_batch_tokens: int = 16384,
         peers: str = "both", variants: str = DEFAULT_VARIANTS, out: str | None = None,
         peers_last: bool = False) -> int:
    """peers: which transformers runs to time beside scorer: both (arrival order and length-sorted),
    sorted, or none; peers_last: time them after scorer's runs instead of before (on a power-capped card
    the clocks a run gets depend on what ran just before it)."""
    if not torch.cuda.is_available():
        print("scorer bench needs a CUDA GPU (torch sees none).")
        return 2
    if model_shape not in SHAPES:
        print(f"--model-shape must be one of {sorted(SHAPES)}, not {model_shape!r}")
        return 2
    torch.backends.cuda.matmul.allow_tf32 = True
    dev = torch.cuda.get_device_name()
    lengths = synthetic_lengths(n_texts)
    ids = synthetic_ids(lengths, SHAPES[model_shape]["vocab_size"])
    ceiling = gemm_ceiling(model_shape)
    sustained = gemm_ceiling(model_shape, sustain_s=10.0)
    fpt = flops_per_token(model_shape)
    print(f"# {dev}, torch {torch.__version__}, shape {model_shape}, {n_texts} texts, "
          f"mean length {lengths.mean():.0f}, median {np.median(lengths):.0f}; "
          f"GEMM ceiling {ceiling:,.0f} tokens/s ({ceiling * fpt / 1e12:.0f} TFLOP/s) after warm-up, "
          f"{sustained:,.0f} tokens/s ({sustained * fpt / 1e12:.0f} TFLOP/s) after 10 s under load", flush=True)
    rows: list[Row] = []

    def time_peers() -> None:
        if model_shape == "8b" and peers in ("both", "sorted"):
            for sort in ([False] if peers == "both" else []) + [True]:
                rows.append(bench_transformers(model_shape, ids, 32, sort=sort))
                print(rows[-1], flush=True)

    if not peers_last:
        time_peers()
    for spec in variants.split(","):
        v = Variant.parse(spec.strip())
        if model_shape == "70b" and not v.quantized:
            continue  # a 70B model in bf16 does not fit one GPU
        try:
            rows.append(bench_scorer(model_shape, ids, v, max_batch_tokens))
            print(rows[-1], flush=True)
        except Exception as e:  # noqa: BLE001 - one failing variant must not hide the others' figures
            print(f"{v.name}: FAILED {type(e).__name__}: {e}", flush=True)
            _free()
    if peers_last:
        time_peers()
    peer = next((r.tokens_per_s for r in rows if "length-sorted" in r.name), None)
    print()
    arrival = next((r.tokens_per_s for r in rows if "arrival" in r.name), None)
    print("| run | real tokens/s | first pass | x transformers sorted | x transformers arrival | MFU vs ceiling "
          "| vs sustained ceiling | padding eff. | peak GiB | GPU weights GiB |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        ratio = f"{r.tokens_per_s / peer:.2f}" if peer else "-"
        ratio_a = f"{r.tokens_per_s / arrival:.2f}" if arrival else "-"
        first = f"{r.first_pass_tokens_per_s:,.0f}" if r.first_pass_tokens_per_s else "-"
        print(f"| {r.name} | {r.tokens_per_s:,.0f} | {first} | {ratio} | {ratio_a} | {r.tokens_per_s / ceiling:.0%} | "
              f"{r.tokens_per_s / sustained:.0%} | {r.padding_efficiency:.2f} | {r.peak_gib:.1f} | {r.weight_gib:.1f} |")
    print(f"\nceiling: {ceiling:,.0f} tokens/s after warm-up, {sustained:,.0f} sustained; device {dev}; "
          f"date {time.strftime('%Y-%m-%d')}")
    out = out or os.environ.get("OUT")
    if out:
        Path(out).mkdir(parents=True, exist_ok=True)
        (Path(out) / f"bench_{model_shape}.json").write_text(json.dumps(
            dict(device=dev, shape=model_shape, n_texts=n_texts, ceiling=ceiling, sustained_ceiling=sustained,
                 rows=[r.as_dict() for r in rows]),
            indent=1))
    return 0
