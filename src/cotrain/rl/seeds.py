"""Every seed of a run, derived so that nobody but the orchestrator's schedule picks one.

A task is fixed by ``(run seed, step, slot, attempt)`` (an attempt that retries a task nobody
solved uses an earlier attempt's); the sampling seed of each sample of its group by
``(task seed, run, slot key, sample index)``, new at every attempt. A slot issued again (its
worker died or cheated) gets the same task and seeds, so any honest worker produces the same
completions, and the synchronous loop and an async run at level 0 draw identical batches.
Held-out tasks use seeds no run draws.
"""

from __future__ import annotations

import hashlib

DOMAIN = b"cotrain.rl.sampling/1"

HELDOUT_BASE = 1 << 52
"""Held-out task seeds are ``HELDOUT_BASE + i``; ``task_seed`` stays below it."""


def derive_seed(task_seed: int, worker_key: str, counter: int) -> int:
    """The sampling seed of one rollout: fixed by the task, the worker and its counter, so
    a worker cannot pick a favourable one (63 bits). Plain hashing: the orchestrator, which
    draws seeds, never loads torch."""
    h = hashlib.sha256(DOMAIN + f"|{task_seed}|{worker_key}|{counter}".encode()).digest()
    return int.from_bytes(h[:8], "big") >> 1


def task_seed(run_seed: int, step: int, slot: int, attempt: int) -> int:
    h = hashlib.sha256(f"cotrain.rl.task/1|{run_seed}|{step}|{slot}|{attempt}".encode()).digest()
    return int.from_bytes(h[:8], "big") % HELDOUT_BASE


JSON_SAFE = 1 << 53
"""Seeds travel in signed JSON, whose canonical form (RFC 8785) holds integers below 2^53."""


def sample_seeds(task: int, run: str, slot_key: str, group_size: int) -> list[int]:
    return [derive_seed(task, f"{run}/{slot_key}", i) % JSON_SAFE for i in range(group_size)]


def heldout_seeds(n: int) -> list[int]:
    return [HELDOUT_BASE + i for i in range(n)]
