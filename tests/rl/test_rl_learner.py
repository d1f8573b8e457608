"""The learner: its log-probabilities match the workers' (ratio 1 on fresh rollouts), a step
raises positive-advantage completions and lowers negative ones, steps are bit-identical and
survive a checkpoint, the memory measures (recomputed activations, the projection at completion
positions only, the tied weight's gradient summed in place) leave a step bit for bit the same,
checkpoint files are written tensor by tensor and link the published weights, an empty batch
changes nothing, and held-out greedy accuracy is the batched decoding of every task."""

from __future__ import annotations

import copy
import hashlib
import os
from pathlib import Path
from typing import Any

import pytest
import torch
from hf_harness import small_hf_model, write_text

from cotrain.rl import sampling, wire
from cotrain.rl.checkpoint import CheckpointError
from cotrain.rl.config import TrainerConfig
from cotrain.rl.env import Task
from cotrain.rl.evaluate import heldout_accuracy
from cotrain.rl.learner import Learner
from cotrain.rl.weights import weights_bytes, write_safetensors, write_weights

pytest.importorskip("transformers")

CFG = TrainerConfig(lr=3e-3, micro_batch=3, pack_prompts=False)
PACKED = TrainerConfig(lr=3e-3, micro_batch=3)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tmp = tmp_path_factory.mktemp("rl_learner")
    return small_hf_model(tmp / "m", write_text(tmp / "text.txt"))


@pytest.fixture(autouse=True)
def one_thread() -> Any:
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _load(model_dir: Path) -> Any:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model_dir).eval()


def _batch(
    model: Any, step: int, *, temperature: float = 1.0, version: int | None = None
) -> wire.Batch:
    """Two groups of four honest samples (prompts of different lengths), advantages r - mean
    with made-up rewards."""
    prompts = [[5, 17, 42, 99, 3], [7, 250, 31, 8, 64, 12, 90, 4]]
    samples = []
    for g, prompt in enumerate(prompts):
        rewards = [1.0, 0.0, 1.0, 0.0] if g == 0 else [0.0, 0.0, 1.0, 0.0]
        mean = sum(rewards) / len(rewards)
        for j, r in enumerate(rewards):
            out = sampling.generate(
                model,
                prompt,
                max_new_tokens=4 + j,
                temperature=temperature,
                seed=100 * step + 10 * g + j,
                eos_token_id=None,
            )
            samples.append(
                wire.Sample(
                    rollout_id=f"s{step}.j{g}.a0.i0/{j}",
                    prompt_ids=prompt,
                    completion_ids=out.tokens,
                    logprobs=out.logprobs,
                    advantage=r - mean,
                    reward=r,
                    version=step if version is None else version,
                    temperature=temperature,
                )
            )
    return wire.Batch(step, samples, groups=2, dropped_groups=0, mean_reward=0.375, level=0)


def _seq_logprob(model: Any, s: wire.Sample) -> float:
    logits = sampling.prefill_logits(model, s.prompt_ids, s.completion_ids)  # (T, V)
    lp = torch.log_softmax(logits / s.temperature, -1)
    return float(lp.gather(-1, torch.tensor(s.completion_ids)[:, None]).sum())


def _weights(model: Any) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_step_agrees_with_the_workers_and_follows_the_advantages(model_dir: Path) -> None:
    model = _load(model_dir)
    batch = _batch(model, 1, temperature=0.7)
    before = [_seq_logprob(model, s) for s in batch.samples]
    learner = Learner(model, PACKED)
    stats = learner.step(batch)
    # fresh rollouts of the same weights: the trainer's log-probabilities are the worker's
    assert stats.mismatch_kl < 1e-8 and stats.clip_fraction == 0.0
    assert 0.9999 < stats.ratio_min <= stats.ratio_max < 1.0001
    assert stats.tokens == sum(len(s.completion_ids) for s in batch.samples)
    assert stats.samples == 8 and stats.micro_batches == 3 and stats.applied
    assert stats.staleness == {0: 8} and stats.grad_norm > 0

    after = [_seq_logprob(model, s) for s in batch.samples]
    for s, b, a in zip(batch.samples, before, after, strict=True):
        if s.advantage > 0:
            assert a > b, s.rollout_id
        elif s.advantage < 0:
            assert a < b, s.rollout_id
    # the same batch again is now off-policy: ratios move, the loss is lower
    again = learner.step(batch)
    assert again.loss < stats.loss and again.mismatch_kl > 0


def test_micro_batching_does_not_change_the_step(model_dir: Path) -> None:
    base = _load(model_dir)
    batch = _batch(base, 1)
    results = []
    for mb in (1, 3, 16):
        model = copy.deepcopy(base)
        stats = Learner(model, TrainerConfig(lr=3e-3, micro_batch=mb)).step(batch)
        results.append((stats, _weights(model)))
    (s1, w1), (_, w3), (s16, w16) = results
    assert s1.loss == pytest.approx(s16.loss, rel=1e-5)
    assert s1.grad_norm == pytest.approx(s16.grad_norm, rel=1e-4)
    # AdamW divides by the root of the squared gradient: a weight whose gradient is ~0 moves
    # by up to lr on rounding alone, so its step agrees to a few % of lr (the loss and the
    # gradient norm above are the tight checks)
    for k in w1:
        torch.testing.assert_close(w1[k], w16[k], rtol=1e-4, atol=0.05 * 3e-3)
        torch.testing.assert_close(w3[k], w16[k], rtol=1e-4, atol=0.05 * 3e-3)


@pytest.mark.parametrize("pack_tokens", [1024, 16])
def test_packing_a_prompts_samples_in_one_row_changes_a_step_only_by_rounding(
    model_dir: Path, pack_tokens: int
) -> None:
    base = _load(model_dir)
    b1, b2 = _batch(base, 1, temperature=0.7), _batch(base, 2, version=1)
    results = []
    for pack in (False, True):
        model = copy.deepcopy(base)
        cfg = TrainerConfig(lr=3e-3, micro_batch=3, pack_prompts=pack, pack_tokens=pack_tokens)
        learner = Learner(model, cfg)
        assert learner._packs == pack
        grads: list[list[torch.Tensor]] = []
        adamw = learner.optimizer.step

        def step(adamw: Any = adamw, grads: Any = grads, learner: Any = learner) -> Any:
            grads.append([p.grad.clone() for p in learner.params])  # what AdamW is given
            return adamw()

        learner.optimizer.step = step  # type: ignore[method-assign]
        stats = [learner.step(b1), learner.step(b2)]
        results.append((stats, grads))
    (plain, g_plain), (packed, g_packed) = results
    for a, b in zip(plain, packed, strict=True):
        assert a.loss == pytest.approx(b.loss, rel=1e-4, abs=1e-7)
        assert a.grad_norm == pytest.approx(b.grad_norm, rel=1e-4)
        assert a.ratio_min == pytest.approx(b.ratio_min, abs=1e-5)
        assert a.tokens == b.tokens
    for step_a, step_b in zip(g_plain, g_packed, strict=True):
        for ga, gb in zip(step_a, step_b, strict=True):
            torch.testing.assert_close(ga, gb, rtol=1e-3, atol=1e-6)


def test_a_packed_row_keeps_each_completion_to_its_prompt_and_itself(model_dir: Path) -> None:
    """Fresh samples packed in one row (and split over rows): every token's ratio to the
    worker's log-probability, computed on the sample alone, is 1."""
    model = _load(model_dir)
    batch = _batch(model, 1)
    for limit in (1024, 12):
        learner = Learner(model, TrainerConfig(micro_batch=8, pack_tokens=limit))
        with torch.no_grad():
            out = learner._micro_batch(batch.samples)
        assert out.tokens == sum(len(s.completion_ids) for s in batch.samples)
        assert 0.9999 < out.ratio_min <= out.ratio_max < 1.0001, limit


def test_steps_are_bit_identical_and_resume_exactly(model_dir: Path, tmp_path: Path) -> None:
    ref = _load(model_dir)
    b1 = _batch(ref, 1)
    b2 = _batch(ref, 2, version=1)  # a stale batch: rollouts of v1 at step 2

    def run(model: Any) -> dict[str, torch.Tensor]:
        learner = Learner(model, CFG)
        learner.step(b1)
        stats = learner.step(b2)
        assert stats.staleness == {1: 8} and stats.mean_staleness == 1.0
        return _weights(model)

    straight = run(_load(model_dir))
    assert _equal(straight, run(_load(model_dir)))  # twice: bit-identical

    first = Learner(_load(model_dir), CFG)
    first.step(b1)
    first.save(tmp_path / "ckpt", 1, {"version": 2})
    first.save(tmp_path / "ckpt", 1, {"version": 2})  # saved again: still one complete save
    resumed = Learner(_load(model_dir), CFG)
    saved = resumed.load(tmp_path / "ckpt")
    assert saved is not None and saved.step == 1 and saved.extra == {"version": 2}
    assert resumed.steps == 1
    resumed.step(b2)
    assert _equal(straight, _weights(resumed.model))
    # the second save of step 1 took a name of its own, so latest never named a half-replaced
    # directory; the first is gone
    latest, only = sorted(p.name for p in (tmp_path / "ckpt").iterdir())
    assert latest == "latest" and only.startswith("step-00000001-")
    assert (tmp_path / "ckpt" / "latest").read_text() == only


def _tied_model(seed: int = 7) -> Any:
    """A small Llama whose output projection is its input embeddings (as SmolLM2's)."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    cfg = LlamaConfig(
        vocab_size=512,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=3,
        num_attention_heads=2,
        num_key_value_heads=2,
        tie_word_embeddings=True,
    )
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(cfg).eval()


def _plain(learner: Learner, *, keep_head: bool = False) -> Learner:
    """The step without its memory measures: every activation kept, (N, K, V) logits gathered
    after the projection (unless ``keep_head``), the tied weight's two gradients summed by
    autograd."""
    learner._layers, learner._tied = [], None
    if not keep_head:
        learner._head = None
    return learner


@pytest.mark.parametrize("tied", [False, True])
def test_the_memory_measures_leave_a_step_bit_for_bit_the_same(model_dir: Path, tied: bool) -> None:
    base = _tied_model() if tied else _load(model_dir)
    # micro-batches of 3 over groups of 4: the second holds prompts of two lengths; a
    # temperature that is not 1, then completions of several lengths from an older version
    b1 = _batch(base, 1, temperature=0.7)
    b2 = _batch(base, 2, version=1)

    def run(make: Any) -> tuple[dict[str, torch.Tensor], list[dict[str, Any]]]:
        model = copy.deepcopy(base)
        learner = make(model)
        stats = [learner.step(b1).to_json(), learner.step(b2).to_json()]
        return _weights(model), stats

    learner = Learner(copy.deepcopy(base), CFG)
    assert len(learner._layers) == 2 + tied and learner._head is not None
    assert (learner._tied is not None) == tied
    ref_w, ref_s = run(lambda m: _plain(Learner(m, CFG)))
    for make in (lambda m: Learner(m, CFG), lambda m: Learner(m, CFG, recompute=False)):
        w, s = run(make)
        assert _equal(ref_w, w) and s == ref_s
    # packed rows: the projection at the gathered positions is a matrix product of another
    # shape than over the whole row (other rounding), so the reference keeps it
    assert Learner(copy.deepcopy(base), PACKED)._packs
    ref_w, ref_s = run(lambda m: _plain(Learner(m, PACKED), keep_head=True))
    for make in (lambda m: Learner(m, PACKED), lambda m: Learner(m, PACKED, recompute=False)):
        w, s = run(make)
        assert _equal(ref_w, w) and s == ref_s
    assert not _equal(ref_w, _weights(base))  # it trained


def test_recomputing_keeps_only_the_layers_inputs(model_dir: Path) -> None:
    model = _load(model_dir)
    chunk = _batch(model, 1).samples[:3]

    def saved_bytes(learner: Learner) -> int:
        params = {p.untyped_storage().data_ptr() for p in model.parameters()}
        saved: dict[int, int] = {}

        def pack(t: torch.Tensor) -> torch.Tensor:
            if t.untyped_storage().data_ptr() not in params:
                saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out = learner._micro_batch(chunk)
        out.loss.backward()
        model.zero_grad(set_to_none=True)
        return sum(saved.values())

    kept = saved_bytes(Learner(model, CFG, recompute=False))
    recomputed = saved_bytes(Learner(model, CFG))
    assert recomputed < kept / 2
    assert "forward" not in model.model.layers[0].__dict__  # the layers are as they were


def test_safetensors_written_tensor_by_tensor(tmp_path: Path) -> None:
    from safetensors.torch import load_file

    tensors = {
        "b": torch.arange(6, dtype=torch.float32).reshape(2, 3),
        "a.step": torch.tensor(3.0),
        "c": torch.ones(3, dtype=torch.bfloat16),
        "d": torch.arange(5, dtype=torch.int64),
        "e": torch.tensor([True, False]),
        "f": torch.arange(12, dtype=torch.float32).reshape(3, 4).t(),  # not contiguous
    }
    path = tmp_path / "x.safetensors"
    digest = write_safetensors(tensors, path)
    assert digest == hashlib.sha256(path.read_bytes()).hexdigest()
    back = load_file(path)
    assert back.keys() == tensors.keys()
    for k, t in tensors.items():
        assert back[k].dtype == t.dtype and torch.equal(back[k], t), k


def test_weights_written_to_a_file_are_the_published_bytes(tmp_path: Path) -> None:
    model = _tied_model()
    write_weights(model, tmp_path / "w.safetensors")
    assert (tmp_path / "w.safetensors").read_bytes() == weights_bytes(model)


def test_a_checkpoint_links_the_published_weights(model_dir: Path, tmp_path: Path) -> None:
    from safetensors.torch import load_file

    learner = Learner(_load(model_dir), CFG)
    learner.step(_batch(learner.model, 1))
    # no weights given: the model file is what a version publishes
    path = learner.save(tmp_path / "a", 1)
    assert (path / "model.safetensors").read_bytes() == weights_bytes(learner.model)
    # a file given: linked, not written again; its hash as given
    published = tmp_path / "v2.safetensors"
    write_weights(learner.model, published)
    digest = hashlib.sha256(published.read_bytes()).hexdigest()
    path = learner.save(tmp_path / "b", 1, weights=published, weights_sha256=digest)
    assert os.stat(path / "model.safetensors").st_ino == os.stat(published).st_ino
    state = load_file(path / "optimizer.safetensors")
    assert (
        state.keys() == load_file(tmp_path / "a" / "step-00000001" / "optimizer.safetensors").keys()
    )
    again = Learner(_load(model_dir), CFG)
    saved = again.load(tmp_path / "b")
    assert saved is not None and saved.model_sha256 == digest
    assert _equal(_weights(learner.model), _weights(again.model))
    for p, q in zip(learner.params, again.params, strict=True):
        a, b = learner.optimizer.state[p], again.optimizer.state[q]
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_corrupt_or_missing_checkpoint(model_dir: Path, tmp_path: Path) -> None:
    learner = Learner(_load(model_dir), CFG)
    assert learner.load(tmp_path / "none") is None
    path = learner.save(tmp_path / "ckpt", 3)
    data = bytearray((path / "optimizer.safetensors").read_bytes())
    data[-1] ^= 1
    (path / "optimizer.safetensors").write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="corrupt"):
        Learner(_load(model_dir), CFG).load(tmp_path / "ckpt")


def test_an_empty_batch_changes_nothing(model_dir: Path) -> None:
    model = _load(model_dir)
    learner = Learner(model, CFG)
    before = _weights(model)
    stats = learner.step(wire.Batch(1, [], groups=0, dropped_groups=4, mean_reward=1.0, level=0))
    assert not stats.applied and stats.samples == 0 and stats.tokens == 0
    assert learner.steps == 1 and _equal(before, _weights(model))


def test_published_weights_load_into_a_tied_model(tmp_path: Path) -> None:
    from safetensors.torch import load_model
    from transformers import AutoModelForCausalLM, LlamaConfig

    cfg = LlamaConfig(
        vocab_size=64,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
        tie_word_embeddings=True,
    )
    torch.manual_seed(3)
    a = AutoModelForCausalLM.from_config(cfg)
    torch.manual_seed(4)
    b = AutoModelForCausalLM.from_config(cfg)
    data = weights_bytes(a)
    assert weights_bytes(a) == data  # the same weights, the same bytes (and manifest hash)
    f = tmp_path / "w.safetensors"
    f.write_bytes(data)
    load_model(b, f, strict=True)
    assert _equal(_weights(a), _weights(b))
    # what save_pretrained keeps; a plain load_state_dict misses only the tied output name
    from safetensors.torch import load_file

    state = load_file(f)
    assert "model.embed_tokens.weight" in state and "lm_head.weight" not in state
    torch.manual_seed(5)
    c = AutoModelForCausalLM.from_config(cfg)
    missing, unexpected = c.load_state_dict(state, strict=False)
    assert missing == ["lm_head.weight"] and not unexpected


class _CopyEnv:
    """Scores 1 exactly when the reply is the one unbatched greedy decoding gives."""

    id = "copy@1"
    levels = 1

    def __init__(self, expected: dict[int, str]) -> None:
        self.expected = expected

    def task(self, seed: int, level: int = 0) -> Task:
        return Task(self.id, seed, level, "the number " * (1 + seed % 4) + str(seed), "", {})

    def score(self, task: Task, reply: str) -> float:
        return 1.0 if reply == self.expected[task.seed] else 0.0


def test_heldout_accuracy_decodes_every_task_greedily_in_batches(model_dir: Path) -> None:
    from transformers import AutoTokenizer

    from cotrain.rl.policy import encode_prompt

    model = _load(model_dir)
    tok = AutoTokenizer.from_pretrained(model_dir)
    seeds = list(range(7))
    env = _CopyEnv({})
    for s in seeds:  # one at a time, no padding
        ids = encode_prompt(tok, env.task(s).prompt)
        out = sampling.generate(
            model, ids, max_new_tokens=6, temperature=0.0, seed=0, eos_token_id=tok.eos_token_id
        )
        env.expected[s] = tok.decode(out.tokens, skip_special_tokens=True)
    kw: dict[str, Any] = {"level": 0, "max_new_tokens": 6}
    assert heldout_accuracy(model, tok, env, seeds, batch_size=3, **kw) == 1.0
    env.expected[5] = "something else"
    assert heldout_accuracy(model, tok, env, seeds, batch_size=4, **kw) == pytest.approx(6 / 7)


def test_heldout_accuracy_on_a_real_environment(model_dir: Path) -> None:
    pytest.importorskip("reasoning_gym")
    from transformers import AutoTokenizer

    from cotrain.rl.env import make_env
    from cotrain.rl.seeds import heldout_seeds

    model = _load(model_dir)
    tok = AutoTokenizer.from_pretrained(model_dir)
    env = make_env("chain_sum")
    seeds = heldout_seeds(6)
    a = heldout_accuracy(model, tok, env, seeds, level=0, max_new_tokens=4, batch_size=4)
    b = heldout_accuracy(model, tok, env, seeds, level=0, max_new_tokens=4, batch_size=4)
    assert 0.0 <= a <= 1.0 and a == b


# ---- the trainer role's parts that need no orchestrator ----------------------------------------


def _rl_config(tmp_path: Path, model_dir: Path, **trainer: Any) -> Any:
    from cotrain.rl.config import ModelSpec, RLConfig, RunConfig

    return RLConfig(
        run=RunConfig(id="rl-test", out_dir=tmp_path / "run", total_steps=4),
        model=ModelSpec(path=str(model_dir)),
        trainer=TrainerConfig(lr=3e-3, micro_batch=3, **trainer),
    )


def test_resume_keeps_checkpoint_and_versions_in_agreement(model_dir: Path, tmp_path: Path) -> None:
    from cotrain.core.identity import Identity
    from cotrain.rl.trainer import (
        ResumeError,
        checkpoint_dir,
        publish_config,
        resume,
        sha256,
        versions_dir,
    )
    from cotrain.shardcast.publisher import publish
    from cotrain.shardcast.store import VersionStore

    cfg = _rl_config(tmp_path, model_dir)
    key = Identity.generate()
    store = VersionStore(versions_dir(cfg))
    base = _load(model_dir)
    b1, b2 = _batch(base, 1), _batch(base, 2)

    # a new run publishes the base as v1; a restart finds it and publishes nothing
    r = resume(Learner(_load(model_dir), CFG), cfg, key, log=lambda _: None)
    assert (r.action, r.step, r.version) == ("published base", 0, 1)
    assert r.file_sha256 == sha256(weights_bytes(base)) and store.versions() == [1]
    r = resume(Learner(_load(model_dir), CFG), cfg, key, log=lambda _: None)
    assert (r.action, r.step, r.version) == ("continued", 0, 1) and store.versions() == [1]

    # killed after the checkpoint of step 1, before publishing v2: v2 is its weights
    learner = Learner(_load(model_dir), cfg.trainer)
    learner.step(b1)
    after1 = sha256(weights_bytes(learner.model))
    learner.save(checkpoint_dir(cfg), 1, {"version": 2, "file_sha256": after1, "level": 0})
    r = resume(Learner(_load(model_dir), cfg.trainer), cfg, key, log=lambda _: None)
    assert (r.action, r.step, r.version, r.file_sha256) == ("published checkpoint", 1, 2, after1)
    r = resume(Learner(_load(model_dir), cfg.trainer), cfg, key, log=lambda _: None)
    assert (r.action, r.version) == ("continued", 2) and store.versions() == [1, 2]

    # step 2 published without a checkpoint (checkpoint_every > 1): its weights come back
    learner.step(b2)
    after2 = weights_bytes(learner.model)
    publish(after2, dir=store.root, identity=key, config=publish_config(cfg))
    again = Learner(_load(model_dir), cfg.trainer)
    r = resume(again, cfg, key, log=lambda _: None)
    assert (r.action, r.step, r.version) == ("loaded version", 2, 3)
    assert again.steps == 2 and weights_bytes(again.model) == after2

    # the trainer's order: publish, then save the published bytes as the checkpoint's model
    learner.save(checkpoint_dir(cfg), 2, {"level": 1}, weights=after2)
    r = resume(Learner(_load(model_dir), cfg.trainer), cfg, key, log=lambda _: None)
    assert (r.action, r.step, r.version, r.level) == ("continued", 2, 3, 1)
    assert r.file_sha256 == sha256(after2) and store.versions() == [1, 2, 3]

    # the versions of another key are not ours to continue
    with pytest.raises(ResumeError, match="another trainer or run"):
        resume(Learner(_load(model_dir), cfg.trainer), cfg, Identity.generate())
    # a checkpoint ahead of every version: refused with what to delete
    other = _rl_config(tmp_path / "b", model_dir)
    learner.save(checkpoint_dir(other), 2, {})
    with pytest.raises(ResumeError, match="holds no version"):
        resume(Learner(_load(model_dir), other.trainer), other, key)


def test_the_trainer_publishes_one_file_that_the_checkpoint_links(
    model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import safetensors.torch

    from cotrain.core.identity import Identity
    from cotrain.rl.trainer import (
        Trainer,
        checkpoint_dir,
        publish_config,
        sha256,
        staging_dir,
        versions_dir,
    )
    from cotrain.shardcast.publisher import publish
    from cotrain.shardcast.store import VersionStore

    cfg = _rl_config(tmp_path, model_dir)
    key = Identity.generate()
    trainer = Trainer(cfg, _load(model_dir), None, key)
    batch = _batch(trainer.learner.model, 1)

    def no_bytes(*_: Any, **__: Any) -> bytes:
        raise AssertionError("the weights were serialised to bytes in memory")

    monkeypatch.setattr(safetensors.torch, "save", no_bytes)
    stats, staged, _ = trainer._train(batch)
    assert stats.applied and staged.parent == staging_dir(cfg)
    result = publish(staged, dir=versions_dir(cfg), identity=key, config=publish_config(cfg))
    trainer._checkpoint(1, staged, result.manifest.file_sha256, 0)
    monkeypatch.undo()
    assert not staged.exists() and list(staging_dir(cfg).iterdir()) == []
    data = VersionStore(versions_dir(cfg)).data_path(result.version)
    model_file = checkpoint_dir(cfg) / "step-00000001" / "model.safetensors"
    assert os.stat(model_file).st_ino == os.stat(data).st_ino  # one file on disk
    assert result.manifest.file_sha256 == sha256(weights_bytes(trainer.learner.model))


def test_the_version_notice_is_signed_and_parses(model_dir: Path, tmp_path: Path) -> None:
    from cotrain.core.identity import Identity
    from cotrain.core.signed import Envelope
    from cotrain.rl.trainer import Trainer

    cfg = _rl_config(tmp_path, model_dir)
    key = Identity.generate()
    trainer = Trainer(cfg, _load(model_dir), None, key)
    trainer.version, trainer.file_sha256 = 3, "ab" * 32
    trainer.origin_url = "http://127.0.0.1:8490"
    env = Envelope.from_json(
        trainer.notice().to_json(), domain=wire.VERSION, signers={key.public_hex}
    )
    notice = wire.VersionNotice.from_body(env.body)
    assert (notice.run, notice.version, notice.step) == ("rl-test", 3, 2)
    assert notice.servers == ["http://127.0.0.1:8490"]


def test_an_unreachable_orchestrator_is_one_typed_error() -> None:
    import asyncio
    import socket

    import aiohttp

    from cotrain.rl.errors import OrchestratorUnreachable
    from cotrain.rl.trainer import OrchestratorLink

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]

    async def ask() -> None:
        async with aiohttp.ClientSession() as session:
            link = OrchestratorLink(f"http://127.0.0.1:{port}", session, log=lambda _: None)
            await link.batch(1, timeout_s=0.3)

    with pytest.raises(OrchestratorUnreachable, match="no answer"):
        asyncio.run(ask())
