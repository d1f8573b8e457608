"""Finding the processes a test started (and checking none outlives it) through /proc."""

from __future__ import annotations

import os


def processes_with(*entries: str) -> list[int]:
    """Live (not zombie) processes whose environment holds every ``KEY=VALUE`` of ``entries``:
    give children a tag in their environment and every descendant carries it."""
    needles = {e.encode() for e in entries}
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/environ", "rb") as f:
                env = set(f.read().split(b"\0"))
            with open(f"/proc/{entry}/stat", "rb") as f:
                state = f.read().rsplit(b")", 1)[1].split()[0]
        except (OSError, IndexError):
            continue
        if needles <= env and state != b"Z":
            found.append(int(entry))
    return found
