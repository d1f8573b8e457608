"""A short run of bench/fuzz.py: a real master and 3 real peers all-reduce in a loop while
thousands of hostile connections and frames hit the master's port and a peer's data port, with
hundreds of idle and slowloris connections held from a stranger's address and from the peers'
own. Nothing unauthenticated gets in, no handler dies, nothing leaks, the loop never stalls."""

from __future__ import annotations

import pytest
from bench_harness import load_bench


def _fuzz():  # type: ignore[no-untyped-def]
    return load_bench("fuzz")


@pytest.mark.timeout(90)
def test_hostile_connections_and_frames_leave_the_run_untouched() -> None:
    fuzz = _fuzz()
    cfg = fuzz.FuzzConfig(
        cases=1500, idle=60, idle_honest_addr=300, slow=10, handshake_timeout_s=2.0, settle_s=20
    )
    report = fuzz.run(cfg, log=lambda _: None)
    s = report["summary"]
    assert s["cases"] >= 1500
    assert s["accepted_unauthenticated"] == 0, report["accepted"]
    assert s["handler_tracebacks"] == 0, (report["tracebacks"], report["errors"])
    assert s["crashes"] == 0, report["crashed"]
    assert s["fd_growth"] <= 0, report["processes"]
    assert s["rss_growth_mb"] < 10, report["processes"]
    assert s["max_stall_s"] < 2, s
    assert s["honest_refused"] == 0, report["honest_refusals"]
