"""The rollout store on S3-compatible object storage, against a real S3 endpoint on loopback.

``moto_server`` (PyPI ``moto[server]``, in the ``dev`` extra) serves the S3 HTTP API; the store
reaches it through ``s3fs`` (the ``s3`` extra) with nothing but the standard AWS environment
variables, exactly as a deployment would point ``orchestrator.store_url = "s3://..."`` at MinIO,
Ceph or R2. Skipped when either package is missing.
"""

from __future__ import annotations

import importlib.util
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from cotrain.rl.journal import RolloutStore

pytestmark = pytest.mark.timeout(60)

BUCKET = "cotrain-rollouts"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait_for_port(port: int, proc: subprocess.Popen[bytes], deadline_s: float) -> None:
    deadline = time.monotonic() + deadline_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"moto_server exited with {proc.returncode} before listening")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.02)  # polling interval, not synchronisation: the deadline bounds it
    raise TimeoutError(f"moto_server did not listen on port {port} within {deadline_s} s")


@pytest.fixture(scope="module")
def s3_endpoint(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real S3 HTTP endpoint (moto) on a free loopback port, stopped when the module ends."""
    for mod in ("s3fs", "boto3", "moto", "flask"):
        if importlib.util.find_spec(mod) is None:
            pytest.skip(f"{mod} is not installed (pip install -e '.[dev,s3]')")
    port = _free_port()
    log = tmp_path_factory.mktemp("moto") / "moto_server.log"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "FSSPEC_"))}
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
        )
    try:
        try:
            _wait_for_port(port, proc, deadline_s=30)
        except (RuntimeError, TimeoutError) as e:
            pytest.fail(f"{e}\n{log.read_text(errors='replace')[-2000:]}")
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)


@pytest.fixture
def s3_env(s3_endpoint: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[str]:
    """The environment a deployment sets to use an S3-compatible store; yields the endpoint."""
    import s3fs

    for key in list(os.environ):
        if key.startswith(("AWS_", "FSSPEC_")):
            monkeypatch.delenv(key)
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_endpoint)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    # hermetic: no ~/.aws files, no EC2 metadata lookups
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-aws-config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-aws-credentials"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    # fsspec caches filesystem instances: one made under another environment must not be reused
    s3fs.S3FileSystem.clear_instance_cache()
    yield s3_endpoint
    s3fs.S3FileSystem.clear_instance_cache()


def _boto3_client(endpoint: str) -> Any:
    import boto3

    return boto3.client("s3", endpoint_url=endpoint)


def _records(step: int) -> list[dict[str, Any]]:
    """Records shaped like the orchestrator's (``Orchestrator._write_step``)."""
    return [
        {
            "id": f"r{step}-{i}",
            "worker": f"worker-{i % 2}",
            "status": "accepted" if i != 2 else "rejected",
            "reward": 0.5 * i,
            "verdict": {"ok": i != 2, "reason": "" if i != 2 else "mismatch"},
            "validator": "validator-0",
            "rollout": {"completion": f"é ✓ {step}+{i}", "tokens": [1, 2, step, i]},
        }
        for i in range(3)
    ]


def test_s3_store_round_trip_matches_local(s3_env: str, tmp_path: Path) -> None:
    client = _boto3_client(s3_env)
    client.create_bucket(Bucket=BUCKET)

    s3 = RolloutStore(f"s3://{BUCKET}/run1/")
    local = RolloutStore(str(tmp_path / "rollouts"))
    assert s3.path(1) == f"s3://{BUCKET}/run1/step_000001.jsonl"

    for step in (1, 2):
        assert s3.write_step(step, _records(step)) == s3.path(step)
        local.write_step(step, _records(step))

    for step in (1, 2):
        assert s3.read_step(step) == _records(step)
        assert s3.read_step(step) == local.read_step(step)

    # the objects really are on the server, byte for byte what the local store wrote
    listed = client.list_objects_v2(Bucket=BUCKET, Prefix="run1/")
    assert sorted(o["Key"] for o in listed["Contents"]) == [
        "run1/step_000001.jsonl",
        "run1/step_000002.jsonl",
    ]
    for step in (1, 2):
        body = client.get_object(Bucket=BUCKET, Key=f"run1/step_{step:06d}.jsonl")["Body"].read()
        assert body == Path(local.path(step)).read_bytes()
        assert body.count(b"\n") == 3

    # rewriting a step replaces it; an empty step is an empty object; a missing step is missing
    s3.write_step(2, _records(2)[:1])
    assert s3.read_step(2) == _records(2)[:1]
    s3.write_step(3, [])
    assert s3.read_step(3) == []
    with pytest.raises(FileNotFoundError):
        s3.read_step(4)
    with pytest.raises(FileNotFoundError):
        local.read_step(4)
    # what a restarted orchestrator lists to find the steps it must write again
    assert s3.steps() == {1, 2, 3} and local.steps() == {1, 2}
    assert RolloutStore(f"s3://{BUCKET}/run2").steps() == set()


def test_s3_store_endpoint_from_fsspec_config(s3_env: str, tmp_path: Path) -> None:
    """``FSSPEC_S3_ENDPOINT_URL`` works in place of ``AWS_ENDPOINT_URL``; fsspec reads it when
    it is imported, so this runs in a fresh interpreter."""
    client = _boto3_client(s3_env)
    client.create_bucket(Bucket=BUCKET)
    env = {k: v for k, v in os.environ.items() if k != "AWS_ENDPOINT_URL"}
    env["FSSPEC_S3_ENDPOINT_URL"] = s3_env
    code = (
        "from cotrain.rl.journal import RolloutStore\n"
        f"s = RolloutStore('s3://{BUCKET}/run2')\n"
        "s.write_step(7, [{'id': 'r7', 'reward': 1.0}])\n"
        "assert s.read_step(7) == [{'id': 'r7', 'reward': 1.0}]\n"
    )
    subprocess.run([sys.executable, "-c", code], env=env, check=True, timeout=30)
    body = client.get_object(Bucket=BUCKET, Key="run2/step_000007.jsonl")["Body"].read()
    assert body == b'{"id":"r7","reward":1.0}\n'


def test_s3_store_unreachable_endpoint_raises(s3_env: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The orchestrator logs a failed write and carries on; the store itself must raise, and
    with ``AWS_MAX_ATTEMPTS=1`` it gives up in about a second (the defaults retry for ~20 s)."""
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{_free_port()}")
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")
    store = RolloutStore(f"s3://{BUCKET}/run1")
    t0 = time.monotonic()
    with pytest.raises(Exception, match="Could not connect"):
        store.write_step(1, _records(1))
    with pytest.raises(Exception, match="Could not connect"):
        store.read_step(1)
    assert time.monotonic() - t0 < 15
