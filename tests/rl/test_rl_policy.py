"""The orchestrator's prompt codec (``tokenizers`` and jinja2, no transformers, no torch) gives
the very prompt ids and completion text the workers' transformers tokenizer gives, and loading
it imports no torch."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from cotrain.rl.policy import PromptCodec, encode_prompt

pytest.importorskip("transformers")
pytest.importorskip("reasoning_gym")

TEXTS = [
    "What is 2+3?",
    "State the final answer to the following arithmetic problem: 5 - 4 =\n"
    "Reply with only the final number.",
    "  leading and trailing spaces  ",
    "unicode: déjà vu, 東京, emoji 🙂, tabs\tand\nnewlines",
    "{{ not a template }} {% neither %} <|im_end|> in the text",
    "",
]


def _smollm2() -> Path:
    from cotrain.models.errors import ModelNotFoundError
    from cotrain.models.hf import smollm2_dir

    try:
        return smollm2_dir()
    except ModelNotFoundError as e:
        pytest.skip(f"SmolLM2 is not available: {e}")


def test_the_codec_encodes_and_decodes_as_transformers_does() -> None:
    from transformers import AutoTokenizer

    from cotrain.rl.env import make_env

    path = _smollm2()
    tok = AutoTokenizer.from_pretrained(path)
    codec = PromptCodec(path)
    env = make_env("chain_sum")
    texts = TEXTS + [env.task(seed, level).prompt for seed in range(20) for level in (0, 2)]
    for text in texts:
        ids = codec.encode_prompt(text)
        assert ids == encode_prompt(tok, text), text
        assert codec.decode(ids) == tok.decode(ids, skip_special_tokens=True)


def test_loading_the_codec_imports_no_torch() -> None:
    path = _smollm2()
    script = (
        "import sys\n"
        "from pathlib import Path\n"
        "from cotrain.rl import orchestrator, policy\n"
        "from cotrain.rl.config import ModelSpec\n"
        f"codec = policy.load_codec(ModelSpec(path={str(path)!r}))\n"
        "assert codec.encode_prompt('hi')\n"
        "print('torch' in sys.modules)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120, check=True
    )
    assert out.stdout.strip() == "False", out.stderr
