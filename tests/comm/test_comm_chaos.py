"""Chaos, short: the shipped benchmark (bench/chaos.py --quick) with 8 real peer processes under
kill -9, SIGSTOP past the heartbeat timeout, a join and a master kill + restart; and the rules a
restarted master rebuilds its state by (``recovery.py``)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from cotrain.comm import messages as m
from cotrain.comm.recovery import elect, outcomes

RING = ["a", "b", "c", "d", "e"]


def resume(epoch: int, ring: list[str], revision: int | None, **kw: object) -> m.Resume:
    return m.Resume(epoch=epoch, ring=ring, revision=revision, **kw)  # type: ignore[arg-type]


def test_a_stale_peer_arriving_first_cannot_impose_its_view() -> None:
    # "x" was dropped at epoch 6; the others went on to epoch 7 and revision 41
    stale = {"x": resume(6, [*RING, "x"], 30)}
    assert elect(stale, final=False) is None  # one of six: wait for more
    reports = {**stale, **{p: resume(7, RING, 41) for p in RING[:3]}}
    view = elect(reports, final=False)
    assert view is not None
    assert (view.epoch, view.ring, view.revision) == (7, tuple(RING), 41)
    assert view.reporters == frozenset(RING[:3])


def test_the_revision_is_the_majority_s_or_none() -> None:
    split = {"a": resume(7, RING, 41), "b": resume(7, RING, 42)}
    view = elect(split, final=True)  # the window is over: the most reported view
    assert view is not None and view.revision is None  # no majority: the next sync decides
    view = elect({**split, "c": resume(7, RING, 42)}, final=False)
    assert view is not None and view.revision == 42


def test_a_commit_any_member_saw_is_a_commit_for_all() -> None:
    reports = {
        "a": resume(7, RING, 41, done_seq=1, committed=True),
        "b": resume(7, RING, 41, done_seq=1),
        "c": resume(7, RING, 41, done_seq=1),
        "x": resume(6, [*RING, "x"], 30, done_seq=3),  # not a member of the elected view
    }
    view = elect(reports, final=False)
    assert view is not None
    got = outcomes(view, reports, all_reported=False)
    assert got == {"b": (7, 1, True), "c": (7, 1, True), "x": (6, 3, False)}


def test_no_commit_seen_rolls_back_only_once_every_member_reported() -> None:
    reports = {p: resume(7, RING, 41, done_seq=2) for p in RING[:3]}
    view = elect(reports, final=False)
    assert view is not None
    assert outcomes(view, reports, all_reported=False) == {}  # "d" or "e" may have committed
    assert outcomes(view, reports, all_reported=True) == {p: (7, 2, False) for p in RING[:3]}


@pytest.mark.timeout(150)
def test_chaos_quick(tmp_path: Path) -> None:
    bench = Path(__file__).resolve().parents[2] / "bench" / "chaos.py"
    out = tmp_path / "chaos.json"
    proc = subprocess.run(
        [sys.executable, str(bench), "--quick", "--json", str(out)],
        capture_output=True,
        text=True,
        timeout=140,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    r = json.loads(out.read_text())
    incidents = json.dumps(r["incidents"], indent=1)[-6000:]
    for kind in ("kill", "join", "stop", "master"):
        assert r["faults"][kind] >= 1, r["faults"]
        assert r["recovery_s"][kind]["n"] == r["faults"][kind], (r["recovery_s"], incidents)
    assert r["collectives"] > 50
    for key in (
        "wrong_results",
        "split_outcomes",
        "inputs_not_restored",
        "repeated_rounds",
        "wedged_runs",
        "hangs",
        "crashes",
        "unrecovered",
    ):
        assert r[key] == 0, (key, incidents)
