"""Every algorithm cuBLASLt's heuristic offers for the GEMMs scorer runs, timed under sustained load
against torch's own matmul (which takes the heuristic's first): is there a faster one at the power cap?

    python benchmarks/gemm_algos.py [--sustain 10] [--count 24] [--alone SECONDS] [--shapes KxN,..] [--out DIR]

Cases: the bf16 Llama-3-8B projections at m = 16384 (nn.Linear's TN layout, and NN, the act-order 4-bit
path's), and the 4-bit issue's fp16 shapes at m = 4096 (TN and NN). The card first runs GEMMs back to back
for --sustain seconds so it sits at the clocks its power limit allows; then torch and each algorithm are
timed in turns (5 rounds, ~10 ms of calls each, median), so drift hits them alike; or, with --alone S,
each runs alone for S seconds and the second half is timed, so the power controller has settled on that
algorithm's own draw. Every algorithm's output is checked against torch's first.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # scorer
sys.path.insert(0, str(Path(__file__).resolve().parent))  # lt

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import lt as cublaslt  # noqa: E402  (benchmarks/lt.py)

MODEL = [(4096, 6144), (4096, 4096), (4096, 28672), (14336, 4096)]
INT4 = [(4096, 6144), (4096, 4096), (4096, 28672), (14336, 4096), (8192, 10240), (8192, 57344), (28672, 8192)]


def cases() -> list[tuple[str, int, int, int, torch.dtype]]:
    out = [(lay, 16384, k, n, torch.bfloat16) for lay in ("tn", "nn") for k, n in MODEL]
    out += [(lay, 4096, k, n, torch.float16) for lay in ("tn", "nn") for k, n in INT4]
    return out


def window(fn, calls: int) -> float:
    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    a.record()
    for _ in range(calls):
        fn()
    b.record()
    b.synchronize()
    return a.elapsed_time(b) * 1e-3 / calls


def sustain(seconds: float) -> None:
    x = torch.randn(16384, 4096, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(14336, 4096, device="cuda", dtype=torch.bfloat16) * 0.02
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        for _ in range(8):
            F.linear(x, w)
        torch.cuda.synchronize()


def alone(fn, seconds: float) -> tuple[float, float]:
    """(seconds per call, median SM clock MHz) of fn run back to back for `seconds`, timed over the second
    half: the card's power controller has settled on this algorithm's own draw by then."""
    est = window(fn, 2)
    calls = max(2, int(0.05 / est))  # ~50 ms a window
    times, clocks, end, half = [], [], time.perf_counter() + seconds, time.perf_counter() + seconds / 2
    while time.perf_counter() < end:
        t = window(fn, calls)
        if time.perf_counter() > half:
            times.append(t)
            try:
                clocks.append(torch.cuda.clock_rate())
            except Exception:  # noqa: BLE001 - pynvml missing: no clock column
                pass
    return statistics.median(times), (statistics.median(clocks) if clocks else float("nan"))


def run_case(lay: str, m: int, k: int, n: int, dt: torch.dtype, count: int, alone_s: float = 0.0) -> dict:
    x = torch.randn(m, k, device="cuda", dtype=dt)
    w = torch.randn(n, k, device="cuda", dtype=dt) * 0.02  # (N, K)
    wl = w if lay == "tn" else w.t().contiguous()  # (K, N) for nn
    ref = F.linear(x, w) if lay == "tn" else x @ wl
    g = cublaslt.Gemm(k, n, dt, lay, False, x.device.index)
    offered = g.algos(m, count)
    out = torch.empty(m, n, device="cuda", dtype=dt)
    cands = {"torch": (lambda: F.linear(x, w)) if lay == "tn" else (lambda: x @ wl)}
    bad = []
    for i, (algo, _, _) in enumerate(offered):
        out.fill_(float("nan"))
        g.run(x, wl, None, out, algo)
        err = ((out.float() - ref.float()).abs().max() / ref.float().abs().max()).item()
        if not err < 1e-2:
            bad.append((i, err))
            continue
        cands[f"lt{i}"] = lambda algo=algo: g.run(x, wl, None, out, algo)
    clock = {}
    if alone_s:  # each candidate alone for alone_s seconds: what a long run of that one algorithm gets
        med = {}
        for c, fn in cands.items():
            med[c], clock[c] = alone(fn, alone_s)
    else:
        est = window(cands["torch"], 3)
        calls = max(3, int(10e-3 / est))
        times = {c: [] for c in cands}
        for _ in range(5):
            for c, fn in cands.items():
                times[c].append(window(fn, calls))
        med = {c: statistics.median(v) for c, v in times.items()}
    best = min((c for c in med if c != "torch"), key=med.get, default=None)
    row = {"layout": lay, "m": m, "K": k, "N": n, "dtype": str(dt).removeprefix("torch."), "offered": len(offered),
           "bad": bad, "torch_us": med["torch"] * 1e6, "lt0_us": med.get("lt0", float("nan")) * 1e6,
           "best": best, "best_us": med[best] * 1e6 if best else float("nan"),
           "best_cfg": cublaslt.describe(offered[int(best[2:])][0]) if best else {},
           "lt0_cfg": cublaslt.describe(offered[0][0]) if offered else {},
           "tflops_torch": 2 * m * k * n / med["torch"] / 1e12, "all_us": {c: t * 1e6 for c, t in med.items()},
           "clock_mhz": clock}
    row["torch_over_best"] = row["torch_us"] / row["best_us"]
    return row


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sustain", type=float, default=10.0)
    ap.add_argument("--count", type=int, default=24, help="algorithms asked of the heuristic (it offered 8)")
    ap.add_argument("--out", default=os.environ.get("OUT"))
    ap.add_argument("--alone", type=float, default=0.0,
                    help="seconds each candidate runs alone (0: 5 interleaved rounds of ~10 ms windows)")
    ap.add_argument("--shapes", default="", help="comma-separated KxN to keep, e.g. 4096x28672,14336x4096")
    ap.add_argument("--only", default="", help="comma-separated layouts or dtypes to keep (tn, nn, bfloat16, float16)")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("no CUDA device", file=sys.stderr)
        return 2
    keep = set(filter(None, args.only.split(",")))
    sustain(args.sustain)
    rows = []
    print(f"# {torch.cuda.get_device_name()}, torch {torch.__version__}, cuBLASLt {cublaslt._find()}")
    print("| layout | dtype | m | K x N | torch us | heuristic #0 us | best us | best | torch/best | best cfg | #0 cfg |")
    print("|---|---|---:|---|---:|---:|---:|---|---:|---|---|")
    for lay, m, k, n, dt in cases():
        if keep and not ({lay, str(dt).removeprefix("torch.")} & keep):
            continue
        if args.shapes and f"{k}x{n}" not in args.shapes.split(","):
            continue
        r = run_case(lay, m, k, n, dt, args.count, args.alone)
        rows.append(r)
        print(f"| {lay} | {r['dtype']} | {m} | {k}x{n} | {r['torch_us']:.1f} | {r['lt0_us']:.1f} | {r['best_us']:.1f} | "
              f"{r['best']} of {r['offered']} | {r['torch_over_best']:.3f} | {r['best_cfg']} | {r['lt0_cfg']} |"
              + (f" bad: {r['bad']}" if r["bad"] else ""), flush=True)
        if args.alone:
            print("    " + ", ".join(f"{c} {t:.0f} us @ {r['clock_mhz'].get(c, float('nan')):.0f} MHz"
                                     for c, t in r["all_us"].items()), flush=True)
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / "gemm_algos.json").write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
