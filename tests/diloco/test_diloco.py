"""DiLoCo: the outer step, configs, and real multi-process runs (elastic, DDP, resume).

Multi-process tests start a real master and real workers (``cotrain train``) on loopback with
port 0, a ~50k-parameter GPT and a small real-text corpus; they check replicas by hash.
"""

from __future__ import annotations

import secrets
from pathlib import Path
from typing import Any, cast

import pytest
import torch
from diloco_harness import pair_worker_config, tiny_train_config, write_fake_shakespeare

from cotrain.comm.communicator import Communicator
from cotrain.core.config import load_config
from cotrain.core.errors import ConfigError, TimeoutExpired
from cotrain.data import prepare
from cotrain.diloco import OuterConfig, OuterState, TrainConfig, Worker
from cotrain.diloco.metrics import Clocks, MetricsLog, read_log
from cotrain.diloco.sync import Synchronizer, SyncOutcome
from cotrain.launch.procs import Proc, start_master, start_worker

ROOT = Path(__file__).resolve().parents[2]


def test_public_surface() -> None:
    import cotrain.data
    import cotrain.diloco

    assert sorted(cotrain.diloco.__all__) == [
        "AlgoConfig",
        "CheckpointError",
        "ConfigChangedError",
        "ConfigMismatchError",
        "DDP",
        "DiLoCo",
        "InnerConfig",
        "OuterConfig",
        "OuterState",
        "RoundFailedError",
        "RunEndedError",
        "SyncReport",
        "TrainConfig",
        "TrainError",
        "Worker",
        "train",
    ]
    assert "prepare" in cotrain.data.__all__ and "ShardReader" in cotrain.data.__all__


def test_outer_step_is_torch_sgd_nesterov() -> None:
    """The outer update equals torch's SGD(lr 0.7, momentum 0.9, nesterov) on -delta."""
    torch.manual_seed(0)
    p = torch.nn.Parameter(torch.randn(1000))
    ref = torch.nn.Parameter(p.detach().clone())
    outer = OuterState([p], OuterConfig())
    sgd = torch.optim.SGD([ref], lr=0.7, momentum=0.9, nesterov=True, foreach=False)
    for _ in range(4):
        delta = torch.randn(1000) * 0.01  # outer - local
        outer.apply(delta)
        ref.grad = delta.clone()
        sgd.step()
        torch.testing.assert_close(outer.params, ref.detach(), rtol=0, atol=1e-6)
    assert int(outer.step[0]) == 4
    digest = outer.digest()
    assert OuterState([p], OuterConfig()).digest() != digest


@pytest.mark.parametrize(
    "path",
    sorted([*ROOT.glob("configs/train*.toml"), *ROOT.glob("configs/diloco*.toml")]),
    ids=lambda p: p.name,
)
def test_shipped_configs_parse(path: Path) -> None:
    load_config(TrainConfig, path)


def test_config_errors_say_what_to_fix() -> None:

    with pytest.raises(ConfigError, match="block_size"):
        load_config(TrainConfig, None, ["data.seq_len=1024"])
    with pytest.raises(ConfigError, match="world = 1"):
        load_config(TrainConfig, None, ["algo.mode=single", "world=2"])


# ---- processes ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("cache")
    write_fake_shakespeare(path)
    cfg = TrainConfig.model_validate(tiny_train_config(path, path / "unused"))
    prepare(cfg.data)  # once, before workers start
    return path


def _records(proc: Proc) -> list[dict[str, Any]]:
    import json

    return [json.loads(x) for x in proc.lines if x.startswith("{")]


def _outer(records: list[dict[str, Any]]) -> dict[int, dict[str, Any]]:
    return {r["outer_step"]: r for r in records if r["event"] == "outer"}


def _finish(procs: list[Proc], timeout_s: float) -> None:
    for p in procs:
        try:
            p.popen.wait(timeout_s)
        except Exception:
            for q in procs:
                q.stop()
            raise AssertionError(f"{p.name} did not finish: {' | '.join(p.lines[-5:])}") from None


def _kill_and_replace(cache: Path, out: Path, kill_at_step: int, **over: Any) -> list[Proc]:
    """Workers 0 and 1 start (elastic: a lone survivor waits for a replacement); worker 1 is
    killed at ``kill_at_step``; a fresh worker 2 joins; 0 and 2 run to the end.
    Returns the three processes, all ended."""
    secret = secrets.token_hex(8)
    master, port = start_master(secret)
    procs: list[Proc] = []

    def cfg(i: int, **kw: Any) -> TrainConfig:
        return pair_worker_config(cache, out, port, i, elastic=True, **over, **kw)

    try:
        procs.append(start_worker(cfg(0), secret))
        procs.append(start_worker(cfg(1, kill_at_step=kill_at_step), secret))
        assert procs[1].popen.wait(360) == -9
        procs.append(start_worker(cfg(2, join="join"), secret))
        _finish([procs[0], procs[2]], 360)
    finally:
        for p in procs:
            p.stop()
        master.stop()
    return procs


@pytest.mark.timeout(420)
@pytest.mark.parametrize(
    ("overlap", "fragments"), [(False, 1), (True, 2)], ids=["diloco", "overlap-fragments"]
)
def test_diloco_kill_and_join_keeps_replicas_bit_identical(
    cache: Path, tmp_path: Path, overlap: bool, fragments: int
) -> None:
    """A worker is killed mid-run (with overlap: while a synchronisation is in flight or about
    to start) and a fresh one joins; the outer state stays bit-identical by hash."""
    over = {"algo.overlap": overlap, "algo.fragments": fragments}
    procs = _kill_and_replace(cache, tmp_path, 10, **over)  # killed in its third inner phase
    w0, w2 = _records(procs[0]), _records(procs[2])
    o0, o2 = _outer(w0), _outer(w2)
    last = 6 * fragments + fragments - 1  # sync points: 6 outer steps of 4, F - 1 final ones
    assert sorted(o0) == list(
        range(last + 1)
    )  # 0: the initial model  # the survivor finished every outer step
    first = min(o2)
    assert o2[first]["fetched"] and o2[first]["tokens"] == 0  # received, contributed nothing
    for k in o2:  # from its first outer step on, the joiner is bit-identical to the survivor
        assert o2[k]["hash"] == o0[k]["hash"], k
    assert max(o2) == last and o2[last]["world"] == 2 and o2[last]["tokens"] > 0
    vals = [o0[k]["val_loss"] for k in sorted(o0) if o0[k]["val_loss"] is not None]
    assert vals[-1] < vals[0]
    done = [r for r in (*w0, *w2) if r["event"] == "done"]
    assert len({r["hash"] for r in done}) == 1  # local params = outer params at the end
    logged = read_log(tmp_path / "worker0.jsonl")
    assert [r for r in logged if r["event"] == "outer"] == list(o0.values())


def _run_workers(
    cache: Path,
    out: Path,
    n: int,
    *,
    per_worker: dict[int, dict[str, Any]] | None = None,
    **over: Any,
) -> list[Proc]:
    """``n`` workers of one run (and its master) to the end; their records stay on the Procs."""
    secret = secrets.token_hex(8)
    master, port = start_master(secret)
    procs: list[Proc] = []
    try:
        for i in range(n):
            d = tiny_train_config(cache, out, **{"comm.master_port": port, **over})
            d.update(worker_index=i, world=n, **(per_worker or {}).get(i, {}))
            procs.append(start_worker(TrainConfig.model_validate(d), secret))
        for p in procs:
            p.popen.wait(360)
    finally:
        for p in procs:
            p.stop()
        master.stop()
    return procs


@pytest.mark.timeout(420)
def test_overlap_kill_every_worker_and_resume(cache: Path, tmp_path: Path) -> None:
    """Overlap on, every worker killed at step 10 with a synchronisation in flight, all
    restarted: they resume from the step-8 checkpoint (less than one outer step lost), restart
    the synchronisation they had sent, and end bit-identical to an uninterrupted run (fp32 on
    two peers: a sum of two values does not depend on the order)."""
    over = {"algo.overlap": True, "algo.quantization": "none"}
    ref = _run_workers(cache, tmp_path / "ref", 2, **over)
    killed = _run_workers(
        cache,
        tmp_path / "b",
        2,
        per_worker={0: {"kill_at_step": 10}, 1: {"kill_at_step": 10}},
        **over,
    )
    assert [p.popen.returncode for p in killed] == [-9, -9]
    resumed = _run_workers(cache, tmp_path / "b", 2, **over)
    for p in resumed:
        recs = _records(p)
        assert next(r for r in recs if r["event"] == "start")["resumed_step"] == 8
        assert min(_outer(recs)) == 2  # the outer step sent at step 8 was applied after all
    ref_done = {next(r for r in _records(p) if r["event"] == "done")["hash"] for p in ref}
    done = {next(r for r in _records(p) if r["event"] == "done")["hash"] for p in resumed}
    assert len(ref_done) == 1 and done == ref_done
    assert _outer(_records(resumed[0]))[6]["hash"] == _outer(_records(ref[0]))[6]["hash"]


@pytest.mark.timeout(420)
def test_time_bounded_inner_phases_weight_by_tokens(cache: Path, tmp_path: Path) -> None:
    """inner_time_s: a slow worker (4 threads on a tiny model, plus a longer sequence) runs
    fewer steps per phase; the pseudo-gradients are token-weighted and replicas stay identical."""
    procs = _run_workers(
        cache, tmp_path, 2, total_steps=12, **{"algo.inner_time_s": 0.5, "algo.overlap": True}
    )
    a, b = (_outer(_records(p)) for p in procs)
    assert sorted(a) == [0, 1, 2, 3] and all(a[k]["hash"] == b[k]["hash"] for k in a)
    steps = [next(r for r in _records(p) if r["event"] == "done")["tokens"] for p in procs]
    assert all(t >= 3 * 4 * 16 for t in steps)  # at least one step of 4 x 16 tokens a phase


@pytest.mark.timeout(420)
def test_ddp_replicas_identical_and_every_step_moves_the_model(cache: Path, tmp_path: Path) -> None:
    secret = secrets.token_hex(8)
    master, port = start_master(secret)
    procs = []
    try:
        for i in range(2):
            over = {"algo.mode": "ddp", "algo.quantization": "none", "total_steps": 8}
            procs.append(start_worker(pair_worker_config(cache, tmp_path, port, i, **over), secret))
        _finish(procs, 360)
    finally:
        for p in procs:
            p.stop()
        master.stop()
    a, b = (_outer(_records(p)) for p in procs)
    assert sorted(a) == [1, 2] and all(a[k]["hash"] == b[k]["hash"] for k in a)
    params = next(r for r in _records(procs[0]) if r["event"] == "start")["params"]
    # 8 fp32 all-reduces of the gradients; a 2-peer ring sends 2 (n - 1) / n = 1 model per step
    assert a[2]["bytes_sent"] == 8 * 4 * params


@pytest.mark.timeout(420)
def test_kill_and_resume_is_bit_identical(cache: Path, tmp_path: Path) -> None:
    """Single mode: killed at step 10, resumed from the step-8 checkpoint, the run ends with
    exactly the parameters of an uninterrupted run."""
    ref = Worker(
        TrainConfig.model_validate(
            tiny_train_config(cache, tmp_path / "ref", **{"algo.mode": "single"}, total_steps=16)
        ),
        echo=False,
    ).run()
    ref_log = read_log(tmp_path / "ref" / "worker0.jsonl")
    d = tiny_train_config(cache, tmp_path / "b", **{"algo.mode": "single"}, total_steps=16)
    killed = start_worker(TrainConfig.model_validate({**d, "kill_at_step": 10}), "x")
    assert killed.popen.wait(360) == -9
    resumed = start_worker(TrainConfig.model_validate(d), "x")
    _finish([killed, resumed], 360)
    recs = _records(resumed)
    start = next(r for r in recs if r["event"] == "start")
    assert start["resumed_step"] == 8  # at most one outer step lost
    done = next(r for r in recs if r["event"] == "done")
    ref_done = next(r for r in ref_log if r["event"] == "done")
    assert done["hash"] == ref_done["hash"] and done["tokens"] == ref["tokens"]


def test_cli_train_and_data_help() -> None:
    import subprocess
    import sys

    for args in (["train", "--help"], ["data", "prepare", "--help"], ["demo", "--help"]):
        out = subprocess.run(
            [sys.executable, "-m", "cotrain", *args],
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
        ).stdout
        assert "Usage" in out


def test_fragment_split_and_staggered_schedule() -> None:
    """Fragments are contiguous whole tensors of about equal size; fragment f syncs every H
    steps at offset (f + 1) H / F; the final F - 1 sync points add no inner steps."""
    from cotrain.diloco.fragments import Schedule, split

    params = [torch.nn.Parameter(torch.zeros(n)) for n in (100, 10, 40, 50, 5, 95)]
    frags = split(params, 3)
    assert [(f.start, f.stop, f.params) for f in frags] == [
        (0, 100, (0,)),
        (100, 200, (1, 2, 3)),
        (200, 300, (4, 5)),
    ]
    assert split(params, 1)[0].numel == 300
    assert [f.params for f in split(params, 6)] == [(i,) for i in range(6)]
    with pytest.raises(ValueError, match=r"lower algo\.fragments"):
        split(params, 7)
    s = Schedule.for_run(total_steps=95, inner_steps=12, fragments=3)  # 8 outer steps of 12
    assert s.rounds == 8 and s.every == 4 and s.sync_points == 8 * 3 + 2
    ends = [s.end_step(k) for k in range(s.sync_points)]
    assert ends[:7] == [4, 8, 12, 16, 20, 24, 28] and ends[-3:] == [96, 96, 96]
    for f in range(3):  # every fragment is synced every H = 12 steps, at offset (f + 1) * 4
        steps = [e for k, e in enumerate(ends[:24]) if s.fragment(k) == f]
        assert steps == list(range((f + 1) * 4, 97, 12))
    assert [s.fragment(k) for k in range(24, 26)] == [0, 1]  # the final ones: all but the last
    assert Schedule.for_run(total_steps=10, inner_steps=5, fragments=1).sync_points == 2
    with pytest.raises(ConfigError, match=r"multiple of algo\.fragments"):
        load_config(TrainConfig, None, ["algo.inner_steps=10", "algo.fragments=3"])


def test_warm_start_continues_the_run_exactly(cache: Path, tmp_path: Path) -> None:
    """A run stopped at step 8 (stop_at_step) and another started from its checkpoint
    (init_from) end with the parameters of one uninterrupted 16-step run."""
    over = {"algo.mode": "single", "algo.inner_steps": 4}
    ref = Worker(
        TrainConfig.model_validate(
            tiny_train_config(cache, tmp_path / "ref", **over, total_steps=16)
        ),
        echo=False,
    ).run()
    first = tiny_train_config(cache, tmp_path / "a", **over, total_steps=16, stop_at_step=8)
    assert Worker(TrainConfig.model_validate(first), echo=False).run()["step"] == 8
    second = tiny_train_config(
        cache, tmp_path / "b", **over, total_steps=16, init_from=str(tmp_path / "a")
    )
    out = Worker(TrainConfig.model_validate(second), echo=False).run()
    assert out["tokens"] == ref["tokens"]
    done = [
        next(r for r in read_log(tmp_path / d / "worker0.jsonl") if r["event"] == "done")["hash"]
        for d in ("ref", "b")
    ]
    assert done[0] == done[1]
    with pytest.raises(ConfigError, match="stop_at_step"):
        load_config(TrainConfig, None, ["stop_at_step=8"])  # diloco runs cannot stop early


@pytest.mark.timeout(420)
def test_ddp_kill_and_join(cache: Path, tmp_path: Path) -> None:
    """DDP: a worker is killed, a fresh one joins at a vote, fetches params, AdamW moments and
    step, and from then on is bit-identical to the survivor."""
    over = {"algo.mode": "ddp", "algo.ddp_vote_every_steps": 2, "total_steps": 16}
    procs = _kill_and_replace(cache, tmp_path, 6, **over)
    o0, o2 = _outer(_records(procs[0])), _outer(_records(procs[2]))
    assert sorted(o0) == [1, 2, 3, 4] and o2 and max(o2) == 4
    for k in o2:
        assert o2[k]["hash"] == o0[k]["hash"], k
    assert o2[4]["world"] == 2


def test_a_timed_out_synchronisation_is_retried_with_a_vote(tmp_path: Path) -> None:
    log = MetricsLog(tmp_path / "w.jsonl", echo=False)
    sync = Synchronizer(cast(Communicator, None), clocks=Clocks(), log_=log, retries=2)
    votes: list[bool] = []

    def attempt(vote: bool) -> SyncOutcome:
        votes.append(vote)
        if len(votes) == 1:
            raise TimeoutExpired("timed out waiting for the shared-state plan")
        return SyncOutcome(fetched=False, total_weight=1.0, world=2, attempts=1)

    out = sync.run(attempt, vote=False, step=4)
    log.close()
    assert votes == [False, True] and out.attempts == 2
    assert [r["error"] for r in read_log(tmp_path / "w.jsonl")] == ["TimeoutExpired"]
