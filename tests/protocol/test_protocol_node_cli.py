"""``cotrain node`` and ``cotrain validator`` on a user's mistakes: one line, exit 2."""

from __future__ import annotations

import asyncio
import os
import sys
from pathlib import Path

import pytest
from diloco_harness import tiny_train_config, write_fake_shakespeare
from protocol_harness import config, identities, running

from cotrain.rl.launch import free_port


async def _cotrain(*args: str, timeout_s: float = 120) -> tuple[int, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("COTRAIN_")}
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "cotrain",
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=env,
    )
    _, err = await asyncio.wait_for(proc.communicate(), timeout_s)
    assert proc.returncode is not None
    return proc.returncode, err.decode()


def _one_error(rc: int, err: str, text: str) -> None:
    lines = [x for x in err.splitlines() if x.startswith("error:")]
    assert rc == 2 and lines and text in lines[0], err
    assert "Traceback" not in err, err


@pytest.mark.timeout(300)
def test_node_and_validator_mistakes_are_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)  # a default key file (initiator.pem, ...) lands here

    async def main() -> None:
        port = free_port()
        rc, err = await _cotrain(
            "node", "--coordinator", f"http://127.0.0.1:{port}", "--key", str(tmp_path / "a.pem")
        )
        _one_error(rc, err, "cannot reach the coordinator")
        async with running(config(tmp_path)) as (url, _coord):
            ids = await identities(url, init=["initiator"], v=["validator"])
            _, c = ids["init"]
            spec = {
                "master": "127.0.0.1:1",
                "master_key": "ab" * 32,
                "store": str(tmp_path / "store"),
            }
            other = await c.write(
                "/v1/tasks", {"name": "x", "kind": "other", "budget": 10, "rate_per_unit": 1}
            )
            invite_only = await c.write(
                "/v1/tasks",
                {"name": "y", "kind": "diloco", "spec": spec, "budget": 10, "rate_per_unit": 1},
            )
            for t in (other["task"], invite_only["task"]):
                await c.write(f"/v1/tasks/{t}/open", {})
            node = ("node", "--coordinator", url, "--key", str(tmp_path / "n.pem"))
            _one_error(*await _cotrain(*node, "--task", "t999"), "no task t999")
            _one_error(*await _cotrain(*node, "--task", other["task"]), "not diloco")
            _one_error(*await _cotrain(*node, "--task", invite_only["task"]), "admits by invite")
            _one_error(*await _cotrain(*node), "no open diloco task admits nodes openly")
            vkey = tmp_path / "v.pem"
            ids["v"][0].save(vkey)
            _one_error(
                *await _cotrain(
                    "validator",
                    "--coordinator",
                    url,
                    "--key",
                    str(vkey),
                    "--task",
                    invite_only["task"],
                ),
                "is not among",
            )
            _one_error(*await _cotrain("validator", "--coordinator", url), "give --task")
            # an initiator's mistakes with `cotrain task`
            as_init = ("--coordinator", url, "--key", str(tmp_path / "i.pem"))
            _one_error(
                *await _cotrain("task", "publish", str(tmp_path / "none.json"), *as_init),
                "cannot read a task",
            )
            bad = tmp_path / "bad.json"
            bad.write_text('{"name": "x", "kind": "diloco", "budget": -1, "rate_per_unit": 1}')
            _one_error(*await _cotrain("task", "publish", str(bad), *as_init), "budget")
            gone_url = f"http://127.0.0.1:{free_port()}"
            _one_error(
                *await _cotrain("task", "finalize", "t1", "--coordinator", gone_url),
                "cannot reach the coordinator",
            )
            rc, err = await _cotrain("task", "finalize", other["task"], *as_init)
            assert rc == 1 and err.count("\n") == 1 and "Traceback" not in err, err
            # a task whose run cannot be reached: the node says where it looked
            cache = tmp_path / "cache"
            write_fake_shakespeare(cache)
            train = tiny_train_config(cache, tmp_path / "x", **{"comm.connect_timeout_s": 2})
            del train["out_dir"]
            gone = {**spec, "master": f"127.0.0.1:{free_port()}", "train": train}
            t = (
                await c.write(
                    "/v1/tasks",
                    {
                        "name": "z",
                        "kind": "diloco",
                        "spec": gone,
                        "budget": 10,
                        "rate_per_unit": 1,
                        "admission": "open",
                    },
                )
            )["task"]
            await c.write(f"/v1/tasks/{t}/open", {})
            wd = ("--work_dir", str(tmp_path / "wd"))
            _one_error(*await _cotrain(*node, "--task", t, *wd), "cannot reach the task's run")
            for c2 in (c, ids["v"][1]):
                await c2.close()

    asyncio.run(main())
