"""cotrain.models: the small GPT (sizes, seeded init, KV cache, training) and model specs."""

from __future__ import annotations

import pytest
import torch

import cotrain.models as models
from cotrain.models import GPT, ByteTokenizer, GPTConfig, ModelSpecError, load_model
from cotrain.models.hf import cache_dir

pytestmark = pytest.mark.timeout(120)


def test_public_surface_is_pinned():
    assert sorted(models.__all__) == sorted(
        [
            "GPT",
            "GPTLM",
            "HFLM",
            "ByteTokenizer",
            "CausalLM",
            "GPTConfig",
            "GPTOutput",
            "KVCache",
            "LoraConfig",
            "ModelConfig",
            "ModelError",
            "ModelNotFoundError",
            "ModelSpecError",
            "TrainableLM",
            "build_model",
            "load_model",
        ]
    )


def test_named_sizes():
    debug = GPTConfig.named("debug")
    assert (debug.n_layer, debug.n_embd) == (2, 256)
    assert 1_500_000 < GPT(debug).num_params() < 2_000_000
    ten = GPT(GPTConfig.named("10m"))
    assert 9_500_000 < ten.num_params() < 11_500_000
    assert GPTConfig(size="10m").n_embd == 384  # the size fills the fields in TOML too
    assert GPTConfig.named("debug", n_layer=3).n_layer == 3


def test_bad_configs_say_what_to_fix():
    with pytest.raises(ValueError, match="must divide"):
        GPTConfig.named("debug", n_head=3)
    with pytest.raises(ValueError, match="unknown GPT size"):
        GPTConfig.named("huge")
    with pytest.raises(ValueError, match="Extra inputs"):
        GPTConfig.model_validate({"size": "debug", "n_layers": 2})


def test_init_is_seeded():
    a, b = GPT(GPTConfig.named("debug", seed=1)), GPT(GPTConfig.named("debug", seed=1))
    c = GPT(GPTConfig.named("debug", seed=2))
    for (na, pa), (_, pb) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
        assert torch.equal(pa, pb), na
    assert not torch.equal(a.transformer.wte.weight, c.transformer.wte.weight)
    assert a.lm_head.weight is a.transformer.wte.weight  # tied


def test_forward_logits_and_loss():
    model = GPT(GPTConfig.named("debug"))
    idx = torch.randint(0, 256, (2, 16))
    out = model(idx)
    assert out.logits.shape == (2, 16, 256) and out.loss is None
    out = model(idx[:, :-1], idx[:, 1:])
    assert out.loss is not None and abs(out.loss.item() - torch.log(torch.tensor(256.0))) < 0.5
    with pytest.raises(ValueError, match="block_size"):
        model(torch.zeros((1, 513), dtype=torch.long))


def test_kv_cache_matches_full_recompute():
    model = GPT(GPTConfig.named("debug", seed=3)).eval()
    prompt = torch.randint(0, 256, (2, 7))
    out = model.generate(prompt, 12, temperature=0)
    # Greedy without the cache: recompute the whole sequence at every step.
    seq = prompt
    with torch.no_grad():
        for _ in range(12):
            nxt = model(seq).logits[:, -1].argmax(-1, keepdim=True)
            seq = torch.cat([seq, nxt], 1)
        assert torch.equal(out, seq)
        full = model.hidden_states(out)
        cache = model.new_cache(2)
        step = torch.cat([model.hidden_states(out[:, :7], cache)] + [
            model.hidden_states(out[:, i : i + 1], cache) for i in range(7, 19)
        ], 1)  # fmt: skip
    torch.testing.assert_close(step, full, rtol=1e-4, atol=1e-5)


def test_sampling_is_seeded_and_stops():
    model = GPT(GPTConfig.named("debug")).eval()
    prompt = torch.randint(0, 256, (3, 5))
    a = model.generate(prompt, 10, generator=torch.Generator().manual_seed(0))
    b = model.generate(prompt, 10, generator=torch.Generator().manual_seed(0))
    assert torch.equal(a, b) and a.shape == (3, 15)
    c = model.generate(prompt, 10, temperature=1.0, top_k=1)
    assert torch.equal(c, model.generate(prompt, 10, temperature=0))
    s = model.generate(prompt, 30, stop_token=int(c[0, 5]))  # rows keep the stop token
    for row in s[:, 5:].tolist():
        if int(c[0, 5]) in row:
            i = row.index(int(c[0, 5]))
            assert set(row[i:]) == {int(c[0, 5])}


@pytest.mark.timeout(180)
def test_debug_model_trains_in_seconds():
    torch.manual_seed(0)
    model = GPT(GPTConfig.named("debug"))
    text = ByteTokenizer().encode("the quick brown fox jumps over the lazy dog. " * 20)
    data = torch.tensor(text)
    opt = torch.optim.AdamW(model.parameters(), lr=5e-3)
    losses = []
    for _ in range(25):
        starts = torch.randint(0, len(data) - 33, (8,))
        batch = torch.stack([data[s : s + 33] for s in starts])
        loss = model(batch[:, :-1], batch[:, 1:]).loss
        assert loss is not None
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0]


def test_byte_tokenizer_roundtrip():
    tok = ByteTokenizer()
    assert tok.decode(tok.encode("héllo, wörld")) == "héllo, wörld"
    assert tok.decode([0xC3]) == "\ufffd"


def test_model_specs():
    lm = load_model("gpt-debug-seed4")
    assert lm.model_id == "gpt-debug-seed4" and lm.vocab_size == 256 and lm.max_seq_len == 512
    assert load_model("gpt-debug").model_id == "gpt-debug-seed0"
    for bad in ("gpt-huge-seed1", "llama-7b", "/nonexistent/dir"):
        with pytest.raises(ModelSpecError):
            load_model(bad)


def test_cache_dir_follows_env(monkeypatch, tmp_path):
    monkeypatch.setenv("COTRAIN_CACHE", str(tmp_path))
    assert cache_dir() == tmp_path
    monkeypatch.delenv("COTRAIN_CACHE")
    assert cache_dir().name == "cotrain"
