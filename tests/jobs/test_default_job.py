"""The repository's own jobs.yaml, end to end on a CPU: what a new user's first command does.

`scorer run jobs.yaml` runs as a subprocess in a copy of the repository's jobs.yaml and examples/ (so
the relative paths, the default `lake/` output and the `dt={date}` partition are the user's), with no
Ray cluster to join: the command starts its own, with CPU workers, as on a fresh CPU machine. Then the
same command again, which must skip every committed shard. The outputs are checked row by row; the
classifier's held-out accuracy must equal what the training script reported (metrics.json) within 1%.

The README promises the first command's run finishes in under 60 s on 2 CPU cores, Ray's start
included; that is asserted unless something else is loading the machine: the 1-minute load average
at the start may hold pytest's own preceding tests (up to one per core), not more.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.dataset as ds
import pytest

REPO = Path(__file__).resolve().parents[2]
RUN_BUDGET_S = 60.0

pytestmark = pytest.mark.slow


def _scorer() -> list[str]:
    exe = Path(sys.executable).with_name("scorer")  # the console script pip installed beside python
    return [str(exe)] if exe.exists() else [sys.executable, "-c", "from scorer.cli import app; app()"]


def _parquet_files(root: Path) -> dict[str, int]:
    return {str(p.relative_to(root)): p.stat().st_mtime_ns for p in root.rglob("*.parquet")}


@pytest.fixture(scope="module")
def first_command(tmp_path_factory):
    work = tmp_path_factory.mktemp("clone")
    shutil.copy(REPO / "jobs.yaml", work / "jobs.yaml")
    shutil.copytree(REPO / "examples", work / "examples")
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "SCORER_MODEL")}
    env.pop("RAY_AUTH_MODE", None)  # the runner must cope with a user's plain environment
    cmd = _scorer() + ["run", "jobs.yaml"]

    load = os.getloadavg()[0]
    t0 = time.monotonic()
    first = subprocess.run(cmd, cwd=work, env=env, capture_output=True, text=True, timeout=300)
    first_s = time.monotonic() - t0
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    before = _parquet_files(work / "lake")

    t0 = time.monotonic()
    second = subprocess.run(cmd, cwd=work, env=env, capture_output=True, text=True, timeout=300)
    second_s = time.monotonic() - t0
    print(f"\nscorer run jobs.yaml: first {first_s:.1f} s (load average {load:.1f}), second {second_s:.1f} s")
    return dict(work=work, first=first, first_s=first_s, load=load, before=before, second=second,
                second_s=second_s)


def _quiet(load: float) -> bool:
    """No other work on the machine: pytest's own tests before this one account for up to a core each."""
    return load < (os.cpu_count() or 1) + 1


def _partition(root: Path) -> Path:
    parts = sorted(root.glob("dt=*"))
    assert len(parts) == 1, parts  # one dt={date} partition: today's
    assert parts[0].name == "dt=" + time.strftime("%Y-%m-%d") or parts[0].name == "dt=" + time.strftime(
        "%Y-%m-%d", time.gmtime())
    return parts[0]


def test_first_command_runs_in_budget(first_command):
    r = first_command["first"]
    assert "debian-sections: 4 shard(s) to score, 0 already committed" in r.stdout + r.stderr
    if _quiet(first_command["load"]):
        assert first_command["first_s"] < RUN_BUDGET_S, f"{first_command['first_s']:.1f} s"


def test_default_jobs_outputs(first_command):
    work = first_command["work"]
    source = ds.dataset(REPO / "examples/data/debian", format="parquet", partitioning="hive").to_table()
    truth = dict(zip(source["id"].to_pylist(), source["section"].to_pylist()))
    split = dict(zip(source["id"].to_pylist(), source["split"].to_pylist()))

    out = _partition(work / "lake/scored/debian-sections")
    assert (out / "_SUCCESS").exists() and len(list(out.glob("*.parquet"))) == 4  # one file per input shard
    scored = ds.dataset(out, format="parquet", exclude_invalid_files=True).to_table()
    ids = scored["id"].to_pylist()
    assert scored.num_rows == source.num_rows and len(set(ids)) == len(ids) and set(ids) == set(truth)
    assert scored["error"].null_count == scored.num_rows
    assert scored["section"].to_pylist() == [truth[i] for i in ids]  # passthrough stays with its row
    assert scored["split"].to_pylist() == [split[i] for i in ids]

    config = json.loads((REPO / "examples/models/debian-section-gptq-4bit/config.json").read_text())
    id2label = config["id2label"]
    labels = scored["label"].to_pylist()
    assert [id2label[str(i)] for i in scored["label_id"].to_pylist()] == labels  # names from id2label
    assert set(labels) == set(id2label.values())
    probs = np.array(scored["probs"].to_pylist(), dtype=np.float64)
    np.testing.assert_allclose(probs.sum(1), 1.0, atol=1e-4)
    np.testing.assert_allclose(np.array(scored["score"].to_pylist()), probs.max(1), atol=1e-6)

    test = np.array([split[i] == "test" for i in ids])
    acc = float(np.mean(np.array(labels)[test] == np.array(scored["section"].to_pylist())[test]))
    metrics = json.loads((REPO / "examples/models/debian-section-fp16/metrics.json").read_text())
    assert test.sum() == metrics["heldout_rows"]
    assert abs(acc - metrics["gptq_4bit"]["heldout_accuracy"]) <= 0.01, acc
    assert acc > 5 * metrics["majority_class_baseline"]  # ten sections: the majority class is ~0.11

    emb_out = _partition(work / "lake/embedded/debian-sections")
    assert (emb_out / "_SUCCESS").exists()
    emb = ds.dataset(emb_out, format="parquet", exclude_invalid_files=True).to_table()
    assert sorted(emb["id"].to_pylist()) == sorted(truth)
    etype = emb.schema.field("embedding").type
    assert pa.types.is_fixed_size_list(etype) and etype.list_size == 128 and pa.types.is_float16(etype.value_type)
    vecs = np.array(emb["embedding"].to_pylist(), dtype=np.float32)
    assert vecs.shape == (source.num_rows, 128) and np.isfinite(vecs).all()
    np.testing.assert_allclose(np.linalg.norm(vecs, axis=1), 1.0, atol=2e-3)  # normalized, stored as float16


def test_second_run_skips_committed_shards(first_command):
    r = first_command["second"]
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    out = r.stdout + r.stderr
    for job in ("debian-sections", "debian-embeddings"):
        assert f"{job}: 0 shard(s) to score, 4 already committed" in out
    assert _parquet_files(first_command["work"] / "lake") == first_command["before"]  # nothing rewritten
    if _quiet(first_command["load"]):
        assert first_command["second_s"] < 15
