"""Where a full model-only run loses time against one batch: per-batch GPU time, clocks and power.

    python benchmarks/timeline.py [--variants bf16+compile] [--texts 2048] [--gemm-seconds 20]

For each variant: the e2e benchmark's workload (same texts, same Scorer.score_encoded), with CUDA events
around every packed forward, while nvidia-smi samples SM clock, power and the clock-event reasons every
100 ms. Prints per-batch tokens, GPU ms and tokens/s in run order, the sum of batch GPU time against the
wall time (host gaps), and the clocks seen. Then the model's fused GEMM shapes at m = 16384 run back to
back for --gemm-seconds, printing TFLOP/s and clocks per 2-second window: the sustained ceiling next to the
short one the e2e benchmark measures.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402

FIELDS = "timestamp,clocks.sm,power.draw,temperature.gpu,clocks_event_reasons.active"


class Smi:
    """nvidia-smi sampling every 100 ms into a file, read back as (t, sm MHz, W, C, reasons) rows."""

    def __init__(self) -> None:
        self.path = Path(tempfile.mkdtemp()) / "smi.csv"
        self.proc = None
        for fields in (FIELDS, FIELDS.replace("clocks_event_reasons", "clocks_throttle_reasons")):
            try:
                ok = subprocess.run(["nvidia-smi", f"--query-gpu={fields}", "--format=csv,noheader,nounits"],
                                    capture_output=True, text=True, timeout=20)
            except (OSError, subprocess.TimeoutExpired):
                return
            if ok.returncode == 0:
                self.proc = subprocess.Popen(["nvidia-smi", f"--query-gpu={fields}", "--format=csv,noheader,nounits",
                                              "-lms", "100"], stdout=open(self.path, "w"), stderr=subprocess.DEVNULL)
                return

    def rows(self) -> list[tuple[float, float, float, float, str]]:
        out = []
        if not self.path.exists():
            return out
        for line in self.path.read_text().splitlines():
            parts = [p.strip() for p in line.split(",")]
            if len(parts) < 5:
                continue
            try:
                t = time.mktime(time.strptime(parts[0].split(".")[0], "%Y/%m/%d %H:%M:%S"))
                t += float("0." + parts[0].split(".")[1]) if "." in parts[0] else 0.0
                out.append((t, float(parts[1]), float(parts[2]), float(parts[3]), parts[4]))
            except ValueError:
                continue
        return out

    def window(self, t0: float, t1: float) -> str:
        r = [x for x in self.rows() if t0 <= x[0] <= t1]
        if not r:
            return "no nvidia-smi samples"
        clk, pw = np.array([x[1] for x in r]), np.array([x[2] for x in r])
        reasons = sorted({x[4] for x in r})
        return (f"SM clock median {np.median(clk):.0f} MHz (min {clk.min():.0f}, max {clk.max():.0f}), "
                f"power median {np.median(pw):.0f} W (max {pw.max():.0f}), temp max {max(x[3] for x in r):.0f} C, "
                f"clock-event reasons {reasons}")

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()


def run_variant(spec: str, n_texts: int, smi: Smi) -> None:
    from scorer.api import Encoded
    from scorer.bench import SHAPES, Variant, random_scorer, synthetic_ids, synthetic_lengths

    v = Variant.parse(spec)
    sc = random_scorer("8b", v, 16384)
    lengths = synthetic_lengths(n_texts)
    ids = synthetic_ids(lengths, SHAPES["8b"]["vocab_size"])
    enc, warm = Encoded.from_ids(ids), Encoded.from_ids(ids[:64])
    sc.score_encoded(warm)
    sc.score_encoded(warm)
    torch.cuda.synchronize()

    inner = sc.model.model.forward_packed
    marks: list[tuple[torch.cuda.Event, torch.cuda.Event, int, int]] = []

    def timed(input_ids, position_ids, ctx):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        h = inner(input_ids, position_ids, ctx)
        b.record()
        marks.append((a, b, int(input_ids.shape[0]), ctx.max_len))
        return h

    sc.model.model.forward_packed = timed
    t0 = time.time()
    w0 = time.perf_counter()
    sc.score_encoded(enc)
    torch.cuda.synchronize()
    wall = time.perf_counter() - w0
    t1 = time.time()
    sc.model.model.forward_packed = inner
    gpu = [a.elapsed_time(b) / 1e3 for a, b, _, _ in marks]
    span = marks[0][0].elapsed_time(marks[-1][1]) / 1e3
    toks = [m[2] for m in marks]
    print(f"\n## scorer {spec}: {len(marks)} batches, {sum(toks):,} tokens\n")
    print("| batch | tokens | longest | GPU ms | tokens/s |")
    print("|---:|---:|---:|---:|---:|")
    for i, (g, (_, _, t, ml)) in enumerate(zip(gpu, marks)):
        print(f"| {i} | {t} | {ml} | {g * 1e3:.1f} | {t / g:,.0f} |")
    full = [t / g for g, t in zip(gpu, toks) if t >= 15000]
    print(f"\nwall {wall:.3f} s = {sum(toks) / wall:,.0f} tokens/s; first-to-last event span {span:.3f} s; "
          f"sum of forwards' GPU time {sum(gpu):.3f} s ({sum(toks) / sum(gpu):,.0f} tokens/s); "
          f"outside forwards (heads, copies, gaps) {span - sum(gpu):.3f} s")
    if full:
        print(f"full batches (>= 15000 tokens): first 3 {np.mean(full[:3]):,.0f} tokens/s, "
              f"last 3 {np.mean(full[-3:]):,.0f}, median {np.median(full):,.0f}")
    print("during the run:", smi.window(t0, t1), flush=True)
    del sc
    torch.cuda.empty_cache()


def sustained_gemm(seconds: float, smi: Smi) -> None:
    m = 16384
    shapes = [(4096, 6144), (4096, 4096), (4096, 28672), (14336, 4096)]  # fused qkv, o, gate_up, down
    xs = {k: torch.randn(m, k, device="cuda", dtype=torch.bfloat16) for k in {k for k, _ in shapes}}
    ws = [torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02 for k, n in shapes]
    flop = sum(2.0 * m * k * n for k, n in shapes)

    def layer():
        for (k, _), w in zip(shapes, ws):
            torch.nn.functional.linear(xs[k], w)

    for _ in range(3):
        layer()
    torch.cuda.synchronize()
    print(f"\n## sustained bf16 GEMM, fused layer shapes at m = {m}, {seconds:.0f} s back to back\n")
    print("| window s, BLAS | TFLOP/s | clocks |")
    print("|---|---:|---|")
    start = time.time()
    libs = ["default", "cublaslt"] if hasattr(torch.backends.cuda, "preferred_blas_library") else ["default"]
    win = 0
    while time.time() - start < seconds:
        lib = libs[win % len(libs)]  # alternate windows between torch's default BLAS and cuBLASLt
        win += 1
        if lib == "cublaslt":
            torch.backends.cuda.preferred_blas_library("cublaslt")
        else:
            torch.backends.cuda.preferred_blas_library("cublas")
        t0 = time.time()
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        reps = 0
        while time.time() - t0 < 2.0:
            for _ in range(20):
                layer()
            reps += 20
            torch.cuda.synchronize()
        b.record()
        b.synchronize()
        dt = a.elapsed_time(b) / 1e3
        print(f"| {t0 - start:.0f}-{time.time() - start:.0f} {lib} | {reps * flop / dt / 1e12:.0f} | "
              f"{smi.window(t0, time.time())} |", flush=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--variants", default="bf16+compile")
    ap.add_argument("--texts", type=int, default=2048)
    ap.add_argument("--gemm-seconds", type=float, default=20.0)
    args = ap.parse_args()
    torch.backends.cuda.matmul.allow_tf32 = True
    smi = Smi()
    print(f"# {torch.cuda.get_device_name()}, torch {torch.__version__}, {time.strftime('%Y-%m-%d')}, "
          f"nvidia-smi sampling {'on' if smi.proc else 'off'}")
    try:
        if args.gemm_seconds > 0:
            sustained_gemm(args.gemm_seconds, smi)
            torch.backends.cuda.preferred_blas_library("cublas")
        for spec in args.variants.split(","):
            run_variant(spec.strip(), args.texts, smi)
    finally:
        smi.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
