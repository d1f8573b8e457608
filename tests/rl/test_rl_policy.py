"""The orchestrator's prompt codec (``tokenizers`` and jinja2, no transformers, no torch) gives
the very prompt ids and completion text the workers' transformers tokenizer gives, and loading
it imports no torch."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from cotrain.rl.policy import TEMPLATE_DATE, PromptCodec, encode_prompt

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


TEMPLATE = (
    "{%- set ns = namespace(n=0) -%}"
    "{{ bos_token }}"
    "{%- if tools is not none or documents is not none %}{{ raise_exception('tools') }}{% endif %}"
    "{%- for m in messages %}"
    "{%- if m.role not in ['user', 'assistant', 'system'] %}"
    "{{ raise_exception('unknown role ' + m.role) }}"
    "{%- endif %}"
    "{%- if loop.index > 9 %}{% break %}{% endif %}"
    "{%- set ns.n = ns.n + 1 %}"
    "<|im_start|>{{ m.role }}\n"
    "{%- if m.role == 'assistant' %}{% generation %}{{ m.content }}{% endgeneration %}"
    "{%- else %}{{ m.content | trim }}{% endif %}"
    "<|im_end|>\n"
    "{%- endfor %}"
    "{{ dict(turns=ns.n) | tojson }}"
    "{%- if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def test_the_codec_renders_transformers_template_extensions(tmp_path: Path) -> None:
    """A chat template with what transformers adds to jinja2 (``raise_exception``,
    ``{% generation %}``, loop controls, ``namespace``, ``dict``, ``tojson``, ``tools`` and
    ``documents`` given as None) encodes to the same ids; ``strftime_now`` renders the fixed
    ``TEMPLATE_DATE``, whatever the day."""
    import json
    import shutil

    from transformers import AutoTokenizer

    src = _smollm2()
    for name in ("tokenizer.json", "special_tokens_map.json"):
        if (src / name).is_file():
            shutil.copy(src / name, tmp_path / name)
    config = json.loads((src / "tokenizer_config.json").read_text())
    config["chat_template"] = TEMPLATE
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    tok = AutoTokenizer.from_pretrained(tmp_path)
    codec = PromptCodec(tmp_path)
    for text in TEXTS:
        ids = codec.encode_prompt(text)
        assert ids == encode_prompt(tok, text), text
    assert '{"turns": 1}' in tok.decode(codec.encode_prompt("hi"))
    # a conversation: the generation tag renders the assistant's turn as transformers does
    chat = [
        {"role": "user", "content": "2+2?"},
        {"role": "assistant", "content": "4"},
        {"role": "user", "content": "and 3+3?"},
    ]
    want = tok.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
    assert codec.render(chat) == want and "<|im_start|>assistant4<|im_end|>" in want
    # the date is the fixed one, so every role renders the same prompt on any day
    config["chat_template"] = "{{ strftime_now('%Y-%m-%d') }} {{ messages[0].content }}"
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    dated = PromptCodec(tmp_path)
    assert dated.tokenizer.decode(dated.encode_prompt("hi")) == (f"{TEMPLATE_DATE:%Y-%m-%d} hi")
    # a template that does not parse, or fails on a prompt: one line, no traceback
    from cotrain.core.errors import UsageError

    config["chat_template"] = "{% frobnicate %}"
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    with pytest.raises(UsageError, match="does not parse"):
        PromptCodec(tmp_path)
    for failing in ("{{ messages[0].content.nope() }}", "{{ messages | tojson(indent=1, x=2) }}"):
        config["chat_template"] = failing
        (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
        with pytest.raises(UsageError, match="failed on a prompt"):
            PromptCodec(tmp_path).encode_prompt("hi")


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
