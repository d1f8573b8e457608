"""The orchestrator's schedule: which task goes to whom, what a verdict means, when a batch is
whole. A pure state machine with no I/O and no clock of its own, so that the orchestrator can
journal every event and rebuild the same state by replaying them after a restart, and so that
the synchronous loop and an async run at level 0 form identical batches.

Steps, slots, attempts::

    trainer step n   -> B slots (one group each)
    slot j           -> attempt 0, 1, ... (a new task when a group had no signal)
    attempt a        -> issued to one worker at a time; re-issued (same task, same seeds) when
                        its deadline passes or one of its rollouts is rejected

Pacing (the async bound k, the dispatch lag d <= k): slots of step n are issued once version
n - d is published (d = 1 unless set, 0 when k = 0), and their rollouts must use a version
>= n - k, so nothing generated is ever discarded as too stale. With k = 0 step n's rollouts
all come from version n: the synchronous loop.

A slot is complete when all G samples of one attempt are accepted; if their rewards are all
equal (zero advantage) the slot moves to its next attempt, up to ``max_resample``, then is
dropped. The next attempt draws a new task when every sample solved it, and samples the same
task again with new seeds when none did (``retry_failed_tasks``: hard tasks stay in the
batches). Batches form strictly in step order once every slot of the step is complete or
dropped; the curriculum and the zero-batch counter move only then, so their effect does not
depend on the order in which rollouts arrive.

Revisits (``revisit_below``): a task that batch n's group solved but rarely is sampled again
in one of the first slots of step n + k + 1. That step is created only once version n + 1 is
published, so batch n is always formed by then and the schedule stays a function of the
events, whatever order they arrive in.
"""

from __future__ import annotations

import statistics
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from cotrain.rl import seeds
from cotrain.rl.config import RLConfig
from cotrain.rl.env import Curriculum
from cotrain.rl.wire import Assignment, Batch, Sample

STD_EPS = 1e-4
"""Added to a group's reward std before dividing by it (``run.advantage_scale = "std"``), as
TRL does: partial rewards that differ by a hair must not blow the advantages up."""


@dataclass
class Accepted:
    """An accepted sample, with the reward the orchestrator computed for it."""

    rollout_id: str
    worker: str
    prompt_ids: list[int]
    completion_ids: list[int]
    logprobs: list[float]
    reward: float
    version: int


@dataclass
class Issue:
    assignment: Assignment
    received: set[int] = field(default_factory=set)
    """Sample indices this issue's worker has submitted."""
    failed: bool = False
    """One of its rollouts was rejected: the slot is issued again."""


@dataclass(frozen=True)
class TaskRef:
    """A task: the slot key it was scheduled for, its seed and its level (a revisit samples
    an earlier group's task again)."""

    key: str
    task_seed: int
    level: int


@dataclass
class Slot:
    step: int
    index: int
    attempt: int = 0
    issues: list[Issue] = field(default_factory=list)
    accepted: dict[int, Accepted] = field(default_factory=dict)
    """Accepted samples of the current attempt, by sample index."""
    done: bool = False
    dropped: bool = False
    rewards: list[list[float]] = field(default_factory=list)
    """Rewards of each completed attempt, in order."""
    fresh: list[bool] = field(default_factory=list)
    """Per completed attempt: whether its task was drawn for it (at the step's level), not
    sampled again after a group that failed it, nor a revisit: what the curriculum counts."""
    task_attempt: int = 0
    """The attempt whose task the current attempt samples again (``retry_failed_tasks``)."""
    excluded: set[str] = field(default_factory=set)
    """Workers that had a rollout of this slot rejected: never given it again."""
    revisit: TaskRef | None = None
    """The earlier group whose task this slot's first task is (``revisit_below``)."""

    @property
    def key(self) -> str:
        return f"s{self.step}.j{self.index}.a{self.attempt}"


@dataclass
class StepState:
    step: int
    level: int
    slots: list[Slot]
    batch: Batch | None = None


class RunAborted(Exception):
    """Internal: raised by ``form_batches`` when too many batches in a row had no signal."""


class Planner:
    """Every decision of the orchestrator, replayable from its events."""

    def __init__(self, cfg: RLConfig, *, run_id: str, env_id: str, levels: int) -> None:
        self.cfg = cfg
        self.run_id = run_id
        self.env_id = env_id
        r = cfg.run
        self.k = r.async_level
        self.d = r.lag
        """Step n is dispatched once version n - d is published (d <= k)."""
        self.G, self.B = r.group_size, r.groups_per_step
        self.curriculum = Curriculum(
            levels,
            threshold=cfg.env.curriculum_threshold,
            window=cfg.env.curriculum_window,
        )
        self.curriculum.level = min(cfg.env.start_level, levels - 1)
        self.curriculum_on = cfg.env.curriculum == "on"
        self.versions: dict[int, str] = {}
        """Published policy versions -> manifest file_sha256."""
        self.servers: list[str] = []
        self.trainer_step = 0
        self.steps: dict[int, StepState] = {}
        self.next_batch = 1
        """The first step whose batch is not formed yet."""
        self.zero_batches = 0
        self.aborted: str | None = None
        self.issued = 0
        self.assignments: dict[str, Issue] = {}
        self.slot_of: dict[str, Slot] = {}
        self.revisits: dict[int, list[TaskRef]] = {}
        """Rarely solved tasks of each formed batch, by step: step n + k + 1 samples them."""
        self.strikes: Counter[str] = Counter()
        """Hard rejects per worker."""
        self.alive: Callable[[str, float], bool] = lambda worker, now: True
        """Whether ``worker`` is still heard from at ``now`` (the orchestrator's heartbeats):
        a dead worker's issue frees its slot before the deadline."""

    # ---- versions ------------------------------------------------------------------------------

    @property
    def latest_version(self) -> int:
        return max(self.versions, default=0)

    @property
    def done(self) -> bool:
        return self.latest_version > self.cfg.run.total_steps

    def apply_version(self, version: int, sha256: str, step: int, servers: list[str]) -> None:
        self.versions[version] = sha256
        self.servers = list(servers)
        self.trainer_step = max(self.trainer_step, step)

    # ---- issuing -------------------------------------------------------------------------------

    def _step(self, n: int) -> StepState:
        st = self.steps.get(n)
        if st is None:
            level = self.curriculum.level if self.curriculum_on else self.cfg.env.start_level
            st = StepState(n, level, [Slot(n, j) for j in range(self.B)])
            # batch n - d - 1 is formed: version n - d, which step n waits for, was trained on it
            for j, revisit in enumerate(self.revisits.get(n - self.d - 1, [])):
                st.slots[j].revisit = revisit
            self.steps[n] = st
        return st

    def open_steps(self) -> range:
        """Steps whose slots may be issued now: not yet batched, within the dispatch lag of the
        latest version (``run.dispatch_lag``, at most the async bound), and within the
        run."""
        last = min(self.latest_version + self.d, self.cfg.run.total_steps)
        return range(self.next_batch, last + 1)

    def plan(self, worker: str, now: float, *, prompt_of: Any) -> Assignment | None:
        """The next assignment for ``worker`` (None: nothing to do within the bound).
        ``prompt_of(task_seed, level)`` -> prompt ids (the env and the tokenizer)."""
        if self.aborted or self.latest_version == 0:
            return None
        for n in self.open_steps():
            st = self._step(n)
            for slot in st.slots:
                if slot.done or worker in slot.excluded or self._busy(slot, now):
                    continue
                return self._assignment(st, slot, worker, now, prompt_of)
        return None

    def _busy(self, slot: Slot, now: float) -> bool:
        """Whether the slot's current attempt has a live issue (not failed, not expired)."""
        for issue in slot.issues:
            a = issue.assignment
            if (
                a.attempt == slot.attempt
                and not issue.failed
                and a.deadline_unix > now
                and self.alive(a.worker, now)
            ):
                return True
        return False

    def _assignment(
        self, st: StepState, slot: Slot, worker: str, now: float, prompt_of: Any
    ) -> Assignment:
        cfg = self.cfg
        t = self._task(st, slot)
        task, level = t.task_seed, t.level
        return Assignment(
            run=self.run_id,
            id=f"{slot.key}.i{self.issued}",
            worker=worker,
            step=st.step,
            slot=slot.index,
            attempt=slot.attempt,
            env=self.env_id,
            task_seed=task,
            level=level,
            prompt_ids=prompt_of(task, level),
            seeds=seeds.sample_seeds(task, self.run_id, slot.key, self.G),
            min_version=max(1, st.step - self.k),
            temperature=cfg.sampling.temperature,
            max_new_tokens=cfg.sampling.max_new_tokens,
            issued_unix=now,
            deadline_unix=now + cfg.orchestrator.assignment_timeout_s,
            task_from=t.key if t is slot.revisit else "",
        )

    def apply_issue(self, a: Assignment) -> None:
        st = self._step(a.step)
        slot = st.slots[a.slot]
        issue = Issue(a)
        slot.issues.append(issue)
        self.assignments[a.id] = issue
        self.slot_of[a.id] = slot
        self.issued += 1

    # ---- rollouts and verdicts -----------------------------------------------------------------

    def slot_needs(self, assignment_id: str, sample: int) -> bool:
        """Whether a rollout for this issue and sample can still count (False: superseded)."""
        slot = self.slot_of.get(assignment_id)
        if slot is None:
            return False
        a = self.assignments[assignment_id].assignment
        return (
            not slot.done
            and a.attempt == slot.attempt
            # an issue from before a restart under other settings may name another task
            and a.task_seed == self._task_seed(slot)
            and sample not in slot.accepted
        )

    def _task(self, st: StepState, slot: Slot) -> TaskRef:
        """The slot's current task: its seed, its level and the slot key it was scheduled
        for (a revisit's: the original group's)."""
        if slot.revisit is not None and slot.task_attempt == 0:
            return slot.revisit
        return TaskRef(
            f"s{slot.step}.j{slot.index}.a{slot.task_attempt}",
            seeds.task_seed(self.cfg.run.seed, slot.step, slot.index, slot.task_attempt),
            st.level,
        )

    def _task_seed(self, slot: Slot) -> int:
        return self._task(self.steps[slot.step], slot).task_seed

    def apply_received(self, assignment_id: str, sample: int) -> None:
        issue = self.assignments.get(assignment_id)
        if issue is not None:
            issue.received.add(sample)

    def apply_reject(self, assignment_id: str, worker: str, *, hard: bool = True) -> None:
        """A rollout of this issue failed validation: the slot goes to someone else."""
        issue = self.assignments.get(assignment_id)
        if issue is not None:
            issue.failed = True
            slot = self.slot_of[assignment_id]
            slot.excluded.add(worker)
            limit = self.cfg.orchestrator.max_slot_rejects
            if not slot.done and limit and len(slot.excluded) >= limit:
                # every worker it reaches fails it: drop it rather than wait for a worker it
                # has not met (there may be none, and the step's batch would never form)
                slot.done = slot.dropped = True
                slot.accepted = {}
        if hard:
            self.strikes[worker] += 1

    def banned(self, worker: str) -> bool:
        limit = self.cfg.orchestrator.ban_after_rejects
        return limit > 0 and self.strikes[worker] >= limit

    def apply_accept(self, assignment_id: str, sample: int, accepted: Accepted) -> None:
        """An accepted rollout; completes its slot's attempt when it is the last one."""
        if not self.slot_needs(assignment_id, sample):
            return
        slot = self.slot_of[assignment_id]
        slot.accepted[sample] = accepted
        if len(slot.accepted) < self.G:
            return
        rewards = [slot.accepted[i].reward for i in range(self.G)]
        slot.rewards.append(rewards)
        revisiting = slot.revisit is not None and slot.task_attempt == 0
        slot.fresh.append(slot.task_attempt == slot.attempt and not revisiting)
        if max(rewards) > min(rewards):
            slot.done = True
        elif slot.attempt < self.cfg.run.max_resample:
            slot.attempt += 1  # no signal: new samples, of the same task if none solved it
            if not (self.cfg.run.retry_failed_tasks and max(rewards) <= 0.0):
                slot.task_attempt = slot.attempt
            slot.accepted = {}
        else:
            slot.done = slot.dropped = True
            slot.accepted = {}

    # ---- batches -------------------------------------------------------------------------------

    def form_batches(self) -> list[Batch]:
        """Form every batch that is whole, in step order; ``RunAborted`` after too many
        batches in a row with no signal."""
        formed = []
        while self.next_batch <= self.cfg.run.total_steps:
            st = self.steps.get(self.next_batch)
            if st is None or not all(s.done for s in st.slots):
                break
            st.batch = self._batch(st)
            formed.append(st.batch)
            self.next_batch += 1
            if st.batch.groups == 0:
                self.zero_batches += 1
                if self.zero_batches >= self.cfg.run.abort_after_zero_batches:
                    self.aborted = (
                        f"{self.zero_batches} batches in a row had no signal (every group's "
                        "samples got the same reward): check the environment's scoring, the "
                        "prompt and max_new_tokens, or lower the difficulty"
                    )
                    raise RunAborted(self.aborted)
            else:
                self.zero_batches = 0
        return formed

    def _batch(self, st: StepState) -> Batch:
        samples: list[Sample] = []
        all_rewards: list[float] = []
        # The curriculum's: the level's tasks as drawn. The retries of a task no sample solved
        # and the revisits of rare successes are chosen for being hard; counted, a level with a
        # few tasks the policy cannot solve yet (SmolLM2's negative answers: 21% of chain_sum's
        # first level) would never pass the threshold however well it solves the rest.
        level_rewards: list[float] = []
        hard: list[tuple[float, int, TaskRef]] = []  # (mean reward, slot, task): revisits
        groups = dropped = 0
        below = self.cfg.run.revisit_below
        for slot in st.slots:
            for fresh, rewards in zip(slot.fresh, slot.rewards, strict=True):
                all_rewards.extend(rewards)
                if fresh:
                    level_rewards.extend(rewards)
            if slot.dropped:
                dropped += 1
                continue
            groups += 1
            rewards = slot.rewards[-1]
            mean = sum(rewards) / self.G
            # every sample of this task in the slot: a success found after failed attempts
            # counts as rarer than one found at once
            tried = [r for rs in slot.rewards[slot.task_attempt :] for r in rs]
            rate = sum(tried) / len(tried)
            if below > 0 and rate <= below:
                hard.append((rate, slot.index, self._task(st, slot)))
            scale = 1.0
            if self.cfg.run.advantage_scale == "std":  # + eps: rewards may differ by a hair
                scale = statistics.pstdev(rewards) + STD_EPS
            for i in range(self.G):
                acc = slot.accepted[i]
                samples.append(
                    Sample(
                        rollout_id=acc.rollout_id,
                        prompt_ids=acc.prompt_ids,
                        completion_ids=acc.completion_ids,
                        logprobs=acc.logprobs,
                        advantage=(acc.reward - mean) / scale,
                        reward=acc.reward,
                        version=acc.version,
                        temperature=self.cfg.sampling.temperature,
                    )
                )
        self.revisits[st.step] = [t for _, _, t in sorted(hard)[: self.B // 2]]
        if self.curriculum_on:
            self.curriculum.record(st.level, level_rewards)
        mean_reward = sum(all_rewards) / len(all_rewards) if all_rewards else 0.0
        return Batch(st.step, samples, groups, dropped, mean_reward, self.curriculum.level)

    def batch(self, step: int) -> Batch | None:
        st = self.steps.get(step)
        return st.batch if st is not None else None

    def progress(self, step: int) -> dict[str, Any]:
        st = self.steps.get(step)
        if st is None:
            return {
                "step": step,
                "slots_done": 0,
                "slots": self.B,
                "open": step in self.open_steps(),
            }
        return {
            "step": step,
            "slots_done": sum(s.done for s in st.slots),
            "slots": self.B,
            "samples_accepted": sum(len(s.accepted) for s in st.slots if not s.done),
            "open": step in self.open_steps(),
        }
