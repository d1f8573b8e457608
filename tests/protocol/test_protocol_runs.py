"""Work artifacts of DiLoCo tasks and task specs: what a validator reads is what was claimed."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import torch
from safetensors.torch import save

from cotrain.core.errors import UsageError
from cotrain.protocol import runs


def test_a_pseudo_gradient_round_trips_under_its_key(tmp_path: Path) -> None:
    delta = torch.randn(1000)
    key = runs.put_pseudo_gradient(tmp_path, "t3", delta, {"step": "0"})
    path = runs.artifact_path(tmp_path, "t3", key)
    assert hashlib.sha256(path.read_bytes()).hexdigest() == key
    got = runs.get_pseudo_gradient(tmp_path, "t3", key, numel=1000)
    assert torch.equal(got, delta)


def test_bad_artifacts_are_named(tmp_path: Path) -> None:
    key = runs.put_pseudo_gradient(tmp_path, "t3", torch.randn(100), {})
    path = runs.artifact_path(tmp_path, "t3", key)
    with pytest.raises(runs.ArtifactError, match="no artifact"):
        runs.get_pseudo_gradient(tmp_path, "t3", "0" * 64)
    blob = bytearray(path.read_bytes())
    blob[-1] ^= 1
    path.write_bytes(bytes(blob))
    with pytest.raises(runs.ArtifactError, match="does not hash to its key"):
        runs.get_pseudo_gradient(tmp_path, "t3", key)
    # a file over the model's size is refused before it is read
    huge = b"\0" * (4 * 100 + (64 << 10) + 1)
    k2 = hashlib.sha256(huge).hexdigest()
    runs.artifact_path(tmp_path, "t3", k2).write_bytes(huge)
    with pytest.raises(runs.ArtifactError, match="over a pseudo-gradient of 100 values"):
        runs.get_pseudo_gradient(tmp_path, "t3", k2, numel=100)
    # hashes right but is not a flat fp32 tensor, or not safetensors at all
    for blob2, why in (
        (save({"delta": torch.zeros(2, 2)}), "not a flat fp32"),
        (save({"delta": torch.zeros(4, dtype=torch.float16)}), "not a flat fp32"),
        (b"not safetensors", "is not safetensors"),
    ):
        k3 = hashlib.sha256(blob2).hexdigest()
        runs.artifact_path(tmp_path, "t3", k3).write_bytes(blob2)
        with pytest.raises(runs.ArtifactError, match=why):
            runs.get_pseudo_gradient(tmp_path, "t3", k3)


def test_task_specs_are_checked_with_the_field_named() -> None:
    good = {"master": "10.0.0.1:48400", "master_key": "ab" * 32, "store": "/srv/t"}
    spec = runs.DiLoCoSpec.of({"id": "t1", "kind": "diloco", "spec": good})
    cfg = spec.train_config("t1", worker_index=2, out_dir="/tmp/x")
    assert (cfg.comm.master_host, cfg.comm.master_port, cfg.worker_index) == ("10.0.0.1", 48400, 2)
    with pytest.raises(UsageError, match="rl task, not diloco"):
        runs.DiLoCoSpec.of({"id": "t1", "kind": "rl", "spec": good})
    with pytest.raises(UsageError, match=r"spec\.master_key"):
        runs.DiLoCoSpec.of({"id": "t1", "kind": "diloco", "spec": {**good, "master_key": "x"}})
    with pytest.raises(UsageError, match=r"spec\.train\.algo\.inner_steps"):
        runs.DiLoCoSpec.of(
            {"id": "t1", "kind": "diloco", "spec": {**good, "train": {"algo": {"inner_steps": 0}}}}
        ).train_config("t1")


def test_an_rl_task_makes_the_node_an_inference_worker_of_its_orchestrator(tmp_path: Path) -> None:
    task = {
        "id": "t4",
        "kind": "rl",
        "spec": {
            "orchestrator": "http://10.0.0.2:8480",
            "rl": {"run": {"id": "math"}, "env": {"name": "chain_sum"}},
        },
    }
    spec = runs.RLSpec.of(task)
    key = tmp_path / "node.pem"
    cfg = spec.worker_config("t4", key=key, coordinator="http://c:8740", out_dir=tmp_path / "rl")
    assert cfg.orchestrator_url == "http://10.0.0.2:8480" and cfg.run.id == "math"
    assert cfg.path(cfg.worker.key) == key.resolve()
    assert (cfg.worker.coordinator, cfg.worker.coordinator_task) == ("http://c:8740", "t4")
    # a task may not set a node's own settings (its key, its cheats)
    bad = {**task, "spec": {**task["spec"], "rl": {"worker": {"cheat": "stale"}}}}
    with pytest.raises(UsageError, match="not \\['worker'\\]"):
        runs.RLSpec.of(bad).worker_config("t4", key=key, coordinator="", out_dir=tmp_path)
    with pytest.raises(UsageError, match=r"spec\.orchestrator"):
        runs.RLSpec.of({**task, "spec": {"orchestrator": "ftp://x"}})
