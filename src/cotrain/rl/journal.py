"""The orchestrator's record: every event it acted on, appended as one JSON line, replayed on
restart; and the rollout store, where each step's rollouts and verdicts are written once its
batch is formed (a local directory by default, any fsspec URL such as ``s3://bucket/run``).

The journal is the truth: state is a function of it (``Planner`` replays it), so an
orchestrator killed at any moment restarts where it was. A line cut short by the kill is
dropped on replay; everything before it stands.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

from cotrain.core import jsonsafe


class Journal:
    """Append-only JSON lines at ``path``."""

    def __init__(self, path: Path) -> None:
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        self._truncate_torn_tail()
        self._f: IO[str] = open(path, "a", encoding="utf-8")  # noqa: SIM115
        self.events = 0

    def _truncate_torn_tail(self) -> None:
        """Drop a last line without its newline (the process died while writing it)."""
        if not self.path.exists():
            return
        data = self.path.read_bytes()
        if data and not data.endswith(b"\n"):
            with open(self.path, "r+b") as f:
                f.truncate(data.rfind(b"\n") + 1)

    def replay(self) -> Iterator[dict[str, Any]]:
        if not self.path.exists():
            return
        with open(self.path, encoding="utf-8") as f:
            for line in f:
                if line.strip():
                    yield jsonsafe.loads_object(line)

    def append(self, event: dict[str, Any], *, sync: bool = False) -> None:
        self._f.write(json.dumps(event, separators=(",", ":")) + "\n")
        self._f.flush()
        if sync:
            os.fsync(self._f.fileno())
        self.events += 1

    def close(self) -> None:
        self._f.close()


class RolloutStore:
    """Where each step's records go once its batch is formed: ``<url>/step_000001.jsonl``."""

    def __init__(self, url: str) -> None:
        self.url = url.rstrip("/")
        if "://" not in self.url:
            Path(self.url).mkdir(parents=True, exist_ok=True)
            for tmp in Path(self.url).glob("step_*.jsonl.*.tmp"):  # a killed writer's
                pid = tmp.name.split(".")[-2]
                if pid.isdigit() and not Path(f"/proc/{pid}").exists():
                    tmp.unlink(missing_ok=True)

    def path(self, step: int) -> str:
        return f"{self.url}/step_{step:06d}.jsonl"

    def write_step(self, step: int, records: list[dict[str, Any]]) -> str:
        import fsspec

        path = self.path(step)
        data = "".join(json.dumps(r, separators=(",", ":")) + "\n" for r in records)
        if "://" not in self.url:  # local: atomic, so a reader never sees half a file
            tmp = f"{path}.{os.getpid()}.tmp"
            Path(tmp).write_text(data, encoding="utf-8")
            os.replace(tmp, path)
        else:
            with fsspec.open(path, "w", encoding="utf-8") as f:
                f.write(data)
        return path

    def steps(self) -> set[int]:
        """The steps written so far (one listing of the store)."""
        import fsspec

        if "://" not in self.url:
            names = [p.name for p in Path(self.url).glob("step_*.jsonl")]
        else:
            fs, root = fsspec.core.url_to_fs(self.url)
            names = [str(p).rsplit("/", 1)[-1] for p in fs.glob(f"{root}/step_*.jsonl")]
        out = set()
        for name in names:
            digits = name.removeprefix("step_").removesuffix(".jsonl")
            if digits.isdigit():
                out.add(int(digits))
        return out

    def read_step(self, step: int) -> list[dict[str, Any]]:
        import fsspec

        with fsspec.open(self.path(step), "r", encoding="utf-8") as f:
            return [jsonsafe.loads_object(line) for line in f if line.strip()]
