"""``DiLoCo`` and ``DDP`` as a library around a user's own model, optimizer and loop.

Workers are threads of this process, each with its own ``Communicator`` (real sockets on
loopback) and a real master; the model is a small torch MLP on a synthetic regression task.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import torch
from comm_harness import MasterThread, peer_config
from torch import nn

from cotrain.comm import Communicator
from cotrain.core.errors import UsageError
from cotrain.diloco import DDP, ConfigChangedError, DiLoCo, SyncReport
from cotrain.diloco import checkpoint as ckpt

pytestmark = pytest.mark.timeout(120)


def _model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 1))


_TARGET = torch.randn(8, 1, generator=torch.Generator().manual_seed(7)) / 3


def _batch(worker: int, step: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1000 * worker + step)
    x = torch.randn(16, 8, generator=g)
    return x, x @ _TARGET


def _train(
    port: int,
    worker: int,
    total: int,
    *,
    world: int | None,
    kw: dict[str, Any],
    started: threading.Event | None = None,
    on_sync: Callable[[SyncReport], None] | None = None,
    checkpoint_dir: Path | None = None,
    stop_after: int | None = None,
) -> tuple[bytes, int, DiLoCo]:
    torch.set_num_threads(1)
    model = _model()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-2)
    comm = Communicator(peer_config(port), name=f"w{worker}")
    comm.connect()
    try:
        with DiLoCo(
            comm,
            model,
            opt,
            world=world,
            total_steps=total,
            on_sync=on_sync,
            checkpoint_dir=checkpoint_dir,
            **kw,
        ) as d:
            if started is not None:
                started.set()
            while d.inner_step < total:
                x, y = _batch(worker, d.inner_step)
                loss = nn.functional.mse_loss(model(x), y)
                loss.backward()
                opt.step()
                opt.zero_grad()
                d.step(tokens=16)
                if stop_after is not None and d.inner_step >= stop_after:
                    raise KeyboardInterrupt  # the user's Ctrl-C, mid-run
        flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
        return flat.numpy().tobytes(), d.inner_step, d
    finally:
        comm.close()


def _run_all(jobs: list[Callable[[], Any]]) -> list[Any]:
    with ThreadPoolExecutor(len(jobs)) as pool:
        futures = [pool.submit(j) for j in jobs]
        return [f.result(timeout=100) for f in futures]


@pytest.mark.parametrize(
    "kw",
    [
        # outer momentum 0.5: a convex toy overshoots with DiLoCo's 0.9 in six outer steps
        {"sync_every": 4, "outer_momentum": 0.5},
        {"sync_every": 4, "outer_momentum": 0.5, "overlap": True, "quantization": "int4"},
        {"sync_every": 4, "outer_momentum": 0.5, "fragments": 2, "quantization": "fp16"},
    ],
    ids=["plain", "overlap-int4", "fragments-fp16"],
)
def test_workers_end_bit_identical_and_learn(kw: dict[str, Any]) -> None:
    master = MasterThread()
    try:
        reports: list[SyncReport] = []
        out = _run_all(
            [
                lambda i=i: _train(master.port, i, 24, world=3, kw=kw, on_sync=reports.append)  # type: ignore[misc]
                for i in range(3)
            ]
        )
    finally:
        master.stop()
    params = {o[0] for o in out}
    assert len(params) == 1, "replicas differ after the run"
    assert {o[1] for o in out} == {24}
    digests: dict[int, set[str]] = {}
    for r in reports:
        digests.setdefault(r.outer_step, set()).add(r.digest)
    assert all(len(v) == 1 for v in digests.values())
    assert max(digests) == out[0][2].schedule.sync_points
    # the consensus model learned something
    model = _model()
    before = _eval(model)
    torch.nn.utils.vector_to_parameters(
        torch.frombuffer(bytearray(out[0][0]), dtype=torch.float32), model.parameters()
    )
    assert _eval(model) < 0.5 * before


def _eval(model: nn.Module) -> float:
    with torch.no_grad():
        x, y = _batch(99, 0)
        return float(nn.functional.mse_loss(model(x), y))


def test_a_joiner_receives_the_run_and_ends_identical() -> None:
    master = MasterThread()
    kw = {"sync_every": 4, "outer_momentum": 0.5}
    try:
        ahead = threading.Event()

        def watch(r: SyncReport) -> None:
            if r.outer_step >= 3:
                ahead.set()

        with ThreadPoolExecutor(3) as pool:
            first = [
                pool.submit(_train, master.port, i, 40, world=2, kw=kw, on_sync=watch)
                for i in range(2)
            ]
            assert ahead.wait(60) or [f.result() for f in first]
            joiner = pool.submit(_train, master.port, 2, 40, world=2, kw=kw)
            out = [f.result(timeout=100) for f in [*first, joiner]]
    finally:
        master.stop()
    assert len({o[0] for o in out}) == 1
    assert out[2][2].joined_run and not out[0][2].joined_run
    assert out[2][2].tokens < out[0][2].tokens  # it trained only part of the run


def test_checkpoint_resume_and_a_changed_config_is_named(tmp_path: Path) -> None:
    master = MasterThread()
    kw = {"sync_every": 4}
    try:
        with pytest.raises(KeyboardInterrupt):
            _train(master.port, 0, 16, world=1, kw=kw, checkpoint_dir=tmp_path, stop_after=9)
        saved = ckpt.load(tmp_path)
        assert saved is not None and saved.meta["step"] == 8
        assert not list(tmp_path.glob(".tmp-*"))
        # resumed with another outer learning rate: refused, the difference named
        with pytest.raises(ConfigChangedError, match=r"diloco\.outer\.lr: 0\.7 -> 0\.5"):
            _train(master.port, 0, 16, world=1, kw={**kw, "outer_lr": 0.5}, checkpoint_dir=tmp_path)
        _, step, d = _train(master.port, 0, 16, world=1, kw=kw, checkpoint_dir=tmp_path)
        assert d.resumed and step == 16
    finally:
        master.stop()


def test_interrupted_save_leaves_nothing_behind(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    model = _model()
    opt = torch.optim.AdamW(model.parameters())
    ckpt.save(tmp_path, step=4, model=model, optimizer=opt, tensors={}, meta={"extra": None})

    def interrupted(*a: object, **k: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(ckpt, "save_file", interrupted)
    with pytest.raises(KeyboardInterrupt):
        ckpt.save(tmp_path, step=8, model=model, optimizer=opt, tensors={}, meta={})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest", "step-00000004"]
    saved = ckpt.load(tmp_path)
    assert saved is not None and saved.meta["step"] == 4
    # a corrupt file is refused with a clear message
    (saved.path / "model.safetensors").write_bytes(b"garbage")
    with pytest.raises(ckpt.CheckpointError, match="corrupt"):
        ckpt.load(tmp_path)


def test_ddp_replicas_identical() -> None:
    master = MasterThread()

    def run(i: int) -> bytes:
        torch.set_num_threads(1)
        model = _model()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
        with Communicator(peer_config(master.port), name=f"w{i}") as comm:
            comm.connect()
            with DDP(comm, model, opt, world=2) as ddp:
                while ddp.step < 6:
                    x, y = _batch(i, ddp.step)
                    nn.functional.mse_loss(model(x), y).backward()
                    ddp.sync_gradients()
                    opt.step()
                    opt.zero_grad()
        return torch.cat([p.detach().reshape(-1) for p in model.parameters()]).numpy().tobytes()

    try:
        out = _run_all([lambda i=i: run(i) for i in range(2)])  # type: ignore[misc]
    finally:
        master.stop()
    assert out[0] == out[1]


def test_misuse_is_a_clear_error() -> None:
    model = _model()
    opt = torch.optim.AdamW(model.parameters())
    comm = Communicator(peer_config(1))
    with pytest.raises(UsageError, match="multiple of fragments"):
        DiLoCo(comm, model, opt, sync_every=5, fragments=2)
    with pytest.raises(UsageError, match="int9"):
        DiLoCo(comm, model, opt, quantization="int9")  # type: ignore[arg-type]
    with pytest.raises(UsageError, match="context manager"):
        DiLoCo(comm, model, opt).step()
    entered = DiLoCo(comm, model, opt)
    entered._entered = True  # past __enter__ (no master here): the argument check alone
    with pytest.raises(UsageError, match="negative"):
        entered.step(tokens=-5)
    with pytest.raises(UsageError, match="not supported"):
        DDP(comm, model, torch.optim.Adagrad(model.parameters()))


def test_joining_a_run_that_ended_is_refused() -> None:
    from cotrain.diloco.errors import RunEndedError

    master = MasterThread()
    try:
        _train(master.port, 0, 8, world=1, kw={"sync_every": 4})
        with pytest.raises(RunEndedError, match="no other worker"):
            _train(master.port, 1, 8, world=1, kw={"sync_every": 4})
    finally:
        master.stop()


def test_a_worker_with_other_settings_is_refused() -> None:
    from cotrain.diloco import ConfigMismatchError

    master = MasterThread()
    try:
        with ThreadPoolExecutor(2) as pool:
            futures = [
                pool.submit(_train, master.port, i, 20, world=2, kw={"sync_every": 4 + i})
                for i in range(2)
            ]
            outcomes = []
            for f in futures:
                try:
                    outcomes.append(f.result(timeout=100)[1])
                except ConfigMismatchError as e:
                    outcomes.append(str(e))
    finally:
        master.stop()
    refused = [o for o in outcomes if isinstance(o, str)]
    assert len(refused) == 1 and "sync_every" in refused[0]
    assert 20 in outcomes  # the other one finished the run


def test_a_total_that_is_not_a_multiple_of_sync_every_ends_with_a_short_phase() -> None:
    master = MasterThread()
    try:
        reports: list[SyncReport] = []
        out = _run_all(
            [
                lambda i=i: _train(  # type: ignore[misc]
                    master.port, i, 10, world=2, kw={"sync_every": 4}, on_sync=reports.append
                )
                for i in range(2)
            ]
        )
    finally:
        master.stop()
    assert [o[1] for o in out] == [10, 10] and out[0][0] == out[1][0]
    assert sorted({r.step for r in reports}) == [4, 8, 10]
