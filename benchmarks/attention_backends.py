"""Varlen causal attention of one packed batch: flash attention (what scorer runs) against cuDNN's fused
attention through the same kind of aten op, on the benchmark's log-normal row lengths.

    python benchmarks/attention_backends.py [--tokens 16384] [--heads 32] [--kv-heads 8]

Prints each backend's time, its TFLOP/s (causal FLOPs of the real rows), and its max difference from
flash attention; a backend that raises is reported, not fatal.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from scorer.bench import cuda_time, synthetic_lengths  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tokens", type=int, default=16384)
    ap.add_argument("--heads", type=int, default=32)
    ap.add_argument("--kv-heads", type=int, default=8)
    ap.add_argument("--head-dim", type=int, default=128)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("no CUDA device", file=sys.stderr)
        return 2
    lengths = synthetic_lengths(4096)
    lengths = lengths[np.cumsum(lengths) <= args.tokens]
    n, nh, nkv, d = int(lengths.sum()), args.heads, args.kv_heads, args.head_dim
    cu = torch.tensor(np.concatenate([[0], np.cumsum(lengths)]), dtype=torch.int32, device="cuda")
    mx = int(lengths.max())
    q = torch.randn(n, nh, d, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(n, nkv, d, device="cuda", dtype=torch.bfloat16)
    v = torch.randn(n, nkv, d, device="cuda", dtype=torch.bfloat16)
    scale = d**-0.5
    flops = sum(4 * nh * d * int(t) * (int(t) + 1) / 2 for t in lengths)
    kx, vx = (t.repeat_interleave(nh // nkv, dim=1) for t in (k, v))  # GQA expanded, for backends without it

    def flash():
        return torch.ops.aten._flash_attention_forward(q, k, v, cu, cu, mx, mx, 0.0, True, False, scale=scale)[0]

    def cudnn(kk, vv):
        return torch.ops.aten._cudnn_attention_forward(q, kk, vv, None, cu, cu, mx, mx, False, 0.0, True, False,
                                                       scale=scale)[0]

    ref = flash()
    print(f"# {torch.cuda.get_device_name()}, torch {torch.__version__}, cuDNN {torch.backends.cudnn.version()}: "
          f"{len(lengths)} rows, {n} tokens, max {mx}, heads {nh}/{nkv}, d {d}")
    print("| backend | us | TFLOP/s | max abs diff vs flash |\n|---|---:|---:|---:|")
    for name, fn in [("flash varlen (scorer)", flash), ("cuDNN varlen, GQA", lambda: cudnn(k, v)),
                     ("cuDNN varlen, k/v expanded", lambda: cudnn(kx, vx))]:
        try:
            out = fn()
            diff = (out.float() - ref.float()).abs().max().item()
            t = cuda_time(fn, reps=20)
            print(f"| {name} | {t * 1e6:.0f} | {flops / t / 1e12:.0f} | {diff:.2e} |", flush=True)
        except Exception as e:  # noqa: BLE001 - report and go on
            print(f"| {name} | failed: {type(e).__name__}: {str(e)[:200]} | | |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
