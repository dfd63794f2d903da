"""Compiled against eager: the same random-weight model scored both ways, max |prob diff| and labels.

    python benchmarks/compile_parity.py [--model-shape 8b] [--texts 256] [--variants int4,bf16]

torch.compile changes the kernels (inductor's fused RMSNorm, RoPE, SwiGLU; for 4-bit, the int4 op inside
the layer's graph), not the math, so the two must agree to bf16 rounding. bench.random_scorer seeds its
weights, so the eager and compiled Scorers carry the same ones. Run where the model code or the int4
op changes; the figures go to benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from scorer import bench  # noqa: E402
from scorer.api import Encoded  # noqa: E402


def probs(shape: str, spec: str, ids: list[list[int]], budget: int) -> np.ndarray:
    v = bench.Variant.parse(spec)
    sc = bench.random_scorer(shape, v, budget)
    if v.compile:
        sc.warmup()
    out = np.array(sc.score_encoded(Encoded.from_ids(ids))["probs"].to_pylist())
    del sc
    bench._free()
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model-shape", default="8b", choices=["8b", "70b"])
    ap.add_argument("--texts", type=int, default=256)
    ap.add_argument("--variants", default="int4,bf16")
    ap.add_argument("--max-batch-tokens", type=int, default=16384)
    a = ap.parse_args()
    vocab = bench.hf_config(a.model_shape)["vocab_size"]
    ids = bench.synthetic_ids(bench.synthetic_lengths(a.texts), vocab)
    print(f"# {torch.cuda.get_device_name()}, torch {torch.__version__}, shape {a.model_shape}, {a.texts} texts\n")
    print("| weights | max abs prob diff, compiled vs eager | labels equal | max prob |")
    print("|---|---:|---:|---:|")
    for base in a.variants.split(","):
        pe = probs(a.model_shape, base, ids, a.max_batch_tokens)
        pc = probs(a.model_shape, base + "+compile", ids, a.max_batch_tokens)
        same = float((pe.argmax(1) == pc.argmax(1)).mean())
        print(f"| {base} | {np.abs(pe - pc).max():.2e} | {100 * same:.1f}% | {pe.max():.3f} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
