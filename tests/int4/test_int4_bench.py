"""benchmarks/int4.py's summary against the 4-bit issue's targets, on made-up rows (no GPU)."""

from __future__ import annotations

import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "benchmarks"))

import int4 as bench  # noqa: E402  (benchmarks/int4.py)


def row(k, n, m, speedup, alone=None):
    r = {"K": k, "N": n, "m": m, "speedup": speedup}
    if alone is not None:
        r["alone_speedup"] = alone
    return r


def test_targets_count_the_rows_that_meet_each_target():
    rows = [row(8192, 57344, 1, 3.2), row(4096, 4096, 16, 1.1), row(4096, 4096, 64, 0.5),
            row(4096, 4096, 4096, 0.99, alone=1 / 1.04), row(8192, 57344, 4096, 0.99, alone=1 / 1.07),
            row(8192, 57344, 16384, 1 / 1.01)]
    infos = [{"K": 4096, "N": 4096, "dequant_TBps": 3.8, "dequant_rows_TBps": 3.6},
             {"K": 8192, "N": 57344, "dequant_TBps": 4.0, "dequant_rows_TBps": 2.3}]
    small, large, dq = bench.targets(rows, infos)
    assert "met on 1 of 2 rows (8192x57344 m = 1); 1.10-3.20x" in small
    # the alone ratios decide at m >= 4096 (in turns 0.99x would pass both), and m = 16384 counts in turns
    assert "(in turns where not timed alone): met on 2 of 3 rows (4096x4096 m = 4096, 8192x57344 m = 16384)" in large
    assert "1.010-1.070" in large
    assert dq.endswith("missed (slowest 2.30 TB/s, 8192x57344)")
    assert bench.targets([row(4096, 4096, 4096, 1 / 1.2, alone=1 / 1.2)], [])[0].startswith(
        "- m >= 4096 within 1.05x of fp16 cuBLAS, dequant included (alone): met on 0 of 1 rows; ")


def test_the_markdown_carries_the_targets():
    rows = [row(4096, 4096, 1, 1.5)]
    rows[0].update(cublas_fp16_us=13.6, int4_us=9.1, path="fused")
    md = bench.markdown(rows, [{"K": 4096, "N": 4096, "dequant_us": 11.0, "dequant_TBps": 3.8,
                                "dequant_rows_us": 11.6, "dequant_rows_TBps": 3.6, "crossover_m": 32}], None, "GPU")
    assert "Against the 4-bit issue's targets:" in md
    assert "- m <= 16 at least 3x fp16 cuBLAS (act-order): met on 0 of 1 rows; 1.50-1.50x" in md
    assert "- dequant at 2.4 TB/s or more: met (slowest 3.60 TB/s, 4096x4096)" in md
