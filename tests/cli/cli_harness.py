"""Helpers of the CLI tests: real ``cotrain`` processes, each tagged through its environment so a
scan of /proc finds anything it left behind; TOML files written from dicts."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from proc_harness import processes_with

TAG = "COTRAIN_TEST_TAG"


def tagged(tag: str) -> list[int]:
    """Live processes whose environment carries ``TAG=tag`` (ours and their descendants)."""
    return processes_with(f"{TAG}={tag}")


def child_env(tag: str, **extra: str) -> dict[str, str]:
    """This environment without any COTRAIN_ variable, plus the tag and ``extra``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("COTRAIN_")}
    env.update({TAG: tag, "PYTHONUNBUFFERED": "1"}, **extra)
    return env


@dataclass
class Ran:
    code: int
    stdout: str
    stderr: str
    left: list[int]
    """Tagged processes still alive once the command returned."""


Cotrain = Callable[..., Ran]


def run_cotrain(*args: Any, env: dict[str, str] | None = None, timeout_s: float = 90.0) -> Ran:
    """Run ``python -m cotrain ARGS`` to the end (hard timeout); what it printed and left."""
    tag = uuid.uuid4().hex
    proc = subprocess.run(
        [sys.executable, "-m", "cotrain", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=timeout_s,
        env=child_env(tag, **(env or {})),
    )
    return Ran(proc.returncode, proc.stdout, proc.stderr, tagged(tag))


def write_toml(path: Path, data: dict[str, Any]) -> Path:
    """A flat TOML file: top-level values, then one table per dict value."""

    def value(v: Any) -> str:
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, str):
            return f'"{v}"'
        if isinstance(v, Sequence):
            return "[" + ", ".join(value(x) for x in v) + "]"
        return repr(v)

    lines = [f"{k} = {value(v)}" for k, v in data.items() if not isinstance(v, dict)]
    for section, table in data.items():
        if isinstance(table, dict):
            lines += [f"[{section}]", *(f"{k} = {value(v)}" for k, v in table.items())]
    path.write_text("\n".join(lines) + "\n")
    return path
