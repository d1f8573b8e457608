"""The inference worker's group generation: the same tokens as ``sampling.generate`` one sample
at a time, honest at every batch size and thread count (a validator's prefill replays every
sample and verifies every proof), and rows that end early prove only their own positions."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import torch
from hf_harness import small_hf_model, write_text

from cotrain.rl import inference, sampling, seeds
from cotrain.toploc.config import ProofConfig
from cotrain.toploc.proof import chunk_bytes, n_rollout_chunks, verify_proofs

pytest.importorskip("transformers")

PROMPT = [5, 17, 42, 99, 3, 250, 7, 11, 64, 128, 31]
SEEDS = [seeds.derive_seed(3, "inference-test", i) for i in range(8)]
EOS = 0
CHUNK, TOPK = 8, 32


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    """One torch thread unless a test sets another: 2 shared cores, steadier timings."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """The tiny model with spread logits and an EOS of p ~ 0.03-0.09 at every position (as
    tests/rl/test_rl_checks.py: untrained, it is nearly uniform and rarely ends a row)."""
    from transformers import AutoModelForCausalLM

    tmp = tmp_path_factory.mktemp("rlinf")
    m = AutoModelForCausalLM.from_pretrained(small_hf_model(tmp / "m", write_text(tmp / "t")))
    head = m.lm_head
    lin = torch.nn.Linear(head.in_features, head.out_features, bias=True)
    with torch.no_grad():
        lin.weight.copy_(head.weight * 15.0)
        lin.weight[EOS] = 0.0
        lin.bias.zero_()
        lin.bias[EOS] = 4.8
    m.lm_head = lin
    return m.eval()


def group(model: Any, batch_size: int, **kw: Any) -> list[inference.Generated]:
    args: dict[str, Any] = {
        "temperature": 1.0,
        "max_new_tokens": 16,
        "eos_token_id": EOS,
        "batch_size": batch_size,
        "proof_chunk": CHUNK,
        "proof_topk": TOPK,
    }
    args.update(kw)
    return inference.generate_group(model, PROMPT, SEEDS, **args)


class threads:
    def __init__(self, n: int) -> None:
        self.n, self.before = n, torch.get_num_threads()

    def __enter__(self) -> None:
        torch.set_num_threads(self.n)

    def __exit__(self, *exc: object) -> None:
        torch.set_num_threads(self.before)


@pytest.mark.parametrize("temperature", [1.0, 0.7, 0.0])
def test_batch_of_one_is_sampling_generate(model: Any, temperature: float) -> None:
    got = group(model, 1, temperature=temperature)
    for seed, g in zip(SEEDS, got, strict=True):
        ref = sampling.generate(
            model,
            PROMPT,
            max_new_tokens=16,
            temperature=temperature,
            seed=seed,
            eos_token_id=EOS,
        )
        assert g.tokens == ref.tokens and g.finish_reason == ref.finish_reason
        assert g.logprobs == pytest.approx(ref.logprobs, abs=1e-6)


@pytest.mark.parametrize("batch_size", [1, 3, 8])
@pytest.mark.parametrize("worker_threads", [1, 2])
def test_every_sample_replays_on_a_validators_prefill(
    model: Any, batch_size: int, worker_threads: int
) -> None:
    with threads(worker_threads):
        got = group(model, batch_size)
    with threads(3 - worker_threads):  # the validator's machine
        fills = inference.prefill_group(model, PROMPT, [g.tokens for g in got], batch_size=3)
        # the prompt's pass on the state of its beginning (a validator's shared template)
        head = inference.prompt_state(model, PROMPT[:6])
        state = inference.prompt_state(model, PROMPT, prefix=head)
        assert state.hidden.shape == (len(PROMPT), model.config.hidden_size)
        prefixed = inference.prefill_group(
            model, PROMPT, [g.tokens for g in got], batch_size=3, state=state
        )
        # the prefix's own state is left as it was
        assert head.cache.get_seq_length() == 6 and head.hidden.shape[0] == 6
        for seed, g, grouped, on_head in zip(SEEDS, got, fills, prefixed, strict=True):
            fill = inference.prefill(model, PROMPT, g.tokens)
            n = len(g.tokens)
            assert fill.logits.shape == (n, model.config.vocab_size)
            assert fill.hidden.shape == (len(PROMPT) + n - 1, model.config.hidden_size)
            assert len(g.proof) == n_rollout_chunks(len(PROMPT), n, CHUNK) * chunk_bytes(TOPK)
            for f in (fill, grouped, on_head):
                r = sampling.replay(f.logits, g.tokens, temperature=1.0, seed=seed)
                assert r.ok and r.worst_gap < 1e-3, (seed, r)
                v = verify_proofs(
                    g.proof, f.hidden, CHUNK, TOPK, ProofConfig(chunk_tokens=CHUNK, topk=TOPK)
                )
                assert v.passed and v.median_rel_err < 1e-3, (seed, v.median_rel_err)
                lp = torch.log_softmax(f.logits, -1).gather(1, torch.tensor(g.tokens)[:, None])
                assert lp[:, 0].tolist() == pytest.approx(g.logprobs, abs=1e-4)
            assert torch.allclose(grouped.logits, fill.logits, atol=1e-4)
            assert torch.allclose(grouped.hidden, fill.hidden, atol=1e-4)


@pytest.mark.parametrize("with_prefix", [False, True])
def test_packed_prefill_is_each_completions_own_pass(model: Any, with_prefix: bool) -> None:
    """Completions of three prompts packed one after the other (a block mask, position ids
    restarting after each prompt), packs batched as rows and cut at a few positions: every
    completion gets what its own forward pass gives, one-token ones included, and every
    sample still replays and proves."""
    prompts = [PROMPT, [*PROMPT[:6], 77, 78], [*PROMPT[:6], 300, 301, 302, 303]]
    groups = []
    for k, prompt in enumerate(prompts):
        got = inference.generate_group(
            model, prompt, SEEDS[:5], temperature=1.0, max_new_tokens=12 + k,
            eos_token_id=EOS, batch_size=5, proof_chunk=CHUNK, proof_topk=TOPK,
        )  # fmt: skip
        groups.append((prompt, got))
    completions = [[g.tokens for g in got] for _, got in groups]
    completions[1][2] = completions[1][2][:1]  # a one-token completion: the prompt's logits
    prefix = inference.prompt_state(model, PROMPT[:6]) if with_prefix else None
    for max_rows, batch_rows in ((256, 512), (20, 40)):  # one pass; many packs and batches
        packed = inference.prefill_packed(
            model, [(p, cs) for (p, _), cs in zip(groups, completions, strict=True)],
            prefix=prefix, max_rows=max_rows, batch_rows=batch_rows,
        )  # fmt: skip
        for (prompt, got), cs, fills in zip(groups, completions, packed, strict=True):
            assert len(fills) == len(cs)
            for seed, g, c, f in zip(SEEDS[:5], got, cs, fills, strict=True):
                own = inference.prefill(model, prompt, c)
                assert f.logits.shape == own.logits.shape and f.hidden.shape == own.hidden.shape
                assert torch.allclose(f.logits, own.logits, atol=1e-4)
                assert torch.allclose(f.hidden, own.hidden, atol=1e-4)
                if c == g.tokens:
                    assert sampling.replay(f.logits, c, temperature=1.0, seed=seed).ok
                    cfg = ProofConfig(chunk_tokens=CHUNK, topk=TOPK)
                    assert verify_proofs(g.proof, f.hidden, CHUNK, TOPK, cfg).passed
    if prefix is not None:  # the prefix's own state is left as it was
        assert prefix.cache.get_seq_length() == 6
    with pytest.raises(ValueError, match="proper beginning"):
        inference.prefill_packed(model, [([1, 2, 3], [[4, 5]])], prefix=prefix or
                                 inference.prompt_state(model, PROMPT[:6]))  # fmt: skip


def test_batches_agree_and_rows_end_on_their_own(model: Any) -> None:
    one, three, eight = group(model, 1), group(model, 3), group(model, 8)
    assert [g.tokens for g in three] == [g.tokens for g in one] == [g.tokens for g in eight]
    reasons = [g.finish_reason for g in eight]
    assert "eos" in reasons and "length" in reasons  # some rows left the batch early
    for g in eight:
        if g.finish_reason == "eos":
            assert g.tokens[-1] == EOS and EOS not in g.tokens[:-1] and len(g.tokens) <= 16
        else:
            assert len(g.tokens) == 16 and EOS not in g.tokens
    no_eos = group(model, 8, eos_token_id=None)
    assert all(g.finish_reason == "length" and len(g.tokens) == 16 for g in no_eos)


def test_a_proof_covers_its_own_positions_only(model: Any) -> None:
    """A row's proof is of its own hidden states: a prefill of another row's tokens (or of its
    own with the last fed token changed) does not verify."""
    got = group(model, 8)
    a, b = next((x, y) for x in got for y in got if len(x.tokens) == len(y.tokens) > 2 and x != y)
    cfg = ProofConfig(chunk_tokens=CHUNK, topk=TOPK, max_median_rel_err=0.0025)
    assert verify_proofs(
        a.proof, inference.prefill(model, PROMPT, a.tokens).hidden, CHUNK, TOPK, cfg
    ).passed
    other = inference.prefill(model, PROMPT, b.tokens).hidden
    assert not verify_proofs(a.proof, other, CHUNK, TOPK, cfg).passed
    changed = [*a.tokens[:-2], (a.tokens[-2] + 1) % 512, a.tokens[-1]]
    assert not verify_proofs(
        a.proof, inference.prefill(model, PROMPT, changed).hidden, CHUNK, TOPK, cfg
    ).passed


def test_one_token_completions(model: Any) -> None:
    got = group(model, 4, max_new_tokens=1)
    assert all(len(g.tokens) == 1 for g in got)
    fills = inference.prefill_group(model, PROMPT, [g.tokens for g in got])
    for g, f in zip(got, fills, strict=True):
        assert f.hidden.shape[0] == len(PROMPT)
        assert verify_proofs(g.proof, f.hidden, CHUNK, TOPK).passed


def test_settings_that_cannot_work_are_refused(model: Any) -> None:
    for bad in ({"max_new_tokens": 0}, {"temperature": -1.0}, {"temperature": float("nan")}):
        with pytest.raises(ValueError):
            group(model, 2, **bad)
    with pytest.raises(ValueError, match="batch_size"):
        group(model, 0)
    with pytest.raises(ValueError, match="seed"):
        inference.generate_group(
            model,
            PROMPT,
            [],
            temperature=1.0,
            max_new_tokens=4,
            eos_token_id=EOS,
            batch_size=1,
            proof_chunk=CHUNK,
            proof_topk=TOPK,
        )
    with pytest.raises(ValueError):
        inference.prefill(model, PROMPT, [])
    head = inference.prompt_state(model, PROMPT[:4])
    for prompt in (PROMPT[:4], [6, *PROMPT[1:]]):  # not a proper beginning of the prompt
        with pytest.raises(ValueError, match="prefix"):
            inference.prompt_state(model, prompt, prefix=head)
