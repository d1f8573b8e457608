"""Whole RL runs as real processes (orchestrator, trainer with its shardcast origin,
validators, workers) on a small real Hugging Face model: async level 0 equals the synchronous
loop bit for bit; the run goes on through killed and late workers, a killed validator, a
trainer killed and resumed from its checkpoint and a restarted orchestrator; every cheating
worker is caught in every submission while honest workers at other thread counts and batch
sizes are never rejected."""

from __future__ import annotations

import hashlib
import json
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from bench_harness import load_bench
from hf_harness import trained_like_hf_model, write_text

from cotrain.core.errors import TimeoutExpired
from cotrain.rl import cheats
from cotrain.rl.config import RLConfig
from cotrain.rl.launch import LocalRun
from cotrain.rl.worker import ENVELOPE_CHEATS

pytest.importorskip("transformers")

CHEATS = [*cheats.CHEATS, *ENVELOPE_CHEATS]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tmp = tmp_path_factory.mktemp("rl-model")
    return trained_like_hf_model(tmp / "tiny", write_text(tmp / "text.txt"))


def _cfg(model: Path, out: Path, **run: Any) -> RLConfig:
    cfg = RLConfig()
    r = cfg.run
    r.id, r.out_dir, r.total_steps, r.async_level = "t", out, 4, 2
    r.group_size, r.groups_per_step = 4, 2
    for k, v in run.items():
        setattr(r, k, v)
    cfg.model.path, cfg.model.threads = str(model), 1
    cfg.env.name, cfg.env.heldout_items = "reverse_text", 8
    cfg.env.curriculum = "off"
    cfg.sampling.max_new_tokens = 8
    # the model's hidden size is 32: a proof chunk of one position holds 32 entries at most
    cfg.proof.chunk_tokens, cfg.proof.topk = 8, 32
    # its honest recomputes are bit-exact (median 0); int8 weights move the median to ~0.004
    cfg.validator.max_median_rel_err = 0.0025
    cfg.trainer.lr = 1e-3
    cfg.trainer.micro_batch = 4
    cfg.worker.batch_size = 4
    cfg.orchestrator.assignment_timeout_s = 20
    cfg.orchestrator.validation_timeout_s = 20
    cfg.orchestrator.ban_after_rejects = 0
    return cfg


def _events(run: LocalRun, name: str) -> list[dict[str, Any]]:
    out = []
    for line in run.procs[name].lines:
        if line.startswith("{"):
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                pass
    return out


def _get(run: LocalRun, path: str) -> dict[str, Any]:
    with urllib.request.urlopen(run.cfg.orchestrator.url + path, timeout=10) as r:
        return dict(json.loads(r.read()))


def _wait(what: str, cond: Any, timeout_s: float, poll_s: float = 0.2) -> None:
    end = time.monotonic() + timeout_s
    while not cond():
        if time.monotonic() > end:
            raise TimeoutExpired(f"{what} within {timeout_s} s")
        time.sleep(poll_s)


def _dump(run: LocalRun) -> None:
    """Every process's last lines (shown by pytest when a test fails)."""
    for name, p in run.procs.items():
        print(f"===== {name} (exit {p.popen.poll()})")
        print("\n".join(line[:300] for line in p.lines[-15:]))


def _rejections(run: LocalRun, worker: str) -> list[str]:
    """Why ``worker``'s rollouts were rejected, from the orchestrator's journal."""
    mine, out = set(), []
    with open(run.cfg.run.out_dir / "orchestrator" / "journal.jsonl") as f:
        for line in f:
            ev = json.loads(line)
            if ev["e"] == "rollout" and ev["envelope"]["signer"] == worker:
                body = ev["envelope"]["body"]
                mine.add(f"{body['assignment']['body']['id']}/{body['sample']}")
            elif ev["e"] == "door" and ev["worker"] == worker:
                out.append(f"door {ev['check']}: {ev['reason']}")
            elif ev["e"] == "verdict" and ev["envelope"]["body"]["rollout_id"] in mine:
                v = ev["envelope"]["body"]
                if not v["ok"]:
                    out.append(f"{v['rollout_id']} {v['check']}: {v['reason']}")
    return out[:10]


def _steps(run: LocalRun) -> list[int]:
    return [e["step"] for e in _events(run, "trainer") if e.get("event") == "step"]


def test_level_zero_equals_the_synchronous_loop(model_dir: Path, tmp_path: Path) -> None:
    import torch

    from cotrain.rl.policy import load_policy
    from cotrain.rl.sync import run_sync
    from cotrain.rl.weights import weights_bytes

    cfg = _cfg(model_dir, tmp_path / "run", async_level=0, total_steps=3)
    cfg.trainer.eval_every = 0
    run = LocalRun(cfg)
    try:
        run.start_all()
        assert run.wait_trainer(240) == 0
        status = run.status()
        published = status["latest_sha256"]
    finally:
        run.stop()
    # bench/rl.py's table of the run's samples by version counts every accepted one
    rows = load_bench("rl").samples_by_version(cfg.run.out_dir, every=1)
    assert sum(r["samples"] for r in rows) == status["accepted"] > 0
    assert {r["level"] for r in rows} == {0} and {r["kind"] for r in rows} == {""}
    torch.set_num_threads(1)
    policy = load_policy(cfg.model)
    batches: list[Any] = []
    run_sync(cfg, policy.model, policy.tokenizer, on_step=lambda b, s: batches.append(b))
    assert sum(len(b.samples) for b in batches) > 0  # it trained on something
    assert hashlib.sha256(weights_bytes(policy.model)).hexdigest() == published


def _trained(run: LocalRun) -> int:
    """Trainer steps published, as the orchestrator knows them (-1 while it is down)."""
    try:
        return int(_get(run, "/v1/status")["latest_version"]) - 1
    except OSError:
        return -1


def test_the_run_goes_on_through_every_fault(model_dir: Path, tmp_path: Path) -> None:
    # enough work per step that the faults land mid-run (a tiny step takes ~0.2 s)
    cfg = _cfg(model_dir, tmp_path / "run", total_steps=40, groups_per_step=6)
    cfg.sampling.max_new_tokens = 16
    cfg.trainer.eval_every = 0
    cfg.orchestrator.assignment_timeout_s = 8
    cfg.orchestrator.validation_timeout_s = 8
    run = LocalRun(cfg)

    def after(steps: int, timeout_s: float = 120) -> None:
        target = max(_trained(run), 0) + steps
        _wait(f"step {target}", lambda: _trained(run) >= target, timeout_s)
        assert _trained(run) < cfg.run.total_steps - 3, "the run ended before every fault"

    try:
        run.start_orchestrator()
        run.start_trainer()
        run.start_validator(0)
        w0 = run.start_worker()
        run.start_worker()
        after(1)
        # a worker killed while it holds an assignment; another joins late, with other
        # threads and batch size
        _wait(
            "an assignment",
            lambda: any(e.get("event") == "submitted" for e in _events(run, w0.name)),
            60,
        )
        run.kill(w0.name)
        run.start_worker(wait=False, extra={"model.threads": 2, "worker.batch_size": 3})
        after(2)
        # the validator killed and started again (its claims expire and are offered again)
        run.kill("validator0")
        run.start_validator(0)
        after(2)
        # the trainer killed and resumed from its checkpoint
        run.kill("trainer")
        run.start_trainer()
        after(2)
        # the orchestrator killed and restarted: it replays its journal, same address
        run.kill("orchestrator")
        run.start_orchestrator()
        code = run.wait_trainer(240)
        assert code == 0, run.procs["trainer"].lines[-10:]
        status = run.status()
    except BaseException:
        _dump(run)
        raise
    finally:
        run.stop()
    assert status["next_batch"] == cfg.run.total_steps + 1
    assert status["latest_version"] == cfg.run.total_steps + 1
    assert status["rejected_by_check"] == {}, status  # nobody cheated: nothing rejected
    # the resumed trainer went on from its checkpoint, not from step 1
    steps = [e["step"] for e in _events(run, "trainer") if e.get("event") == "step"]
    assert steps == list(range(steps[0], cfg.run.total_steps + 1)) and steps[0] > 1


@pytest.fixture(scope="module")
def running(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalRun]:
    """One long async run with honest workers at different thread counts and batch sizes;
    each cheat test adds its cheater."""
    cfg = _cfg(model_dir, tmp_path_factory.mktemp("cheats") / "run", total_steps=100_000)
    # a policy that stays diverse for the whole module (at 1e-3 the tiny model collapses to
    # one reply per prompt within a minute, and the run aborts for lack of signal)
    cfg.trainer.lr = 1e-6
    cfg.run.abort_after_zero_batches = 1_000_000
    cfg.trainer.eval_every = 0
    cfg.worker.max_assignments = 0
    run = LocalRun(cfg)
    try:
        run.start_orchestrator()
        run.start_trainer()
        run.start_validator(0)
        run.start_worker()
        run.start_worker(extra={"model.threads": 2, "worker.batch_size": 3})
        # far enough that a stale version exists and a batch is public to copy from
        _wait("step 4", lambda: _get(run, "/v1/status")["next_batch"] > 4, 180)
        yield run
        status = run.status()
        honest = {
            e["worker"]
            for n in run.procs
            if n.startswith("worker") and "-" not in n
            for e in _events(run, n)
            if e.get("event") == "ready"
        }
        for key in honest:
            counts = status["workers"].get(key, {})
            assert counts.get("rejected", 0) == 0, (key, counts, _rejections(run, key))
            assert counts.get("accepted", 0) > 0, (key, counts)
    finally:
        run.stop()


@pytest.fixture(scope="module")
def cheaters(running: LocalRun) -> dict[str, Any]:
    """Every cheating worker at once (two assignments each), against the running run."""
    running.cfg.worker.max_assignments = 2
    try:
        return {cheat: running.start_worker(cheat, wait=False) for cheat in CHEATS}
    finally:
        running.cfg.worker.max_assignments = 0


@pytest.mark.timeout(300)  # the first one also starts the run and its 18 cheaters
@pytest.mark.parametrize("cheat", CHEATS)
def test_every_cheat_is_caught(running: LocalRun, cheaters: dict[str, Any], cheat: str) -> None:
    run = running
    p = cheaters[cheat]
    try:
        p.wait_for("finished", 200)
    except TimeoutExpired as e:
        pytest.fail(f"{e}; its last lines: {p.lines[-8:]}; the run: {run.status()}")
    subs = [e for e in _events(run, p.name) if e.get("event") == "submitted" and e.get("cheat")]
    assert subs, f"{cheat}: no cheating submission was made: {p.lines[-6:]}"
    for e in subs:
        if e["status"] == "rejected":
            continue
        rid = urllib.parse.quote(e["id"])
        _wait(
            f"a verdict on {e['id']}",
            lambda rid=rid: _get(run, f"/v1/record?id={rid}")["status"] != "queued",
            60,
        )
        rec = _get(run, f"/v1/record?id={rid}")
        assert rec["status"] == "rejected", (cheat, rec)
