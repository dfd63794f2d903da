"""gemv's launches with and without programmatic dependent launch, one process, in turns.

    python benchmarks/pdl.py [--ms 1,4,16] [--shapes 4096x4096,...] [--rounds 3] [--out DIR]

A 4-bit call at m <= 16 is two or three launches: act-order's gather of x (int4_stage_x), the stream
(int4_gemv) and its split-K fix-up (int4_gemv_fix). In a CUDA graph each waits for the one ahead to
finish before it starts. With PDL (scorer.kernels.int4.PDL, sm_90+) the gather and the fix-up, and gemv
behind the gather, may start early: gemv's blocks begin streaming the codes while the gather is still
running, and the fix-up's blocks take SMs as gemv's leave; each waits (griddepcontrol.wait) only before
it touches the kernel ahead's output. (Without a gather, static groups, gemv is launched plainly.) This times
int4.matmul both ways on the Llama layer shapes, act-order and static groups, CUDA-graph replays over
rotated weights (int4.py's gpu_time), and checks that both give the same bits, eagerly and replayed.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

import torch  # noqa: E402

import int4 as bench  # noqa: E402  (benchmarks/int4.py: gpu_time, quant_layer, rotated, as gemv_sweep.py uses it)
from scorer.kernels import int4  # noqa: E402


def set_pdl(on: bool, weights) -> None:
    int4.PDL = on
    for w in weights:
        w.plans.clear()  # plans hold their launches, built under the flag as it was


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--ms", default="1,4,16")
    ap.add_argument("--shapes", default="", help="comma-separated KxN (default: int4.py's seven)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--out", default=os.environ.get("OUT"))
    a = ap.parse_args()
    if not torch.cuda.is_available():
        print("no CUDA device", file=sys.stderr)
        return 2
    shapes = [tuple(int(v) for v in s.split("x")) for s in a.shapes.split(",")] if a.shapes else bench.SHAPES
    ms = [int(v) for v in a.ms.split(",")]
    device = torch.cuda.get_device_name()
    lines = [f"# {device}: 4-bit calls (gather, gemv, fix-up), PDL off / on, us of CUDA-graph replays", "",
             "| K x N | groups | m | PDL off | PDL on | saved | same bits |", "|---|---|---:|---:|---:|---:|---|"]
    print("\n".join(lines), flush=True)
    rows = []
    for k, n in shapes:
        for act in (True, False):
            lin = bench.quant_layer(k, n, act_order=act)
            ws = bench.rotated(lin._weight())
            for m in ms:
                xs = [torch.randn(m, k, device="cuda", dtype=torch.float16) for _ in range(4)]
                fns = [lambda i=i: int4.matmul(xs[i % 4], ws[i % len(ws)]) for i in range(max(4, len(ws)))]
                outs = {}
                for on in (False, True):  # eager, then replayed: the same bits both ways
                    set_pdl(on, ws)
                    eager = int4.matmul(xs[0], ws[0])
                    g = torch.cuda.CUDAGraph()
                    side = torch.cuda.Stream()
                    side.wait_stream(torch.cuda.current_stream())
                    with torch.cuda.stream(side):
                        int4.matmul(xs[1], ws[0])
                    torch.cuda.current_stream().wait_stream(side)
                    with torch.cuda.graph(g):
                        replayed = int4.matmul(xs[1], ws[0])
                    g.replay()
                    torch.cuda.synchronize()
                    outs[on] = (eager.clone(), replayed.clone())
                    del g
                same = all(torch.equal(p, q) for p, q in zip(outs[False], outs[True]))
                times = {False: [], True: []}
                for _ in range(a.rounds):
                    for on in (False, True):
                        set_pdl(on, ws)
                        times[on].append(bench.gpu_time(fns, reps=5))
                off, on_ = (statistics.median(times[v]) * 1e6 for v in (False, True))
                row = {"K": k, "N": n, "act_order": act, "m": m, "off_us": off, "on_us": on_, "same": same}
                rows.append(row)
                line = (f"| {k}x{n} | {'act-order' if act else 'static'} | {m} | {off:.1f} | {on_:.1f} | "
                        f"{off - on_:.1f} | {'yes' if same else 'NO'} |")
                lines.append(line)
                print(line, flush=True)
            del lin, ws
            torch.cuda.empty_cache()
    int4.PDL = True
    bench.save_results(a.out, "pdl", {"device": device, "rows": rows}, "\n".join(lines))
    return 0 if all(r["same"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
