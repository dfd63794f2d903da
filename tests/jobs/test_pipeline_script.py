"""The multi-GPU issue's run script, on a CPU: `benchmarks/pipeline_gpu.py --workers 1,2` with the tiny
shape writes a real GPTQ checkpoint and shards, runs `scorer run` once per worker count in one process,
and checks rows in = rows out, every worker scoring, each its own GPU where there are GPUs. The script
is what a multi-GPU machine will run; this keeps it working until one is lent."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow


def test_scaling_script_runs_each_worker_count_and_checks_its_workers(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(OUT=str(tmp_path), CUDA_VISIBLE_DEVICES="", RAY_USAGE_STATS_ENABLED="0")
    cmd = [sys.executable, str(REPO / "benchmarks" / "pipeline_gpu.py"), "--shape", "tiny", "--texts", "96",
           "--workers", "1,2", "--work", str(tmp_path / "work")]
    run = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    res = json.loads((tmp_path / "pipeline_gpu.json").read_text())
    assert [r["workers"] for r in res["runs"]] == [1, 2]
    assert res["texts"] == 96
    for r in res["runs"]:
        assert r["rc"] == 0 and r["problems"] == [], r
        rep = r["report"]
        assert rep["rows"] == 96 and rep["shards"]["committed_this_run"] == 8  # 4 x the most workers, at least 8
        assert len(rep["workers"]) == r["workers"] and all(w["shards"] > 0 for w in rep["workers"])
        assert r["max_prob_diff"] < 1e-5  # fp32 on a CPU: the same probabilities as model-only scoring
    assert "| scorer run, workers ready to last commit | 2 |" in run.stdout


def test_check_workers_names_what_is_wrong():
    sys.path.insert(0, str(REPO / "benchmarks"))
    from pipeline_gpu import check_workers

    good = {"workers": [{"worker": "a", "gpus": "0", "shards": 4}, {"worker": "b", "gpus": "1", "shards": 4}]}
    assert check_workers(good, 2, "cuda") == []
    shared = {"workers": [{"worker": "a", "gpus": "0", "shards": 4}, {"worker": "b", "gpus": "0", "shards": 4}]}
    assert "not one distinct GPU each" in check_workers(shared, 2, "cuda")[0]
    both = {"workers": [{"worker": "a", "gpus": "0,1", "shards": 8}]}
    assert any("distinct GPU" in p for p in check_workers(both, 1, "cuda"))
    idle = {"workers": [{"worker": "a", "gpus": "0", "shards": 8}, {"worker": "b", "gpus": "1", "shards": 0}]}
    assert check_workers(idle, 2, "cuda") == ["workers that scored no shard: ['b']"]
    assert check_workers(good, 3, "cuda") == ["2 workers reported, 3 asked for"]
    assert check_workers({"workers": [{"worker": "a", "gpus": "", "shards": 1}]}, 1, "cpu") == []
