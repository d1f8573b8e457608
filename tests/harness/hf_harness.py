"""A small real Hugging Face causal LM with a real (small) tokenizer, for fast tests.

A Llama-architecture model of a few hundred thousand parameters, seeded, saved with
``save_pretrained``, beside a byte-level BPE trained on the test text and saved as a
``PreTrainedTokenizerFast``: ``AutoModelForCausalLM.from_pretrained`` and
``AutoTokenizer.from_pretrained`` load the directory as they would any model's. (SmolLM2's
49,152-token vocabulary makes every step cost a 49k-wide softmax; tests that need SmolLM2
itself use it directly.)
"""

from __future__ import annotations

import json
from pathlib import Path

from diloco_harness import _texts


def write_text(path: Path) -> Path:
    """Real English prose (the standard library's docstrings), about 300 kB."""
    path.write_text("\n\n".join(_texts().values()))
    return path


def small_hf_model(directory: Path, text: Path, *, vocab: int = 512, hidden: int = 32) -> Path:
    """Write a seeded small Llama model and its BPE tokenizer into ``directory``."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import AutoModelForCausalLM, LlamaConfig

    directory.mkdir(parents=True, exist_ok=True)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator([text.read_text()], trainer=trainer)
    tok.save(str(directory / "tokenizer.json"))
    (directory / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "tokenizer_class": "PreTrainedTokenizerFast",
                "eos_token": "<|endoftext|>",
                "model_max_length": 1024,
            }
        )
    )
    config = LlamaConfig(
        vocab_size=tok.get_vocab_size(),
        hidden_size=hidden,
        intermediate_size=4 * hidden,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=256,
        eos_token_id=tok.token_to_id("<|endoftext|>"),
    )
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(directory)
    return directory


def trained_like_hf_model(directory: Path, text: Path) -> Path:
    """``small_hf_model`` made to look trained where RL's checks can tell, saved in place.

    Untrained, the model is nearly uniform over its vocabulary (two models' samples coincide)
    and its weights are Gaussian (int8 rounding moves them below what TOPLOC sees). Trained
    models have spread logits and outlier weights: one 10-sigma weight per row, and the output
    layer scaled up."""
    import torch
    from transformers import AutoModelForCausalLM

    small_hf_model(directory, text)
    model = AutoModelForCausalLM.from_pretrained(directory)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 2 and not name.startswith("lm_head"):
                col = torch.randint(0, p.size(1), (p.size(0),), generator=gen)
                sign = torch.randint(0, 2, (p.size(0),), generator=gen) * 2 - 1
                p[torch.arange(p.size(0)), col] = 10.0 * float(p.std()) * sign
        model.lm_head.weight.mul_(40.0)
    model.save_pretrained(directory)
    return directory
