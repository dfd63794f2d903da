"""Tuning sweep of int4_gemv (the m <= 16 fused kernel): variants of its build knobs and host layout,
timed by CUDA-graph replay on Llama layer shapes, main loop alone and with the fix-up.

    python benchmarks/gemv_sweep.py [--variants r1,r2,smem12,...] [--ms 1,16] [--shapes 4096x4096,...]
        [--waves 1,2,4] [--min-chunks 16,32] [--fix-threads 256,64] [--fix-depths 8,16] [--ncu]

A variant is build options (the GEMV_* knobs of int4.cu: RING, blocks a SM B1/B2, ring depths S1/S2, the
bulk-copy ring S3 x T3 at m <= 8 and S3_16 x T3_16 at m <= 16, FOLD, XAHEAD, ...) plus the host's
min_chunk (tiles per warp at least); r1 and r2 are the current build's two rings. `--waves F` cuts the
layer into F times as many chunks as one wave holds (F waves of shorter chunks, handed out by the block
scheduler as SMs free up); `--min-chunks` overrides the variant's min_chunk, `--fix-threads` the fix-up's
block size, `--fix-depths` its F (int4_gemv_fix<DT, MT, F>; default: the host's choice by pieces). Every
combination is timed. --ncu launches each kernel once, for
`ncu --kernel-name regex:int4_gemv`.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT / "tests" / "int4"))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from scorer.kernels import int4  # noqa: E402

# Before the eleventh session the scale was applied to each dequantized weight (FOLD=0) and ring 2 loaded x
# a stage ahead (XAHEAD=1), with one S3 x T3 for both row-tile counts: the older variants pin that build.
_OLD = dict(FOLD=0, XAHEAD=1)


def _tma(s3: int, t3: int, **kw) -> dict:  # ring 2 with the same ring at m <= 8 and m <= 16
    return dict(RING=2, S3=s3, T3=t3, S3_16=s3, T3_16=t3, **kw)


VARIANTS = {  # name: (build options, min_chunk); B1/B2 (blocks per SM, default int4.GEMV_BLOCKS) size the wave
    # the current build, each ring
    "r1": (dict(RING=1), 16),
    "r2": (dict(RING=2), 16),
    "r1nofold": (dict(RING=1, FOLD=0), 16),  # the current rings with the scale on every weight
    "r2nofold": (dict(RING=2, FOLD=0), 16),
    "r2b3": (dict(RING=2, B1=3), 16),
    "r2b3t11": (dict(RING=2, B1=3, T3=11), 16),
    "r2t10": (dict(RING=2, T3=10), 16),
    "r1b3": (dict(RING=1, B1=3), 16),
    "r2m2x8": (dict(RING=2, S3_16=2, T3_16=8), 16),
    "r2m4x4": (dict(RING=2, S3_16=4, T3_16=4), 16),
    "r2m3x6b2": (dict(RING=2, B2=2), 16),
    "r2b4m16": (dict(RING=2, B2=4, S3_16=4, T3_16=4), 16),
    # the build before the eleventh session (ring 1 as smem12, ring 2 as tma4x4h)
    "reg": (dict(RING=0, D1=4, D2=4, B1=5, B2=4, PF=16, **_OLD), 16),
    "smem12": (dict(RING=1, S1=12, S2=12, B1=6, B2=4, PF=0, T=1, **_OLD), 16),
    "burst2x6": (dict(RING=1, S1=12, S2=12, B1=6, B2=4, PF=0, T=2, **_OLD), 16),
    "burst4x3": (dict(RING=1, S1=12, S2=12, B1=6, B2=4, PF=0, T=4, **_OLD), 16),
    "burst6x2": (dict(RING=1, S1=12, S2=12, B1=6, B2=4, PF=0, T=6, **_OLD), 16),
    "burst4x3c32": (dict(RING=1, S1=12, S2=12, B1=6, B2=4, PF=0, T=4, **_OLD), 32),
    # bulk copy engine (sm_90): S3 stages of T3 tiles a warp, one cp.async.bulk a stage
    "tma4x4": (_tma(4, 4, B1=6, B2=4, HINT=0, **_OLD), 16),
    "tma4x4h": (_tma(4, 4, B1=6, B2=4, HINT=1, **_OLD), 16),
    "tma8x2": (_tma(8, 2, B1=6, B2=4, HINT=0, **_OLD), 16),
    "tma3x6": (_tma(3, 6, B1=6, B2=4, HINT=0, **_OLD), 16),
    "tma2x8": (_tma(2, 8, B1=6, B2=4, HINT=0, **_OLD), 16),
    "tma4x4b4": (_tma(4, 4, B1=4, B2=4, HINT=0, **_OLD), 16),
    "tma5x4b5": (_tma(5, 4, B1=5, B2=4, HINT=0, **_OLD), 16),
    # eleventh session: x fragments loaded before each stage's wait (XAHEAD=0: fewer registers)
    "tma4x4x0": (_tma(4, 4, B1=6, B2=4, FOLD=0, XAHEAD=0), 16),
    "tma4x4b5x0": (_tma(4, 4, B1=5, B2=3, FOLD=0, XAHEAD=0), 16),
    "smem12b5": (dict(RING=1, S1=12, S2=12, B1=5, B2=3, FOLD=0), 16),
    # the scale applied to each group's fp32 sums (FOLD=1)
    "fold12": (dict(RING=1, B1=6, B2=4), 16),
    "fold12b5": (dict(RING=1, B1=5, B2=3), 16),
    "fold12b4": (dict(RING=1, B1=4, B2=3), 16),
    "fold16b4": (dict(RING=1, S1=16, B1=4, B2=3), 16),
    "foldtma": (_tma(4, 4, B1=5, B2=3), 16),
    "foldtmab6": (_tma(4, 4, B1=6, B2=4), 16),
    "foldtmab4": (_tma(4, 4, B1=4, B2=3, XAHEAD=1), 16),
    "foldtmab4x0": (_tma(4, 4, B1=4, B2=2), 16),
    "foldtma5x4": (_tma(5, 4, B1=5, B2=3), 16),
    "foldtma8x2": (_tma(8, 2, B1=5, B2=3), 16),
    "foldtma2x8": (_tma(2, 8, B1=5, B2=3), 16),
    "foldtma2x10": (_tma(2, 10, B1=5, B2=3), 16),
    "foldtma3x6": (_tma(3, 6, B1=5, B2=3), 16),
    "foldtma2x8b4": (_tma(2, 8, B1=4, B2=3), 16),
    "foldtma2x8b4xa": (_tma(2, 8, B1=4, B2=3, XAHEAD=1), 16),
}
SHAPES = [(8192, 57344), (28672, 8192), (4096, 28672), (14336, 4096), (4096, 4096), (4096, 6144)]


def blocks(opts: dict) -> tuple[int, int]:
    """A variant's blocks per SM at m <= 8 and m <= 16 (its launch bounds, and so its wave and chunks)."""
    return opts.get("B1", int4.GEMV_BLOCKS[1]), opts.get("B2", int4.GEMV_BLOCKS[2])


def build(opts_: dict):
    import cupy

    names = [f"int4_gemv<0, {mt}>" for mt in (1, 2)] + [f"int4_gemv_fix<0, {mt}, {f}>" for mt in (1, 2)
                                                          for f in int4.GEMV_FIX_DEPTHS]
    opts = ("-std=c++17", f"-DGEMV_WARPS={int4.GEMV_WARPS}") + tuple(f"-DGEMV_{k}={v}" for k, v in opts_.items())
    return cupy.RawModule(code=int4.SOURCE.read_text(), options=opts, name_expressions=names)


def launcher(mod, variant, w: int4.Int4Weight, x: torch.Tensor, out: torch.Tensor, ws: torch.Tensor,
             main_only: bool, waves: int = 1, min_chunk: int | None = None, fix_threads: int = 256,
             fix_depth: int | None = None):
    opts, min_chunk0 = variant
    min_chunk = min_chunk0 if min_chunk is None else min_chunk
    warps_per_block = int4.GEMV_WARPS
    b1, b2 = blocks(opts)
    m = x.shape[0]
    kp, np_ = int4.padded(w.k, w.n)
    nbk, kt = w.qweight.shape[:2]
    mt = int4.mt_of(m)
    wave = warps_per_block * (b1 if mt == 1 else b2) * waves
    chunk, warps, pmax = int4.gemv_layout(nbk, kt, torch.cuda.get_device_properties(0).multi_processor_count,
                                          min_chunk, wave)
    if nbk * pmax * mt * 8 * 64 > ws.numel():
        raise ValueError(f"gemv_sweep: the fix-up workspace is too small for {waves} waves")
    fn = mod.get_function(f"int4_gemv<0, {mt}>")
    depth = int4.gemv_fix_depth(pmax) if fix_depth is None else fix_depth
    fix = mod.get_function(f"int4_gemv_fix<0, {mt}, {depth}>")
    p = lambda t: np.uint64(0 if t is None else t.data_ptr())  # noqa: E731
    args = (p(x), p(w.qweight), p(w.scales), p(w.qzeros), p(None), p(out), p(ws), np.int32(m), np.int32(kp),
            np.int32(w.n), np.int32(np_), np.int32(kt), np.int32(w.n_groups), np.int32(w.group16), np.int32(chunk),
            np.int32(pmax))
    fargs = (p(ws), p(None), p(out), np.int32(m), np.int32(w.n), np.int32(np_), np.int32(kt), np.int32(chunk),
             np.int32(pmax))

    fix_blocks = -(-int4.gemv_fix_threads(nbk, m) // fix_threads)

    def run():
        with int4._stream(x.device):
            fn((-(-warps // warps_per_block),), (32 * warps_per_block,), args)
            if not main_only:
                fix((fix_blocks,), (fix_threads,), fargs)

    return run, depth


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--waves", default="1", help="comma-separated wave counts")
    ap.add_argument("--min-chunks", default="", help="comma-separated min_chunk overrides (default: the variant's)")
    ap.add_argument("--ncu", action="store_true")
    ap.add_argument("--ms", default="1,16", help="comma-separated m")
    ap.add_argument("--fix-threads", default="256", help="comma-separated fix-up block sizes (at most 256)")
    ap.add_argument("--fix-depths", default="", help="comma-separated F of the fix-up (default: the host's)")
    ap.add_argument("--shapes", default="", help="comma-separated KxN (default: the Llama-3 8B and 70B layers)")
    args = ap.parse_args()
    waves_l = [int(v) for v in args.waves.split(",")]
    ms = [int(v) for v in args.ms.split(",")]
    fixes = [int(v) for v in args.fix_threads.split(",")]
    depths = [int(v) for v in args.fix_depths.split(",")] if args.fix_depths else [None]
    if set(depths) - {None, *int4.GEMV_FIX_DEPTHS}:
        ap.error(f"--fix-depths: built are {int4.GEMV_FIX_DEPTHS}")
    shapes = [tuple(int(d) for d in s.split("x")) for s in args.shapes.split(",")] if args.shapes else SHAPES
    chunks_l = [int(v) for v in args.min_chunks.split(",")] if args.min_chunks else [None]
    from int4 import gpu_time, quant_layer, rotated  # benchmarks/int4.py

    names = args.variants.split(",")
    mods = {n: build(VARIANTS[n][0]) for n in names}
    ws = torch.zeros(64 * 2**20, dtype=torch.float32, device="cuda")
    print(f"# {torch.cuda.get_device_name()}: int4_gemv sweep, fp16, g128 act-order (x pre-gathered)\n")
    print("| K x N | m | variant | waves | min chunk | fix threads | fix F | main us | main TB/s | main + fix us "
          "| TB/s | x ref rel err | bits = first |")
    print("|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|")
    for k, n in shapes:
        lin = quant_layer(k, n)
        w0 = lin._weight()
        wsl = rotated(w0)
        dense = lin.dequantized_weight().float()
        qbytes = int4.bandwidth_bytes(w0) - k * n * 2
        for m in ms:
            x = torch.randn(m, k, device="cuda", dtype=torch.float16)
            xs = x[:, w0.perm.long()].contiguous()  # what gemv gathers first under act-order
            ref = x.float() @ dense.t()
            out = torch.empty(m, n, device="cuda", dtype=torch.float16)
            first = {}  # the first output of each arithmetic and chunking: the others must match it bit for bit
            for name, waves, mc, ft, fd in ((nm, f, c, t, d) for nm in names for f in waves_l for c in chunks_l
                                            for t in fixes for d in depths):
                v = VARIANTS[name]
                runs = [launcher(mods[name], v, wi, xs, out, ws, False, waves, mc, ft, fd) for wi in wsl]
                depth = runs[0][1]
                runs = [r for r, _ in runs]
                if args.ncu:
                    runs[0]()
                    torch.cuda.synchronize()
                    continue
                mains = [launcher(mods[name], v, wi, xs, out, ws, True, waves, mc)[0] for wi in wsl]
                out.fill_(float("nan"))
                runs[0]()
                err = ((out.float() - ref).norm() / ref.norm()).item()
                o = v[0]  # same arithmetic and the same chunks: the same bits
                key = (o.get("FOLD", 1), blocks(o), waves, mc)
                ref_bits = first.setdefault(key, out.clone())
                same = "yes" if torch.equal(out, ref_bits) else "NO"
                t_main = gpu_time(mains)
                t_all = gpu_time(runs)
                print(f"| {k}x{n} | {m} | {name} | {waves} | {v[1] if mc is None else mc} | {ft} | {depth} | "
                      f"{t_main * 1e6:.1f} | "
                      f"{qbytes / t_main / 1e12:.2f} | {t_all * 1e6:.1f} | {qbytes / t_all / 1e12:.2f} | {err:.1e} | "
                      f"{same} |", flush=True)
        del lin, wsl, dense
        torch.cuda.empty_cache()
    return 0


if __name__ == "__main__":
    sys.exit(main())
