"""Causal attention of packed batches: flash attention varlen (what scorer runs) against cuDNN's fused
attention, on the benchmark's log-normal row lengths.

    python benchmarks/attention_backends.py [--tokens 16384] [--heads 32] [--kv-heads 8]
    python benchmarks/attention_backends.py --plan [--texts 2048] [--pad-to 64]

Default: one packed batch of random rows; each backend's time, its TFLOP/s (causal FLOPs of the real rows)
and its max difference from flash attention; a backend that raises is reported, not fatal.

--plan: every batch of the e2e mix as Scorer cuts it (longest first, `--tokens` real tokens a batch), so
the rows of a batch have nearly one length. Each batch runs flash varlen, and cuDNN's dense fused attention
on the rows right-padded to the batch's longest (rounded up to `--pad-to`): with right padding and a causal
mask no real query sees a pad key, so no mask is needed. "with copies" adds the scatter of q/k/v into the
padded layout and the gather of the output back, which a packed model would pay. Summed over the batches
and multiplied by the layer count, against the e2e run's time, it gives the share of a forward each path
costs. Also the first call of each new padded shape (cuDNN builds an execution plan per shape).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from scorer.batching import grid_layout, plan_packed  # noqa: E402
from scorer.bench import cuda_time, synthetic_lengths  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tokens", type=int, default=16384)
    ap.add_argument("--heads", type=int, default=32)
    ap.add_argument("--kv-heads", type=int, default=8)
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--plan", action="store_true", help="every batch of the e2e mix (see the docstring)")
    ap.add_argument("--texts", type=int, default=2048)
    ap.add_argument("--pad-to", type=int, default=64)
    ap.add_argument("--layers", type=int, default=32, help="layers a forward runs (the share of a forward)")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("no CUDA device", file=sys.stderr)
        return 2
    if args.plan:
        return plan(args)
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


def plan(args: argparse.Namespace) -> int:
    nh, nkv, d = args.heads, args.kv_heads, args.head_dim
    scale = d**-0.5
    all_len = synthetic_lengths(args.texts)
    batches = plan_packed(all_len, args.tokens, 1024)
    gen = torch.Generator(device="cuda").manual_seed(0)
    print(f"# {torch.cuda.get_device_name()}, torch {torch.__version__}, cuDNN {torch.backends.cudnn.version()}: "
          f"{args.texts} texts, {int(all_len.sum())} tokens, {len(batches)} batches of <= {args.tokens} tokens, "
          f"heads {nh}/{nkv}, d {d}, pad to {args.pad_to}", flush=True)
    tot = {"flash varlen": 0.0, "cuDNN dense": 0.0, "cuDNN dense with copies": 0.0, "flash dense with copies": 0.0}
    flops_real = flops_pad = 0.0
    builds, worst = [], 0.0
    shapes = set()
    for idx in batches:
        lengths = all_len[idx]
        n, mx = int(lengths.sum()), int(lengths.max())
        src_h, dst_h = grid_layout(lengths, args.pad_to)  # the grid Scorer builds (W: longest, rounded up)
        B, L = src_h.shape
        cu_h = np.concatenate([[0], np.cumsum(lengths)])
        cu = torch.tensor(cu_h, dtype=torch.int32, device="cuda")
        dst = torch.tensor(dst_h, dtype=torch.int64, device="cuda")
        q = torch.randn(n, nh, d, device="cuda", dtype=torch.bfloat16, generator=gen)
        k = torch.randn(n, nkv, d, device="cuda", dtype=torch.bfloat16, generator=gen)
        v = torch.randn(n, nkv, d, device="cuda", dtype=torch.bfloat16, generator=gen)
        qp = torch.zeros(B, L, nh, d, device="cuda", dtype=torch.bfloat16)
        kp = torch.zeros(B, L, nkv, d, device="cuda", dtype=torch.bfloat16)
        vp = torch.zeros(B, L, nkv, d, device="cuda", dtype=torch.bfloat16)
        flops_real += sum(4 * nh * d * int(t) * (int(t) + 1) / 2 for t in lengths)
        flops_pad += B * 4 * nh * d * L * (L + 1) / 2

        def scatter():
            for src, buf in ((q, qp), (k, kp), (v, vp)):
                buf.view(B * L, *src.shape[1:]).index_copy_(0, dst, src)

        def flash_v():
            return torch.ops.aten._flash_attention_forward(q, k, v, cu, cu, mx, mx, 0.0, True, False, scale=scale)[0]

        def cudnn_dense():  # (B, L, heads, d) buffers seen as (B, heads, L, d): the BSHD layout, no copy
            out = torch.ops.aten._scaled_dot_product_cudnn_attention(
                qp.transpose(1, 2), kp.transpose(1, 2), vp.transpose(1, 2), None, False, 0.0, True, False,
                scale=scale)[0]
            return out.transpose(1, 2)  # (B, L, nh, d)

        def flash_dense():
            return torch.ops.aten._flash_attention_forward(qp, kp, vp, None, None, L, L, 0.0, True, False,
                                                           scale=scale)[0]

        def gather(out):
            return out.reshape(B * L, nh * d).index_select(0, dst)

        ref = flash_v()
        scatter()
        torch.cuda.synchronize()
        new = (B, L) not in shapes
        t0 = time.perf_counter()
        out = cudnn_dense()
        torch.cuda.synchronize()
        if new:
            builds.append(time.perf_counter() - t0)
            shapes.add((B, L))
        worst = max(worst, (gather(out).float() - ref.reshape(n, -1).float()).abs().max().item(),
                    (gather(flash_dense()).float() - ref.reshape(n, -1).float()).abs().max().item())
        tot["flash varlen"] += cuda_time(flash_v, reps=5)
        tot["cuDNN dense"] += cuda_time(cudnn_dense, reps=5)
        tot["cuDNN dense with copies"] += cuda_time(lambda: (scatter(), gather(cudnn_dense())), reps=5)
        tot["flash dense with copies"] += cuda_time(lambda: (scatter(), gather(flash_dense())), reps=5)
        del q, k, v, qp, kp, vp
    base = tot["flash varlen"]
    print(f"padded FLOPs / real: {flops_pad / flops_real:.3f}; {len(shapes)} padded shapes, first call "
          f"{min(builds) * 1e3:.1f}-{max(builds) * 1e3:.1f} ms (median {np.median(builds) * 1e3:.1f}); "
          f"max |diff| vs flash varlen on real tokens {worst:.2e}")
    print(f"| path | one layer, all batches ms | x {args.layers} layers s | TFLOP/s (real) | vs flash varlen |")
    print("|---|---:|---:|---:|---:|")
    for name, t in tot.items():
        print(f"| {name} | {t * 1e3:.2f} | {t * args.layers:.3f} | {flops_real / t / 1e12:.0f} | {t / base:.3f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
