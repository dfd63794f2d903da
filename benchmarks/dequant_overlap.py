"""Can the large-m 4-bit path hide its dequant pass? Column chunks, serial or on a side stream.

    python benchmarks/dequant_overlap.py [--out DIR] [--ms 1024,4096,16384] [--alone SECONDS] [--shapes KxN,...]

The large-m path is one dequant pass (read 0.5 B a weight, write 2 B) and then cuBLAS over the whole
fp16 W. At m = 4096 the pass is 4-6% of the GEMM and cannot run beside it: cuBLAS's Hopper kernels hold
every SM. Two ways around that, timed here against fp16 cuBLAS in the same run:

  * serial chunks: dequant a block of columns into one of two small buffers, then cuBLAS writes that
    block of y; the buffer is small enough to stay in L2, so the pass's 2 B a weight of writes may be
    absorbed there and drained during the compute-bound GEMM (which leaves DRAM idle);
  * side stream: the same chunks, with chunk i+1's dequant on a second stream while chunk i's GEMM runs,
    so its blocks fill the SMs that each chunk's last wave of GEMM tiles leaves idle (normal or high
    stream priority).

Every variant's output is compared with the whole-layer path's (max |diff|; cuBLAS may pick other
kernels for narrower GEMMs). Timing as in int4.py: CUDA-graph replays, in turns, and --alone for the
best variant of each row.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from int4 import SHAPES, alone_time, gpu_time, interleaved, quant_layer, rotated, save_results  # noqa: E402  (benchmarks/int4.py)
from scorer.kernels import int4 as k4  # noqa: E402


def dequant_cols(w: k4.Int4Weight, b0: int, b1: int, out: torch.Tensor) -> None:
    """out (K, nc) <- W[:, 64*b0 : 64*b1] (columns clipped at N), rows in input order: int4_dequant_rows
    over column blocks b0..b1 only (pointers offset, N = the chunk's width)."""
    dev = w.qweight.device
    kt = w.qweight.shape[1]
    n0, nc = 64 * b0, min(64 * b1, w.n) - 64 * b0
    units = (b1 - b0) * kt
    act = "true" if w.perm is not None else "false"
    fn = k4._kernel(dev.index, f"int4_dequant_rows<{k4._DT[w.dtype]}, {act}>")
    _, np_ = k4.padded(w.k, w.n)
    i32 = np.int32
    args = (np.uint64(w.qweight.data_ptr() + b0 * kt * 32 * 16), np.uint64(w.scales.data_ptr() + n0 * 2),
            np.uint64(w.qzeros.data_ptr() + (n0 // 8) * 4), k4._ptr(w.perm), np.uint64(out.data_ptr()),
            i32(w.k), i32(nc), i32(np_), i32(kt), i32(w.n_groups), i32(w.group16), i32(units))
    fn((-(-units // 8),), (256,), args, stream=k4._stream(dev))


class Chunked:
    """y = x @ W in column chunks of `cols` (a multiple of 64) through two (K, cols) buffers."""

    def __init__(self, w: k4.Int4Weight, m: int, cols: int, side: str | None) -> None:
        self.w, self.cols = w, cols
        self.blocks = [(c // 64, min(c + cols, w.n + 63) // 64) for c in range(0, w.n, cols)]
        self.bufs = [torch.empty(w.k * cols, device="cuda", dtype=w.dtype) for _ in range(2)]
        self.y = torch.empty(m, w.n, device="cuda", dtype=w.dtype)
        self.side = None if side is None else torch.cuda.Stream(priority=-1 if side == "high" else 0)
        n = len(self.blocks)
        self.ready = [torch.cuda.Event() for _ in range(n)]
        self.free = [torch.cuda.Event() for _ in range(n)]

    def _buf(self, i: int) -> torch.Tensor:
        b0, b1 = self.blocks[i]
        nc = min(64 * b1, self.w.n) - 64 * b0
        return self.bufs[i % 2][: self.w.k * nc].view(self.w.k, nc)

    def _gemm(self, x: torch.Tensor, i: int) -> None:
        b0, b1 = self.blocks[i]
        n0 = 64 * b0
        buf = self._buf(i)
        torch.mm(x, buf, out=self.y[:, n0 : n0 + buf.shape[1]])

    def __call__(self, x: torch.Tensor, w: k4.Int4Weight | None = None) -> torch.Tensor:
        w = w or self.w
        n = len(self.blocks)
        if self.side is None:
            for i in range(n):
                dequant_cols(w, *self.blocks[i], self._buf(i))
                self._gemm(x, i)
            return self.y
        main = torch.cuda.current_stream()
        self.side.wait_stream(main)
        for i in range(n):
            with torch.cuda.stream(self.side):
                if i >= 2:
                    self.side.wait_event(self.free[i - 2])  # the GEMM that last read this buffer
                dequant_cols(w, *self.blocks[i], self._buf(i))
                self.ready[i].record(self.side)
            if i >= 1:
                main.wait_event(self.ready[i - 1])
                self._gemm(x, i - 1)
                self.free[i - 1].record(main)
        main.wait_event(self.ready[n - 1])
        self._gemm(x, n - 1)
        return self.y


def bench(k: int, n: int, ms: list[int], alone: float) -> list[dict]:
    lin = quant_layer(k, n)  # g128 act-order, fp16, as int4.py
    w = lin._weight()
    ws = rotated(w)
    dense = lin.dequantized_weight()  # (N, K)
    rows = []
    for m in ms:
        xs = [torch.randn(m, k, device="cuda", dtype=torch.float16) for _ in range(2)]
        ref = k4.dequant_matmul(xs[0], w).clone()
        variants: dict[str, list] = {
            "cublas": [lambda i=i: F.linear(xs[i % 2], dense) for i in range(2)],
            "whole": [lambda i=i: k4.dequant_matmul(xs[i % 2], ws[i % len(ws)]) for i in range(len(ws))],
        }
        diffs = {}
        for nch in (2, 3, 4, 8):
            cols = -(-n // nch // 256) * 256
            if cols >= n or cols < 512:
                continue
            for side in (None, "normal", "high"):
                name = f"{-(-n // cols)}x{cols}" + ("" if side is None else f"+{side}")
                ch = Chunked(w, m, cols, side)
                y = ch(xs[0]).clone()
                torch.cuda.synchronize()
                diffs[name] = float((y.float() - ref.float()).abs().max())
                variants[name] = [lambda i=i, ch=ch: ch(xs[i % 2], ws[i % len(ws)]) for i in range(len(ws))]
        t = interleaved(variants)
        best = min((v for v in t if v not in ("cublas", "whole")), key=t.get)
        row = {"K": k, "N": n, "m": m, "us": {v: s * 1e6 for v, s in t.items()}, "diff": diffs, "best": best,
               "ratio_whole": t["whole"] / t["cublas"], "ratio_best": t[best] / t["cublas"]}
        if alone:
            row["alone_us"] = {v: alone_time(variants[v], alone) * 1e6 for v in ("cublas", "whole", best)}
            a = row["alone_us"]
            row["alone_ratio_whole"], row["alone_ratio_best"] = a["whole"] / a["cublas"], a[best] / a["cublas"]
        rows.append(row)
        print(json.dumps(row), flush=True)
        del variants, xs
    del ws, lin, dense
    torch.cuda.empty_cache()
    return rows


def markdown(rows: list[dict], device: str) -> str:
    lines = [f"### Hiding the dequant pass on {device} (torch {torch.__version__})", "",
             "4-bit time / fp16 cuBLAS time, g128 act-order, in turns; `best` is the fastest chunked variant "
             "(chunks x columns, +side stream); diff = its max |y - whole-layer y|.", "",
             "| K x N | m | cuBLAS us | whole / cuBLAS | best | best / cuBLAS | diff | alone: whole | alone: best |",
             "|---|---:|---:|---:|---|---:|---:|---:|---:|"]
    for r in rows:
        aw = f"{r['alone_ratio_whole']:.3f}" if "alone_ratio_whole" in r else ""
        ab = f"{r['alone_ratio_best']:.3f}" if "alone_ratio_best" in r else ""
        lines.append(f"| {r['K']}x{r['N']} | {r['m']} | {r['us']['cublas']:.1f} | {r['ratio_whole']:.3f} | "
                     f"{r['best']} | {r['ratio_best']:.3f} | {r['diff'][r['best']]:.1e} | {aw} | {ab} |")
    lines += ["", "All variants, us:", ""]
    for r in rows:
        lines.append(f"- {r['K']}x{r['N']} m={r['m']}: " + ", ".join(f"{v} {t:.1f}" for v, t in r["us"].items()))
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=os.environ.get("OUT"))
    ap.add_argument("--ms", default="1024,4096,16384")
    ap.add_argument("--alone", type=float, default=0.0, help="seconds each of cuBLAS, whole, best also runs alone")
    ap.add_argument("--shapes", default="", help="KxN,... (default: int4.py's seven)")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("no CUDA device", file=sys.stderr)
        return 2
    torch.backends.cuda.matmul.allow_fp16_reduced_precision_reduction = False
    shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")] if args.shapes else SHAPES
    ms = [int(m) for m in args.ms.split(",")]
    rows, t0 = [], time.time()
    for k, n in shapes:
        rows += bench(k, n, ms, args.alone)
        print(f"{k}x{n} done ({time.time() - t0:.0f} s)", flush=True)
    md = markdown(rows, torch.cuda.get_device_name())
    save_results(args.out, "dequant_overlap", rows, md)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
