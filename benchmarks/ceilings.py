"""How far the 4-bit issue's two missed targets are from what the hardware allows, layer by layer.

    python benchmarks/ceilings.py [--alone 1.0] [--out DIR]

m <= 16 ("at least 3x fp16 cuBLAS"): any kernel that reads a layer's packed weights once takes at least
as long as a kernel that only reads those bytes. This times such pure reads (int4.cu's 16-byte
streaming loads and its 2 KB bulk-copy ring, one wave of warps, each warp a contiguous chunk or all
warps side by side: read_pattern.py's kernels, sized to the layer) and an empty launch, all from CUDA
graphs with the buffers rotated past L2, against fp16 cuBLAS at m = 1 and 16 on the same shape. The
best read's speedup over cuBLAS is the ceiling of any one-pass 4-bit kernel; the 4-bit path is timed
beside it, with act-order (one gather launch more) and with static groups.

m = 4096 ("within 1.05x of fp16 cuBLAS including the dequant"): under act-order, the sequential rows of
the packed layout (groups contiguous, so the small-m kernels read each group's scale once) pair with
x's columns through the permutation. A GEMM on that layout needs either W back in input order (the
dequant pass: 2.5 bytes a weight) or x in sequential order (a gather: 4 bytes per element of x, read +
write); a second copy of the weights in input order would break the 30% weight-memory target. So the
act-order floor is the GEMM plus the cheaper of the two passes, each timed alone here (`--alone S`
seconds of back-to-back replays, the second half timed, as int4.py --alone). Static groups need no
pass in principle: that floor is cuBLAS itself, reachable only by a mixed-input GEMM that dequantizes
in its mainloop.
"""

from __future__ import annotations

import argparse
import importlib.util
import math
import os
import sys
import warnings
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

import cupy  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from scorer.kernels import int4  # noqa: E402

_spec = importlib.util.spec_from_file_location("int4_bench", HERE / "int4.py")
bench = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench)
from read_pattern import SRC as READ_SRC  # noqa: E402

NOP = r"""
__global__ void nop(u32* out) { if (threadIdx.x == 1023) out[0] = 1; }
"""
READS = {"rd<0>": "chunk, 16 B loads", "rd<1>": "sweep, 16 B loads", "rd_bulk<0>": "chunk, 2 KB bulk",
         "rd_bulk<1>": "sweep, 2 KB bulk"}


def packed_bytes(w: int4.Int4Weight) -> int:
    return int4.bandwidth_bytes(w) - w.k * w.n * 2


def read_ceiling(mod, nbytes: int, sms: int, warps_per_sm: int = 24) -> dict[str, float]:
    """Seconds of the fastest pure read of `nbytes` (one wave, rotated buffers), per pattern."""
    pieces = -(-nbytes // 512)
    per = max(8, -(-pieces // (sms * warps_per_sm)))
    per = -(-per // 8) * 8  # rd reads 8 pieces a step, rd_bulk 4 a stage
    warps = -(-pieces // per)
    warps = -(-warps // 4) * 4  # 4 warps a block
    size = warps * per * 512
    bufs = [torch.empty(size // 4, dtype=torch.int32, device="cuda").random_()
            for _ in range(max(2, math.ceil(bench.ROTATE_BYTES / size)))]
    out = torch.zeros(1, dtype=torch.int32, device="cuda")
    times = {}
    for name in READS:
        fn = mod.get_function(name)

        def run(b, fn=fn):
            with cupy.cuda.ExternalStream(torch.cuda.current_stream().cuda_stream):
                fn((warps // 4,), (128,), (np.uint64(b.data_ptr()), np.int32(per), np.uint64(out.data_ptr())))

        times[name] = bench.gpu_time([lambda b=b, run=run: run(b) for b in bufs])
    del bufs
    return times


def nop_time(mod, sms: int) -> float:
    out = torch.zeros(1, dtype=torch.int32, device="cuda")
    fn = mod.get_function("nop")

    def run():
        with cupy.cuda.ExternalStream(torch.cuda.current_stream().cuda_stream):
            fn((sms,), (128,), (np.uint64(out.data_ptr()),))

    return bench.gpu_time([run])


def small_m(k: int, n: int, mod, sms: int, w, ws, wss, ds) -> list[dict]:
    reads = read_ceiling(mod, packed_bytes(w), sms)
    best = min(reads, key=reads.get)
    rows = []
    for m in (1, 16):
        xs = [torch.randn(m, k, device="cuda", dtype=torch.float16) for _ in range(4)]
        t_cb = bench.gpu_time([lambda i=i: F.linear(xs[i % 4], ds[i % len(ds)]) for i in range(max(4, len(ds)))])
        t_act = bench.gpu_time([lambda i=i: int4.matmul(xs[i % 4], ws[i % len(ws)]) for i in range(max(4, len(ws)))])
        t_st = bench.gpu_time([lambda i=i: int4.matmul(xs[i % 4], wss[i % len(wss)])
                               for i in range(max(4, len(wss)))])
        rows.append({"K": k, "N": n, "m": m, "cublas_us": t_cb * 1e6, "read_us": reads[best] * 1e6,
                     "read_pattern": READS[best], "read_TBps": packed_bytes(w) / reads[best] / 1e12,
                     "reads_us": {READS[kk]: v * 1e6 for kk, v in reads.items()},
                     "ceiling_speedup": t_cb / reads[best], "act_us": t_act * 1e6, "act_speedup": t_cb / t_act,
                     "static_us": t_st * 1e6, "static_speedup": t_cb / t_st})
    return rows


def large_m(k: int, n: int, m: int, w, ws, wss, ds, seconds: float) -> dict:
    nx = 3
    xs = [torch.randn(m, k, device="cuda", dtype=torch.float16) for _ in range(nx)]
    dkn = [d.t().contiguous() for d in ds[:nx]]
    s = int4._get_scratch(ds[0].device, k * n * 2)
    scratch = s.buf[: k * n * 2].view(torch.float16)
    kp, _ = int4.padded(k, n)
    xg = torch.empty(m, kp, device="cuda", dtype=torch.float16)
    paths = {
        "cublas_tn": [lambda i=i: F.linear(xs[i % nx], ds[i % len(ds)]) for i in range(max(nx, len(ds)))],
        "cublas_nn": [lambda i=i: torch.mm(xs[i % nx], dkn[i % len(dkn)]) for i in range(nx)],
        "dequant_rows": [lambda wi=wi: int4.dequant_rows(wi, scratch.view(k, n)) for wi in ws],
        "dequant_tn": [lambda wi=wi: int4.dequant(wi, scratch.view(n, k)) for wi in wss],
        "gather_x": [lambda i=i: int4._stage_x(xs[i % nx], w, xg) for i in range(nx)],
        "ours_act": [lambda i=i: int4.matmul(xs[i % nx], ws[i % len(ws)]) for i in range(max(nx, len(ws)))],
        "ours_static": [lambda i=i: int4.matmul(xs[i % nx], wss[i % len(wss)]) for i in range(max(nx, len(wss)))],
    }
    t = {name: bench.alone_time(fns, seconds) for name, fns in paths.items()}
    base = t["cublas_tn"]
    floor_act = min(t["cublas_nn"] + t["dequant_rows"], base + t["gather_x"])
    del xs, dkn, xg
    return {"K": k, "N": n, "m": m, **{f"{kk}_us": v * 1e6 for kk, v in t.items()},
            "act_floor": floor_act / base, "act_ratio": t["ours_act"] / base,
            "static_ratio": t["ours_static"] / base, "pass_share": min(t["dequant_rows"], t["gather_x"]) / base}


def markdown(small: list[dict], large: list[dict], nop_us: float, device: str, seconds: float) -> str:
    lines = [f"### Ceilings on {device} (torch {torch.__version__})", "",
             f"An empty launch of one block a SM, in a graph: {nop_us:.2f} us.", "",
             "m <= 16: the fastest pure read of the layer's packed bytes (one wave), and the speedup over fp16 "
             "cuBLAS that it caps any one-pass 4-bit kernel at:", "",
             "| K x N | m | fp16 cuBLAS us | best read us | read TB/s | ceiling speedup | 4-bit act-order | "
             "4-bit static |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in small:
        lines.append(f"| {r['K']}x{r['N']} | {r['m']} | {r['cublas_us']:.1f} | {r['read_us']:.1f} "
                     f"({r['read_pattern']}) | {r['read_TBps']:.2f} | **{r['ceiling_speedup']:.2f}x** | "
                     f"{r['act_us']:.1f} us = {r['act_speedup']:.2f}x | {r['static_us']:.1f} us = "
                     f"{r['static_speedup']:.2f}x |")
    lines += ["", f"m = {large[0]['m'] if large else 4096}, each path alone ({seconds:g} s, second half timed), us; "
              "act-order floor = min(cuBLAS NN + dequant_rows, cuBLAS TN + gather) / cuBLAS TN:", "",
              "| K x N | cuBLAS TN | cuBLAS NN | dequant_rows | dequant TN | gather x | act-order floor | "
              "4-bit act-order | 4-bit static |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in large:
        lines.append(f"| {r['K']}x{r['N']} | {r['cublas_tn_us']:.1f} | {r['cublas_nn_us']:.1f} | "
                     f"{r['dequant_rows_us']:.1f} | {r['dequant_tn_us']:.1f} | {r['gather_x_us']:.1f} | "
                     f"**{r['act_floor']:.3f}** | {r['act_ratio']:.3f} | {r['static_ratio']:.3f} |")
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--alone", type=float, default=1.0, help="seconds each m = 4096 path runs alone")
    ap.add_argument("--m", type=int, default=4096, help="the large m")
    ap.add_argument("--shapes", default="", help="comma-separated KxN (default: int4.py's seven)")
    ap.add_argument("--out", default=os.environ.get("OUT"))
    a = ap.parse_args()
    if not torch.cuda.is_available():
        print("no CUDA device", file=sys.stderr)
        return 2
    torch.backends.cuda.matmul.allow_fp16_reduced_precision_reduction = False
    warnings.simplefilter("ignore", DeprecationWarning)  # CuPy 14 on ExternalStream (int4.py says why it stays)
    shapes = ([tuple(int(v) for v in s.split("x")) for s in a.shapes.split(",")] if a.shapes else bench.SHAPES)
    mod = cupy.RawModule(code=int4.SOURCE.read_text() + READ_SRC + NOP, options=("-std=c++17", "-DGEMV_HINT=0"),
                         name_expressions=list(READS) + ["nop"])
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    device = torch.cuda.get_device_name()
    nop_us = nop_time(mod, sms) * 1e6
    small, large = [], []
    for k, n in shapes:
        lin = bench.quant_layer(k, n)
        w = lin._weight()
        ws = bench.rotated(w)
        lin_s = bench.quant_layer(k, n, act_order=False)
        wss = bench.rotated(lin_s._weight())
        dense = lin.dequantized_weight()
        ds = [dense] + [dense.clone() for _ in range(max(1, math.ceil(bench.ROTATE_BYTES / dense.numel() / 2)) - 1)]
        int4.crossover(w), int4.crossover(lin_s._weight())  # measured outside the timings
        small += small_m(k, n, mod, sms, w, ws, wss, ds)
        large.append(large_m(k, n, a.m, w, ws, wss, ds, a.alone))
        print(f"{k}x{n}: ceiling {small[-2]['ceiling_speedup']:.2f}x / {small[-1]['ceiling_speedup']:.2f}x, "
              f"act-order floor {large[-1]['act_floor']:.3f}", flush=True)
        del lin, lin_s, w, ws, wss, dense, ds
        torch.cuda.empty_cache()
    md = markdown(small, large, nop_us, device, a.alone)
    bench.save_results(a.out, "ceilings", {"device": device, "nop_us": nop_us, "small": small, "large": large}, md)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
