"""reasoning-gym behind ``Env``: tasks rebuilt from (env, seed, level) alone, gold answers score
1 at every level, last-integer scoring, and a curriculum that raises the level."""

from __future__ import annotations

import pytest

pytest.importorskip("reasoning_gym")

from cotrain.rl.env import Curriculum, EnvError, last_integer, make_env, self_test


@pytest.mark.parametrize("name", ["chain_sum", "basic_arithmetic"])
def test_builtin_envs_pass_their_self_test(name: str) -> None:
    env = make_env(name)
    self_test(env, per_level=3)
    a, b = env.task(7, 0), env.task(7, 0)
    assert a == b and a.prompt.endswith("Reply with only the final number.")
    assert env.task(8, 0).prompt != a.prompt  # another seed, another task


def test_scoring_reads_the_last_integer() -> None:
    env = make_env("chain_sum")
    task = env.task(3, 0)
    assert env.score(task, f"Let me see: 1 + 1 = 2, so {task.answer}") == 1.0
    assert env.score(task, f"{task.answer} or maybe {int(task.answer) + 1}") == 0.0
    assert env.score(task, "no idea") == 0.0
    assert last_integer("x -12 y 7") == "7" and last_integer("none") is None


def test_a_reply_is_right_or_wrong_no_partial_credit() -> None:
    """reasoning-gym scores a reply containing the answer ``len(answer) / len(reply)``: ``-6``
    for 6 would earn 0.5, a reward for the wrong sign. Ours is 0 or 1; the dataset's
    tolerance of a ``+`` sign and leading zeros stays."""
    env = make_env("chain_sum")
    pos = next(t for t in (env.task(s, 0) for s in range(50)) if int(t.answer) > 0)
    neg = next(t for t in (env.task(s, 0) for s in range(50)) if int(t.answer) < 0)
    assert env.score(pos, f"-{pos.answer}") == 0.0
    assert env.score(pos, f"1{pos.answer}") == 0.0 and env.score(pos, pos.answer * 2) == 0.0
    assert env.score(pos, f"0{pos.answer}") == 1.0
    assert env.score(neg, neg.answer) == 1.0 and env.score(neg, neg.answer[1:]) == 0.0
    assert env.id == "chain_sum@2"  # validators must not mix it with the old scoring


def test_levels_get_harder_and_bad_input_is_one_clear_error() -> None:
    env = make_env("chain_sum")
    easy, hard = env.task(1, 0), env.task(1, env.levels - 1)
    assert len(hard.entry["metadata"]["expression"]) > len(easy.entry["metadata"]["expression"])
    with pytest.raises(EnvError, match=r"levels 0\.\."):
        env.task(1, env.levels)
    with pytest.raises(EnvError, match="no_such_env"):
        make_env("no_such_env")


def test_curriculum_raises_the_level_once_solved() -> None:
    c = Curriculum(3, threshold=0.8, window=8)
    assert c.record(0, [1.0] * 4) == 0  # not enough evidence yet
    assert c.record(0, [1.0, 1.0, 1.0, 0.0]) == 1  # 7/8 > 0.8
    assert c.record(0, [1.0] * 8) == 1  # stale rewards of the old level do not count
    assert c.record(1, [0.0] * 8) == 1
    assert c.record(1, [1.0] * 8) == 2 and c.record(2, [1.0] * 8) == 2  # the top level stays


def test_reverse_text_scores_similarity() -> None:
    env = make_env("reverse_text")
    self_test(env, per_level=3)
    task = env.task(5, 1)
    assert task == env.task(5, 1) and len(task.answer) == 5
    assert env.score(task, task.answer) == 1.0
    assert env.score(task, task.answer[::-1]) < 1.0
    assert 0.0 < env.score(task, task.answer[:3]) < 1.0
