"""The synchronous on-policy loop in one process: the reference an async run at level 0 must
equal bit for bit (a test), built from the same parts: the ``Planner`` draws the same tasks and
seeds, ``inference.generate_group`` samples, the env scores, the ``Learner`` steps.

No worker, validator or network: generate the step's groups with the current policy, score,
form the batch, train, repeat. Honest by construction, so nothing is validated.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from cotrain.rl.config import RLConfig
from cotrain.rl.env import make_env
from cotrain.rl.errors import RLError
from cotrain.rl.inference import generate_group
from cotrain.rl.learner import Learner, StepStats
from cotrain.rl.planner import Accepted, Planner
from cotrain.rl.policy import encode_prompt
from cotrain.rl.wire import Batch


def run_sync(
    cfg: RLConfig,
    model: Any,
    tokenizer: Any,
    *,
    on_step: Callable[[Batch, StepStats], None] | None = None,
) -> Learner:
    """Train ``model`` for ``cfg.run.total_steps`` synchronous steps; returns the learner."""
    if cfg.run.async_level != 0:
        raise RLError("the synchronous loop is async_level = 0")
    env = make_env(cfg.env.name)
    planner = Planner(cfg, run_id=cfg.run.id, env_id=env.id, levels=env.levels)
    learner = Learner(model, cfg.trainer)
    eos = tokenizer.eos_token_id

    def prompt_of(seed: int, level: int) -> list[int]:
        return encode_prompt(tokenizer, env.task(seed, level).prompt)

    for n in range(1, cfg.run.total_steps + 1):
        planner.apply_version(n, "0" * 64, n - 1, [])
        while planner.batch(n) is None:
            a = planner.plan("sync", 0.0, prompt_of=prompt_of)
            if a is None:
                raise RLError(f"step {n}: nothing to generate and no batch ({planner.aborted})")
            planner.apply_issue(a)
            gens = generate_group(
                model,
                a.prompt_ids,
                a.seeds,
                temperature=a.temperature,
                max_new_tokens=a.max_new_tokens,
                eos_token_id=None if eos is None else int(eos),
                batch_size=cfg.worker.batch_size,
                proof_chunk=cfg.proof.chunk_tokens,
                proof_topk=cfg.proof.topk,
            )
            task = env.task(a.task_seed, a.level)
            for i, g in enumerate(gens):
                text = str(tokenizer.decode(g.tokens, skip_special_tokens=True))
                reward = float(env.score(task, text))
                acc = Accepted(f"{a.id}/{i}", "sync", a.prompt_ids, g.tokens, g.logprobs, reward, n)
                planner.apply_accept(a.id, i, acc)
            planner.form_batches()
        batch = planner.batch(n)
        assert batch is not None
        stats = learner.step(batch)
        if on_step is not None:
            on_step(batch, stats)
    return learner
