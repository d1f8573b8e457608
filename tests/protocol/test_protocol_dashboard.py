"""The coordinator serves the dashboard: its files with a strict content policy, nothing else
from disk; and the inclusion check the dashboard runs in the browser (dashboard.js, run here
with Node's WebCrypto) agrees with the coordinator's own log: a real entry is included in the
newest signed checkpoint, the same entry with one byte changed is not.

The pages in a real browser (Chromium through Playwright) are issue 15's next step."""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
from protocol_harness import config, identities, running

from cotrain.protocol.client import Client

JS = Path(__file__).resolve().parents[2] / "src/cotrain/protocol/dashboard/dashboard.js"

CHECK = r"""
const fs = require("fs");
globalThis.crypto = require("crypto").webcrypto;
const src = fs.readFileSync(process.argv[1], "utf8");
eval(src.slice(src.indexOf("const hex ="), src.indexOf("async function checkpoint")) +
     "; globalThis.verifyInclusion = verifyInclusion; globalThis.unhex = unhex;");
const cases = JSON.parse(fs.readFileSync(0, "utf8"));
(async () => {
  const out = [];
  for (const c of cases) {
    const root = Uint8Array.from(Buffer.from(c.root, "base64"));
    out.push(await verifyInclusion(new TextEncoder().encode(c.entry), c.index, c.size,
                                   c.proof.map(unhex), root));
  }
  console.log(JSON.stringify(out));
})();
"""


def test_the_dashboard_is_served_and_nothing_else(tmp_path: Path) -> None:
    async def main() -> None:
        async with running(config(tmp_path)) as (url, _), Client(url) as c:
            s = c.session
            async with s.get(url + "/") as r:
                assert r.status == 200 and r.content_type == "text/html"
                assert "default-src 'self'" in r.headers["Content-Security-Policy"]
                assert '<script src="/ui/dashboard.js"' in await r.text()
            for name, kind in [("dashboard.js", "text/javascript"), ("dashboard.css", "text/css")]:
                async with s.get(f"{url}/ui/{name}") as r:
                    assert r.status == 200 and r.content_type == kind
                    assert r.headers["X-Content-Type-Options"] == "nosniff"
            for bad in ("../coordinator.py", "..%2F..%2Fcoord.pem", "coord.pem", "x.html"):
                async with s.get(f"{url}/ui/{bad}") as r:  # ../ leaves /ui/: no GET route
                    assert r.status in (404, 405), bad
                    assert "error" in await r.json()

    asyncio.run(asyncio.wait_for(main(), 60))


@pytest.mark.skipif(shutil.which("node") is None, reason="needs Node.js to run dashboard.js")
def test_the_browser_inclusion_check_agrees_with_the_log(tmp_path: Path) -> None:
    async def main() -> list[dict[str, Any]]:
        cfg = config(tmp_path, checkpoint_every=5, checkpoint_interval_s=0.2)
        async with running(cfg) as (url, _):
            ids = await identities(url, **{f"n{i}": ["node"] for i in range(9)})
            for _, c in ids.values():
                await c.close()
            async with Client(url) as c:
                for _ in range(100):
                    status = await c.get("/v1/status")
                    if status["checkpoint"] and status["checkpoint"] >= 5:
                        break
                    await asyncio.sleep(0.1)
                async with c.session.get(url + "/v1/log/checkpoint") as r:
                    note = (await r.text()).split("\n")
                size, root = int(note[1]), note[2]
                cases = []
                for i in (0, size // 2, size - 1):
                    async with c.session.get(f"{url}/v1/log/entries?start={i}&end={i + 1}") as r:
                        entry = (await r.text()).rstrip("\n")
                    proof = (await c.get("/v1/log/proof/inclusion", index=i, size=size))["proof"]
                    base = {"index": i, "size": size, "proof": proof, "root": root}
                    cases.append({**base, "entry": entry})
                    cases.append({**base, "entry": entry.replace('"v":1', '"v":2', 1)})
                return cases

    cases = asyncio.run(asyncio.wait_for(main(), 60))
    assert all(c["entry"] for c in cases)
    cp = subprocess.run(
        ["node", "-e", CHECK, str(JS)],
        input=json.dumps(cases),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert cp.returncode == 0, cp.stderr
    assert json.loads(cp.stdout) == [True, False] * 3
