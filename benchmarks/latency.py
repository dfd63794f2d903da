"""Small-batch latency: how long Scorer.score_encoded takes for a handful of texts, and how much of it
the GPU is busy, against transformers on the same rows.

    python benchmarks/latency.py [--model-shape 8b] [--variants bf16+compile,int4+compile] [--cases 1x16,8x64]

A case RxT is R rows of T tokens each. Wall ms is the median of 10 calls after 3 untimed ones (a call
returns scores in host memory, so it ends synchronized). GPU ms is the time the kernels and copies
torch.profiler records in one more call keep the GPU busy (the union of their intervals). Where wall is much larger, the call is bound by the host's
launches (Python, dispatch, CuPy's launch path), which CUDA graphs would remove; where they are close,
by the GPU. The graphs torch.compile builds after Scorer.warmup, over all cases, are counted: a job
should meet none.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from scorer import bench  # noqa: E402

REPS = 10


def wall_ms(fn) -> float:
    """Median ms of fn() after 3 untimed calls. The calls end synchronized (scores reach host memory), so
    the CUDA events around each one span its wall time."""
    return 1e3 * bench.cuda_time(fn, reps=REPS, warmup=3)


def gpu_ms(fn) -> float:
    """GPU-busy time of one call of fn: the union of the intervals of the CUDA kernels and copies
    torch.profiler sees. A union, not a sum: kernels that overlap (side streams, or a kernel launched
    before the one it follows ends, as with programmatic dependent launch, tried in 155a767) would
    otherwise count twice."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    spans = sorted((e.time_range.start, e.time_range.end) for e in prof.events()
                   if e.device_type == torch.autograd.DeviceType.CUDA)
    busy, end = 0.0, float("-inf")
    for a, b in spans:
        if a > end:
            busy, end = busy + (b - a), b
        elif b > end:
            busy, end = busy + (b - end), b
    return busy / 1e3


def cases_of(spec: str) -> list[tuple[int, int]]:
    out = []
    for c in spec.split(","):
        r, t = c.lower().split("x")
        out.append((int(r), int(t)))
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model-shape", default="8b", choices=["8b", "70b", "tiny"])
    ap.add_argument("--variants", default="bf16+compile,int4+compile")
    ap.add_argument("--cases", default="1x16,1x128,1x512,8x64,32x128")
    ap.add_argument("--no-peer", action="store_true", help="skip transformers")
    a = ap.parse_args()
    from torch._dynamo.utils import counters

    from scorer.api import Encoded

    cases = cases_of(a.cases)
    vocab = bench.hf_config(a.model_shape)["vocab_size"]
    rng = np.random.default_rng(0)
    inputs = {c: [rng.integers(1, vocab, c[1]).tolist() for _ in range(c[0])] for c in cases}
    cols: dict[str, dict[tuple[int, int], tuple[float, float]]] = {}
    retraced: dict[str, int] = {}  # graphs torch.compile built after Scorer.warmup, over all the cases

    if not a.no_peer and a.model_shape != "70b":
        model = bench.transformers_model(a.model_shape)
        res = {}
        for c in cases:
            x = torch.tensor(inputs[c])
            mask = torch.ones_like(x)

            def run(x=x, mask=mask):
                with torch.inference_mode():
                    out = model(input_ids=x.cuda(non_blocking=True), attention_mask=mask.cuda(non_blocking=True))
                    return out.logits.float().softmax(-1).cpu()

            res[c] = (wall_ms(run), gpu_ms(run))
        cols["transformers bf16 sdpa"] = res
        del model
        bench._free()

    for spec in a.variants.split(","):
        v = bench.Variant.parse(spec)
        sc = bench.random_scorer(a.model_shape, v, 16384)
        sc.warmup()
        graphs = counters["stats"]["unique_graphs"]
        res = {}
        for c in cases:
            enc = Encoded.from_ids(inputs[c])
            res[c] = (wall_ms(lambda enc=enc: sc.score_encoded(enc)), gpu_ms(lambda enc=enc: sc.score_encoded(enc)))
        cols[v.name] = res
        retraced[v.name] = counters["stats"]["unique_graphs"] - graphs
        del sc
        bench._free()

    print(f"# {torch.cuda.get_device_name()}, torch {torch.__version__}, shape {a.model_shape}: "
          f"wall ms (median of {REPS}) / GPU kernel ms of one call\n")
    names = list(cols)
    print("| rows x tokens | " + " | ".join(names) + " |")
    print("|---|" + "---:|" * len(names))
    for c in cases:
        cells = [f"{cols[nm][c][0]:.1f} / {cols[nm][c][1]:.1f}" for nm in names]
        print(f"| {c[0]}x{c[1]} | " + " | ".join(cells) + " |")
    for nm, k in retraced.items():
        print(f"\n{nm}: {k} graphs compiled after warmup()")
    return 0


if __name__ == "__main__":
    sys.exit(main())
