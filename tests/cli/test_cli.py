"""The CLI: the roles in `cotrain --help`, overrides, keys and tokens, one-line mistakes."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.timeout(60)
def test_help_lists_the_roles() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "cotrain", "--help"],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout
    for word in ("master", "peer", "train", "launch", "shardcast", "toploc", "demo"):
        assert word in out
    # thin entry points: the command tree imports no config model (pydantic) and no torch
    code = "import sys, cotrain.cli; print(sorted({'pydantic', 'torch'} & set(sys.modules)))"
    loaded = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True
    )
    assert loaded.stdout.strip() == "[]"


def test_config_overrides_and_errors(tmp_path: Path) -> None:
    from cotrain.comm.config import CommConfig
    from cotrain.core.config import load_config
    from cotrain.core.errors import ConfigError

    f = tmp_path / "c.toml"
    f.write_text('master_host = "10.0.0.1"\nstreams = 2\n')
    cfg = load_config(CommConfig, f, ["--streams=8", "chunk_kb=64"])
    assert (cfg.master_host, cfg.streams, cfg.chunk_kb) == ("10.0.0.1", 8, 64)
    with pytest.raises(ConfigError, match="streams"):
        load_config(CommConfig, f, ["streams=0"])
    with pytest.raises(ConfigError, match="nope"):
        load_config(CommConfig, f, ["nope=1"])


@pytest.mark.timeout(60)
def test_bad_config_and_missing_secret_are_one_clear_line() -> None:
    import os

    env = {k: v for k, v in os.environ.items() if k != "COTRAIN_SECRET"}
    no_secret = subprocess.run(
        [sys.executable, "-m", "cotrain", "master", "--port", "0"],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
    )
    assert no_secret.returncode == 2 and "COTRAIN_SECRET" in no_secret.stderr
    bad = subprocess.run(
        [sys.executable, "-m", "cotrain", "peer", "--nope=1"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert bad.returncode == 2 and "nope" in bad.stderr and "Traceback" not in bad.stderr


def _cotrain(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "cotrain", *args], capture_output=True, text=True, timeout=60
    )


@pytest.mark.timeout(120)
def test_keygen_and_token(tmp_path: Path) -> None:
    from cotrain.comm.auth import TOKEN_DOMAIN
    from cotrain.core.identity import Identity
    from cotrain.core.signed import Envelope

    key = tmp_path / "issuer.pem"
    made = _cotrain("keygen", "--key", str(key))
    assert made.returncode == 0 and len(made.stdout.strip()) == 64
    assert (key.stat().st_mode & 0o777) == 0o600
    again = _cotrain("keygen", "--key", str(key))  # an existing key is read, never replaced
    assert again.stdout == made.stdout and "exists" in again.stderr
    assert Identity.load(key).public_hex == made.stdout.strip()
    peer = Identity.generate().public_hex
    out = tmp_path / "token.json"
    tok = _cotrain("token", "--key", str(key), "--peer", peer, "--run", "r1", "--out", str(out))
    assert tok.returncode == 0, tok.stderr
    env = Envelope.from_bytes(out.read_bytes(), domain=TOKEN_DOMAIN, signers={made.stdout.strip()})
    assert env.body["peer"] == peer and env.body["run"] == "r1"
    # users' mistakes: one line, exit 2
    for args in (
        ("token", "--key", str(tmp_path / "missing.pem"), "--peer", peer, "--run", "r"),
        ("token", "--key", str(key), "--peer", "abc", "--run", "r"),
        ("keygen", "--key", str(tmp_path)),
    ):
        bad = _cotrain(*args)
        assert bad.returncode == 2, (args, bad.stderr)
        assert len(bad.stderr.strip().splitlines()) == 1 and "Traceback" not in bad.stderr


@pytest.mark.timeout(60)
def test_peer_without_a_key_or_a_way_to_check_the_master_is_one_line(tmp_path: Path) -> None:
    for comm in (
        {"master_port": 1, "secret": "x", "key_file": str(tmp_path / "missing.pem")},
        {"master_port": 1, "secret": ""},  # neither master_key nor a run secret
    ):
        args = [f"--comm.{k}={v}" for k, v in comm.items()]
        env = {k: v for k, v in os.environ.items() if k != "COTRAIN_SECRET"}
        bad = subprocess.run(
            [sys.executable, "-m", "cotrain", "peer", *args],
            capture_output=True,
            text=True,
            timeout=60,
            env=env,
        )
        assert bad.returncode == 2, bad.stderr
        assert len(bad.stderr.strip().splitlines()) == 1 and "Traceback" not in bad.stderr


@pytest.mark.timeout(60)
def test_demo_on_a_busy_port_is_one_line_and_keeps_the_last_demo(tmp_path: Path) -> None:
    import socket

    out = tmp_path / "demo"
    out.mkdir()
    (out / "summary.json").write_text("{}")  # a previous demo's results
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        r = subprocess.run(
            [sys.executable, "-m", "cotrain", "demo", "--port", str(port), "--out-dir", str(out)],
            capture_output=True,
            text=True,
            timeout=60,
        )
    assert r.returncode == 2, r.stderr
    assert f"port {port} is not free" in r.stderr and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
    assert (out / "summary.json").read_text() == "{}"
