"""`scorer quantize --calib s3://...` and `--calib-job` on a job whose input is in a bucket (SeaweedFS)."""

from __future__ import annotations

import json

import pyarrow as pa
from typer.testing import CliRunner

from helpers import job, write_jobs, write_shards
from scorer.cli import app
from scorer.jobs import lake


def test_calibration_from_a_bucket(s3, tiny_model, tmp_path, monkeypatch):
    from scorer.api import Scorer
    from scorer.model import quantize as qmod

    fs = lake.resolve("s3://lake", lake.StorageOptions(endpoint=s3, region="us-east-1")).fs
    tables = write_shards("lake/calib/dt=2026-11-22", [40, 40], fs=fs)
    # --calib: the endpoint from the environment (AWS_ENDPOINT_URL), keys from the provider chain
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3)
    out = tmp_path / "q"
    res = CliRunner().invoke(app, ["quantize", str(tiny_model), str(out), "--calib", "s3://lake/calib/**/*.parquet",
                                   "--samples", "24", "--max-length", "24", "--group-size", "32", "--device", "cpu"])
    assert res.exit_code == 0, res.output
    report = json.loads((out / "quantization_report.json").read_text())
    assert report["calibration"]["source"] == "s3://lake/calib/**/*.parquet"
    assert report["calibration"]["texts"] == 24 and report["calibration"]["heldout_texts"] == 6
    assert Scorer.from_pretrained(out, device="cpu").score(["a text"])["error"].null_count == 1
    # --calib-job: the job's input URI, its storage options, text template and filter
    monkeypatch.delenv("AWS_ENDPOINT_URL")
    spec = job(tiny_model, "s3://lake/calib/dt=2026-11-22", str(tmp_path / "scored"), text="{title}: {text}",
               filter='lang == "en"', storage={"endpoint": s3, "region": "us-east-1"})
    f = write_jobs(tmp_path / "jobs.yaml", {"nightly": spec})
    texts, source = qmod._job_texts(f"{f}:nightly", 1000, seed=0)
    en = pa.concat_tables(tables).filter(pa.compute.equal(pa.concat_tables(tables)["lang"], "en"))
    assert "s3://lake/calib/dt=2026-11-22" in source and len(texts) == en.num_rows == 60
    assert sorted(t.split(":")[0] for t in texts) == sorted(en["title"].to_pylist())


def test_calibration_endpoint_on_the_command_line(s3, tiny_model, tmp_path, monkeypatch):
    """--endpoint-url/--region name the bucket's server when the environment does not; they refuse a
    --calib that is not s3:// and a --calib-job (which has its own storage settings)."""
    fs = lake.resolve("s3://lake", lake.StorageOptions(endpoint=s3, region="us-east-1")).fs
    write_shards("lake/calib-cli", [30], fs=fs)
    for var in ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3"):
        monkeypatch.delenv(var, raising=False)
    out = tmp_path / "q"
    args = ["quantize", str(tiny_model), str(out), "--samples", "12", "--max-length", "16", "--group-size", "32",
            "--device", "cpu"]
    res = CliRunner().invoke(app, args + ["--calib", "s3://lake/calib-cli", "--endpoint-url", s3,
                                          "--region", "us-east-1"])
    assert res.exit_code == 0, res.output
    assert json.loads((out / "quantization_report.json").read_text())["calibration"]["texts"] == 12
    res = CliRunner().invoke(app, args[:2] + [str(tmp_path / "q2")] + args[3:] +
                             ["--calib", str(tmp_path), "--endpoint-url", s3])
    assert res.exit_code == 2 and "--endpoint-url applies to an s3:// --calib only" in res.output
    assert not (tmp_path / "q2").exists()
