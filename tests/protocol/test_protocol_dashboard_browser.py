"""The dashboard in a real browser (the system Chromium through Playwright) against a live
coordinator whose task keeps moving while the test looks: nodes submit work each outer step,
validators judge it with the validation loss in their reasons, one poisoner is hard-rejected.

Checked: every page loads without a console error; the task's curve grows while the page is
open (no reload); a reward on a node's page links to the submission and the verdict entries
that produce it; the in-browser inclusion check passes for the verdict entry and fails once a
byte of it is changed. Screenshots of each page go to ``$COTRAIN_SCREENSHOTS`` (default: the
test's temporary directory).

The same pages against a real DiLoCo and RL run, and the market page, are checked while
``cotrain demo --quick`` runs (tests/demo/test_demo_network.py).
"""

from __future__ import annotations

import asyncio
import os
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from protocol_harness import config, identities, running

CHROMIUM = "/usr/bin/chromium"
pytestmark = pytest.mark.skipif(
    not Path(CHROMIUM).exists(), reason="needs the system Chromium (apt install chromium)"
)


class LiveTask:
    """A coordinator in a background loop, and a task that advances an outer step every
    ``every_s`` until stopped."""

    def __init__(self, tmp: Path, every_s: float = 0.4) -> None:
        self.tmp, self.every_s = tmp, every_s
        self.loop = asyncio.new_event_loop()
        self.ready = threading.Event()
        self.stop = asyncio.Event()
        self.error: BaseException | None = None
        self.url = ""
        self.task = ""
        self.nodes: dict[str, str] = {}
        self.steps = 0
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()
        if not self.ready.wait(60) or self.error:
            raise AssertionError(f"the live task did not start: {self.error!r}")

    def _run(self) -> None:
        try:
            self.loop.run_until_complete(self._main())
        except BaseException as e:
            self.error = e
            self.ready.set()

    async def _main(self) -> None:
        cfg = config(self.tmp, checkpoint_every=8, checkpoint_interval_s=0.3)
        async with running(cfg) as (url, _):
            self.url = url
            ids = await identities(
                url, init=["initiator"], v0=["validator"], v1=["validator"],
                alice=["node"], bob=["node"], carol=["node"], mallory=["node"],
            )  # fmt: skip
            init, v0, v1 = ids["init"][1], ids["v0"][1], ids["v1"][1]
            out = await init.write("/v1/tasks", {
                "name": "tiny-gpt", "kind": "diloco", "spec": {"model": "tiny"},
                "budget": 1_000_000, "rate_per_unit": 3, "validator_fee": 1, "lock_s": 60,
                "admission": "open", "validators": [ids["v0"][0].public_hex,
                                                    ids["v1"][0].public_hex],
                "quorum": 2, "weights": {"tokens": 1},
            })  # fmt: skip
            self.task = t = out["task"]
            await init.write(f"/v1/tasks/{t}/open")
            names = ["alice", "bob", "carol", "mallory"]
            for n in names:
                await ids[n][1].write(f"/v1/tasks/{t}/join", {})
                self.nodes[n] = ids[n][0].public_hex
            self.ready.set()
            loss, step = 6.0, 0
            while not self.stop.is_set() and step < 500:
                after = loss * 0.97
                for n in names:
                    if n == "mallory" and step > 2:
                        continue  # ejected: its writes are refused from now on
                    key = f"{t}-{n}-{step}".encode().hex().ljust(64, "0")[:64]
                    await ids[n][1].write(
                        f"/v1/tasks/{t}/work",
                        {"work_key": key, "kind": "tokens", "units": 512, "step": step},
                    )
                    if n == "mallory" and step == 2:
                        for v in (v0, v1):
                            await v.write(f"/v1/tasks/{t}/verdicts", {
                                "work_key": key, "verdict": "hard_reject",
                                "reason": f"applied to the consensus it raises the validation "
                                          f"loss {loss:.4f} -> {loss * 1.5:.4f}"})  # fmt: skip
                    elif n != "mallory" or step < 2:
                        await v0.write(f"/v1/tasks/{t}/verdicts", {
                            "work_key": key, "verdict": "accept",
                            "reason": f"validation loss {loss:.4f} -> {after:.4f}"})  # fmt: skip
                self.steps = step = step + 1
                loss = after
                try:
                    await asyncio.wait_for(self.stop.wait(), self.every_s)
                except TimeoutError:
                    pass
            for _, c in ids.values():
                await c.close()

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.stop.set)
        self.thread.join(60)


@pytest.fixture
def live(tmp_path: Path) -> Iterator[LiveTask]:
    lt = LiveTask(tmp_path)
    try:
        yield lt
    finally:
        lt.close()


@pytest.mark.timeout(180)
def test_dashboard_pages_in_a_browser(live: LiveTask, tmp_path: Path) -> None:
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

            page.goto(live.url + "/#/")
            page.get_by_role("link", name=live.task, exact=True).wait_for(timeout=15_000)
            assert "tiny-gpt" in page.inner_text("main")
            page.screenshot(path=str(shots / "tasks.png"), full_page=True)

            page.get_by_role("link", name=live.task, exact=True).click()
            chart = page.locator("svg.chart").first
            chart.wait_for(timeout=15_000)
            page.wait_for_function(
                "() => +(document.querySelector('svg.chart')?.dataset.points || 0) >= 3",
                timeout=20_000,
            )
            first = int(chart.get_attribute("data-points") or 0)
            page.wait_for_function(  # it grows while we watch: live, no reload
                f"() => +(document.querySelector('svg.chart')?.dataset.points || 0) > {first + 2}",
                timeout=20_000,
            )
            main = page.inner_text("main")
            assert "ejected" in main, main  # the poisoner, hard-rejected by the quorum
            page.screenshot(path=str(shots / "task.png"), full_page=True)

            page.goto(f"{live.url}/#/node/{live.nodes['alice']}")
            reward = page.locator("span.reward").first
            reward.wait_for(timeout=15_000)
            assert int(reward.inner_text().replace(",", "")) > 0
            row = page.locator("tr", has=page.locator("span.reward")).first
            links = row.locator("a[href^='#/entry/']")
            assert links.count() == 2  # the submission, and the verdict that credited it
            page.screenshot(path=str(shots / "node.png"), full_page=True)

            verdict_href = links.nth(1).get_attribute("href") or ""
            page.wait_for_timeout(1000)  # a checkpoint covers the verdict entry
            page.goto(live.url + "/" + verdict_href)
            result = page.locator("#inclusion")
            page.wait_for_function(
                "() => /included|not covered/i.test(document.getElementById('inclusion')"
                "?.textContent || '')",
                timeout=15_000,
            )
            if "not covered" in result.inner_text():
                page.wait_for_timeout(1500)
                page.click("#check")
                page.wait_for_function(
                    "() => /included/.test(document.getElementById('inclusion')?.textContent"
                    " || '')",
                    timeout=15_000,
                )
            assert result.inner_text().startswith("included"), result.inner_text()
            assert "verdict" in page.input_value("#entry-text")
            page.screenshot(path=str(shots / "entry.png"), full_page=True)

            text = page.input_value("#entry-text")
            page.fill("#entry-text", text.replace("accept", "acceqt", 1))
            page.click("#check")
            page.wait_for_function(
                "() => /NOT included/.test(document.getElementById('inclusion')?.textContent"
                " || '')",
                timeout=15_000,
            )
            page.screenshot(path=str(shots / "entry-tampered.png"), full_page=True)

            page.goto(live.url + "/#/ledger")
            page.locator("#checkpoint").wait_for(timeout=15_000)
            page.wait_for_function(
                "() => document.querySelectorAll('main tbody tr').length >= 10", timeout=15_000
            )
            page.screenshot(path=str(shots / "ledger.png"), full_page=True)

            phone = browser.new_page(viewport={"width": 390, "height": 844})
            phone.goto(live.url + f"/#/task/{live.task}")
            phone.locator("svg.chart").first.wait_for(timeout=15_000)
            width = phone.evaluate("() => document.documentElement.scrollWidth")
            assert width <= 400, f"the task page is {width} px wide on a phone"
            phone.screenshot(path=str(shots / "task-phone.png"), full_page=True)
        finally:
            browser.close()
    assert errors == [], errors
    assert live.error is None, live.error
    assert live.steps > 5
    print(f"screenshots in {shots}")
