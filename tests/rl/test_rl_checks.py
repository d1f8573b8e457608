"""The validator's checks on real signed rollouts: honest ones pass at any batch size and thread
count, every cheat of ``rl.cheats`` is rejected by the check aimed at it, and forged envelope
fields (reward, prompt, seeds, version, manifest) are rejected by name."""

from __future__ import annotations

import base64
import dataclasses
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest
import torch
from hf_harness import small_hf_model, write_text

from cotrain.core.identity import Identity
from cotrain.core.signed import Envelope
from cotrain.rl import cheats, checks, seeds, wire
from cotrain.rl.checks import CheckContext, check_rollout, check_rollouts
from cotrain.rl.config import ProofSpec, ValidatorConfig
from cotrain.rl.env import make_env
from cotrain.rl.inference import Generated, generate_group
from cotrain.rl.policy import encode_prompt

pytest.importorskip("transformers")
pytest.importorskip("reasoning_gym")

RUN = "rl-test"
RUN_SEED = 7
G = 8
MAX_NEW = 12
TEMPERATURE = 1.0
PROOF = ProofSpec(chunk_tokens=8, topk=32)
SHA = "ab" * 32
VERSION, LATEST = 3, 4


def trained_like(model: Any, eos: int) -> Any:
    """Make the untrained tiny model look trained where the checks can tell.

    Untrained, it is nearly uniform over its vocabulary (two models' samples coincide, EOS has
    p ~ 1/V) and its weights are Gaussian (int8 rounds them below bf16's resolution, so TOPLOC
    could not see it). Trained models have spread logits and outlier weights: scale the head,
    give EOS a steady p ~ 0.03-0.09 at every position (a bias: completions end early, and
    honest EOS draws stay above ``eos_min_prob``), and put one 10-sigma weight in every row."""
    gen = torch.Generator().manual_seed(0)
    head = model.lm_head
    lin = torch.nn.Linear(head.in_features, head.out_features, bias=True)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 2 and not name.startswith("lm_head"):
                col = torch.randint(0, p.size(1), (p.size(0),), generator=gen)
                sign = torch.randint(0, 2, (p.size(0),), generator=gen) * 2 - 1
                p[torch.arange(p.size(0)), col] = 10.0 * float(p.std()) * sign
        lin.weight.copy_(head.weight * 15.0)
        lin.weight[eos] = 0.0
        lin.bias.zero_()
        lin.bias[eos] = 4.8
    model.lm_head = lin
    return model


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    """One torch thread unless a test sets another: 2 shared cores, steadier timings."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@dataclass
class World:
    model: Any
    tokenizer: Any
    ctx: CheckContext
    orchestrator: Identity
    worker: Identity


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> World:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tmp = tmp_path_factory.mktemp("rlchecks")
    path = small_hf_model(tmp / "m", write_text(tmp / "text.txt"))
    tok = AutoTokenizer.from_pretrained(path)
    model = trained_like(AutoModelForCausalLM.from_pretrained(path).eval(), tok.eos_token_id)
    ctx = CheckContext(
        run=RUN,
        run_seed=RUN_SEED,
        env=make_env("chain_sum"),
        encode_prompt=lambda text: encode_prompt(tok, text),
        decode=lambda ids: str(tok.decode(ids, skip_special_tokens=True)),
        eos_token_id=tok.eos_token_id,
        vocab_size=model.config.vocab_size,
        model_id="tiny-llama",
        # the tiny model's honest recomputes are bit-exact in bf16 (median 0); int8 weights
        # move its median to ~0.004 (the calibration of the 2-layer "gpt-debug" model)
        config=ValidatorConfig(max_median_rel_err=0.0025),
        proof=PROOF,
        group_size=G,
    )
    return World(model, tok, ctx, Identity.generate(), Identity.generate())


def assign(w: World, step: int, slot: int, **override: Any) -> Envelope:
    """The orchestrator's signed assignment of a slot (``override``: forged fields)."""
    task_seed = seeds.task_seed(RUN_SEED, step, slot, 0)
    task = w.ctx.env.task(task_seed, 0)
    body = wire.Assignment(
        run=RUN,
        id=f"s{step}.j{slot}.a0.i0",
        worker=w.worker.public_hex,
        step=step,
        slot=slot,
        attempt=0,
        env=w.ctx.env.id,
        task_seed=task_seed,
        level=0,
        prompt_ids=w.ctx.encode_prompt(task.prompt),
        seeds=seeds.sample_seeds(task_seed, RUN, f"s{step}.j{slot}.a0", G),
        min_version=VERSION - 1,
        temperature=TEMPERATURE,
        max_new_tokens=MAX_NEW,
        issued_unix=1000.0,
        deadline_unix=2000.0,
    ).to_body()
    body.update(override)
    return Envelope.seal(w.orchestrator, wire.ASSIGNMENT, body)


def submit(
    w: World, a_env: Envelope, sample: int, g: Generated, **override: Any
) -> wire.SignedRollout:
    """The worker's signed rollout of one sample, parsed as a validator receives it."""
    body = wire.Rollout(
        assignment=a_env.to_json(),
        sample=sample,
        version=VERSION,
        manifest_sha256=SHA,
        prompt_ids=list(a_env.body["prompt_ids"]),
        completion_ids=g.tokens,
        logprobs=g.logprobs,
        finish_reason=g.finish_reason,
        proof=base64.b64encode(g.proof).decode(),
        proof_chunk=PROOF.chunk_tokens,
        proof_topk=PROOF.topk,
        claimed_reward=None,
        t_start_unix=1001.0,
        t_end_unix=1002.0,
        nonce="0123456789abcdef",
    ).to_body()
    body.update(override)
    env = Envelope.seal(w.worker, wire.ROLLOUT, body)
    return wire.parse_rollout(env.to_json(), orchestrator=w.orchestrator.public_hex)


def generate(w: World, a_env: Envelope, batch_size: int = 8) -> list[Generated]:
    return generate_group(
        w.model,
        a_env.body["prompt_ids"],
        a_env.body["seeds"],
        temperature=TEMPERATURE,
        max_new_tokens=MAX_NEW,
        eos_token_id=w.tokenizer.eos_token_id,
        batch_size=batch_size,
        proof_chunk=PROOF.chunk_tokens,
        proof_topk=PROOF.topk,
    )


def check(w: World, s: wire.SignedRollout, **kw: Any) -> wire.Verdict:
    args: dict[str, Any] = {"expected_sha256": SHA, "latest_version": LATEST, **kw}
    return check_rollout(w.model, s, w.ctx, **args)


def cheat_context(
    w: World,
    a_env: Envelope,
    *,
    temperature: float = TEMPERATURE,
    batch_size: int = 4,
    **kw: Any,
) -> cheats.CheatContext:
    """What a cheating worker has for the assignment ``a_env``."""
    return cheats.CheatContext(
        model=w.model,
        prompt_ids=a_env.body["prompt_ids"],
        seeds=a_env.body["seeds"],
        temperature=temperature,
        max_new_tokens=MAX_NEW,
        eos_token_id=w.tokenizer.eos_token_id,
        batch_size=batch_size,
        proof_chunk=PROOF.chunk_tokens,
        proof_topk=PROOF.topk,
        **kw,
    )


class threads:
    """Run a block at a torch thread count."""

    def __init__(self, n: int) -> None:
        self.n, self.before = n, torch.get_num_threads()

    def __enter__(self) -> None:
        torch.set_num_threads(self.n)

    def __exit__(self, *exc: object) -> None:
        torch.set_num_threads(self.before)


# ---- honest rollouts -------------------------------------------------------------------------


@pytest.mark.parametrize(("batch_size", "worker_threads"), [(1, 1), (3, 2), (8, 1), (8, 2)])
def test_honest_rollouts_pass(world: World, batch_size: int, worker_threads: int) -> None:
    """4 groups of 8 per case (128 rollouts over the cases): the worker at one thread count,
    the validator at the other, one rollout at a time and a group at once."""
    verdicts = []
    finishes = set()
    for slot in range(4):
        a_env = assign(world, 1, slot + 10 * batch_size)
        with threads(worker_threads):
            group = generate(world, a_env, batch_size)
        subs = [submit(world, a_env, i, g) for i, g in enumerate(group)]
        finishes |= {g.finish_reason for g in group}
        with threads(3 - worker_threads):
            if slot % 2:
                verdicts += check_rollouts(
                    world.model, subs, world.ctx, expected_sha256=SHA, latest_version=LATEST
                )
            else:
                verdicts += [check(world, s) for s in subs]
    bad = [(v.rollout_id, v.check, v.reason) for v in verdicts if not v.ok]
    assert not bad, bad
    assert len(verdicts) == 4 * G and finishes == {"eos", "length"}
    # the later groups' prompts ran on the state of the beginning they share
    [(owner, head)] = world.ctx._prefixes.items()
    assert owner == (id(world.model), SHA) and len(head.prompt_ids) >= 8
    # other weights never run on it
    other = world.ctx.prefix_state(world.model, "ff" * 32, [[*head.prompt_ids, 1]])
    assert other is None
    for v in verdicts:
        assert v.reward in (0.0, 1.0)
        assert v.metrics["replay_worst_gap"] < 1e-3 and v.metrics["logprob_max"] < 1e-3
        assert wire.Verdict.from_body(v.to_body()) == v  # a verdict is valid on the wire


def test_several_groups_at_once_packed_padded_and_in_parts(
    world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    """What a validator claims at once: three groups in one call, judged a few positions at
    a time, short completions packed and long ones padded, in the order given, with a cheat
    among them still caught."""
    monkeypatch.setattr(checks, "CHECK_ROWS", 20)
    monkeypatch.setattr(checks, "PACK_MAX_FED", 5)
    subs = []
    for slot in range(3):
        a_env = assign(world, 2, 40 + slot)
        subs += [submit(world, a_env, i, g) for i, g in enumerate(generate(world, a_env))]
    assert {len(s.rollout.completion_ids) > 6 for s in subs} == {True, False}
    a_env = assign(world, 2, 43)
    bad = generate(world, a_env)[0]
    forged = [x + 0.5 for x in bad.logprobs]
    subs.insert(5, submit(world, a_env, 0, bad, logprobs=forged))
    verdicts = check_rollouts(
        world.model, subs, world.ctx, expected_sha256=SHA, latest_version=LATEST
    )
    assert [v.rollout_id for v in verdicts] == [s.id for s in subs]
    assert verdicts[5].check == "logprobs"
    bad_ones = [(v.check, v.reason) for k, v in enumerate(verdicts) if k != 5 and not v.ok]
    assert not bad_ones, bad_ones


def test_a_retried_task_passes_with_its_new_seeds(world: World) -> None:
    """Attempt 2 of a slot samples attempt 0's task again (nobody solved it) with the seeds of
    attempt 2: the schedule allows it."""
    task_seed = seeds.task_seed(RUN_SEED, 3, 1, 0)
    a_env = assign(
        world, 3, 1, id="s3.j1.a2.i5", attempt=2,
        seeds=seeds.sample_seeds(task_seed, RUN, "s3.j1.a2", G),
    )  # fmt: skip
    group = generate(world, a_env)
    verdicts = [check(world, submit(world, a_env, i, g)) for i, g in enumerate(group[:2])]
    assert all(v.ok for v in verdicts), verdicts


def test_a_correct_answer_is_rewarded_and_a_forged_reward_is_not(world: World) -> None:
    a_env = assign(world, 2, 0)
    group = generate(world, a_env)
    honest = check(world, submit(world, a_env, 0, group[0]))
    assert honest.ok and honest.reward == 0.0  # a tiny model does not add
    forged = check(world, submit(world, a_env, 0, group[0], claimed_reward=1.0))
    assert not forged.ok and forged.check == "reward" and forged.reward is None
    claimed = check(world, submit(world, a_env, 0, group[0], claimed_reward=0.0))
    assert claimed.ok and claimed.reward == 0.0


def test_a_batch_of_two_groups_with_forgeries_keeps_its_order(world: World) -> None:
    a1, a2 = assign(world, 2, 1), assign(world, 2, 2)
    g1, g2 = generate(world, a1), generate(world, a2)
    subs = [
        submit(world, a1, 0, g1[0]),
        submit(world, a2, 0, g2[0], version=LATEST + 1),
        submit(world, a2, 1, g2[1]),
        submit(world, a1, 1, g1[1], claimed_reward=1.0),
        submit(world, a1, 2, g2[2]),  # another group's completion under this assignment
    ]
    got = check_rollouts(world.model, subs, world.ctx, expected_sha256=SHA, latest_version=LATEST)
    assert [v.rollout_id for v in got] == [s.id for s in subs]
    assert [v.check for v in got[:4]] == [None, "staleness", None, "reward"]
    assert got[4].check in ("toploc", "logprobs", "sampling", "schema")


@pytest.mark.parametrize("temperature", [0.5, 0.25])
def test_below_temperature_one_honest_passes_and_greedy_does_not(
    world: World, temperature: float
) -> None:
    """Scores are logits / T + noise, so below T = 1 the logits' float noise grows by 1 / T and
    the near-tie tolerance with it: honest groups (worker at 2 threads, validator at 1) pass,
    and the greedy choice, at most positions far from the seeded draw, is still refused."""
    verdicts, greedy = [], []
    for slot in range(2):
        a_env = assign(world, 4, slot + int(100 * temperature), temperature=temperature)
        cctx = cheat_context(world, a_env, temperature=temperature, batch_size=8)
        with threads(2):
            group = cctx.generate()
        verdicts += [check(world, submit(world, a_env, i, g)) for i, g in enumerate(group)]
        cheat = cheats.cheat_group("greedy", cctx)
        same = cheats.coincides_with_honest(cctx, cheat)
        for i, g in enumerate(cheat):
            if not same[i]:
                greedy.append(check(world, submit(world, a_env, i, g)))
    bad = [(v.rollout_id, v.check, v.reason) for v in verdicts if not v.ok]
    assert not bad, bad
    assert len(greedy) >= G  # most greedy samples differ from the seeded ones
    assert all(not v.ok and v.check == "sampling" for v in greedy), greedy


# ---- cheats ----------------------------------------------------------------------------------

EXPECTED = {
    "other_model": {"sampling"},
    "by_hand": {"termination", "sampling"},
    "swap_last": {"sampling", "termination"},
    "truncate": {"termination"},
    "early_eos": {"termination", "sampling"},
    "smaller_model": {"toploc"},
    "quantized": {"toploc"},
    "other_prompt": {"toploc"},
    "forge_logprobs": {"logprobs"},
    "greedy": {"sampling"},
    "best_of_n": {"sampling"},
}


def test_every_cheat_has_an_expected_check() -> None:
    assert set(EXPECTED) == set(cheats.CHEATS)
    with pytest.raises(ValueError, match="unknown cheat"):
        cheats.cheat_group("nope", None)  # type: ignore[arg-type]


@pytest.mark.parametrize("name", cheats.CHEATS)
def test_every_cheat_is_rejected(world: World, name: str) -> None:
    """3 groups of 8 per cheat; a submission that coincides with the honest sample is the
    honest rollout and must pass instead (rare; at most a few per cheat)."""
    rejected, coincided = [], 0
    for slot in range(3):
        a_env = assign(world, 3, slot)
        task = world.ctx.env.task(a_env.body["task_seed"], 0)
        other = assign(world, 3, slot + 100).body["prompt_ids"]
        cctx = cheat_context(
            world,
            a_env,
            answer_ids=world.tokenizer(task.answer)["input_ids"],
            other_prompt_ids=other,
        )
        group = cheats.cheat_group(name, cctx)
        assert len(group) == G
        same = cheats.coincides_with_honest(cctx, group)
        for i, g in enumerate(group):
            assert len(g.logprobs) == len(g.tokens) <= MAX_NEW
            v = check(world, submit(world, a_env, i, g))
            if same[i]:
                coincided += 1
                assert v.ok or v.check in EXPECTED[name], (name, v)
            else:
                rejected.append(v)
    assert coincided <= 2, coincided
    wrong = [(v.rollout_id, v.check, v.reason) for v in rejected if v.check not in EXPECTED[name]]
    assert not wrong, wrong
    assert all(not v.ok and v.reward is None for v in rejected)


# ---- forged envelope fields ------------------------------------------------------------------


@pytest.fixture(scope="module")
def honest_one(world: World) -> tuple[Envelope, Generated]:
    a_env = assign(world, 4, 0)
    return a_env, generate(world, a_env)[0]


@pytest.mark.parametrize(
    ("what", "expected"),
    [
        ("rollout_prompt", "assignment"),
        ("assignment_prompt", "assignment"),
        ("seeds", "assignment"),
        ("task_seed", "assignment"),
        ("later_task", "assignment"),
        ("env", "assignment"),
        ("run", "signature"),
        ("too_old", "staleness"),
        ("too_new", "staleness"),
        ("manifest", "staleness"),
        ("unknown_version", "staleness"),
        ("proof_size", "schema"),
        ("proof_length", "schema"),
        ("too_long", "schema"),
        ("vocab", "schema"),
        ("times", "schema"),
        ("proof_bits", "toploc"),
    ],
)
def test_forged_fields_are_rejected(
    world: World, honest_one: tuple[Envelope, Generated], what: str, expected: str
) -> None:
    a_env, g = honest_one
    body = a_env.body
    kw: dict[str, Any] = {}
    sub: dict[str, Any] = {}
    a_over: dict[str, Any] = {}
    if what == "rollout_prompt":
        sub["prompt_ids"] = [*body["prompt_ids"][:-1], (body["prompt_ids"][-1] + 1) % 100]
    elif what == "assignment_prompt":  # an assignment the orchestrator signed with a bad prompt
        a_over["prompt_ids"] = [*body["prompt_ids"][:-1], (body["prompt_ids"][-1] + 1) % 100]
    elif what == "seeds":
        a_over["seeds"] = [s ^ 1 for s in body["seeds"]]
    elif what == "task_seed":
        a_over["task_seed"] = body["task_seed"] + 1
    elif what == "later_task":  # attempt 0 with the task the slot's attempt 1 would draw
        a_over["task_seed"] = seeds.task_seed(RUN_SEED, body["step"], body["slot"], 1)
    elif what == "env":
        a_over["env"] = "basic_arithmetic@1"
    elif what == "run":
        a_over["run"] = "another-run"
    elif what == "too_old":
        sub["version"] = VERSION - 2
    elif what == "too_new":
        sub["version"] = LATEST + 1
    elif what == "manifest":
        sub["manifest_sha256"] = "cd" * 32
    elif what == "unknown_version":
        kw["expected_sha256"] = None
    elif what == "proof_size":
        sub["proof_topk"] = PROOF.topk * 2
    elif what == "proof_length":
        sub["proof"] = base64.b64encode(g.proof[: -(2 + 2 * PROOF.topk)]).decode()
    elif what == "too_long":
        a_over["max_new_tokens"] = len(g.tokens) - 1 if len(g.tokens) > 1 else 1
        if len(g.tokens) == 1:
            sub["completion_ids"] = [*g.tokens, 5]
            sub["logprobs"] = [*g.logprobs, -1.0]
    elif what == "vocab":
        sub["completion_ids"] = [*g.tokens[:-1], world.ctx.vocab_size]
    elif what == "times":
        sub["t_start_unix"] = 1003.0
    elif what == "proof_bits":  # a proof of the right size from other hidden states
        proof = bytearray(g.proof)
        proof[2:10] = bytes(8)
        sub["proof"] = base64.b64encode(bytes(proof)).decode()
    if a_over:
        a_env = Envelope.seal(world.orchestrator, wire.ASSIGNMENT, {**body, **a_over})
    v = check(world, submit(world, a_env, 0, g, **sub), **kw)
    assert not v.ok and v.check == expected, (what, v)
    assert v.reason


def test_an_unlikely_eos_passes_only_when_the_seed_drew_it(world: World) -> None:
    """Below ``eos_min_prob``, an EOS the seeded draw chose is honest; a forced one is refused
    by the termination check."""
    a_env = assign(world, 5, 0)
    strict = dataclasses.replace(
        world.ctx, config=world.ctx.config.model_copy(update={"eos_min_prob": 0.5})
    )
    group = generate(world, a_env)
    i = next(i for i, g in enumerate(group) if g.finish_reason == "eos")
    honest = check_rollout(
        world.model,
        submit(world, a_env, i, group[i]),
        strict,
        expected_sha256=SHA,
        latest_version=LATEST,
    )
    assert honest.ok and honest.metrics["eos_prob"] < 0.5
    cctx = cheat_context(world, a_env, batch_size=8)
    forced = cheats.cheat_group("early_eos", cctx)
    same = cheats.coincides_with_honest(cctx, forced)
    j = next(j for j in range(G) if not same[j])
    v = check_rollout(
        world.model,
        submit(world, a_env, j, forced[j]),
        strict,
        expected_sha256=SHA,
        latest_version=LATEST,
    )
    assert not v.ok and v.check == "termination" and "p=" in v.reason


def test_a_revisit_passes_and_a_forged_one_does_not(world: World) -> None:
    """A revisit samples an earlier step's task: the validator accepts the task of the slot
    key it names, only from an earlier step."""
    origin = seeds.task_seed(RUN_SEED, 2, 5, 1)
    prompt = world.ctx.encode_prompt(world.ctx.env.task(origin, 0).prompt)

    def revisit(step: int, task_from: str) -> Envelope:
        return assign(
            world, step, 0, task_from=task_from, task_seed=origin, prompt_ids=prompt,
            seeds=seeds.sample_seeds(origin, RUN, f"s{step}.j0.a0", G),
        )  # fmt: skip

    a_env = revisit(4, "s2.j5.a1")
    group = generate(world, a_env)
    assert all(check(world, submit(world, a_env, i, g)).ok for i, g in enumerate(group[:2]))
    for step, task_from, reason in [
        (2, "s2.j5.a1", "not an earlier step"),
        (4, "s2.j5.a0", "not the schedule's"),
    ]:
        a_env = revisit(step, task_from)
        v = check(world, submit(world, a_env, 0, generate(world, a_env)[0]))
        assert not v.ok and v.check == "assignment" and reason in v.reason, v
    with pytest.raises(wire.WireError, match="task_from"):
        wire.Assignment.from_body(dict(a_env.body, task_from="s2.j5"))
    # an assignment journaled before revisits existed has no task_from: its own schedule's
    old = {k: v for k, v in a_env.body.items() if k != "task_from"}
    assert wire.Assignment.from_body(old).task_from == ""
