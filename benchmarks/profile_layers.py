"""Where a forward's GPU time goes, by kernel family: scorer variants on a few Llama-3-8B-shaped layers.

    python benchmarks/profile_layers.py [--layers 4] [--tokens 16384 | --case 1x16] [--variants bf16+compile,int4+compile]

One packed batch of synthetic lengths (the benchmark's log-normal mix) up to `tokens` real tokens (or, with
`--plan-batch I`, batch I of the e2e mix as Scorer cuts it, whose rows have nearly one length), two
warm-up forwards, then one forward under torch.profiler. Kernel time is summed by family (cuBLAS GEMM,
flash attention, Triton/inductor fused elementwise, int4 CuPy kernels, the rest) and the top kernels are
listed, so two variants can be compared kernel by kernel in one run.
"""

from __future__ import annotations

import argparse
import math
import re
import sys
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402

FAMILIES = [  # first match wins
    ("int4", re.compile(r"int4_")),
    ("attention", re.compile(r"flash_fwd|fmha|sdpa", re.I)),  # flash (its name says cutlass) or cuDNN's
    ("gemm", re.compile(r"gemm|nvjet|sm90_xmma|cutlass|cublas|xmma", re.I)),
    ("triton", re.compile(r"triton", re.I)),  # inductor's fused elementwise kernels (RoPE, SwiGLU, norms)
]


def _case(case: str) -> tuple[int, int]:
    """"RxT" -> (R rows, T tokens each)."""
    rows, each = (int(v) for v in case.lower().split("x"))
    return rows, each


def family(name: str) -> str:
    return next((f for f, rx in FAMILIES if rx.search(name)), "other")


def profile(spec: str, layers: int, tokens: int, plan_batch: int | None = None, case: str | None = None) -> dict:
    from scorer.api import Encoded
    from scorer.bench import SHAPES, Variant, random_scorer, synthetic_ids, synthetic_lengths

    nn_layout = spec.endswith("+nn")  # experiment: dense weights stored (K, N), so nn.Linear runs cuBLAS NN
    v = Variant.parse(spec.removesuffix("+nn"))
    budget = tokens if case is None else max(tokens, math.prod(_case(case)))  # the whole case in one batch
    sc = random_scorer("8b", v, max_batch_tokens=budget, layers=layers)
    if nn_layout:
        for mod in sc.model.modules():
            if isinstance(mod, torch.nn.Linear):
                mod.weight.data = mod.weight.data.t().contiguous().t()
    if case is not None:  # R rows of T tokens each
        rows, each = _case(case)
        keep = np.full(rows, each)
    elif plan_batch is None:
        lengths = synthetic_lengths(4096)
        keep = lengths[np.cumsum(lengths) <= tokens]  # one batch of about `tokens` random-length rows
    else:  # batch `plan_batch` of the e2e mix as Scorer cuts it: rows of nearly one length
        from scorer.batching import plan_packed

        lengths = synthetic_lengths(2048)
        keep = lengths[plan_packed(lengths, tokens, 1024)[plan_batch]]
    ids = synthetic_ids(keep, SHAPES["8b"]["vocab_size"])
    enc = Encoded.from_ids(ids)
    for _ in range(2):
        sc.score_encoded(enc)
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        sc.score_encoded(enc)
        torch.cuda.synchronize()
    per_family: dict[str, float] = defaultdict(float)
    per_kernel: dict[str, float] = defaultdict(float)
    for e in prof.events():
        if e.device_type == torch.autograd.DeviceType.CUDA:
            us = e.device_time_total if hasattr(e, "device_time_total") else e.cuda_time_total
            per_family[family(e.name)] += us
            per_kernel[e.name] += us
    del sc
    torch.cuda.empty_cache()
    return dict(spec=spec, tokens=int(keep.sum()), rows=len(ids), families=dict(per_family), kernels=dict(per_kernel))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--tokens", type=int, default=16384)
    ap.add_argument("--variants", default="bf16+compile,bf16+compile+nn,int4+compile")
    ap.add_argument("--top", type=int, default=12)
    ap.add_argument("--plan-batch", type=int, default=None,
                    help="profile this batch of the e2e mix's plan (sorted rows) instead of random-length rows")
    ap.add_argument("--case", default=None, help="RxT: R rows of T tokens (a small batch) instead of --tokens")
    args = ap.parse_args()
    results = [profile(s.strip(), args.layers, args.tokens, args.plan_batch, args.case)
               for s in args.variants.split(",")]
    print(f"# {torch.cuda.get_device_name()}, {args.layers} layers, GPU time of one forward (us)\n")
    fams = ["gemm", "attention", "triton", "int4", "other"]
    print("| variant | tokens | total | " + " | ".join(fams) + " |")
    print("|---|---:|---:|" + "---:|" * len(fams))
    for r in results:
        tot = sum(r["families"].values())
        print(f"| {r['spec']} | {r['tokens']} | {tot:,.0f} | "
              + " | ".join(f"{r['families'].get(f, 0):,.0f}" for f in fams) + " |")
    for r in results:
        print(f"\n## {r['spec']}: top kernels\n")
        for name, us in sorted(r["kernels"].items(), key=lambda kv: -kv[1])[: args.top]:
            print(f"- {us:9,.0f} us  [{family(name)}] {name[:150]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
