"""The 8B model's chain of small-m linears: 4-bit gemv with and without programmatic dependent launch, and
bf16 cuBLAS, in one process.

    python benchmarks/pdl_chain.py [--layers 32] [--ms 1,16] [--out DIR]

int4.py times one layer's calls back to back, where each gemv follows the previous call's fix-up. In a
model each linear follows torch / inductor kernels (norms, RoPE, attention, SwiGLU). This builds that
chain: per layer the fused q|k|v, o, gate|up and down projections of Llama-3-8B (4-bit g128, static
order: what a compiled layer hands the op, x already gathered), each behind an elementwise torch kernel
that reads the previous output, the residual added back. Three CUDA graphs of the whole chain: gemv under
programmatic dependent launch (int4.py's default), gemv with plain launches, and the same chain with
bf16 nn.Linear weights (cuBLAS), replayed in turns (ABCABC...) so the card's drift hits all three alike.
Outputs of the two 4-bit graphs must be finite and bit-identical.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from scorer.kernels import int4  # noqa: E402

SHAPES = [(4096, 6144), (4096, 4096), (4096, 28672), (14336, 4096)]  # q|k|v, o, gate|up, down


def random_weight(k: int, n: int, gen: torch.Generator) -> int4.Int4Weight:
    kp, np_ = int4.padded(k, n)
    g = k // 128
    q = torch.randint(-(2**31), 2**31 - 1, (np_ // 64, kp // 16, 32, 4), device="cuda", generator=gen,
                      dtype=torch.int64).to(torch.int32)
    scales = (0.001 + 0.002 * torch.rand(g, np_, device="cuda", generator=gen)).to(torch.bfloat16)
    zeros = torch.full((g, np_ // 8), 0x88888888 - 2**32, device="cuda", dtype=torch.int32)
    w = int4.Int4Weight(q, scales, zeros, None, None, k, n, 8)
    w.check()
    int4.reserve(w)
    return w


def rms(h: torch.Tensor) -> torch.Tensor:
    return h * torch.rsqrt(h.float().pow(2).mean(-1, keepdim=True) + 1e-5).to(h.dtype)


def chain(x: torch.Tensor, layers: list, linear) -> list[torch.Tensor]:
    """A decoder layer's linears with torch kernels before each, as in the model (a norm keeps 32 layers
    of random weights finite)."""
    outs = []
    for qkv, o, gate_up, down in layers:
        y = linear(rms(x), qkv)
        y = linear(y[:, :4096] * 0.5, o)
        h = x + y
        y = linear(rms(h), gate_up)
        y = linear(torch.nn.functional.silu(y[:, :14336]) * y[:, 14336:], down)
        x = h + y
        outs.append(x)
    return outs


def gemv_linear(x: torch.Tensor, w: int4.Int4Weight) -> torch.Tensor:
    y = torch.empty(x.shape[0], w.n, device="cuda", dtype=torch.bfloat16)
    return int4.gemv(x, w, y)


def capture(fn):
    fn()  # warm: plans, rings, cuBLAS heuristics
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        out = fn()
    return g, out


def time_in_turns(graphs: dict, reps: int) -> dict[str, float]:
    times = {name: [] for name in graphs}
    for _ in range(reps):
        for name, g in graphs.items():
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            g.replay()
            b.record()
            b.synchronize()
            times[name].append(a.elapsed_time(b) * 1e3)
    return {name: statistics.median(t) for name, t in times.items()}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--ms", default="1,16")
    ap.add_argument("--reps", type=int, default=30)
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    gen = torch.Generator(device="cuda").manual_seed(0)
    layers = [[random_weight(k, n, gen) for k, n in SHAPES] for _ in range(a.layers)]
    dense = [[torch.randn(n, k, device="cuda", generator=gen, dtype=torch.bfloat16) * 0.02 for k, n in SHAPES]
             for _ in range(a.layers)]
    int4._pdl.decide(torch.device("cuda"))
    if not int4._pdl.on:
        print("no programmatic dependent launch on this GPU or driver")
        return 1
    rows = []
    for m in (int(v) for v in a.ms.split(",")):
        x = torch.randn(m, 4096, device="cuda", dtype=torch.bfloat16)
        int4._pdl.on = True
        g_pdl, o_pdl = capture(lambda: chain(x, layers, gemv_linear))
        int4._pdl.on = False
        g_plain, o_plain = capture(lambda: chain(x, layers, gemv_linear))
        int4._pdl.on = True
        g_bf16, _ = capture(lambda: chain(x, dense, torch.nn.functional.linear))
        g_pdl.replay()
        g_plain.replay()
        torch.cuda.synchronize()
        same = all(torch.equal(p, q) and bool(p.isfinite().all()) for p, q in zip(o_pdl, o_plain))
        t = time_in_turns({"pdl": g_pdl, "plain": g_plain, "bf16": g_bf16}, a.reps)
        rows.append((m, t, same))
        del g_pdl, g_plain, g_bf16
    name = torch.cuda.get_device_name()
    lines = [f"# {name}: {a.layers} layers of Llama-3-8B's linears, each behind an elementwise kernel, "
             f"one CUDA graph each, median of {a.reps} replays in turns (us per layer)", "",
             "| m | 4-bit gemv, PDL | 4-bit gemv, plain launches | bf16 cuBLAS | PDL / plain | bf16 / 4-bit PDL | finite, bit-identical |",
             "|---:|---:|---:|---:|---:|---:|---|"]
    for m, t, same in rows:
        p, q, d = (t[k] / a.layers for k in ("pdl", "plain", "bf16"))
        lines.append(f"| {m} | {p:.1f} | {q:.1f} | {d:.1f} | {p / q:.3f} | {d / p:.2f}x | {same} |")
    text = "\n".join(lines)
    print(text)
    if a.out:
        Path(a.out).mkdir(parents=True, exist_ok=True)
        (Path(a.out) / "pdl_chain.md").write_text(text + "\n")
    return 0 if all(same for _, _, same in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
