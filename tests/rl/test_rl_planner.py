"""The orchestrator's schedule as a pure state machine: the async bound gates dispatch, slots are
re-issued with the same task after a timeout or a rejection, zero-advantage groups are
resampled then dropped, batches form in step order whatever order rollouts arrive in, and a
run with no signal aborts."""

from __future__ import annotations

import random
from typing import Any

import pytest

from cotrain.rl.config import RLConfig
from cotrain.rl.planner import Accepted, Planner, RunAborted

W1, W2 = "a" * 64, "b" * 64


def _cfg(**run: object) -> RLConfig:
    cfg = RLConfig()
    cfg.run.group_size, cfg.run.groups_per_step, cfg.run.total_steps = 2, 2, 6
    for k, v in run.items():
        setattr(cfg.run, k, v)
    cfg.env.curriculum = "off"
    return cfg


def _planner(**run: object) -> Planner:
    p = Planner(_cfg(**run), run_id="t", env_id="e@1", levels=3)
    p.apply_version(1, "0" * 64, 0, ["http://x"])
    return p


def _prompt(seed: int, level: int) -> list[int]:
    return [seed % 1000, level]


def _issue(p: Planner, worker: str = W1, now: float = 0.0):  # type: ignore[no-untyped-def]
    a = p.plan(worker, now, prompt_of=_prompt)
    if a is not None:
        p.apply_issue(a)
    return a


def _answer(p: Planner, a, rewards: list[float], version: int = 1) -> None:  # type: ignore[no-untyped-def]
    for i, r in enumerate(rewards):
        p.apply_received(a.id, i)
        p.apply_accept(a.id, i, Accepted(f"{a.id}/{i}", a.worker, [1], [2], [-0.1], r, version))


def test_async_bound_gates_dispatch() -> None:
    p = _planner(async_level=1)
    issued = [_issue(p) for _ in range(5)]
    # steps 1 and 2 are open with version 1 (1 + k); step 3 is not
    assert [a.step for a in issued if a] == [1, 1, 2, 2]
    assert issued[-1] is None
    assert {a.min_version for a in issued if a} == {1}
    p.apply_version(2, "1" * 64, 1, ["http://x"])
    p.next_batch = 2  # as if batch 1 were formed
    a = _issue(p)
    assert a is not None and a.step == 3 and a.min_version == 2


def test_dispatch_lag_sends_tasks_later_within_the_same_bound() -> None:
    p = _planner(async_level=2, dispatch_lag=1)
    issued = [_issue(p) for _ in range(5)]
    # version 1 opens steps 1 and 2 (1 + d), not 3 (1 + k); stale rollouts still count
    assert [a.step for a in issued if a] == [1, 1, 2, 2] and issued[-1] is None
    assert {a.min_version for a in issued if a} == {1}
    p.apply_version(2, "1" * 64, 1, ["http://x"])
    p.next_batch = 2
    a = _issue(p)
    assert a is not None and a.step == 3 and a.min_version == 1  # 3 - k: a slow worker's v1
    with pytest.raises(ValueError, match="dispatch_lag"):
        RLConfig.model_validate({"run": {"async_level": 1, "dispatch_lag": 2}})


def test_the_default_dispatch_lag_is_one_step_whatever_the_bound() -> None:
    for k, opened in ((1, [1, 1, 2, 2]), (2, [1, 1, 2, 2]), (4, [1, 1, 2, 2]), (0, [1, 1])):
        p = _planner(async_level=k)
        issued = [_issue(p) for _ in range(5)]
        assert [a.step for a in issued if a] == opened, k
        assert {a.min_version for a in issued if a} == {1}
        assert p.cfg.run.lag == min(k, 1)
    p = _planner(async_level=2, dispatch_lag=2)  # as early as the bound allows, if asked
    assert [a.step for a in (_issue(p) for _ in range(7)) if a] == [1, 1, 2, 2, 3, 3]


def test_synchronous_level_zero_waits_for_each_version() -> None:
    p = _planner(async_level=0)
    a1, a2 = _issue(p), _issue(p)
    assert (a1.step, a2.step) == (1, 1) and _issue(p) is None
    _answer(p, a1, [0.0, 1.0])
    _answer(p, a2, [1.0, 0.0])
    [batch] = p.form_batches()
    assert batch.step == 1 and batch.groups == 2 and len(batch.samples) == 4
    assert _issue(p) is None  # step 2 needs version 2
    p.apply_version(2, "1" * 64, 1, ["http://x"])
    a = _issue(p)
    assert a.step == 2 and a.min_version == 2


def test_expired_and_rejected_slots_are_reissued_with_the_same_task() -> None:
    p = _planner(async_level=0)
    a = _issue(p, W1, now=0.0)
    b = _issue(p, W1, now=0.0)
    assert _issue(p, W2, now=1.0) is None  # both slots live
    late = _issue(p, W2, now=1e6)  # past the deadline
    assert late.slot == a.slot and late.task_seed == a.task_seed and late.seeds == a.seeds
    assert late.id != a.id
    p.apply_reject(b.id, W1)
    again = _issue(p, W2, now=1e6 + 1)  # slot a is live with W2's issue; slot b is free
    assert again.slot == b.slot and again.seeds == b.seeds
    assert p.strikes[W1] == 1


def test_rejected_worker_never_gets_the_slot_back() -> None:
    p = _planner(async_level=0)
    p.cfg.run.groups_per_step = 1
    p.B = 1
    a = _issue(p, W1)
    p.apply_reject(a.id, W1)
    assert _issue(p, W1) is None
    assert _issue(p, W2).slot == a.slot


def test_a_slot_every_worker_fails_is_dropped_not_waited_for() -> None:
    """A slot rejected for ``max_slot_rejects`` different workers (a task honest workers all
    fail the same way, their seeds being the slot's) is dropped; the batch forms without it."""
    p = _planner(async_level=0)
    p.cfg.orchestrator.max_slot_rejects = 3
    a, b = _issue(p, W1), _issue(p, W1)
    _answer(p, b, [0.0, 1.0])
    p.apply_reject(a.id, W1)
    retry = _issue(p, "c" * 64)
    assert retry is not None and retry.slot == a.slot
    p.apply_reject(retry.id, "c" * 64)
    retry = _issue(p, "d" * 64)
    assert retry is not None and retry.slot == a.slot
    assert not p.form_batches()
    p.apply_reject(retry.id, "d" * 64)  # the third worker it failed for
    [batch] = p.form_batches()
    assert batch.groups == 1 and batch.dropped_groups == 1 and len(batch.samples) == 2
    assert _issue(p, "e" * 64) is None  # nothing of step 1 is issued again


def test_zero_advantage_groups_are_resampled_then_dropped() -> None:
    p = _planner(async_level=0, max_resample=1)
    a, b = _issue(p), _issue(p)
    _answer(p, a, [1.0, 1.0])  # no signal: attempt 1, a new task
    _answer(p, b, [0.0, 1.0])
    a2 = _issue(p)
    assert a2.slot == a.slot and a2.attempt == 1 and a2.task_seed != a.task_seed
    _answer(p, a2, [0.0, 0.0])  # no signal again: dropped
    [batch] = p.form_batches()
    assert batch.groups == 1 and batch.dropped_groups == 1
    assert batch.mean_reward == pytest.approx(3 / 6)
    assert sorted(s.advantage for s in batch.samples) == [-0.5, 0.5]


def test_a_task_none_solved_is_sampled_again_with_new_seeds() -> None:
    p = _planner(async_level=0, max_resample=3, groups_per_step=1)
    a = _issue(p)
    _answer(p, a, [0.0, 0.0])  # too hard so far: the same task, new sampling seeds
    a1 = _issue(p)
    assert (a1.attempt, a1.task_seed, a1.prompt_ids) == (1, a.task_seed, a.prompt_ids)
    assert set(a1.seeds).isdisjoint(a.seeds)
    _answer(p, a1, [1.0, 1.0])  # solved by every sample: a new task
    a2 = _issue(p)
    assert a2.attempt == 2 and a2.task_seed not in (a.task_seed, a1.task_seed)
    _answer(p, a2, [0.0, 1.0])
    [batch] = p.form_batches()
    assert batch.groups == 1 and batch.mean_reward == pytest.approx(3 / 6)
    # without retry_failed_tasks every attempt draws its own task
    q = _planner(async_level=0, max_resample=3, groups_per_step=1, retry_failed_tasks=False)
    b = _issue(q)
    _answer(q, b, [0.0, 0.0])
    assert _issue(q).task_seed != b.task_seed
    # a journal replayed under the other setting: the issue of the retried task no longer
    # counts for its slot, whose attempt 1 is now another task (a group holds one task)
    q = _planner(async_level=0, max_resample=3, groups_per_step=1, retry_failed_tasks=False)
    q.apply_issue(a)
    _answer(q, a, [0.0, 0.0])
    q.apply_issue(a1)
    assert not q.slot_needs(a1.id, 0)


def test_abort_after_batches_without_signal() -> None:
    p = _planner(async_level=2, max_resample=0, abort_after_zero_batches=2)
    for _ in range(4):
        _answer(p, _issue(p), [1.0, 1.0])
    with pytest.raises(RunAborted, match="no signal"):
        p.form_batches()
    assert p.aborted and _issue(p) is None


def test_batches_do_not_depend_on_arrival_order() -> None:
    def run(order_seed: int) -> list[tuple[str, float]]:
        p = _planner(async_level=2, dispatch_lag=2, total_steps=3)
        issued = [_issue(p) for _ in range(6)]
        rewards = {a.id: [float(a.slot), float(a.step % 2)] for a in issued}
        random.Random(order_seed).shuffle(issued)
        for a in issued:
            _answer(p, a, rewards[a.id])
        return [(s.rollout_id, s.advantage) for b in p.form_batches() for s in b.samples]

    assert run(0) == run(1) == run(2)


@pytest.mark.parametrize("scale", ["none", "std"])
def test_advantages_are_centred_and_optionally_scaled_by_the_groups_std(scale: str) -> None:
    """G = 4: one success in four (a hard task solved once) and an even split. Centred only,
    the success gets 0.75 and the even split +-0.5; divided by the group's std (0.433 and
    0.5), sqrt(3) = 1.732 and +-1."""
    p = _planner(async_level=0, group_size=4, advantage_scale=scale)
    a, b = _issue(p), _issue(p)
    _answer(p, a, [0.0, 1.0, 0.0, 0.0])
    _answer(p, b, [1.0, 0.0, 1.0, 0.0])
    [batch] = p.form_batches()
    adv = {s.rollout_id: s.advantage for s in batch.samples}
    one = [adv[f"{a.id}/{i}"] for i in range(4)]
    even = [adv[f"{b.id}/{i}"] for i in range(4)]
    if scale == "none":
        assert one == pytest.approx([-0.25, 0.75, -0.25, -0.25])
        assert even == pytest.approx([0.5, -0.5, 0.5, -0.5])
    else:
        s = 3**0.5
        assert one == pytest.approx([-1 / s, s, -1 / s, -1 / s], rel=1e-3)
        assert even == pytest.approx([1.0, -1.0, 1.0, -1.0], rel=1e-3)
    assert sum(one) == pytest.approx(0.0) and sum(even) == pytest.approx(0.0)


def test_a_rarely_solved_task_is_revisited_k_plus_one_steps_later() -> None:
    """G = 4, k = 1, revisit_below = 0.25: step 1's slot 0 solves its task once in four (at
    the threshold), slot 1 twice. Step 3 (created once version 2, trained on batch 1, is out)
    samples slot 0's task again in its first slot, with new seeds and the original's key; a
    revisit that fails is retried on the same task, and one still solved rarely is revisited
    again under the original's key."""
    p = _planner(async_level=1, group_size=4, revisit_below=0.25)
    issued = [_issue(p) for _ in range(4)]
    assert [(a.step, a.slot) for a in issued] == [(1, 0), (1, 1), (2, 0), (2, 1)]
    assert all(a.task_from == "" for a in issued)  # batch 0 does not exist: no revisits
    s10, s11, s20, s21 = issued
    _answer(p, s10, [0.0, 1.0, 0.0, 0.0])
    _answer(p, s11, [1.0, 0.0, 1.0, 0.0])
    [b1] = p.form_batches()
    assert b1.step == 1
    p.apply_version(2, "1" * 64, 1, ["http://x"])
    r, fresh = _issue(p), _issue(p)
    assert (r.step, r.slot, fresh.step, fresh.slot) == (3, 0, 3, 1)
    assert (r.task_seed, r.level, r.prompt_ids, r.task_from) == (
        s10.task_seed,
        s10.level,
        s10.prompt_ids,
        "s1.j0.a0",
    )
    assert set(r.seeds).isdisjoint(s10.seeds)
    assert fresh.task_from == "" and fresh.task_seed not in (s10.task_seed, s11.task_seed)
    _answer(p, r, [0.0, 0.0, 0.0, 0.0])  # none solved it: the same task again
    r1 = _issue(p)
    assert (r1.step, r1.slot, r1.attempt) == (3, 0, 1)
    assert (r1.task_seed, r1.task_from) == (s10.task_seed, "s1.j0.a0")
    _answer(p, r1, [0.0, 0.0, 1.0, 0.0])
    _answer(p, fresh, [1.0, 1.0, 1.0, 0.0])
    for a in (s20, s21):
        _answer(p, a, [1.0, 1.0, 0.0, 0.0])
    assert [b.step for b in p.form_batches()] == [2, 3]
    assert [t.key for t in p.revisits[3]] == ["s1.j0.a0"]  # the chain keeps the original
    assert p.revisits[2] == []


def test_the_rarest_successes_are_revisited_in_at_most_half_the_slots() -> None:
    """Default threshold 0.1, G = 4: a task solved once in its first four samples (0.25) is
    not revisited; one solved once after two (1/12) or three (1/16) failed attempts is, rarest
    first, in at most half of the next step's slots."""

    def revisited(**run: object) -> list[str]:
        p = _planner(async_level=0, group_size=4, groups_per_step=4, max_resample=3, **run)
        a = [_issue(p) for _ in range(4)]
        _answer(p, a[0], [1.0, 0.0, 0.0, 0.0])
        for k, fails in [(1, 2), (2, 3), (3, 2)]:
            for _ in range(fails):
                _answer(p, a[k], [0.0] * 4)
                a[k] = _issue(p)
            _answer(p, a[k], [1.0, 0.0, 0.0, 0.0])
        [batch] = p.form_batches()
        assert batch.groups == 4
        p.apply_version(2, "1" * 64, 1, ["http://x"])
        return [_issue(p).task_from for _ in range(4)]

    assert revisited() == ["s1.j2.a0", "s1.j1.a0", "", ""]  # s1.j3 (1/12) is over the cap
    assert revisited(revisit_below=0.0) == ["", "", "", ""]


def test_a_replayed_journal_schedules_the_same_revisits() -> None:
    """A restarted orchestrator replays issues and verdicts: the revisits it schedules, and
    so the next assignments, are the ones the first one would have made."""
    log: list[tuple[str, Any]] = []

    def issue(p: Planner) -> Any:
        a = _issue(p)
        log.append(("issue", a))
        return a

    def answer(p: Planner, a: Any, rewards: list[float]) -> None:
        log.append(("answer", (a, rewards)))
        _answer(p, a, rewards)

    p = _planner(async_level=0, group_size=4, max_resample=3)
    a, b = issue(p), issue(p)
    for _ in range(2):
        answer(p, a, [0.0] * 4)
        a = issue(p)
    answer(p, a, [0.0, 0.0, 1.0, 0.0])  # 1 in 12: revisited at step 2
    answer(p, b, [1.0, 1.0, 0.0, 0.0])
    p.form_batches()
    p.apply_version(2, "1" * 64, 1, ["http://x"])
    first = issue(p)
    assert first.task_from == "s1.j0.a0"

    q = _planner(async_level=0, group_size=4, max_resample=3)
    for kind, ev in log[:-1]:
        if kind == "issue":
            q.apply_issue(ev)
        else:
            _answer(q, *ev)
        q.form_batches()
    q.apply_version(2, "1" * 64, 1, ["http://x"])
    again = q.plan(W1, 0.0, prompt_of=_prompt)
    assert again is not None
    assert (again.task_seed, again.task_from, again.seeds) == (
        first.task_seed,
        first.task_from,
        first.seeds,
    )


def test_the_curriculum_counts_each_task_as_drawn_not_its_retries() -> None:
    """One task solved 3 times in 4, one no sample solves until its third group: the level's
    tasks as drawn pass 3 of 8 (over a 0.3 threshold: the level goes up). Counting the
    retries, chosen for being hard, would give 4 of 16 and keep the level down."""
    cfg = _cfg(async_level=0, group_size=4, max_resample=2)
    cfg.env.curriculum, cfg.env.curriculum_threshold, cfg.env.curriculum_window = "on", 0.3, 8
    p = Planner(cfg, run_id="t", env_id="e@1", levels=3)
    p.apply_version(1, "0" * 64, 0, ["http://x"])
    a, b = _issue(p), _issue(p)
    _answer(p, a, [1.0, 1.0, 1.0, 0.0])
    for rewards in ([0.0] * 4, [0.0] * 4):
        _answer(p, b, rewards)
        b = _issue(p)
    _answer(p, b, [1.0, 0.0, 0.0, 0.0])
    [batch] = p.form_batches()
    assert batch.mean_reward == pytest.approx(4 / 16)  # what the batch reports: every group
    assert batch.level == 1 and p.curriculum.level == 1
