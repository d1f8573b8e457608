"""A validator's checks on one rollout, cheapest first; the first that fails names the verdict.

::

    schema       sizes and ids within bounds, proof sizes as agreed, a proof of the right length
    signature    the assignment is for this run (parse_rollout checked both signatures)
    assignment   the prompt, task seed and sampling seeds are the ones the schedule fixes
    staleness    the claimed policy version is in the assignment's window and its manifest hash
                 is the one the trainer published
    -- one prefill of the claimed version's model over prompt + completion --
    toploc       the proof matches the recomputed hidden states (the model and the tokens fed)
    logprobs     the claimed behaviour log-probabilities are the model's
    termination  EOS only at the end, and where the model gave it less than eos_min_prob only
                 if the seeded draw chose it; otherwise the full token budget
    sampling     every token is the seeded Gumbel-max choice (near-ties tolerated)
    reward       the environment's score of the decoded completion

The four model checks read one prefill (the hidden states and the logits of one pass).
``check_rollouts`` computes them for everything it is given at once, on the kept state of the
beginning that the prompts of a version share (the chat template around the task,
``CheckContext.prefix_state``): short completions of all the prompts are packed one after the
other behind their prompt's own part (``inference.prefill_packed``: no padding and no separate
pass over each prompt) and the packs batched into a few passes; long ones are prefilled in
padded batches on their prompt's kept state (``inference.prefill_group``). Validating a
rollout so costs its share of a forward pass over its tokens plus the few noise blocks its
replay opens, against the T decode steps of generating it.

``eos_min_prob`` refuses an unlikely EOS only when the seeded draw did not choose it: an honest
sampler draws an EOS below 0.02 now and then (2 of 48 honest SmolLM2 rollouts of up to 128
tokens did), and refusing those would reject, then ban, honest workers; a forced EOS is not the
seeded draw, so it is still refused here, by name, before the full replay.
"""

from __future__ import annotations

import math
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from cotrain.rl import seeds as seeds_mod
from cotrain.rl.config import ProofSpec, ValidatorConfig
from cotrain.rl.env import Env, EnvError, Task
from cotrain.rl.inference import (
    PACK_MAX_FED,
    PACK_ROWS,
    Prefill,
    PromptState,
    common_prefix,
    packs_ok,
    prefill_group,
    prefill_packed,
    prompt_state,
)
from cotrain.rl.sampling import replay
from cotrain.rl.wire import MAX_TOKENS, SLOT_KEY, SignedRollout, Verdict
from cotrain.toploc.config import ProofConfig, calibrated_median_rel_err
from cotrain.toploc.errors import ProofFormatError
from cotrain.toploc.proof import chunk_bytes, n_rollout_chunks, verify_proofs

LOGPROB_MAX_FACTOR = 10.0
"""No single position's claimed log-probability may be off by more than
``exp(|d|) - 1 <= LOGPROB_MAX_FACTOR * logprob_tolerance`` (|d| <= ln 2 = 0.69 nats at the
default tolerance 0.10: no probability off by more than a factor of 2).

The median bound alone lets a forger rewrite up to half of the positions freely; this one bounds
each. Honest gaps are far below it: fp32 recomputes on other thread counts, batch shapes or a KV
cache differ by ~1e-5 nats, and even a bf16 worker against an fp32 validator (SmolLM2, 582
positions) was off by a median 0.022, p99 0.17 and at most 0.23 nats. A factor of 2 on mu is
also what the trainer's importance ratio pi/mu can absorb: its clip (eps 0.2-0.28, delta 4)
already limits the update of a sample whose ratio is that far off."""

_TASK_CACHE = 4096
_PROMPT_CACHE = 16
_PREFIX_CACHE = 4
CHECK_ROWS = 1024
"""``check_rollouts`` prefills and judges at most this many completion positions at a time (or
one rollout, when one is longer): their (T, V) logits are ~200 MB for SmolLM2, however many
rollouts it is given."""
MIN_SHARED_PREFIX = 8
"""Prompts that begin with this many tokens in common share the state of that beginning."""


@dataclass
class CheckContext:
    """What a validator knows about the run, independent of any rollout."""

    run: str
    """The run id (signed into every assignment)."""
    run_seed: int
    env: Env
    encode_prompt: Callable[[str], list[int]]
    decode: Callable[[list[int]], str]
    eos_token_id: int | None
    vocab_size: int
    model_id: str
    """For the calibrated TOPLOC threshold (``calibrated_median_rel_err``)."""
    config: ValidatorConfig
    proof: ProofSpec
    group_size: int
    batch_size: int = 8
    """Completions of one prompt prefilled together by ``check_rollouts``."""
    max_seq_len: int | None = None
    """Longest prompt + completion (None: the model's ``max_position_embeddings``)."""
    _tasks: dict[tuple[int, int], tuple[Task, list[int]]] = field(
        default_factory=dict, init=False, repr=False, compare=False
    )
    _prompts: OrderedDict[tuple[int, str, tuple[int, ...]], PromptState] = field(
        default_factory=OrderedDict, init=False, repr=False, compare=False
    )
    _seen: OrderedDict[tuple[int, str, tuple[int, ...]], None] = field(
        default_factory=OrderedDict, init=False, repr=False, compare=False
    )
    """The prompts checked lately, by model and weights (what ``prefix_state`` compares)."""
    _prefixes: OrderedDict[tuple[int, str], PromptState] = field(
        default_factory=OrderedDict, init=False, repr=False, compare=False
    )
    """The state of the beginning the prompts of a version share (the chat template around the
    task), by the model and weights it was computed with (a claim spans a few versions)."""

    def task(self, task_seed: int, level: int) -> tuple[Task, list[int]]:
        """The task of a seed and level with its encoded prompt (cached: every sample of a
        group asks for the same one)."""
        key = (task_seed, level)
        if key not in self._tasks:
            if len(self._tasks) >= _TASK_CACHE:
                self._tasks.clear()
            task = self.env.task(task_seed, level)
            self._tasks[key] = (task, list(self.encode_prompt(task.prompt)))
        return self._tasks[key]

    def prompt_state(self, model: Any, weights_sha256: str, prompt: list[int]) -> PromptState:
        """The prompt's forward pass under these weights, computed once for all the samples of
        a group even when they are checked one call at a time (the validator's loop).

        Keyed by the model object and its version's manifest hash, so weights loaded into the
        same module for another version never reuse a stale pass."""
        key = (id(model), weights_sha256, tuple(prompt))
        if key in self._prompts:
            self._prompts.move_to_end(key)
        else:
            prefix = self.prefix_state(model, weights_sha256, [prompt])
            self._prompts[key] = prompt_state(model, prompt, prefix=prefix)
            while len(self._prompts) > _PROMPT_CACHE:
                self._prompts.popitem(last=False)
        return self._prompts[key]

    def prefix_state(
        self, model: Any, weights_sha256: str, prompts: Sequence[list[int]]
    ) -> PromptState | None:
        """The kept state of the beginning every one of ``prompts`` shares with the prompts
        seen before them and with each other under these weights (None while there is none),
        and ``prompts`` counted as seen.

        Tasks of one environment differ only at the end of their chat template: the state is
        computed once per version, and a prompt's own pass then covers its task alone. It is
        what all of at least three distinct prompts share, not a beginning two tasks happen
        to share."""
        owner = (id(model), weights_sha256)
        mine = {tuple(p) for p in prompts}
        shortest = min(len(p) for p in prompts)

        def fits(st: PromptState) -> bool:
            n = len(st.prompt_ids)
            return n < shortest and all(p[:n] == st.prompt_ids for p in mine)

        state = self._prefixes.get(owner)
        if state is not None and fits(state):
            self._prefixes.move_to_end(owner)
        else:
            state = None
            known = mine | {k[2] for k in self._seen if k[:2] == owner}
            if len(known) >= 3:
                n = min(common_prefix(list(known)), shortest - 1)  # one own token at least
                if n >= MIN_SHARED_PREFIX:
                    state = prompt_state(model, list(prompts[0][:n]))
                    self._prefixes[owner] = state
                    self._prefixes.move_to_end(owner)
                    while len(self._prefixes) > _PREFIX_CACHE:
                        self._prefixes.popitem(last=False)
        for p in mine:
            self._seen[(*owner, p)] = None
            self._seen.move_to_end((*owner, p))
        while len(self._seen) > _PROMPT_CACHE:
            self._seen.popitem(last=False)
        return state


class _Reject(Exception):
    def __init__(self, check: str, reason: str) -> None:
        super().__init__(reason)
        self.check, self.reason = check, reason


def check_rollout(
    model: Any,
    signed: SignedRollout,
    ctx: CheckContext,
    *,
    expected_sha256: str | None,
    latest_version: int,
) -> Verdict:
    """Rule on one rollout. ``model`` holds the weights of the version the rollout claims;
    ``expected_sha256`` is that version's manifest hash (None: a version the trainer never
    published)."""
    return check_rollouts(
        model, [signed], ctx, expected_sha256=expected_sha256, latest_version=latest_version
    )[0]


def check_rollouts(
    model: Any,
    rollouts: Sequence[SignedRollout],
    ctx: CheckContext,
    *,
    expected_sha256: str | None,
    latest_version: int,
) -> list[Verdict]:
    """``check_rollout`` of several rollouts that claim the same version (``model``), in their
    order. Their prompts and completions are prefilled together (the prompts' shared
    beginning once, each prompt's own part once)."""
    verdicts: list[Verdict | None] = [None] * len(rollouts)
    groups: dict[tuple[int, ...], list[tuple[int, Task]]] = {}
    max_len = ctx.max_seq_len or int(getattr(model.config, "max_position_embeddings", MAX_TOKENS))
    for i, s in enumerate(rollouts):
        try:
            task = _cheap_checks(s, ctx, max_len, expected_sha256, latest_version)
        except _Reject as r:
            verdicts[i] = _verdict(s, r.check, r.reason, None, {})
            continue
        groups.setdefault(tuple(s.rollout.prompt_ids), []).append((i, task))
    # every rollout here passed staleness, so expected_sha256 names the model's weights
    sha = expected_sha256 or ""
    tasks = {i: task for members in groups.values() for i, task in members}

    def judge(fills: dict[int, Prefill], took: float) -> None:
        for i, fill in fills.items():
            verdicts[i] = _model_checks(rollouts[i], tasks[i], fill, ctx, took / len(fills))

    # Short completions of every prompt packed into a few passes with their prompts' own
    # parts, long ones in padded batches on their prompt's kept state. Judged part by part:
    # the (T, V) logits of at most CHECK_ROWS positions (or one rollout) at a time.
    packable = packs_ok(model)
    short: list[tuple[list[int], list[int]]] = []
    long: list[tuple[list[int], list[int]]] = []
    for prompt, members in groups.items():
        idx = [i for i, _ in members]
        fits = [i for i in idx if packable and _fed(rollouts[i]) <= PACK_MAX_FED]
        fits = [i for i in fits if len(prompt) + _fed(rollouts[i]) <= PACK_ROWS]
        short += [(list(prompt), part) for part in _parts(fits, rollouts)]
        packed = set(fits)
        rest = [i for i in idx if i not in packed]
        long += [(list(prompt), part) for part in _parts(rest, rollouts)]
    prefix = ctx.prefix_state(model, sha, [p for p, _ in short]) if short else None
    for unit in _units(short, rollouts):
        t0 = time.perf_counter()
        got = prefill_packed(
            model,
            [(p, [rollouts[i].rollout.completion_ids for i in ix]) for p, ix in unit],
            prefix=prefix,
        )
        fills = {
            i: f for (_, ix), fs in zip(unit, got, strict=True) for i, f in zip(ix, fs, strict=True)
        }
        judge(fills, time.perf_counter() - t0)
    for head, ix in long:
        t0 = time.perf_counter()
        state = ctx.prompt_state(model, sha, head)
        padded = prefill_group(
            model, head, [rollouts[i].rollout.completion_ids for i in ix],
            batch_size=ctx.batch_size, state=state,
        )  # fmt: skip
        judge(dict(zip(ix, padded, strict=True)), time.perf_counter() - t0)
    return [v for v in verdicts if v is not None]


def _bins(sizes: Sequence[int], limit: int) -> list[list[int]]:
    """Indices of ``sizes`` in order, in runs whose sizes add up to at most ``limit`` (an item
    larger than the limit alone)."""
    bins: list[list[int]] = []
    total = limit
    for k, n in enumerate(sizes):
        if bins and total + n <= limit:
            bins[-1].append(k)
            total += n
        else:
            bins.append([k])
            total = n
    return bins


def _parts(idx: list[int], rollouts: Sequence[SignedRollout]) -> list[list[int]]:
    """``idx`` in runs of at most ``CHECK_ROWS`` prefilled positions (one rollout at least)."""
    return [[idx[k] for k in b] for b in _bins([_fed(rollouts[i]) + 1 for i in idx], CHECK_ROWS)]


def _units(
    parts: list[tuple[list[int], list[int]]], rollouts: Sequence[SignedRollout]
) -> list[list[tuple[list[int], list[int]]]]:
    """Parts of several prompts together, at most ``CHECK_ROWS`` positions a unit."""
    sizes = [sum(_fed(rollouts[i]) + 1 for i in ix) for _, ix in parts]
    return [[parts[k] for k in b] for b in _bins(sizes, CHECK_ROWS)]


def _fed(s: SignedRollout) -> int:
    """Completion positions a prefill computes (all but the last token)."""
    return len(s.rollout.completion_ids) - 1


def _verdict(
    s: SignedRollout, check: str | None, reason: str, reward: float | None, metrics: dict
) -> Verdict:
    return Verdict(
        rollout_id=s.id,
        rollout_sha256=s.sha256,
        ok=check is None,
        check=check,
        reason=reason,
        reward=reward,
        metrics={k: float(v) for k, v in metrics.items()},
    )


def _cheap_checks(
    s: SignedRollout,
    ctx: CheckContext,
    max_len: int,
    expected_sha256: str | None,
    latest_version: int,
) -> Task:
    """schema, signature, assignment, staleness: no model needed. Returns the task."""
    r, a = s.rollout, s.assignment
    n_prompt, n_out = len(r.prompt_ids), len(r.completion_ids)
    # schema
    if n_out > a.max_new_tokens:
        raise _Reject("schema", f"{n_out} completion tokens, max_new_tokens is {a.max_new_tokens}")
    if max(max(r.prompt_ids), max(r.completion_ids)) >= ctx.vocab_size:
        raise _Reject("schema", f"token ids outside the vocabulary [0, {ctx.vocab_size})")
    if n_prompt + n_out > min(max_len, MAX_TOKENS):
        raise _Reject("schema", f"{n_prompt} + {n_out} tokens exceed {min(max_len, MAX_TOKENS)}")
    if r.proof_chunk != ctx.proof.chunk_tokens or r.proof_topk != ctx.proof.topk:
        raise _Reject(
            "schema",
            f"proof chunk/topk {r.proof_chunk}/{r.proof_topk}, the run uses "
            f"{ctx.proof.chunk_tokens}/{ctx.proof.topk}",
        )
    want = n_rollout_chunks(n_prompt, n_out, r.proof_chunk) * chunk_bytes(r.proof_topk)
    if len(r.proof_bytes) != want:
        raise _Reject("schema", f"proof of {len(r.proof_bytes)} bytes, {want} expected")
    if r.t_start_unix > r.t_end_unix:
        raise _Reject("schema", "t_start_unix is after t_end_unix")
    # signature (parse_rollout checked both signatures and the assignment's worker)
    if a.run != ctx.run:
        raise _Reject("signature", f"assignment for run {a.run!r}, not {ctx.run!r}")
    # assignment
    if a.env != ctx.env.id:
        raise _Reject("assignment", f"environment {a.env!r}, the run uses {ctx.env.id!r}")
    # an attempt samples its own task or, retrying a task none solved, an earlier attempt's;
    # a revisit's first task is an earlier step's
    scheduled = [seeds_mod.task_seed(ctx.run_seed, a.step, a.slot, t) for t in range(a.attempt + 1)]
    if a.task_from:
        m = SLOT_KEY.match(a.task_from)
        if m is None:  # Assignment.from_body checks the form; a hand-made one may not be
            raise _Reject("assignment", f"task_from {a.task_from!r} is not a slot key")
        step, slot, attempt = (int(x) for x in m.groups())
        if step >= a.step:
            raise _Reject("assignment", f"revisits {a.task_from}, not an earlier step")
        scheduled[0] = seeds_mod.task_seed(ctx.run_seed, step, slot, attempt)
    if a.task_seed not in scheduled:
        raise _Reject("assignment", "task seed is not the schedule's for this slot")
    if len(a.seeds) != ctx.group_size:
        raise _Reject("assignment", f"group of {len(a.seeds)}, the run uses {ctx.group_size}")
    if a.seeds != seeds_mod.sample_seeds(a.task_seed, ctx.run, a.slot_key, len(a.seeds)):
        raise _Reject("assignment", "sampling seeds are not the schedule's for this slot")
    try:
        task, prompt = ctx.task(a.task_seed, a.level)
    except EnvError as e:
        raise _Reject("assignment", str(e)) from None
    if a.prompt_ids != prompt:
        raise _Reject("assignment", "the assignment's prompt is not its task's")
    if r.prompt_ids != a.prompt_ids:
        raise _Reject("assignment", "the rollout's prompt is not the assignment's")
    # staleness
    if not a.min_version <= r.version <= latest_version:
        raise _Reject(
            "staleness", f"version {r.version} outside [{a.min_version}, {latest_version}]"
        )
    if expected_sha256 is None:
        raise _Reject("staleness", f"version {r.version} was never published")
    if r.manifest_sha256 != expected_sha256:
        raise _Reject("staleness", f"manifest hash is not version {r.version}'s")
    return task


def _model_checks(
    s: SignedRollout, task: Task, fill: Prefill, ctx: CheckContext, prefill_s: float
) -> Verdict:
    """toploc, logprobs, termination, sampling, reward on one prefill."""
    t0 = time.perf_counter()
    r, a = s.rollout, s.assignment
    tokens = r.completion_ids
    metrics: dict[str, float] = {"prefill_s": prefill_s, "tokens": float(len(tokens))}

    def reject(check: str, reason: str) -> Verdict:
        metrics["check_s"] = prefill_s + time.perf_counter() - t0
        return _verdict(s, check, reason, None, metrics)

    # toploc
    limit = ctx.config.max_median_rel_err or calibrated_median_rel_err(ctx.model_id)
    cfg = ProofConfig(
        chunk_tokens=ctx.proof.chunk_tokens, topk=ctx.proof.topk, max_median_rel_err=limit
    )
    if not bool(torch.isfinite(fill.hidden).all()):
        return reject("toploc", "recomputed hidden states are not finite")
    try:
        pv = verify_proofs(r.proof_bytes, fill.hidden, cfg.chunk_tokens, cfg.topk, cfg)
    except ProofFormatError as e:
        return reject("toploc", f"malformed proof: {e}")
    metrics["toploc_median_err"] = pv.median_rel_err
    if not pv.passed:
        bad = pv.failed_chunks
        if bad:
            c = pv.chunks[bad[0]]
            return reject(
                "toploc",
                f"chunk {bad[0]} (positions {bad[0] * cfg.chunk_tokens}+) differs: "
                f"{c.matches}/{cfg.topk} entries match",
            )
        return reject("toploc", f"median relative error {pv.median_rel_err:.4f} > {limit}")
    # logprobs
    temp = a.temperature
    z = fill.logits / temp if temp > 0 else fill.logits  # (T, V)
    lse = torch.logsumexp(z, dim=-1, keepdim=True)  # (T, 1): log_softmax = z - lse
    ids = torch.tensor(tokens, dtype=torch.long)
    chosen = (z.gather(1, ids[:, None]) - lse)[:, 0].double()  # (T,)
    gap = torch.expm1((torch.tensor(r.logprobs, dtype=torch.float64) - chosen).abs())  # (T,)
    lp_median, lp_max = float(np.median(gap.numpy())), float(gap.max())
    metrics["logprob_median"], metrics["logprob_max"] = lp_median, lp_max
    tol = ctx.config.logprob_tolerance
    if not lp_median <= tol:  # (NaN fails)
        return reject("logprobs", f"median exp|d|-1 of claimed logprobs {lp_median:.3g} > {tol}")
    if not lp_max <= LOGPROB_MAX_FACTOR * tol:
        worst = int(gap.nan_to_num(float("inf")).argmax())
        return reject(
            "logprobs",
            f"logprob at position {worst} off by exp|d|-1 = {lp_max:.3g} "
            f"> {LOGPROB_MAX_FACTOR * tol:.3g}",
        )
    # termination
    seed = a.seeds[r.sample]
    # the tolerance is on the logits; scores are logits / T (+ noise): below T = 1 the
    # logits' float noise grows by 1 / T
    near_tie = (
        ctx.config.sampling_tolerance / min(temp, 1.0)
        if temp > 0
        else ctx.config.sampling_tolerance
    )
    why = _termination(r.finish_reason, tokens, a.max_new_tokens, ctx, z[-1] - lse[-1], metrics)
    if why is None and not metrics.get("eos_prob", 1.0) >= ctx.config.eos_min_prob:
        # An unlikely EOS is still honest when the seeded draw chose it (one position's replay)
        last = replay(
            fill.logits[-1:], tokens[-1:], temperature=temp, seed=seed,
            tolerance=near_tie, start=len(tokens) - 1,
        )  # fmt: skip
        if not last.ok:
            why = (
                f"EOS where the model gave it p={metrics['eos_prob']:.3g} < "
                f"{ctx.config.eos_min_prob} and the seed did not draw it"
            )
    if why is not None:
        return reject("termination", why)
    # sampling
    rep = replay(fill.logits, tokens, temperature=temp, seed=seed, tolerance=near_tie)
    metrics["replay_worst_gap"] = rep.worst_gap
    metrics["replay_mismatches"] = float(rep.mismatches)
    if not rep.ok:
        return reject(
            "sampling",
            f"{rep.mismatches} tokens are not the seeded sample (first at {rep.first_mismatch}, "
            f"worst gap {rep.worst_gap:.3g})",
        )
    # reward
    reward = float(ctx.env.score(task, ctx.decode(tokens)))
    claimed = r.claimed_reward
    if claimed is not None and not abs(claimed - reward) <= ctx.config.reward_tolerance:
        return reject("reward", f"claimed reward {claimed:.4g}, the completion scores {reward:.4g}")
    metrics["check_s"] = prefill_s + time.perf_counter() - t0
    return _verdict(s, None, "ok", reward, metrics)


def _termination(
    reason: str,
    tokens: list[int],
    max_new_tokens: int,
    ctx: CheckContext,
    last_logp: torch.Tensor,
    metrics: dict[str, float],
) -> str | None:
    """Why the finish reason does not hold in the tokens, or None (the caller weighs
    ``metrics["eos_prob"]`` against ``eos_min_prob``)."""
    eos = ctx.eos_token_id
    inside = eos is not None and eos in tokens[:-1]
    if reason == "eos":
        if eos is None:
            return "finish 'eos' but the model has no EOS token"
        if tokens[-1] != eos:
            return "finish 'eos' without EOS as the last token"
        if inside:
            return "EOS before the last token"
        metrics["eos_prob"] = math.exp(float(last_logp[eos]))  # vs eos_min_prob: the caller
        return None
    if len(tokens) != max_new_tokens:
        return f"finish 'length' after {len(tokens)} of {max_new_tokens} tokens"
    if inside or (eos is not None and tokens[-1] == eos):
        return "finish 'length' with an EOS inside"
    return None
