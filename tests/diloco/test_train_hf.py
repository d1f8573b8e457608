"""``cotrain train`` on a Hugging Face causal LM with LoRA and the user's own JSONL text: two
DiLoCo workers end bit-identical, the final models load with ``from_pretrained`` and agree,
TensorBoard gets the metrics, and a resume with a changed config is refused in one line."""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from hf_harness import small_hf_model, write_text

from cotrain.core.config import to_overrides
from cotrain.diloco import TrainConfig
from cotrain.launch.procs import Proc, start_master, start_worker

pytest.importorskip("peft")
pytestmark = pytest.mark.timeout(300)


def _config(tmp: Path, model: Path, corpus: Path, port: int, index: int) -> TrainConfig:
    return TrainConfig.model_validate(
        {
            "total_steps": 12,
            "out_dir": str(tmp / "run"),
            "worker_index": index,
            "world": 2,
            "log_every_steps": 4,
            "report_to": ["tensorboard"],
            "model": {"kind": "hf", "path": str(model), "lora": {"r": 4, "alpha": 8}},
            "data": {
                "sources": [str(corpus)],
                "cache_dir": str(tmp / "cache"),
                "seq_len": 32,
                "batch_size": 4,
                "num_shards": 2,
                "val_batches": 2,
            },
            "inner": {"lr": 1e-2, "warmup_steps": 2},
            "algo": {"mode": "diloco", "inner_steps": 4},
            "comm": {"master_port": port, "heartbeat_interval_s": 0.2},
        }
    )


def _done(proc: Proc) -> dict[str, Any]:
    recs = [json.loads(line) for line in proc.lines if line.startswith("{")]
    return next(r for r in recs if r.get("event") == "done")


def test_hf_lora_on_jsonl_two_workers(tmp_path: Path) -> None:
    text = write_text(tmp_path / "text.txt")
    model = small_hf_model(tmp_path / "model", text)
    corpus = tmp_path / "corpus.jsonl"
    paragraphs = [p for p in text.read_text().split("\n\n") if p.strip()]
    corpus.write_text("".join(json.dumps({"text": p}) + "\n" for p in paragraphs))
    secret = secrets.token_hex(8)
    master, port = start_master(secret)
    procs: list[Proc] = []
    try:
        cfgs = [_config(tmp_path, model, corpus, port, i) for i in range(2)]
        procs = [start_worker(c, secret) for c in cfgs]
        for p in procs:
            assert p.popen.wait(240) == 0, "\n".join(p.lines[-10:])
        # resuming the finished run with another learning rate: one line, exit 2
        cmd = [sys.executable, "-m", "cotrain", "train", *to_overrides(cfgs[0])]
        env = {**os.environ, "COTRAIN_SECRET": secret}
        res = subprocess.run(
            [*cmd, "--inner.lr=0.005"], capture_output=True, text=True, timeout=120, env=env
        )
    finally:
        for p in procs:
            p.stop()
        master.stop()
    done = [_done(p) for p in procs]
    assert done[0]["hash"] == done[1]["hash"] and done[0]["step"] == 12
    start = next(json.loads(x) for x in procs[0].lines if '"event": "start"' in x)
    assert start["trainable"] < start["params"] / 5  # LoRA: only the adapters train
    run = tmp_path / "run"
    assert list((run / "tensorboard").rglob("events.out.tfevents.*"))
    from transformers import AutoModelForCausalLM

    x = torch.arange(16).view(1, 16)
    logits = []
    for i in range(2):
        m = AutoModelForCausalLM.from_pretrained(run / f"worker{i}" / "model")
        with torch.no_grad():
            logits.append(m(input_ids=x).logits)
    assert torch.equal(logits[0], logits[1])
    base = AutoModelForCausalLM.from_pretrained(model)
    with torch.no_grad():
        assert not torch.equal(base(input_ids=x).logits, logits[0])  # the adapters were merged
    assert res.returncode == 2, res.stderr
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in res.stderr, res.stderr
    assert "inner.lr: 0.01 -> 0.005" in lines[0] and "--allow_config_change" in lines[0]
