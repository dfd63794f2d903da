"""Host time of one small-m 4-bit linear call (what a short batch pays per layer), with its breakdown.

    python benchmarks/host_overhead.py [--calls 2000]

A small batch of the 4-bit model is launch-bound: the GPU finishes a gemv in ~10-100 us, but the host
spends its own time per Int4Linear.forward (checks, layout, three kernel launches through CuPy). This
times back-to-back calls with no synchronisation (host-bound, so wall time per call is host time) for
Int4Linear at m = 1 and 16 (eager, and the torch op a compiled layer calls) against nn.Linear, then lists where a call's host time goes (cProfile).
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import torch  # noqa: E402


def per_call(fn, calls: int) -> float:
    for _ in range(50):
        fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    t_host = time.perf_counter() - t0
    torch.cuda.synchronize()
    return t_host / calls


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--calls", type=int, default=2000)
    a = ap.parse_args()
    from int4 import quant_layer  # benchmarks/int4.py: a random g128 act-order layer on the GPU

    k, n = 4096, 4096
    lin = quant_layer(k, n)
    dense = torch.nn.Linear(k, n, bias=False, device="cuda", dtype=torch.float16)
    print(f"# {torch.cuda.get_device_name()}: host time per call, {k}x{n}, fp16, {a.calls} calls back to back\n")
    print("| layer | m | host us a call |")
    print("|---|---:|---:|")
    with torch.inference_mode():
        for m in (1, 16):
            x = torch.randn(m, k, device="cuda", dtype=torch.float16)
            lin(x)  # first use: crossover and ring measured
            args = (x, lin.qweight, lin.scales, lin.qzeros, lin.perm, lin.bias, k, n, lin._group16)
            op = torch.ops.scorer.int4_matmul.default  # what a compiled layer calls: the dispatcher, then matmul
            for name, f in (("Int4Linear", lambda: lin(x)), ("scorer::int4_matmul op", lambda: op(*args)),
                            ("nn.Linear (cuBLAS)", lambda: dense(x))):
                print(f"| {name} | {m} | {per_call(f, a.calls) * 1e6:.1f} |", flush=True)
        x = torch.randn(1, k, device="cuda", dtype=torch.float16)
        prof = cProfile.Profile()
        prof.enable()
        for _ in range(500):
            lin(x)
        prof.disable()
        torch.cuda.synchronize()
    s = io.StringIO()
    pstats.Stats(prof, stream=s).sort_stats("tottime").print_stats(18)
    print("\n## cProfile of 500 Int4Linear calls at m = 1 (tottime)\n")
    print("```")
    print(s.getvalue().strip())
    print("```")
    return 0


if __name__ == "__main__":
    sys.exit(main())
