"""bench/rl.py's own parts that need no run: what a task is for its per-version table, and
the ``--report`` command's refusals."""

from __future__ import annotations

from pathlib import Path

import pytest
from bench_harness import load_bench

from cotrain.rl.env import make_env


def test_task_kind_names_terms_and_sign() -> None:
    pytest.importorskip("reasoning_gym")
    bench, env = load_bench("rl"), make_env("chain_sum")
    kinds = {bench.task_kind(env.task(seed, 1)) for seed in range(40)}
    # level 1 is 2-3 one-digit terms: both counts and both signs come up in 40 seeds
    assert kinds == {f"{n} terms, {s}" for n in (2, 3) for s in ("positive", "negative")}
    task = env.task(7, 0)
    sign = "negative" if int(task.answer) < 0 else "positive"
    assert bench.task_kind(task) == f"2 terms, {sign}"
    # a text answer has no sign, and a dataset without num_terms gives none
    assert bench.task_kind(make_env("reverse_text").task(3, 0)) == ""


def test_idle_after_the_first_batch_leaves_out_its_wait() -> None:
    bench = load_bench("rl")
    # 90 s waiting for the first batch, 10 s more later, 1000 s in all: 10 of 910 s
    assert bench.steady_idle(
        {"first_wait_s": 90.0, "wait_s": 100.0, "wall_s": 1000.0}
    ) == pytest.approx(10 / 910)
    assert bench.steady_idle({"first_wait_s": 0.0, "wait_s": 0.0, "wall_s": 0.0}) is None


def test_cpu_used_counts_the_reaped_children() -> None:
    import subprocess
    import sys

    bench = load_bench("rl")
    before = bench.children_cpu_s()
    # a child that burns 0.3 s of CPU (its own clock, not the wall) and is then reaped
    burn = "import time\nt = time.process_time()\nwhile time.process_time() - t < 0.3: pass"
    subprocess.run([sys.executable, "-c", burn], check=True, timeout=60)
    assert bench.children_cpu_s() - before >= 0.3
    assert bench.usable_cores() >= 1


def test_report_refuses_a_directory_without_rollouts(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bench = load_bench("rl")
    with pytest.raises(SystemExit) as e:
        bench.main(["--report", str(tmp_path)])
    assert e.value.code == 2
    assert "holds no rollouts/ directory" in capsys.readouterr().err
    (tmp_path / "rollouts").mkdir()
    with pytest.raises(SystemExit) as e:
        bench.main(["--report", str(tmp_path), "--every", "0"])
    assert e.value.code == 2
    assert bench.main(["--report", str(tmp_path)]) == 0  # an empty store: an empty table
    (tmp_path / "rollouts" / "step_000001.jsonl").write_text('{"status": "accepted"}\n[1,\n')
    with pytest.raises(SystemExit) as e:
        bench.main(["--report", str(tmp_path)])
    assert e.value.code == 2
    assert "--report" in capsys.readouterr().err
