"""Benchmark the 4-bit GPTQ path against fp16 cuBLAS on one GPU; prints markdown for benchmarks/RESULTS.md.

    python benchmarks/int4.py [--out DIR] [--quick] [--no-model] [--ms 1024,4096] [--alone SECONDS]

Per Llama-3-8B / 70B layer shape (K x N) and m tokens: fp16 cuBLAS (F.linear, nn.Linear's layout) vs
scorer's dispatched 4-bit path (fused GEMM below the measured crossover, dequant + cuBLAS above), and
the dequant kernel's bandwidth (bytes read + written), and the 4-bit issue's three targets with the rows
that meet each (`targets`). Then the whole-model check: a 4-bit Llama-3-8B-shaped classifier (random
weights, real GPTQ packing, g128 act-order) against the same model with its dequantized bf16 weights: max
probability difference, weight memory, forward time.

Timing: CUDA events around replays of a captured CUDA graph (GPU time; host launch overhead, ~30-50 us
per CuPy launch, is not measured), median of several replays after a warm-up, random data, and for
layers that fit in L2 the weights and inputs rotate over enough copies to exceed it. At m >= 1024 the
four GEMM variants are timed in turns (5 rounds), so clock drift under long GEMMs hits them alike; on a
power-capped card that also sets every variant's clock by their average draw, so --alone S adds cuBLAS and
the 4-bit path each run alone for S seconds (the clock their own draw allows, what a long run gets).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests" / "int4"))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from scorer.kernels import int4  # noqa: E402
from scorer.model.linear import Int4Linear  # noqa: E402
from scorer.model.quant_config import QuantConfig  # noqa: E402

SHAPES = [(4096, 6144), (4096, 4096), (4096, 28672), (14336, 4096), (8192, 10240), (8192, 57344), (28672, 8192)]
MS = [1, 4, 16, 64, 256, 1024, 4096, 16384]
ROTATE_BYTES = 256 * 2**20  # rotate copies until the working set is 5x the 50 MB L2
ALONE_S = 0.0  # --alone: seconds each path also runs alone at m >= 1024 (0: only in turns)
MID = True  # --no-mid: leave gemm_mid out (it is timed at 16 < m <= MID_MAX_M, whether the dispatch uses it or not)


def _graph(fns) -> tuple[torch.cuda.CUDAGraph, int]:
    """A CUDA graph of ~2 ms of calls of fns (called in turn), and how many calls it holds."""
    for f in fns:
        f()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    fns[0]()
    torch.cuda.synchronize()
    est = time.perf_counter() - t0
    calls = max(1, min(max(len(fns), 20), int(2e-3 / max(est, 1e-6))))  # ~2 ms of work per replay
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up on the capture stream's side, as torch.cuda.graph wants
        for i in range(min(calls, len(fns))):
            fns[i]()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, capture_error_mode="thread_local"):
        for i in range(calls):
            fns[i % len(fns)]()
    graph.replay()
    torch.cuda.synchronize()
    return graph, calls


def _replays(graph: torch.cuda.CUDAGraph, n: int) -> float:
    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    a.record()
    for _ in range(n):
        graph.replay()
    b.record()
    b.synchronize()
    return a.elapsed_time(b) * 1e-3


def gpu_time(fns, reps: int = 7) -> float:
    """Median seconds per call of fns (called in turn), replayed from a CUDA graph (GPU time only)."""
    graph, calls = _graph(fns)
    times = [_replays(graph, 1) / calls for _ in range(reps)]
    del graph
    return statistics.median(times)


def alone_time(fns, seconds: float) -> float:
    """Seconds per call of fns replayed back to back for `seconds`, the second half timed: the card's
    power controller has then settled on this path's own draw (at a power cap, a path timed in turns with
    others runs at the clock their average draw allows)."""
    graph, calls = _graph(fns)
    times, end = [], time.perf_counter() + seconds
    half = time.perf_counter() + seconds / 2
    while time.perf_counter() < end:
        t = _replays(graph, 10)
        if time.perf_counter() > half:
            times.append(t / (10 * calls))
    del graph
    return statistics.median(times)


def interleaved(fn_lists: dict[str, list], rounds: int = 5) -> dict[str, float]:
    """Median seconds of each entry, measured in turns (A B C A B C ...): clock and power drift over a
    long run then hits every entry alike, not the one that happened to run last."""
    times: dict[str, list[float]] = {k: [] for k in fn_lists}
    for _ in range(rounds):
        for k, fns in fn_lists.items():
            times[k].append(gpu_time(fns, reps=3))
    return {k: statistics.median(v) for k, v in times.items()}


def save_results(out: str | None, name: str, data, md: str) -> None:
    """NAME.json (data) and NAME.md (the printed markdown) under `out`, when it is given (the device's $OUT)."""
    if out:
        d = Path(out)
        d.mkdir(parents=True, exist_ok=True)
        (d / f"{name}.json").write_text(json.dumps(data, indent=1))
        (d / f"{name}.md").write_text(md + "\n")


def quant_layer(k: int, n: int, dtype=torch.float16, act_order: bool = True) -> Int4Linear:
    from model_check import random_gptq

    qc = QuantConfig(bits=4, group_size=128, desc_act=act_order, sym=True, checkpoint_format="gptq")
    with torch.device("meta"):
        lin = Int4Linear(k, n, False, qc)
    state = random_gptq(k, n, "cuda")
    if not act_order:
        state["g_idx"] = torch.arange(k, device="cuda", dtype=torch.int32) // 128
    lin.load_state_dict(state, assign=True)
    lin.prepare(dtype)
    assert lin.backend == "cuda", "CuPy kernels not available"
    return lin


def copy_weight(w: int4.Int4Weight) -> int4.Int4Weight:
    return int4.Int4Weight(w.qweight.clone(), w.scales.clone(), w.qzeros.clone(),
                           None if w.perm is None else w.perm.clone(), None, w.k, w.n, w.group16)


def rotated(w: int4.Int4Weight) -> list[int4.Int4Weight]:
    qbytes = int4.bandwidth_bytes(w) - w.k * w.n * 2  # packed bytes one pass reads
    return [w] + [copy_weight(w) for _ in range(max(1, math.ceil(ROTATE_BYTES / qbytes)) - 1)]


def bench_shape(k: int, n: int, ms: list[int]) -> tuple[list[dict], dict]:
    lin = quant_layer(k, n)
    w = lin._weight()
    dense = lin.dequantized_weight()  # (N, K) fp16, the same values
    ws = rotated(w)
    nq = len(ws)
    nd = max(1, math.ceil(ROTATE_BYTES / dense.numel() / 2))
    ds = [dense] + [dense.clone() for _ in range(nd - 1)]
    dkn = [d.t().contiguous() for d in ds]  # (K, N): the NN layout the act-order path multiplies
    lin_s = quant_layer(k, n, act_order=False)  # static groups: dequant W^T + cuBLAS TN, no permutation
    wss = rotated(lin_s._weight())
    cross = int4.crossover(w)

    # dequant bandwidth (into the shared scratch, as the large-m path does): both kernels
    s = int4._get_scratch(dense.device, k * n * 2)
    scratch = s.buf[: k * n * 2].view(torch.float16)
    t_dq = gpu_time([lambda wi=wi: int4.dequant(wi, scratch.view(n, k)) for wi in wss])
    t_dqr = gpu_time([lambda wi=wi: int4.dequant_rows(wi, scratch.view(k, n)) for wi in ws])
    info = {"K": k, "N": n, "crossover_m": cross, "dequant_us": t_dq * 1e6,
            "dequant_TBps": int4.bandwidth_bytes(w) / t_dq / 1e12, "dequant_rows_us": t_dqr * 1e6,
            "dequant_rows_TBps": int4.bandwidth_bytes(w) / t_dqr / 1e12}

    rows = []
    for m in ms:
        nx = max(1, min(nq, 8))
        xs = [torch.randn(m, k, device="cuda", dtype=torch.float16) for _ in range(nx)]
        cublas_fns = [lambda i=i: F.linear(xs[i % nx], ds[i % nd]) for i in range(max(nd, nx))]
        ours_fns = [lambda i=i: int4.matmul(xs[i % nx], ws[i % nq]) for i in range(max(nq, nx))]
        big = {}
        if m >= 1024:  # long GEMMs: interleave with cuBLAS NN alone and the static-group (TN) layer
            big = interleaved({
                "cublas": cublas_fns, "ours": ours_fns,
                "nn": [lambda i=i: torch.mm(xs[i % nx], dkn[i % nd]) for i in range(max(nd, nx))],
                "static": [lambda i=i: int4.matmul(xs[i % nx], wss[i % len(wss)]) for i in range(max(len(wss), nx))],
            })
            t_cublas, t_ours = big["cublas"], big["ours"]
            if ALONE_S:  # each path alone under sustained load (see alone_time)
                big["cublas_alone"] = alone_time(cublas_fns, ALONE_S)
                big["ours_alone"] = alone_time(ours_fns, ALONE_S)
        else:
            t_cublas, t_ours = gpu_time(cublas_fns), gpu_time(ours_fns)
        row = {"K": k, "N": n, "m": m, "cublas_fp16_us": t_cublas * 1e6, "int4_us": t_ours * 1e6,
               "speedup": t_cublas / t_ours,
               "path": "fused" if m <= min(cross, int4.MAX_FUSED_M) else "dequant+cuBLAS"}
        if m <= int4.MAX_FUSED_M:  # both paths, to check the crossover
            out = torch.empty(m, n, device="cuda", dtype=torch.float16)
            row["fused_us"] = gpu_time([lambda i=i: int4.gemm_small(xs[i % nx], ws[i % nq], out)
                                        for i in range(max(nq, nx))]) * 1e6
            row["dequant_mm_us"] = gpu_time([lambda i=i: int4.dequant_matmul(xs[i % nx], ws[i % nq])
                                             for i in range(max(nq, nx))]) * 1e6
            if m <= int4.GEMV_MAX_M:  # the split-K kernel that gemv replaced there, same run
                row["tiles_us"] = gpu_time([lambda i=i: int4.gemm_tiles(xs[i % nx], ws[i % nq], out)
                                            for i in range(max(nq, nx))]) * 1e6
                for r in int4.GEMV_RINGS:  # both of gemv's rings (gemv_ring keeps the faster per shape)
                    row[f"ring{r}_us"] = gpu_time([lambda i=i, r=r: int4.gemv(xs[i % nx], ws[i % nq], out, r)
                                                   for i in range(max(nq, nx))]) * 1e6
                row["static_us"] = gpu_time([lambda i=i: int4.matmul(xs[i % nx], wss[i % len(wss)])
                                             for i in range(max(len(wss), nx))]) * 1e6
                row["static_speedup"] = t_cublas / (row["static_us"] * 1e-6)
                row["fused_TBps"] = (int4.bandwidth_bytes(w) - k * n * 2) / (row["fused_us"] * 1e-6) / 1e12
        if MID and int4.GEMV_MAX_M < m <= int4.MID_MAX_M:  # the block-tiled kernel against dequant + cuBLAS
            out = torch.empty(m, n, device="cuda", dtype=torch.float16)
            row["mid_us"] = gpu_time([lambda i=i: int4.gemm_mid(xs[i % nx], ws[i % nq], out)
                                      for i in range(max(nq, nx))]) * 1e6
            if "dequant_mm_us" not in row:
                row["dequant_mm_us"] = gpu_time([lambda i=i: int4.dequant_matmul(xs[i % nx], ws[i % nq])
                                                 for i in range(max(nq, nx))]) * 1e6
            row["mid_speedup"] = row["int4_us"] / row["mid_us"]  # against what the dispatch ran (gemm_mid off)
            row["mid_TFLOPs"] = 2 * m * k * n / (row["mid_us"] * 1e-6) / 1e12
        if big:  # where the large-m time goes: cuBLAS NN alone, and the static-group (TN) path
            row["cublas_nn_us"] = big["nn"] * 1e6
            row["static_us"] = big["static"] * 1e6
            row["static_speedup"] = t_cublas / big["static"]
            if "ours_alone" in big:
                row["cublas_alone_us"] = big["cublas_alone"] * 1e6
                row["int4_alone_us"] = big["ours_alone"] * 1e6
                row["alone_speedup"] = big["cublas_alone"] / big["ours_alone"]
        rows.append(row)
        del xs
    del ws, ds, dkn, wss, lin, lin_s
    torch.cuda.empty_cache()
    return rows, info


TARGET_SPEEDUP, TARGET_RATIO, TARGET_TBPS = 3.0, 1.05, 2.4  # the 4-bit issue's: m <= 16, m >= 4096, dequant


def targets(rows: list[dict], infos: list[dict]) -> list[str]:
    """Markdown lines: each of the issue's three targets, met on how many of the run's rows, and where. At
    m >= 4096 the ratio is 4-bit / cuBLAS, from the paths timed alone where the run did (--alone)."""
    def where(rs: list[dict]) -> str:
        return ", ".join(f"{r['K']}x{r['N']} m = {r['m']}" for r in rs)

    def ratio(r: dict) -> float:
        return 1 / r.get("alone_speedup", r["speedup"])

    lines = []
    small = [r for r in rows if r["m"] <= int4.GEMV_MAX_M]
    if small:
        met = [r for r in small if r["speedup"] >= TARGET_SPEEDUP]
        lo, hi = min(r["speedup"] for r in small), max(r["speedup"] for r in small)
        lines.append(f"- m <= {int4.GEMV_MAX_M} at least {TARGET_SPEEDUP:g}x fp16 cuBLAS (act-order): met on "
                     f"{len(met)} of {len(small)} rows{f' ({where(met)})' if met else ''}; {lo:.2f}-{hi:.2f}x")
    large = [r for r in rows if r["m"] >= 4096]
    if large:
        met = [r for r in large if ratio(r) <= TARGET_RATIO]
        alone = "alone" if all("alone_speedup" in r for r in large) else "in turns where not timed alone"
        lines.append(f"- m >= 4096 within {TARGET_RATIO:g}x of fp16 cuBLAS, dequant included ({alone}): met on "
                     f"{len(met)} of {len(large)} rows{f' ({where(met)})' if met else ''}; "
                     f"{min(map(ratio, large)):.3f}-{max(map(ratio, large)):.3f}")
    if infos:
        tb = [(i[key], i) for i in infos for key in ("dequant_TBps", "dequant_rows_TBps")]
        worst, wi = min(tb, key=lambda v: v[0])
        lines.append(f"- dequant at {TARGET_TBPS:g} TB/s or more: {'met' if worst >= TARGET_TBPS else 'missed'} "
                     f"(slowest {worst:.2f} TB/s, {wi['K']}x{wi['N']})")
    return lines


def markdown(rows: list[dict], infos: list[dict], model: dict | None, device: str) -> str:
    f1 = lambda r, key: f"{r[key]:.1f}" if key in r else ""  # noqa: E731
    lines = [f"### 4-bit GPTQ path on {device} (torch {torch.__version__})", "",
             "g128 act-order; speedup = fp16 cuBLAS / 4-bit. fused = what the fused path runs (gemv for m <= 16), "
             "tiles = the split-K kernel at the same m; at m >= 1024: cuBLAS NN alone (the act-order path's GEMM) "
             "and the static-group layer (dequant W^T + cuBLAS TN); at m <= 16 static is the same layer without "
             "act-order (no gather launch).", "",
             "| K x N | m | fp16 cuBLAS us | 4-bit us | speedup | path | fused us | fused TB/s | tiles us "
             "| gemv ring 1 us | gemv ring 2 us | dequant+mm us | cuBLAS NN us | static 4-bit us | static speedup |",
             "|---|---:|---:|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        tb = f"{r['fused_TBps']:.2f}" if "fused_TBps" in r else ""
        ss = f"{r['static_speedup']:.2f}x" if "static_speedup" in r else ""
        lines.append(f"| {r['K']}x{r['N']} | {r['m']} | {r['cublas_fp16_us']:.1f} | {r['int4_us']:.1f} | "
                     f"{r['speedup']:.2f}x | {r['path']} | {f1(r, 'fused_us')} | {tb} | {f1(r, 'tiles_us')} | "
                     f"{f1(r, 'ring1_us')} | {f1(r, 'ring2_us')} | "
                     f"{f1(r, 'dequant_mm_us')} | {f1(r, 'cublas_nn_us')} | {f1(r, 'static_us')} | {ss} |")
    mid = [r for r in rows if "mid_us" in r]
    if mid:
        lines += ["", "gemm_mid (block-tiled, dequant in the mainloop) against the 4-bit path the dispatch runs "
                  "without it (gemm_small below the crossover, else dequant + cuBLAS), dequant + cuBLAS alone, and "
                  "fp16 cuBLAS on dense weights:", "",
                  "| K x N | m | gemm_mid us | TFLOP/s | 4-bit path us | speedup vs path | dequant+mm us | "
                  "fp16 cuBLAS us | vs cuBLAS |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for r in mid:
            lines.append(f"| {r['K']}x{r['N']} | {r['m']} | {r['mid_us']:.1f} | {r['mid_TFLOPs']:.0f} | "
                         f"{r['int4_us']:.1f} | {r['mid_speedup']:.2f}x | {r['dequant_mm_us']:.1f} | "
                         f"{r['cublas_fp16_us']:.1f} | {r['cublas_fp16_us'] / r['mid_us']:.2f}x |")
    alone = [r for r in rows if "alone_speedup" in r]
    if alone:
        lines += ["", f"Each path alone under sustained load ({ALONE_S:g} s of back-to-back replays, the second half "
                  "timed), against the same rows timed in turns:", "",
                  "| K x N | m | fp16 cuBLAS alone us | 4-bit alone us | speedup alone | speedup in turns |",
                  "|---|---:|---:|---:|---:|---:|"]
        for r in alone:
            lines.append(f"| {r['K']}x{r['N']} | {r['m']} | {r['cublas_alone_us']:.1f} | {r['int4_alone_us']:.1f} | "
                         f"{r['alone_speedup']:.2f}x | {r['speedup']:.2f}x |")
    lines += ["", "| K x N | dequant (TN, static) us | TB/s (read + write) | dequant_rows (NN, act-order) us | TB/s "
              "| crossover m (measured) |", "|---|---:|---:|---:|---:|---:|"]
    for i in infos:
        lines.append(f"| {i['K']}x{i['N']} | {i['dequant_us']:.1f} | {i['dequant_TBps']:.2f} | "
                     f"{i['dequant_rows_us']:.1f} | {i['dequant_rows_TBps']:.2f} | {i['crossover_m']} |")
    lines += ["", "Against the 4-bit issue's targets:", "", *targets(rows, infos)]
    if model:
        lines += ["", f"Whole model (Llama-3-8B shape, {model['layers']} layers, g128 act-order, random weights) "
                  f"vs the same model with dequantized bf16 weights: max |prob diff| {model['max_prob_diff']:.2e} "
                  f"({', '.join(f'{k} {v:.1e}' for k, v in model['prob_diffs_by_m'].items())}); weight memory "
                  f"{model['bytes_4bit'] / 2**30:.2f} GiB vs {model['bytes_bf16'] / 2**30:.2f} GiB = "
                  f"{100 * model['weight_bytes_ratio']:.1f}% (linear layers alone "
                  f"{100 * model['linear_bytes_ratio']:.1f}%); with the embedding table in host memory (Scorer's "
                  f"default for 4-bit), GPU weight memory {model['bytes_4bit_gpu_host_table'] / 2**30:.2f} GiB = "
                  f"{100 * model['gpu_bytes_ratio_host_table']:.1f}% of the bf16 model's, probabilities "
                  f"{'bit-identical' if model['host_embeddings_identical'] else 'DIFFERENT'}."]
        for key, v in model.items():
            if key.startswith("forward_ms"):
                lines.append(f"- forward {key.split('_', 2)[2]}: 4-bit {v['4bit']:.1f} ms, bf16 {v['bf16']:.1f} ms "
                             f"({v['ratio']:.2f}x)")
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=os.environ.get("OUT"), help="directory for int4_bench.json/.md")
    ap.add_argument("--quick", action="store_true", help="two shapes, four m values")
    ap.add_argument("--no-model", action="store_true", help="skip the whole-model check")
    ap.add_argument("--layers", type=int, default=32, help="layers of the whole-model check")
    ap.add_argument("--ms", default="", help="comma-separated m values (default: all of MS)")
    ap.add_argument("--alone", type=float, default=0.0,
                    help="at m >= 1024, also time cuBLAS and the 4-bit path each alone for this many seconds")
    ap.add_argument("--no-mid", action="store_true", help="do not time gemm_mid (16 < m <= 1024)")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("no CUDA device", file=sys.stderr)
        return 2
    import logging

    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    torch.backends.cuda.matmul.allow_fp16_reduced_precision_reduction = False
    device = torch.cuda.get_device_name()
    shapes, ms = (SHAPES[:2], [1, 16, 64, 4096]) if args.quick else (SHAPES, MS)
    if args.ms:
        ms = [int(m) for m in args.ms.split(",")]
    global ALONE_S, MID
    ALONE_S, MID = args.alone, not args.no_mid
    rows, infos = [], []
    t0 = time.time()
    for k, n in shapes:
        r, i = bench_shape(k, n, ms)
        rows += r
        infos.append(i)
        print(f"{k}x{n} done ({time.time() - t0:.0f} s): dequant {i['dequant_TBps']:.2f} TB/s, crossover m={i['crossover_m']}",
              flush=True)
    model = None
    if not args.no_model:
        import model_check

        model = model_check.run(layers=args.layers, timing=True)
        print(json.dumps(model), flush=True)
    md = markdown(rows, infos, model, device)
    save_results(args.out, "int4_bench", {"device": device, "rows": rows, "dequant": infos, "model": model}, md)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
