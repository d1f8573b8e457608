"""The trainer's loss: GRPO with a two-sided clip against the behaviour policy
(research/rl.md 2.4, ``clip_against = "behaviour"``) or AReaL's decoupled objective
(``"proximal"``, the default: below).

Per completion token, with ``rho = exp(log pi - log mu)``, ``mu`` the worker's validated
log-probability of the token under ``softmax(logits / T)`` (so ``log pi`` must be taken at the
same temperature) and ``A`` the sequence's advantage::

    A >= 0:  -min(rho * A,             clip(rho, 1 - eps_low, 1 + eps_high) * A)
    A <  0:  -min(min(rho, delta) * A, clip(rho, 1 - eps_low, 1 + eps_high) * A)
    plus     kl_tau * log(rho)^2

The clip stops the gradient of a token only on the side where the step already moved it far
enough: a positive-advantage token whose ratio is above ``1 + eps_high`` (clip-higher, DAPO),
a negative-advantage token whose ratio is below ``1 - eps_low``. A negative-advantage token
with a huge ratio is what destabilises stale off-policy data (PPO leaves ``rho * A``
unbounded there); INTELLECT-2's second clip caps that ratio at ``delta`` (no gradient above).

With ``clip_against = "proximal"`` (the decoupled objective of AReaL), the clip bounds the
ratio against ``pi_prox``, the trainer's policy at the start of the step, and each token is
weighted by ``min(pi_prox / mu, delta)``::

    -min(pi_prox / mu, delta) * min(r * A, clip(r, 1 - eps_low, 1 + eps_high) * A),
    r = pi / pi_prox

The trainer takes one optimizer step per batch, so ``r`` is 1 where the gradient is taken and
the clip never binds: the loss computed is ``-min(pi_prox / mu, delta) * r * A``, a truncated
importance-weighted policy gradient that never stops a token the previous steps already moved
(rollouts of an async run are up to k versions old).

The sum over tokens is divided by the number of loss tokens of the *whole* batch (DAPO,
PRIME-RL), not per sequence or per micro-batch, so long completions are not down-weighted and
micro-batching gives the gradient of one batch. ``token_loss`` returns the plain sum; the
caller divides by the global count.

Shapes: N sequences, T completion positions (right-padded; ``mask`` marks real tokens), V the
vocabulary.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from cotrain.rl.config import TrainerConfig


@dataclass(frozen=True)
class LossOut:
    """One micro-batch's loss and what it says about the ratio."""

    loss: torch.Tensor
    """Scalar: the sum over loss tokens (divide by the batch's loss-token count)."""
    tokens: int
    """Loss tokens (``mask.sum()``)."""
    clipped: int
    """Tokens whose policy gradient a clip stopped (either side, or the ``delta`` cap)."""
    mismatch_kl: float
    """Sum over tokens of ``rho - 1 - log rho`` (the k3 estimate of KL(mu || pi) from tokens
    sampled by mu): how far the trainer's policy is from the one that sampled."""
    ratio_sum: float
    ratio_min: float
    ratio_max: float
    """Extremes over the loss tokens (1 when there are none)."""


def completion_logprobs(
    logits: torch.Tensor, targets: torch.Tensor, temperature: torch.Tensor | float
) -> torch.Tensor:
    """(N, T) ``log softmax(logits / temperature)`` of ``targets`` (N, T) from ``logits``
    (N, T, V); ``temperature`` a number or (N,) per sequence (0: the raw logits, as the
    workers' greedy logprobs are)."""
    z = logits.float()
    if isinstance(temperature, torch.Tensor):
        t = torch.where(temperature > 0, temperature, torch.ones_like(temperature))  # (N,)
        z = z / t.to(z.dtype)[:, None, None]  # (N, T, V)
    elif temperature > 0:
        z = z / temperature
    picked = z.gather(-1, targets.unsqueeze(-1)).squeeze(-1)  # (N, T)
    return picked - torch.logsumexp(z, dim=-1)  # (N, T)


def token_loss(
    new_logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    cfg: TrainerConfig,
) -> LossOut:
    """The two-sided-clip GRPO loss of one (micro-)batch, summed over loss tokens.

    ``new_logprobs`` (N, T) carry the gradient; ``old_logprobs`` (N, T) are mu; ``advantages``
    (N,); ``mask`` (N, T) bool or 0/1, the real completion tokens."""
    m = mask.to(new_logprobs.dtype)  # (N, T)
    real = m > 0  # (N, T)
    log_ratio = (new_logprobs - old_logprobs.to(new_logprobs.dtype)) * m  # (N, T); 0 on padding
    ratio = torch.exp(log_ratio)  # (N, T)
    adv = advantages.to(new_logprobs.dtype)[:, None].expand_as(ratio)  # (N, T)
    positive = adv >= 0  # (N, T)
    if cfg.clip_against == "proximal":
        # pi_prox: this step's policy before the update (new_logprobs' values); rho = pi / pi_prox
        # is 1 with the gradient of log pi, so clip(rho) never binds in the one optimizer step
        # a batch gets and is left out; the weight pi_prox / mu is a constant
        weight = ratio.detach().clamp(max=cfg.delta)  # (N, T)
        rho = torch.exp(new_logprobs - new_logprobs.detach())  # (N, T)
        policy = -weight * rho * adv  # (N, T)
    else:
        clipped_ratio = ratio.clamp(1.0 - cfg.eps_low, 1.0 + cfg.eps_high)  # (N, T)
        # A < 0: the ratio is capped at delta before the usual pessimistic min
        capped = torch.where(positive, ratio, ratio.clamp(max=cfg.delta))  # (N, T)
        policy = -torch.minimum(capped * adv, clipped_ratio * adv)  # (N, T)
    per_token = policy + cfg.kl_tau * log_ratio.square()  # (N, T)
    loss = (per_token * m).sum()

    with torch.no_grad():
        r = ratio.detach()
        if cfg.clip_against == "proximal":
            cut = r > cfg.delta  # the weight's cap: the only bound that binds in one step
        else:
            cut = torch.where(
                positive,
                (adv > 0) & (r > 1.0 + cfg.eps_high),
                (r < 1.0 - cfg.eps_low) | (r > cfg.delta),
            )  # (N, T)
        k3 = (r - 1.0 - log_ratio.detach()) * m  # (N, T)
        tokens = int(real.sum())
        real_r = r[real]
        return LossOut(
            loss=loss,
            tokens=tokens,
            clipped=int((cut & real).sum()),
            mismatch_kl=float(k3.sum()),
            ratio_sum=float(real_r.sum()) if tokens else 0.0,
            ratio_min=float(real_r.min()) if tokens else 1.0,
            ratio_max=float(real_r.max()) if tokens else 1.0,
        )
