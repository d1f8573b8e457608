"""Seeded Gumbel-max sampling (noise drawn lazily, block by block): exact samples, replayed by
a validator on its own prefill at another thread count, and every cheat on the sampling fails
the replay."""

from __future__ import annotations

import math

import pytest
import torch
from hf_harness import small_hf_model, write_text

from cotrain.rl import sampling, seeds

pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> tuple[object, object]:
    from transformers import AutoModelForCausalLM

    tmp = tmp_path_factory.mktemp("rl")
    text = write_text(tmp / "text.txt")
    honest = AutoModelForCausalLM.from_pretrained(small_hf_model(tmp / "a", text)).eval()
    torch.manual_seed(1)  # another model of the same shape
    other = AutoModelForCausalLM.from_config(honest.config).eval()
    return honest, other


PROMPT = [5, 17, 42, 99, 3, 250, 7]


def _sample(model: object, seed: int, temperature: float = 1.0, n: int = 24) -> sampling.Sampled:
    return sampling.generate(
        model, PROMPT, max_new_tokens=n, temperature=temperature, seed=seed, eos_token_id=None
    )


def test_seeds_are_fixed_by_task_worker_and_counter() -> None:
    s = seeds.derive_seed(7, "ab" * 32, 0)
    assert s == seeds.derive_seed(7, "ab" * 32, 0) and 0 <= s < 2**63
    others = {seeds.derive_seed(7, "cd" * 32, 0), seeds.derive_seed(8, "ab" * 32, 0)}
    assert s not in others and seeds.derive_seed(7, "ab" * 32, 1) != s


def test_gumbel_max_samples_the_softmax() -> None:
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0]])
    counts = torch.zeros(4)
    n = 4000
    for k in range(n):
        counts[int(sampling.draw(logits, 1.0, [k], 0)[0])] += 1
    expected = torch.softmax(logits[0], 0) * n
    assert torch.all((counts - expected).abs() < 4 * expected.sqrt() + 5), (counts, expected)


def test_lazy_noise_is_iid_gumbel_and_the_lazy_draw_is_the_full_argmax() -> None:
    """Blocks drawn top-down (their maximum, then the rest below it) make i.i.d. Gumbel(0)
    noise, and the draw that opens only the blocks that can win picks the argmax of the
    whole vector, across block boundaries and a last, partial block."""
    vocab = 3 * sampling.BLOCK + 40
    g = torch.cat([sampling.noise(s, 0, vocab) for s in range(60)])
    # Gumbel(0): mean Euler's gamma, variance pi^2 / 6, CDF exp(-exp(-x))
    assert abs(float(g.mean()) - 0.5772) < 0.02 and abs(float(g.var()) - 1.6449) < 0.05
    for x in (-1.0, 0.0, 1.0, 3.0):
        assert abs(float((g <= x).double().mean()) - math.exp(-math.exp(-x))) < 0.01
    gen = torch.Generator().manual_seed(0)
    for seed in range(40):
        logits = torch.randn(2, vocab, generator=gen) * (0.5 + seed % 4)
        got = sampling.draw(logits, 0.7, [seed, seed + 1000], 3)
        for i, s in enumerate((seed, seed + 1000)):
            full = logits[i] / 0.7 + sampling.noise(s, 3, vocab)
            assert int(got[i]) == int(torch.argmax(full)), seed
            assert sampling.replay(logits[i : i + 1], [int(got[i])], temperature=0.7, seed=s,
                                   start=3).ok  # fmt: skip


@pytest.mark.parametrize("threads", [1, 2])
def test_honest_completions_replay_at_another_thread_count(
    models: tuple[object, object], threads: int
) -> None:
    honest, _ = models
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        outs = [(seed, _sample(honest, seed)) for seed in range(6)]
        torch.set_num_threads(threads)  # the validator's machine
        for seed, out in outs:
            logits = sampling.prefill_logits(honest, PROMPT, out.tokens)
            r = sampling.replay(logits, out.tokens, temperature=1.0, seed=seed)
            assert r.ok, (seed, r)
            lp = torch.log_softmax(logits, -1).gather(1, torch.tensor(out.tokens)[:, None])
            assert torch.allclose(lp[:, 0], torch.tensor(out.logprobs), atol=1e-4)
    finally:
        torch.set_num_threads(before)


def test_cheats_on_the_sampling_fail_the_replay(models: tuple[object, object]) -> None:
    honest, other = models
    seed = 11
    out = _sample(honest, seed)

    def check(tokens: list[int], seed: int = seed) -> sampling.Replay:
        logits = sampling.prefill_logits(honest, PROMPT, tokens)
        return sampling.replay(logits, tokens, temperature=1.0, seed=seed)

    assert check(out.tokens).ok
    greedy = _sample(honest, seed, temperature=0.0).tokens  # greedy instead of sampling
    assert not check(greedy).ok
    # another model's tokens (both tiny models are nearly uniform, so with the same noise
    # their samples often coincide; every one that differs fails)
    differ = 0
    for s in range(seed, seed + 20):
        theirs = _sample(other, s).tokens
        if theirs != _sample(honest, s).tokens:
            differ += 1
            assert not check(theirs, s).ok, s
    assert differ >= 5
    assert not check(_sample(honest, seed + 1).tokens).ok  # a seed the worker chose
    swapped = [*out.tokens[:-1], (out.tokens[-1] + 1) % 512]  # the last token swapped
    r = check(swapped)
    assert not r.ok and r.first_mismatch == len(swapped) - 1
    # best-of-N: the most likely of 8 samples, claimed under the assigned seed
    best = max((_sample(honest, s) for s in range(100, 108)), key=lambda o: sum(o.logprobs)).tokens
    assert not check(best).ok
    with pytest.raises(ValueError, match="do not match"):
        sampling.replay(torch.zeros(3, 512), [1, 2], temperature=1.0, seed=0)
    assert not sampling.replay(torch.zeros(1, 512), [9999], temperature=1.0, seed=0).ok


def test_a_near_tie_is_tolerated_only_within_float_noise() -> None:
    """The replay forgives a claimed token whose score is within float noise of the seeded
    argmax, not one 0.0006 behind it (what a greedy worker got through at 1e-3), also when
    the two are in different blocks of the noise."""
    seed, vocab = 11, 2 * sampling.BLOCK
    g = sampling.noise(seed, 0, vocab).float()
    for claimed in (5, sampling.BLOCK + 5):
        for behind, ok in ((1e-5, True), (6e-4, False), (2e-3, False)):
            logits = torch.full((1, vocab), -30.0)
            # token 3 is the draw; the claimed token scores ``behind`` less
            logits[0, 3] = 10.0 - g[3]
            logits[0, claimed] = 10.0 - behind - g[claimed]
            r = sampling.replay(logits, [claimed], temperature=1.0, seed=seed)
            assert r.ok is ok, (behind, r)
            if ok:  # within the tolerance the gap is exact or a lower bound (block unopened)
                assert r.worst_gap <= behind + 2e-6, (behind, r)
            else:
                assert r.worst_gap == pytest.approx(behind, abs=2e-6), (behind, r)


def test_a_replay_works_in_bounded_parts_and_never_passes_what_is_not_finite(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A long completion is replayed a few positions at a time with the same result, and a
    position whose scores are not finite (NaN logits, inf - inf) fails rather than passes."""
    vocab = 4 * sampling.BLOCK
    gen = torch.Generator().manual_seed(5)
    logits = torch.randn(50, vocab, generator=gen) * 3
    honest = [int(sampling.draw(logits[t : t + 1], 0.8, [9], t)[0]) for t in range(50)]
    cheat = [(t * 37) % vocab for t in range(50)]  # tokens spread over every block
    whole = [sampling.replay(logits, x, temperature=0.8, seed=9) for x in (honest, cheat)]
    monkeypatch.setattr(sampling, "GAP_ROWS", 7)
    parts = [sampling.replay(logits, x, temperature=0.8, seed=9) for x in (honest, cheat)]
    assert whole == parts and whole[0].ok and whole[1].mismatches >= 45
    greedy = logits[:3].argmax(dim=1).tolist()
    for temperature, tokens in ((0.8, honest[:3]), (0.0, greedy)):
        bad = logits[:3].clone()
        bad[1, 5] = float("nan")
        assert sampling.replay(logits[:3], tokens, temperature=temperature, seed=9).ok
        r = sampling.replay(bad, tokens, temperature=temperature, seed=9)
        assert not r.ok and r.first_mismatch == 1, r
    huge = logits[:1].clone()
    huge[0, :] = float("inf")  # inf - inf everywhere
    assert not sampling.replay(huge, [honest[0]], temperature=0.8, seed=9).ok
