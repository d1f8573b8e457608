"""cotrain.toploc on the tiny GPT: field arithmetic, proofs, capture, validation, records, CLI."""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import replace

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

import cotrain.toploc as toploc
from cotrain.models import load_model
from cotrain.toploc import (
    ProofBuildError,
    ProofConfig,
    ProofFormatError,
    RecordError,
    Rollout,
    Validator,
    ValidatorConfig,
    build_proofs,
    generate_with_proofs,
    read_rollouts,
    verify_proofs,
    write_rollouts,
)
from cotrain.toploc.capture import HiddenCapture
from cotrain.toploc.field import PRIME, evaluate, injective_moduli, interpolate, inverse_table

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def honest():
    """Eight rollouts of the tiny GPT: prompts of two lengths, 70 output tokens each."""
    torch.set_num_threads(1)
    lm = load_model("gpt-debug-seed0")
    prompts = [lm.encode_prompt(f"prompt number {i}: say something") for i in range(6)]
    prompts += [lm.encode_prompt(f"a longer prompt, number {i}, of another length") for i in (0, 1)]
    res = generate_with_proofs(lm, prompts, 70, seed=5, batch_size=4, keep_hidden=True)
    return lm, res


def test_public_surface_is_pinned():
    assert sorted(toploc.__all__) == sorted(
        [
            "ChunkResult",
            "GenerationResult",
            "ProofBuildError",
            "ProofConfig",
            "ProofFormatError",
            "ProofVerdict",
            "RecordError",
            "Rollout",
            "RolloutVerdict",
            "ToplocError",
            "ValidationReport",
            "Validator",
            "ValidatorConfig",
            "build_proofs",
            "generate_with_proofs",
            "read_rollouts",
            "verify_proofs",
            "write_rollouts",
        ]
    )


# ------------------------------------------------------------------ field arithmetic


def test_inverse_table():
    inv = inverse_table()
    a = np.arange(1, PRIME)
    assert ((a * inv[1:]) % PRIME == 1).all()


def test_interpolation_roundtrip_batched():
    rng = np.random.default_rng(0)
    x = np.stack([rng.choice(PRIME, 128, replace=False) for _ in range(6)])
    y = rng.integers(0, PRIME, (6, 128))
    coeffs = interpolate(x, y)
    assert coeffs.shape == (6, 128) and coeffs.max() < PRIME
    assert (evaluate(coeffs, x) == y).all()
    # A polynomial of degree < k through k points is unique: other points give other values.
    other = (x + 1) % PRIME
    assert (evaluate(coeffs, other) != y).mean() > 0.95


def test_injective_moduli_for_large_indices():
    rng = np.random.default_rng(1)
    x = np.stack([rng.choice(10**7, 128, replace=False) for _ in range(40)])
    m = injective_moduli(x)
    assert (m <= PRIME).all() and (m < PRIME).any()  # some rows needed a search
    for row, mod in zip(x, m, strict=True):
        assert len(set((row % mod).tolist())) == 128
    assert (injective_moduli(np.arange(128)[None]) == PRIME).all()


# ------------------------------------------------------------------ proofs


def test_proof_size_and_roundtrip():
    h = torch.randn(100, 256, generator=torch.Generator().manual_seed(0))
    proof = build_proofs(h)
    assert len(proof) == 4 * 258  # 32 + 32 + 32 + 4 rows
    verdict = verify_proofs(proof, h)
    assert verdict.passed and len(verdict.chunks) == 4
    assert all(c.matches == 128 and c.mant_err_mean == 0 for c in verdict.chunks)


def test_golden_proof():
    """Seeded proof bytes are pinned; regenerate with COTRAIN_REGEN_GOLDEN=1 (prints them)."""
    h = torch.randn(40, 192, generator=torch.Generator().manual_seed(42))
    digest = hashlib.sha256(build_proofs(h)).hexdigest()
    if os.environ.get("COTRAIN_REGEN_GOLDEN"):
        print(digest)
    assert digest == "a403cbc3ef28f504f7b3ccc340008016cce7e0ef33798c6ddee62cd30c58cb6c"


def test_noise_passes_changes_fail():
    g = torch.Generator().manual_seed(1)
    h = torch.randn(64, 256, generator=g)
    proof = build_proofs(h)
    noisy = h * (1 + 0.004 * torch.randn(h.shape, generator=g))  # bf16-sized noise
    assert verify_proofs(proof, noisy).passed
    one_row = h.clone()
    one_row[40] = torch.randn(256, generator=g)  # one position changed
    v = verify_proofs(proof, one_row)
    assert not v.passed and v.failed_chunks == [1]
    scaled = h * 1.03  # every value 3% off: within match tolerance, median error too high
    v = verify_proofs(proof, scaled)
    assert all(c.passed for c in v.chunks) and not v.passed
    assert not verify_proofs(proof, torch.randn(64, 256, generator=g)).passed


def test_malformed_proofs_raise_clear_errors():
    h = torch.randn(40, 192, generator=torch.Generator().manual_seed(2))
    proof = build_proofs(h)
    with pytest.raises(ProofFormatError, match="truncated"):
        verify_proofs(proof[:-3], h)
    with pytest.raises(ProofFormatError, match="modulus"):
        verify_proofs(b"\x00\x00" + proof[2:], h)
    with pytest.raises(ProofFormatError, match="coefficient"):
        verify_proofs(proof[:2] + b"\xff\xff" + proof[4:], h)
    with pytest.raises(ProofFormatError, match="bytes"):
        verify_proofs("not bytes", h)  # type: ignore[arg-type]
    with pytest.raises(ProofBuildError, match="NaN"):
        build_proofs(torch.full((4, 192), float("nan")))
    with pytest.raises(ProofBuildError, match="cannot hold"):
        build_proofs(torch.randn(1, 64))  # 128 entries from a 64-wide row


# ------------------------------------------------------------------ capture and validation


def test_capture_records_exactly_what_a_prefill_recomputes(honest):
    lm, res = honest
    assert len(res.rollouts) == 8 and all(len(r.output_tokens) == 70 for r in res.rollouts)
    for r, h in zip(res.rollouts, res.hidden, strict=True):
        seq = torch.tensor([r.prompt_tokens + r.output_tokens[:-1]])
        full = lm.hidden_states(seq, torch.ones_like(seq))[0]
        assert h.shape == full.shape
        torch.testing.assert_close(h, full, rtol=1e-4, atol=1e-4)
        n_chunks = -(-(len(r.prompt_tokens) + 69) // 32)
        assert len(r.proof) == 258 * n_chunks


def test_hook_is_removed():
    lm = load_model("gpt-debug-seed0")
    with HiddenCapture(lm.final_norm) as cap:
        lm.generate([[1, 2, 3]], 2)
    lm.generate([[1, 2, 3]], 2)
    assert len(cap.outputs) == 2  # prefill + one decode step; nothing after the context


@pytest.mark.parametrize("batch_size", [1, 3, 8])
def test_honest_rollouts_pass_any_batching(honest, batch_size):
    lm, res = honest
    report = Validator(lm, ValidatorConfig(batch_size=batch_size)).validate(res.rollouts)
    assert report.n_passed == 8, [v.reason for v in report.verdicts]


def test_bf16_recompute_passes(honest):
    _, res = honest
    bf16 = load_model("gpt-debug-seed0")
    report = Validator(bf16, ValidatorConfig(dtype="bfloat16")).validate(res.rollouts)
    assert report.n_passed == 8, [v.reason for v in report.verdicts]


def test_cheats_fail(honest):
    lm, res = honest
    rs = res.rollouts
    v = Validator(lm)
    rng = np.random.default_rng(3)
    cheats: dict[str, list[Rollout]] = {}
    altered = []
    for r in rs:
        out = list(r.output_tokens)
        j = int(rng.integers(0, len(out) - 1))
        out[j] = (out[j] + 1 + int(rng.integers(0, 254))) % 256
        altered.append(replace(r, output_tokens=out))
    cheats["output altered"] = altered
    prompt_changed = []
    for r in rs:
        p = list(r.prompt_tokens)
        p[int(rng.integers(0, len(p)))] ^= 0x20
        prompt_changed.append(replace(r, prompt_tokens=p))
    cheats["prompt changed"] = prompt_changed
    cheats["foreign proof"] = [replace(r, proof=rs[(i + 1) % 8].proof) for i, r in enumerate(rs)]
    cheats["garbage proof"] = [replace(r, proof=rng.bytes(len(r.proof))) for r in rs]
    cheats["truncated proof"] = [replace(r, proof=r.proof[:-5]) for r in rs]
    other = generate_with_proofs(
        load_model("gpt-debug-seed1"), [r.prompt_tokens for r in rs[:4]], 40, seed=5
    )
    cheats["another seed"] = [replace(r, model=lm.model_id) for r in other.rollouts]
    for name, rollouts in cheats.items():
        report = v.validate(rollouts)
        assert report.n_passed == 0, (name, [x.reason for x in report.verdicts])
    reasons = [x.reason for x in v.validate(cheats["truncated proof"]).verdicts]
    assert all("malformed proof" in r for r in reasons)


def test_int8_weights_are_told_from_bf16_noise(honest):
    """Recomputing with int8 weights is as far from the proofs as an int8 worker would be."""
    _, res = honest
    int8 = load_model("gpt-debug-seed0")
    with torch.no_grad():
        for lin in [m for m in int8.module.modules() if isinstance(m, torch.nn.Linear)]:
            scale = lin.weight.abs().amax(dim=1, keepdim=True) / 127
            lin.weight.copy_((lin.weight / scale).round() * scale)
    report = Validator(int8).validate(res.rollouts)
    assert report.n_passed == 0, [x.reason for x in report.verdicts]
    assert all("median relative error" in x.reason for x in report.verdicts)


def test_claims_that_cannot_be_checked(honest):
    lm, res = honest
    r = res.rollouts[0]
    bad = [
        replace(r, model="gpt-debug-seed9"),
        replace(r, output_tokens=[]),
        replace(r, output_tokens=[*r.output_tokens[:-1], 999]),
        replace(r, topk=64),
        replace(r, prompt_tokens=r.prompt_tokens * 20),
    ]
    report = Validator(lm).validate([*bad, r])
    assert [x.passed for x in report.verdicts] == [False] * 5 + [True]
    reasons = " | ".join(x.reason for x in report.verdicts)
    for part in ("claims model", "no output", "vocabulary", "topk=64", "longer than"):
        assert part in reasons


def test_calibrated_thresholds():
    from cotrain.toploc.config import calibrated_median_rel_err

    assert calibrated_median_rel_err("gpt-debug-seed3") == 0.0025
    assert calibrated_median_rel_err("smollm2-135m-instruct") == 0.01
    assert calibrated_median_rel_err("/some/hf/dir") == 0.01
    v = Validator(load_model("gpt-debug-seed0"))
    assert v.config.proof.max_median_rel_err == 0.0025
    assert ValidatorConfig().proof.max_median_rel_err is None  # the default is left untouched


def test_config_checks():
    with pytest.raises(ValueError, match="chunk_tokens"):
        ProofConfig(chunk_tokens=200)
    with pytest.raises(ValueError, match="match_rel_tol"):
        ProofConfig(match_rel_tol=2)


# ------------------------------------------------------------------ records and CLI


def test_records_roundtrip_and_bad_lines(honest, tmp_path):
    _, res = honest
    path = tmp_path / "r.jsonl"
    write_rollouts(path, res.rollouts[:2])
    with open(path, "a") as f:
        f.write("{not json\n\n")
        f.write(json.dumps({"id": "x"}) + "\n")
        line = json.loads(res.rollouts[0].to_json())
        line["proof"] = "***"
        f.write(json.dumps(line) + "\n")
    lines = list(read_rollouts(path))
    assert [ln.rollout == r for ln, r in zip(lines[:2], res.rollouts, strict=False)] == [True] * 2
    assert [ln.line_no for ln in lines[2:]] == [3, 5, 6]
    errors = [ln.error for ln in lines[2:]]
    assert "bad JSON" in errors[0] and "missing field" in errors[1] and "base64" in errors[2]
    with pytest.raises(RecordError, match="unknown fields"):
        Rollout.from_json(json.dumps({**json.loads(res.rollouts[0].to_json()), "extra": 1}))


def test_cli_generate_and_verify(tmp_path):
    from cotrain.cli import app

    runner = CliRunner()
    out = tmp_path / "r.jsonl"
    gen = runner.invoke(
        app,
        ["toploc", "generate", "--model", "gpt-debug-seed0", "--out", str(out),
         "--prompt", "hello", "--prompt", "world!", "--max-new-tokens", "40"],
    )  # fmt: skip
    assert gen.exit_code == 0, gen.output
    ok = runner.invoke(app, ["toploc", "verify", str(out), "--model", "gpt-debug-seed0"])
    assert ok.exit_code == 0 and "2/2 rollouts pass" in ok.output, ok.output
    wrong = runner.invoke(app, ["toploc", "verify", str(out), "--model", "gpt-debug-seed1"])
    assert wrong.exit_code == 1 and "0/2 rollouts pass" in wrong.output
    with open(out, "a") as f:
        f.write("garbage\n")
    report = tmp_path / "v.json"
    mixed = runner.invoke(
        app, ["toploc", "verify", str(out), "--model", "gpt-debug-seed0", "--json", str(report)]
    )
    assert mixed.exit_code == 1 and "2/3 rollouts pass" in mixed.output
    assert json.loads(report.read_text())["failed"] == 1
    missing = runner.invoke(app, ["toploc", "verify", str(tmp_path / "no"), "--model", "x"])
    assert missing.exit_code == 2
    bad_model = runner.invoke(app, ["toploc", "verify", str(out), "--model", "nope"])
    assert bad_model.exit_code == 2 and "unknown model spec" in bad_model.output
