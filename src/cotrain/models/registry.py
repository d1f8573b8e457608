"""Model specs -> loaded ``CausalLM``s, so a rollout's ``model`` field names what to load.

Specs: ``smollm2-135m-instruct`` (alias ``smollm2``), ``gpt-<size>-seed<N>`` (cotrain's GPT with
seeded weights, e.g. ``gpt-debug-seed0``), or a local Hugging Face model directory.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch

from cotrain.models.errors import ModelSpecError
from cotrain.models.gpt import GPT, GPTConfig
from cotrain.models.lm import GPTLM, HFLM, CausalLM

_GPT_SPEC = re.compile(r"^gpt-(?P<size>[a-z0-9]+)(?:-seed(?P<seed>\d+))?$")


def load_model(spec: str, *, dtype: torch.dtype = torch.float32) -> CausalLM:
    """Build or load the model a spec names (weights in ``dtype``)."""
    from cotrain.models import hf

    if spec in ("smollm2", hf.SMOLLM2_ID):
        loaded = hf.load_smollm2(dtype=dtype)
        return HFLM(loaded.model, loaded.tokenizer, hf.SMOLLM2_ID)
    m = _GPT_SPEC.match(spec)
    if m:
        try:
            config = GPTConfig.named(m["size"], seed=int(m["seed"] or 0))
        except ValueError as e:
            raise ModelSpecError(f"model spec {spec!r}: {e}") from None
        return GPTLM(GPT(config).to(dtype), f"gpt-{m['size']}-seed{config.seed}")
    path = Path(spec)
    if path.is_dir():
        loaded = hf.load_hf_causal_lm(path, dtype=dtype)
        return HFLM(loaded.model, loaded.tokenizer, spec)
    raise ModelSpecError(
        f"unknown model spec {spec!r}: use smollm2-135m-instruct, gpt-<size>-seed<N> "
        "(sizes: debug, 10m) or a local Hugging Face model directory"
    )
