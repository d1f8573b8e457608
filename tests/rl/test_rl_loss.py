"""The two-sided-clip GRPO loss: a hand-computed example, the plain policy gradient at rho = 1,
clips that stop the gradient on one side only, the delta cap for negative advantages, and
micro-batches that give the gradient of one batch."""

from __future__ import annotations

import math

import pytest
import torch

from cotrain.rl.config import TrainerConfig
from cotrain.rl.loss import completion_logprobs, token_loss

CFG = TrainerConfig(clip_against="behaviour")  # eps_low 0.2, eps_high 0.28, delta 4, kl_tau 1e-3
NO_KL = TrainerConfig(clip_against="behaviour", kl_tau=0.0)


def _case(
    ratios: list[list[float]], advantages: list[float]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """new logprobs (with grad), old logprobs, advantages, mask for the given ratios (nan:
    padding)."""
    r = torch.tensor(ratios, dtype=torch.float64)
    mask = ~torch.isnan(r)
    old = torch.full_like(r, -2.0)
    new = (old + torch.log(torch.nan_to_num(r, nan=1.0))).requires_grad_(True)
    return new, old, torch.tensor(advantages, dtype=torch.float64), mask


def test_a_hand_computed_example() -> None:
    nan = float("nan")
    new, old, adv, mask = _case([[1.5, 0.5, nan], [0.5, 6.0, 2.0]], [1.0, -1.0])
    out = token_loss(new, old, adv, mask, CFG)
    # A = +1: rho 1.5 -> -min(1.5, 1.28); rho 0.5 -> -min(0.5, 0.8)
    # A = -1: rho 0.5 -> -min(-0.5, -0.8); rho 6 -> -min(-4 (capped at delta), -1.28);
    #         rho 2 -> -min(-2, -1.28)
    policy = -1.28 - 0.5 + 0.8 + 4.0 + 2.0
    logs = [math.log(x) for x in (1.5, 0.5, 0.5, 6.0, 2.0)]
    kl = 1e-3 * sum(x * x for x in logs)
    assert out.loss.item() == pytest.approx(policy + kl, abs=1e-12)
    assert out.tokens == 5
    assert out.clipped == 3  # (A>0, 1.5), (A<0, 0.5), (A<0, 6 > delta)
    assert out.ratio_min == pytest.approx(0.5) and out.ratio_max == pytest.approx(6.0)
    assert out.ratio_sum == pytest.approx(10.5)
    k3 = sum(r - 1 - math.log(r) for r in (1.5, 0.5, 0.5, 6.0, 2.0))
    assert out.mismatch_kl == pytest.approx(k3)

    out.loss.backward()
    assert new.grad is not None
    g = new.grad
    # d/dlogpi of -rho*A is -rho*A where the gradient flows; only the KL term elsewhere
    expected = torch.tensor(
        [
            [2e-3 * logs[0], -0.5 + 2e-3 * logs[1], 0.0],
            [2e-3 * logs[2], 2e-3 * logs[3], 2.0 + 2e-3 * logs[4]],
        ],
        dtype=torch.float64,
    )
    torch.testing.assert_close(g, expected, rtol=0, atol=1e-12)


def test_at_ratio_one_the_gradient_is_the_plain_policy_gradient() -> None:
    torch.manual_seed(0)
    logits = torch.randn(3, 5, 11, dtype=torch.float64, requires_grad=True)  # (N, T, V)
    targets = torch.randint(0, 11, (3, 5))
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0], [1, 0, 0, 0, 0]], dtype=torch.bool)
    adv = torch.tensor([0.75, -0.25, -0.5], dtype=torch.float64)
    n = int(mask.sum())

    lp = completion_logprobs(logits, targets, 0.7)
    out = token_loss(lp, lp.detach(), adv, mask, CFG)
    assert out.clipped == 0 and out.mismatch_kl == pytest.approx(0.0, abs=1e-12)
    (grad,) = torch.autograd.grad(out.loss / n, logits)

    lp2 = completion_logprobs(logits, targets, 0.7)
    reference = -(adv[:, None] * lp2 * mask).sum() / n
    (expected,) = torch.autograd.grad(reference, logits)
    torch.testing.assert_close(grad, expected, rtol=1e-12, atol=1e-14)


def test_clips_stop_the_gradient_only_on_the_side_the_step_already_moved() -> None:
    ratios = [0.5, 0.9, 1.1, 1.5, 3.0, 6.0]
    for sign in (1.0, -1.0):
        new, old, adv, mask = _case([ratios], [sign])
        token_loss(new, old, adv, mask, NO_KL).loss.backward()
        assert new.grad is not None
        flows = [bool(g != 0) for g in new.grad[0]]
        if sign > 0:  # too likely already (> 1.28): stop; unlikely tokens still pushed up
            assert flows == [True, True, True, False, False, False]
        else:  # too unlikely already (< 0.8): stop; likely ones pushed down up to delta
            assert flows == [False, True, True, True, True, False]


def test_delta_caps_the_ratio_of_negative_advantages() -> None:
    new, old, adv, mask = _case([[4.0, 10.0, 1000.0]], [-2.0])
    out = token_loss(new, old, adv, mask, NO_KL)
    # each term is -min(min(rho, 4) * -2, 1.28 * -2) = 8: bounded however large rho grows
    assert out.loss.item() == pytest.approx(3 * 8.0)
    # plain PPO would give 2 * rho: 2000 for the last token
    new, old, adv, mask = _case([[1000.0]], [2.0])
    assert token_loss(new, old, adv, mask, NO_KL).loss.item() == pytest.approx(-2 * 1.28)


def test_micro_batches_give_the_gradient_of_one_batch() -> None:
    torch.manual_seed(1)
    n_seq, t, v = 6, 7, 13
    logits = torch.randn(n_seq, t, v, dtype=torch.float64, requires_grad=True)
    targets = torch.randint(0, v, (n_seq, t))
    lengths = torch.tensor([7, 3, 5, 1, 6, 2])
    mask = torch.arange(t)[None, :] < lengths[:, None]  # (N, T)
    adv = torch.tensor([1.0, -0.5, 0.25, -1.0, 0.0, 2.0], dtype=torch.float64)
    with torch.no_grad():  # a behaviour policy some distance away: some tokens clip
        old = completion_logprobs(logits + 0.4 * torch.randn_like(logits), targets, 1.0)
    total = int(mask.sum())

    whole = token_loss(completion_logprobs(logits, targets, 1.0), old, adv, mask, CFG)
    assert whole.clipped > 0
    (expected,) = torch.autograd.grad(whole.loss / total, logits)

    grad = torch.zeros_like(logits)
    clipped = 0
    for lo in range(0, n_seq, 2):
        sl = slice(lo, lo + 2)
        lp = completion_logprobs(logits[sl], targets[sl], 1.0)
        part = token_loss(lp, old[sl], adv[sl], mask[sl], CFG)
        (g,) = torch.autograd.grad(part.loss / total, logits)
        grad += g
        clipped += part.clipped
    torch.testing.assert_close(grad, expected, rtol=1e-12, atol=1e-15)
    assert clipped == whole.clipped


def test_logprobs_are_taken_at_the_sampling_temperature() -> None:
    torch.manual_seed(2)
    logits = torch.randn(2, 3, 9)
    targets = torch.randint(0, 9, (2, 3))
    temps = torch.tensor([0.5, 2.0])
    got = completion_logprobs(logits, targets, temps)
    for i, temp in enumerate((0.5, 2.0)):
        ref = torch.log_softmax(logits[i] / temp, -1).gather(-1, targets[i, :, None])[:, 0]
        torch.testing.assert_close(got[i], ref)
    greedy = completion_logprobs(logits, targets, 0.0)  # T = 0: the raw logits
    ref0 = torch.log_softmax(logits, -1).gather(-1, targets[..., None])[..., 0]
    torch.testing.assert_close(greedy, ref0)


def test_the_proximal_clip_weights_every_token_by_its_capped_staleness_ratio() -> None:
    """clip_against = proximal: the same ratios as the hand-computed example. No token's
    gradient is stopped: d/dlogpi is -min(pi/mu, delta) * A (plus the KL term), where the
    behaviour clip stopped three of them; the loss's value is -min(pi/mu, delta) * A."""
    nan = float("nan")
    cfg = TrainerConfig(clip_against="proximal")
    new, old, adv, mask = _case([[1.5, 0.5, nan], [0.5, 6.0, 2.0]], [1.0, -1.0])
    out = token_loss(new, old, adv, mask, cfg)
    logs = [math.log(x) for x in (1.5, 0.5, 0.5, 6.0, 2.0)]
    policy = -1.5 - 0.5 + 0.5 + 4.0 + 2.0
    assert out.loss.item() == pytest.approx(policy + 1e-3 * sum(x * x for x in logs), abs=1e-12)
    assert out.clipped == 1  # only the weight of 6, capped at delta
    out.loss.backward()
    assert new.grad is not None
    expected = torch.tensor(
        [
            [-1.5 + 2e-3 * logs[0], -0.5 + 2e-3 * logs[1], 0.0],
            [0.5 + 2e-3 * logs[2], 4.0 + 2e-3 * logs[3], 2.0 + 2e-3 * logs[4]],
        ],
        dtype=torch.float64,
    )
    torch.testing.assert_close(new.grad, expected, rtol=0, atol=1e-12)
    # on-policy (every ratio 1) both clips give the same loss and gradient
    grads = []
    for against in ("behaviour", "proximal"):
        new, old, adv, mask = _case([[1.0, 1.0], [1.0, 1.0]], [0.5, -0.25])
        token_loss(new, old, adv, mask, TrainerConfig(clip_against=against)).loss.backward()
        grads.append(new.grad)
    torch.testing.assert_close(grads[0], grads[1], rtol=0, atol=1e-12)
