"""Environments: where tasks come from and how replies are scored.

An ``Env`` makes the task of a seed at a difficulty level (the orchestrator draws the seeds, so
a worker cannot pick its tasks) and scores a reply to it. ``ReasoningGymEnv`` adapts a
``reasoning-gym`` dataset (``pip install -e '.[rl]'``): the task of seed s is item 0 of the
dataset built with seed s and the level's parameters, so anyone can rebuild it from
``(env id, seed, level)`` alone, which is what a validator does to check an assignment.
``Curriculum`` raises the level once the recent pass rate exceeds a threshold (a policy that
solves everything gives zero-advantage groups, no signal). ``self_test`` checks that gold
answers score 1 at every level before a run starts.
"""

from __future__ import annotations

import re
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Protocol

from cotrain.core.errors import UsageError

_INT = re.compile(r"-?\d+")

SUFFIX = "Reply with only the final number."
"""Appended to numeric questions (the probe's prompt: research/rl.md 4.1)."""


class EnvError(UsageError):
    """An environment is unknown, not installed, or fails its self-test."""


@dataclass(frozen=True)
class Task:
    env: str
    """``name@version`` of the environment."""
    seed: int
    level: int
    prompt: str
    answer: str
    """The gold answer."""
    entry: dict[str, Any] = field(repr=False)
    """The dataset's item (JSON values), for scoring."""


class Env(Protocol):
    @property
    def id(self) -> str: ...

    @property
    def levels(self) -> int: ...

    def task(self, seed: int, level: int = 0) -> Task: ...

    def score(self, task: Task, reply: str) -> float: ...


def last_integer(reply: str) -> str | None:
    """The last integer in ``reply`` (the probe's scoring: 0.31 against 0.25 for the first)."""
    found = _INT.findall(reply)
    return found[-1] if found else None


# difficulty levels of the built-in environments, easiest first
LEVELS: dict[str, list[dict[str, Any]]] = {
    "chain_sum": [
        {"min_terms": 2, "max_terms": 2, "min_digits": 1, "max_digits": 1},
        {"min_terms": 2, "max_terms": 3, "min_digits": 1, "max_digits": 1},
        {"min_terms": 2, "max_terms": 2, "min_digits": 1, "max_digits": 2},
        {"min_terms": 3, "max_terms": 3, "min_digits": 1, "max_digits": 2},
        {"min_terms": 3, "max_terms": 4, "min_digits": 2, "max_digits": 2},
    ],
    "basic_arithmetic": [
        {"min_terms": 2, "max_terms": 2, "min_digits": 1, "max_digits": 1},
        {"min_terms": 2, "max_terms": 3, "min_digits": 1, "max_digits": 1},
        {"min_terms": 2, "max_terms": 3, "min_digits": 1, "max_digits": 2},
    ],
}


class ReasoningGymEnv:
    """A ``reasoning-gym`` dataset behind ``Env``. A reply is scored on its last integer, and
    it is right (1) or wrong (0): the dataset's scorer decides which (it tolerates a sign,
    leading zeros, commas), but its partial credit for a reply that contains the answer is
    dropped, which would score ``-6`` for ``6`` (or ``16`` for ``6``) 0.5 and so reward the
    wrong sign. Version 2: version 1 passed that partial credit through."""

    version = 2

    def __init__(self, name: str, levels: list[dict[str, Any]] | None = None) -> None:
        try:
            import reasoning_gym
        except ImportError:
            raise EnvError("reasoning-gym is not installed: pip install -e '.[rl]'") from None
        self._rg = reasoning_gym
        self.name = name
        self._levels = levels if levels is not None else LEVELS.get(name, [{}])
        self.id = f"{name}@{self.version}"
        try:
            self._dataset(0, 0)
        except Exception as e:  # reasoning-gym raises many types for an unknown name
            raise EnvError(f"environment {name!r}: {e}") from None

    @property
    def levels(self) -> int:
        return len(self._levels)

    def _dataset(self, seed: int, level: int) -> Any:
        if not 0 <= level < len(self._levels):
            raise EnvError(f"{self.id} has levels 0..{len(self._levels) - 1}, not {level}")
        return self._rg.create_dataset(self.name, size=1, seed=seed, **self._levels[level])

    def task(self, seed: int, level: int = 0) -> Task:
        ds = self._dataset(seed, level)
        entry = ds[0]
        prompt = f"{entry['question']}\n{SUFFIX}"
        return Task(self.id, seed, level, prompt, str(entry["answer"]), dict(entry))

    def score(self, task: Task, reply: str) -> float:
        guess = last_integer(reply)
        if guess is None:
            return 0.0
        ds = self._dataset(task.seed, task.level)
        return 1.0 if float(ds.score_answer(guess, task.entry)) == 1.0 else 0.0


class ReverseTextEnv:
    """Reverse a short string of letters (PRIME-RL's debug task). The reward is the similarity
    of the reply to the reversed text (``difflib`` ratio, in [0, 1]), so even a random policy
    gets rewards that differ within a group: a signal for small models and fast tests. Needs
    nothing installed."""

    id = "reverse_text@1"
    LENGTHS = (3, 5, 8)

    @property
    def levels(self) -> int:
        return len(self.LENGTHS)

    def task(self, seed: int, level: int = 0) -> Task:
        import random

        if not 0 <= level < len(self.LENGTHS):
            raise EnvError(f"{self.id} has levels 0..{len(self.LENGTHS) - 1}, not {level}")
        rng = random.Random(f"{self.id}|{seed}|{level}")
        text = "".join(rng.choice("abcdefghij") for _ in range(self.LENGTHS[level]))
        prompt = f"Reverse the text {text!r}. Reply with only the reversed text."
        return Task(self.id, seed, level, prompt, text[::-1], {"text": text})

    def score(self, task: Task, reply: str) -> float:
        import difflib

        guess = reply.strip().strip("'\"")
        return round(difflib.SequenceMatcher(None, guess, task.answer).ratio(), 6)


def make_env(name: str) -> Env:
    """A built-in environment by name (``chain_sum``, ``basic_arithmetic``, ``reverse_text``)
    or any reasoning-gym dataset name (one level, its defaults)."""
    if name == "reverse_text":
        return ReverseTextEnv()
    return ReasoningGymEnv(name)


def self_test(env: Env, *, per_level: int = 5) -> None:
    """Gold answers must score 1 at every level (a broken adapter would train on noise)."""
    for level in range(env.levels):
        for seed in range(per_level):
            task = env.task(seed, level)
            got = env.score(task, task.answer)
            if got != 1.0:
                raise EnvError(
                    f"{env.id} level {level} seed {seed}: the gold answer {task.answer!r} "
                    f"scores {got}, not 1"
                )


class Curriculum:
    """The level to draw tasks at: up one once the pass rate of the last ``window`` rewards
    at the current level exceeds ``threshold``."""

    def __init__(self, levels: int, *, threshold: float = 0.8, window: int = 64) -> None:
        if levels < 1 or not 0 < threshold <= 1 or window < 1:
            raise UsageError("curriculum: levels >= 1, 0 < threshold <= 1, window >= 1")
        self.levels, self.threshold = levels, threshold
        self.level = 0
        self._recent: deque[float] = deque(maxlen=window)

    def record(self, level: int, rewards: list[float]) -> int:
        """Count rewards of tasks drawn at ``level``; returns the (maybe raised) level."""
        if level != self.level:
            return self.level  # stale: drawn before the last raise
        self._recent.extend(rewards)
        full = len(self._recent) == self._recent.maxlen
        solved = full and sum(self._recent) / len(self._recent) > self.threshold
        if solved and self.level + 1 < self.levels:
            self.level += 1
            self._recent.clear()
        return self.level
