"""int4_stage_x alone: the small-m gather of x's columns (act-order) that runs in front of gemv.

    python benchmarks/stage_x.py [--baseline OLD_INT4_CU] [--ms 1,16] [--ks 4096,8192,14336,28672]

Times the current int4.cu's int4_stage_x by CUDA-graph replay (benchmarks/int4.py's gpu_time) on a random
permutation, next to an empty launch of the same grid (the floor a launch of its own has) and, with
--baseline, the same kernel built from another copy of int4.cu (for example `git show REV:scorer/kernels/
int4.cu > old.cu`), in the same process. Every build's output is checked against torch's gather.
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

NOP = "extern \"C\" __global__ void nop(const void*, const void*, void*, int, int) {}"


def build(source: str):
    import cupy

    return cupy.RawModule(code=source, options=("-std=c++17",), name_expressions=["int4_stage_x"])


def main() -> int:
    import cupy

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--baseline", default="", help="another int4.cu to time beside the current one")
    ap.add_argument("--ms", default="1,4,16")
    ap.add_argument("--ks", default="4096,8192,14336,28672")
    args = ap.parse_args()
    from int4 import gpu_time  # benchmarks/int4.py

    builds = {"current": build(int4.SOURCE.read_text())}
    if args.baseline:
        builds["baseline"] = build(Path(args.baseline).read_text())
    nop = cupy.RawModule(code=NOP).get_function("nop")
    names = list(builds)
    print(f"# {torch.cuda.get_device_name()}: int4_stage_x (act-order gather of x), fp16, us\n")
    print("| K | m | empty launch | " + " | ".join(names) + " |")
    print("|---:|---:|---:|" + "---:|" * len(names))
    for k in (int(v) for v in args.ks.split(",")):
        perm = torch.randperm(k, device="cuda").to(torch.int32)
        for m in (int(v) for v in args.ms.split(",")):
            xs_ = [torch.randn(m, k, device="cuda", dtype=torch.float16) for _ in range(8)]
            out = torch.empty(m, k, device="cuda", dtype=torch.float16)
            grid, block = int4._stage_grid(m, k), (int4._STAGE_BLOCK,)
            want = xs_[0][:, perm.long()]
            p = lambda t: np.uint64(t.data_ptr())  # noqa: E731
            row = []

            def launch(fn, i):
                with int4._stream(out.device):
                    fn(grid, block, (p(xs_[i % len(xs_)]), p(perm), p(out), np.int32(k), np.int32(k)))

            row.append(gpu_time([lambda i=i: launch(nop, i) for i in range(len(xs_))]))
            for name in names:
                fn = builds[name].get_function("int4_stage_x")
                out.fill_(float("nan"))
                launch(fn, 0)
                if not torch.equal(out, want):
                    raise SystemExit(f"stage_x.py: the {name} build's gather is wrong at K={k}, m={m}")
                row.append(gpu_time([lambda i=i, fn=fn: launch(fn, i) for i in range(len(xs_))]))
            print(f"| {k} | {m} | " + " | ".join(f"{t * 1e6:.2f}" for t in row) + " |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
