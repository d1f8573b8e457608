"""Child processes announce themselves with one JSON line on stdout (``{"port": 5000}``)."""

from __future__ import annotations

import json
import os
import selectors
import subprocess
from typing import Any

from cotrain.core.clock import Deadline
from cotrain.netem.errors import AnnounceError


def read_json_line(process: subprocess.Popen[Any], timeout_s: float, what: str) -> dict[str, Any]:
    """Read the first stdout line of ``process`` as a JSON object within ``timeout_s``.

    Reads the raw fd byte by byte up to the newline, so nothing after it is consumed and the
    caller may go on reading ``process.stdout``. Raises ``TimeoutExpired`` naming ``what``, or
    ``AnnounceError`` when the process closes stdout first or the line is not a JSON object.
    """
    assert process.stdout is not None, "start the process with stdout=subprocess.PIPE"
    deadline = Deadline.after(timeout_s)
    fd = process.stdout.fileno()
    buf = bytearray()
    with selectors.DefaultSelector() as sel:
        sel.register(fd, selectors.EVENT_READ)
        while not buf.endswith(b"\n"):
            if not sel.select(deadline.check(what)):
                continue
            byte = os.read(fd, 1)
            if not byte:
                raise AnnounceError(
                    f"{what}: the process closed stdout (exit code {process.poll()})"
                )
            buf += byte
    try:
        value = json.loads(buf)
    except ValueError as exc:
        raise AnnounceError(f"{what}: expected a JSON line, got {bytes(buf)!r}") from exc
    if not isinstance(value, dict):
        raise AnnounceError(f"{what}: expected a JSON object, got {bytes(buf)!r}")
    return value
