"""cotrain.toploc against an attacker and a careless user, on the tiny GPT.

Untrusted input (record lines, rollout files, ``Rollout`` objects built from anything) must end
as a failing verdict with a reason; a user's mistake on the CLI as one ``error:`` line and exit
code 2; Ctrl-C as one line and exit code 130. Never a traceback.
"""

from __future__ import annotations

import base64
import json
import os
import signal
import subprocess
import sys
import threading
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner, Result

import cotrain.toploc.record as record
from cotrain.cli import app
from cotrain.models import load_model
from cotrain.toploc import RecordError, Rollout, Validator, generate_with_proofs, read_rollouts

pytestmark = pytest.mark.timeout(60)

MODEL = "gpt-debug-seed0"


@pytest.fixture(scope="module")
def honest():
    """The tiny GPT and one honest rollout of it (a prompt, 40 output tokens)."""
    torch.set_num_threads(1)
    lm = load_model(MODEL)
    res = generate_with_proofs(lm, [lm.encode_prompt("hello there")], 40, seed=1)
    return lm, res.rollouts[0]


def _record(r: Rollout, **changes: object) -> str:
    """``r``'s JSON line with fields replaced (or removed, for the value ``...``)."""
    d = json.loads(r.to_json())
    d.update(changes)
    return json.dumps({k: v for k, v in d.items() if v is not ...})


# ------------------------------------------------------------------ records


def test_hostile_record_lines_are_record_errors(honest):
    _, r = honest
    good = r.to_json()
    cases: dict[str, tuple[str | bytes, str]] = {
        "invalid utf-8": (good.encode().replace(b'"r0"', b'"\xff\xfe"'), "bad JSON"),
        "deep nesting": ("[" * 100_000 + "]" * 100_000, "bad JSON"),
        "nesting under the recursion limit": ("[" * 500 + "]" * 500, "bad JSON"),
        "huge integer": (_record(r, topk=10**60), "digits"),
        "NaN": (good.replace('"topk":128', '"topk":NaN'), "NaN"),
        "Infinity": (good.replace('"prompt_tokens":[', '"prompt_tokens":[Infinity,'), "Infinity"),
        "overflowing float": (good.replace('"topk":128', '"topk":1e999'), "overflows"),
        "truncated": (good[: len(good) // 2], "bad JSON"),
        "not an object": ("[1, 2, 3]", "object"),
        "a string": ('"hello"', "object"),
        "missing field": (_record(r, proof=...), "missing field 'proof'"),
        "id is a number": (_record(r, id=7), "'id' must be str"),
        "tokens are a string": (_record(r, prompt_tokens="abc"), "'prompt_tokens' must be list"),
        "topk is a bool": (_record(r, topk=True), "'topk' must be int"),
        "topk is a float": (_record(r, topk=128.0), "'topk' must be int"),
        "float token": (_record(r, output_tokens=[1.5]), "non-negative integers"),
        "nested token": (_record(r, output_tokens=[[1]]), "non-negative integers"),
        "negative token": (_record(r, prompt_tokens=[-1, 2]), "non-negative integers"),
        "empty prompt": (_record(r, prompt_tokens=[]), "prompt_tokens is empty"),
        "zero topk": (_record(r, topk=0), "positive"),
        "empty id": (_record(r, id=""), "'id' is empty"),
        "long id": (_record(r, id="x" * 10_000), "longer than"),
        "escape in id": (_record(r, id="\x1b[2Jgotcha"), "control characters"),
        "surrogate in model": (good.replace(MODEL, "\\ud800"), "control characters"),
        "bad base64": (_record(r, proof="***"), "base64"),
        "non-ascii base64": (_record(r, proof="é"), "base64"),
        "wrong format": (_record(r, format="other/1"), "unknown record format"),
        "many unknown fields": (_record(r, **{f"k{i}": i for i in range(10_000)}), "10000 unknown"),
    }
    for name, (line, match) in cases.items():
        with pytest.raises(RecordError, match=match) as info:
            Rollout.from_json(line)
        assert len(str(info.value)) < 300, name


def test_oversized_record_is_refused_unparsed(honest, monkeypatch):
    _, r = honest
    monkeypatch.setattr(record, "MAX_RECORD_BYTES", 1000)
    with pytest.raises(RecordError, match="exceeds 1000"):
        Rollout.from_json(r.to_json())


def test_hostile_files_give_per_line_errors(honest, tmp_path, monkeypatch):
    _, r = honest
    monkeypatch.setattr(record, "MAX_RECORD_BYTES", 4096)
    path = tmp_path / "r.jsonl"
    good = r.to_json().encode()
    assert len(good) < 4096
    path.write_bytes(
        good + b"\n"  # 1
        + b"\x00\xff\xfe binary \x80\x81\n"  # 2
        + b"\n"  # 3: blank, skipped
        + b"{" * 20_000 + b"\n"  # 4: over the line limit, skipped without being parsed
        + good + b"\r\n"  # 5: CRLF is fine
        + good[:100]  # 6: truncated, no final newline
    )  # fmt: skip
    lines = list(read_rollouts(path))
    assert [ln.line_no for ln in lines] == [1, 2, 4, 5, 6]
    assert [ln.rollout is not None for ln in lines] == [True, False, False, True, False]
    assert "longer than 4096 bytes" in (lines[2].error or "")
    assert all("bad JSON" in (ln.error or "") for ln in (lines[1], lines[4]))


# ------------------------------------------------------------------ validator


def test_validator_rejects_hostile_rollout_objects(honest):
    """Rollouts built in Python from anything: each gets a failing verdict, the honest passes."""
    lm, r = honest
    cases: dict[str, tuple[Rollout, str]] = {
        "negative prompt id": (replace(r, prompt_tokens=[-5, *r.prompt_tokens]), "vocabulary"),
        "negative output id": (replace(r, output_tokens=[-1, *r.output_tokens[1:]]), "vocab"),
        "id = vocab size": (replace(r, output_tokens=[256, *r.output_tokens[1:]]), "vocabulary"),
        "huge id": (replace(r, prompt_tokens=[10**40, *r.prompt_tokens[1:]]), "vocabulary"),
        "empty prompt": (replace(r, prompt_tokens=[]), "empty prompt"),
        "no output": (replace(r, output_tokens=[]), "no output"),
        "float tokens": (replace(r, prompt_tokens=[1.0, 2.0]), "list of integers"),
        "bool tokens": (replace(r, output_tokens=[True, False]), "list of integers"),
        "tokens are a string": (replace(r, prompt_tokens="abc"), "list of integers"),
        "tokens are None": (replace(r, output_tokens=None), "list of integers"),
        "tokens are a tuple": (replace(r, prompt_tokens=tuple(r.prompt_tokens)), "list of int"),
        "float topk": (replace(r, topk=128.0), "must be integers"),
        "string topk": (replace(r, topk="128"), "topk='128'"),
        "proof is a string": (replace(r, proof="abc"), "malformed proof: str"),
        "proof is None": (replace(r, proof=None), "malformed proof"),
        "model is a list": (replace(r, model=[MODEL]), "claims model"),
        "model is long": (replace(r, model="m" * 10_000), "..."),
    }
    rollouts = [x for x, _ in cases.values()] + [r]
    report = Validator(lm).validate(rollouts)  # type: ignore[arg-type]
    for (name, (_, match)), v in zip(cases.items(), report.verdicts, strict=False):
        assert not v.passed and match in v.reason, (name, v.reason)
        assert len(v.reason) < 200, name
    assert report.verdicts[-1].passed, report.verdicts[-1].reason


def test_numpy_token_ids_are_integers(honest):
    lm, r = honest
    np_ids = replace(r, prompt_tokens=[np.int64(t) for t in r.prompt_tokens])
    assert Validator(lm).validate([np_ids]).verdicts[0].passed


def test_non_finite_recompute_fails_only_that_rollout(honest):
    """A validator model that makes NaN for one sequence: a verdict, and the batch goes on."""
    _, r = honest
    bad = load_model(MODEL)
    unused = min(set(range(256)) - set(r.prompt_tokens) - set(r.output_tokens))
    with torch.no_grad():
        bad.gpt.transformer.wte.weight[unused] = float("nan")  # poisons only its sequences
    poisoned = replace(r, id="p", prompt_tokens=[unused, *r.prompt_tokens[1:]])
    report = Validator(bad).validate([poisoned, r])
    assert not report.verdicts[0].passed and "not finite" in report.verdicts[0].reason
    assert report.verdicts[1].passed, report.verdicts[1].reason


def test_generate_with_proofs_refuses_bad_requests(honest):
    lm, _ = honest
    bad: list[tuple[dict[str, object], str]] = [
        ({"prompts": [[]]}, "prompt 1 is empty"),
        ({"prompts": [[1], [-1]]}, "prompt 2 has token ids outside"),
        ({"prompts": [[300]]}, "outside"),
        ({"prompts": [[1] * 500]}, "over gpt-debug-seed0's 512"),
        ({"max_new_tokens": 0}, "max_new_tokens=0"),
        ({"batch_size": 0}, "batch_size=0"),
        ({"temperature": float("nan")}, "temperature"),
        ({"temperature": -1.0}, "temperature"),
        ({"seed": 2**70}, "seed"),
    ]
    for changes, match in bad:
        kwargs: dict[str, object] = {"prompts": [[1, 2]], "max_new_tokens": 20, **changes}
        with pytest.raises(ValueError, match=match):
            generate_with_proofs(lm, **kwargs)  # type: ignore[arg-type]


# ------------------------------------------------------------------ CLI


def _invoke(*args: str) -> Result:
    return CliRunner().invoke(app, ["toploc", *args])


def _usage_error(res: Result) -> str:
    """Assert exit code 2 with one ``error:`` line on stderr and no traceback; the line."""
    assert isinstance(res.exception, SystemExit | None), res.exception
    assert res.exit_code == 2, res.output
    lines = res.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), res.stderr
    assert "Traceback" not in res.output and res.stdout == ""
    return lines[0]


@pytest.fixture(scope="module")
def rollout_file(tmp_path_factory, honest):
    _, r = honest
    path = tmp_path_factory.mktemp("cli") / "r.jsonl"
    path.write_text(r.to_json() + "\n")
    return path


def test_cli_generate_usage_errors(tmp_path):
    out = str(tmp_path / "o.jsonl")
    bad_utf8 = tmp_path / "p.txt"
    bad_utf8.write_bytes(b"hello \xff\xfe\n")
    cases: list[tuple[list[str], str]] = [
        (["--prompt", ""], "--prompt number 1 is empty"),
        (["--prompt", "ok", "--prompt", "   "], "--prompt number 2 is empty"),
        (["--prompt", "hi", "--max-new-tokens", "0"], "--max-new-tokens=0"),
        (["--prompt", "hi", "--max-new-tokens", "-3"], "--max-new-tokens=-3"),
        (["--prompt", "hi", "--max-new-tokens", "600"], "shorten the prompt"),
        (["--prompt", "x" * 600], "prompt 1 is 600 tokens"),
        (["--prompt", "hi", "--batch-size", "0"], "--batch-size=0"),
        (["--prompt", "hi", "--temperature", "nan"], "--temperature=nan"),
        (["--prompt", "hi", "--temperature", "inf"], "--temperature=inf"),
        (["--prompt", "hi", "--temperature", "-1"], "--temperature=-1"),
        (["--prompt", "hi", "--seed", str(10**30)], "--seed="),
        (["--prompts-file", str(bad_utf8)], "cannot read"),
        (["--prompts-file", str(tmp_path)], "cannot read"),
        (["--prompts-file", str(tmp_path / "missing.txt")], "cannot read"),
        ([], "at least one --prompt"),
    ]
    for args, match in cases:
        line = _usage_error(_invoke("generate", "--model", MODEL, "--out", out, *args))
        assert match in line, (args, line)
    line = _usage_error(_invoke("generate", "--model", "gpt-debug-seed" + "9" * 30, "--out", out,
                                "--prompt", "hi"))  # fmt: skip
    assert "model spec" in line
    line = _usage_error(_invoke("generate", "--model", MODEL, "--out", str(tmp_path),
                                "--prompt", "hi", "--max-new-tokens", "2"))  # fmt: skip
    assert "cannot write" in line
    assert not Path(out).exists()


def test_cli_verify_usage_errors(tmp_path, rollout_file):
    f = str(rollout_file)
    bad_toml = tmp_path / "bad.toml"
    bad_toml.write_text("batch_size = [")
    bad_utf8 = tmp_path / "bad8.toml"
    bad_utf8.write_bytes(b"batch_size = '\xff'")
    cases: list[tuple[list[str], str]] = [
        ([str(tmp_path / "missing.jsonl")], "does not exist"),
        ([str(tmp_path)], "not a file"),
        ([f, "--batch-size", "0"], "batch_size"),
        ([f, "--dtype", "float64"], "dtype"),
        ([f, "--config", str(bad_toml)], "not valid TOML"),
        ([f, "--config", str(bad_utf8)], "utf-8"),
        ([f, "--config", str(tmp_path)], "Is a directory"),
        ([f, "--config", str(tmp_path / "missing.toml")], "does not exist"),
        ([f, "--max-file-mb", "0"], "--max-file-mb"),
        ([f, "--json", str(tmp_path)], "cannot write"),
        ([f, "--model", "gpt-debug-seed" + "9" * 30], "model spec"),
        ([f, "--model", "nope"], "unknown model spec"),
    ]
    for args, match in cases:
        model = [] if "--model" in args else ["--model", MODEL]
        line = _usage_error(_invoke("verify", *args, *model))
        assert match in line, (args, line)


def _verdicts(tmp_path: Path, content: bytes, *extra: str) -> tuple[Result, dict]:
    path = tmp_path / "in.jsonl"
    path.write_bytes(content)
    report = tmp_path / "v.json"
    res = _invoke("verify", str(path), "--model", MODEL, "--json", str(report), *extra)
    assert isinstance(res.exception, SystemExit | None), res.exception
    assert "Traceback" not in res.output
    return res, json.loads(report.read_text())


def test_cli_verify_hostile_files_get_verdicts(tmp_path, honest):
    _, r = honest
    good = r.to_json().encode()
    lines = [
        b"\xff\xfe\x00garbage",  # invalid UTF-8
        b"[" * 100_000,  # deep nesting
        good.replace(b'"topk":128', b'"topk":' + b"9" * 5000),  # a 5,000-digit integer
        good.replace(b'"topk":128', b'"topk":NaN'),
        good.replace(b'"prompt_tokens":[', b'"prompt_tokens":[-3,'),  # negative id
        good.replace(b'"prompt_tokens":[', b'"prompt_tokens":[999,'),  # id >= vocab size
        _record(r, id="[/x]").encode(),  # rich markup in the id (unbalanced: MarkupError)
        good[:-7],  # truncated
        good,
    ]
    res, report = _verdicts(tmp_path, b"\n".join(lines))
    assert res.exit_code == 1, res.output
    assert (report["passed"], report["failed"]) == (2, 7)
    reasons = [v["reason"] for v in report["rollouts"]]
    for i, part in enumerate(["bad JSON", "nested", "digits", "NaN", "non-negative",
                              "vocabulary", "ok", "bad JSON", "ok"]):  # fmt: skip
        assert part in reasons[i], (i, reasons[i])
    assert "[/x]" in res.stdout  # printed as text, not parsed as markup
    assert report["rollouts"][6]["id"] == "[/x]"


def test_cli_verify_rejects_whole_files(tmp_path):
    for content, extra, match in [
        (b"", [], "holds no rollout records"),
        (b"\n\n  \n", [], "holds no rollout records"),
        (b"\n" * (2**20 + 1), ["--max-file-mb", "1"], "over --max-file-mb 1"),
        (b"[]\n" * 100, ["--max-records", "99"], "over --max-records 99"),
    ]:
        res, report = _verdicts(tmp_path, content, *extra)
        assert res.exit_code == 1, res.output
        assert res.stderr.splitlines() == [f"rejected: {report['rejected']}"]
        assert match in report["rejected"] and report["passed"] == 0


def test_cli_interrupt_is_one_line(tmp_path, rollout_file, monkeypatch):
    def interrupt(*_: object, **__: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(Validator, "validate", interrupt)
    res = _invoke("verify", str(rollout_file), "--model", MODEL)
    assert res.exit_code == 130 and res.stderr == "interrupted\n", res.output
    monkeypatch.setattr("cotrain.toploc.generate_with_proofs", interrupt)
    out = tmp_path / "o.jsonl"
    res = _invoke("generate", "--model", MODEL, "--out", str(out), "--prompt", "hi")
    assert res.exit_code == 130 and res.stderr == "interrupted\n", res.output
    assert not out.exists()


# ------------------------------------------------------------------ real processes


def _cotrain(*args: str, **kwargs: object) -> subprocess.Popen[str]:
    cmd = [sys.executable, "-c", "from cotrain.cli import main; main()", *args]
    return subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kwargs
    )  # type: ignore[call-overload]


def test_process_usage_error_and_bad_bytes_have_no_traceback(tmp_path):
    """The real entry point, not CliRunner: stderr is the one line, nothing more."""
    proc = _cotrain("toploc", "generate", "--model", MODEL, "--out", str(tmp_path / "o"),
                    "--prompt", "")  # fmt: skip
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 2 and err == "error: --prompt number 1 is empty\n" and out == ""
    bad = tmp_path / "bad.jsonl"
    bad.write_bytes(b"\x80\x81\xff\n" + b"[" * 100_000 + b"\n")
    proc = _cotrain("toploc", "verify", str(bad), "--model", MODEL)
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 1 and err == "" and "0/2 rollouts pass" in out, (out, err)


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs a FIFO")
@pytest.mark.timeout(300)
def test_process_ctrl_c_is_one_line(tmp_path):
    """SIGINT while ``generate`` waits on its prompts file (a FIFO: opening it for writing
    returns once the command is reading, so the signal lands there, with no sleep)."""
    fifo = tmp_path / "prompts"
    os.mkfifo(fifo)
    out = tmp_path / "o.jsonl"
    # faulthandler: if it does not exit, SIGABRT prints where every thread of it is stuck
    env = {**os.environ, "PYTHONFAULTHANDLER": "1"}
    # a shell starts background jobs with SIGINT ignored, and Python then installs no
    # KeyboardInterrupt handler: give the command the default, as a terminal would
    proc = _cotrain("toploc", "generate", "--model", MODEL, "--out", str(out),
                    "--prompts-file", str(fifo), env=env,
                    preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))  # fmt: skip
    opened: list[int] = []
    opener = threading.Thread(target=lambda: opened.append(os.open(fifo, os.O_WRONLY)), daemon=True)
    opener.start()
    opener.join(timeout=60)
    try:
        assert opened, "the command never opened its prompts file"
        proc.send_signal(signal.SIGINT)
        try:  # ~1 s
            stdout, stderr = proc.communicate(timeout=120)
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGABRT)
            stdout, stderr = proc.communicate(timeout=30)
            raise AssertionError(f"no exit 120 s after SIGINT; its threads: {stderr}") from None
    finally:
        proc.kill()
        proc.wait(timeout=10)
        for fd in opened:
            os.close(fd)
    assert proc.returncode == 130 and stderr == "interrupted\n", (stdout, stderr)
    assert not out.exists()


def test_record_base64_of_garbage_proof_is_a_verdict(honest):
    """Valid base64 of random bytes of the right length: decodes, then fails as a proof."""
    lm, r = honest
    junk = np.random.default_rng(0).bytes(len(r.proof))
    line = _record(r, proof=base64.b64encode(junk).decode())
    v = Validator(lm).validate([Rollout.from_json(line)]).verdicts[0]
    assert not v.passed and ("malformed proof" in v.reason or "differs" in v.reason)


@pytest.mark.parametrize("command", ["verify", "generate"])
def test_process_closed_stdout_is_quiet(tmp_path, rollout_file, command):
    """``cotrain toploc ... | head`` where head has gone: exit 141, nothing on stderr."""
    args = {
        "verify": ["verify", str(rollout_file)],
        "generate": ["generate", "--out", str(tmp_path / "o"), "--prompt", "hi"],
    }[command]
    proc = _cotrain("toploc", *args, "--model", MODEL)
    assert proc.stdout is not None
    proc.stdout.close()  # before the command writes anything: its first write gets EPIPE
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 141 and err == "", err
