"""Every user mistake, for every role it applies to, is one ``error:`` line on stderr, exit code
2, no traceback, and no process left behind (real ``cotrain`` processes; /proc is scanned for
anything carrying the run's tag)."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from cli_harness import Cotrain, Ran

from cotrain.launch.procs import start_master

SECRET = "right-secret"
KEY = "ab" * 32


@dataclass
class World:
    tmp: Path
    tiny: Path
    busy: int
    """A port something listens on."""
    closed: int
    """A port bound by nobody who listens: a connection is refused at once."""
    master: int
    """A master whose run secret is SECRET."""


@pytest.fixture(scope="module")
def sockets() -> Iterator[tuple[int, int]]:
    busy = socket.create_server(("127.0.0.1", 0))
    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))
    try:
        yield busy.getsockname()[1], closed.getsockname()[1]
    finally:
        busy.close()
        closed.close()


@pytest.fixture(scope="module")
def master() -> Iterator[int]:
    proc, port = start_master(SECRET)
    try:
        yield port
    finally:
        proc.stop()


@pytest.fixture
def world(tmp_path: Path, tiny_toml, sockets: tuple[int, int], master: int) -> World:
    (tmp_path / "bad.toml").write_text("x = [\n")
    return World(tmp_path, tiny_toml(), *sockets, master)


# role: (its words, arguments that make its other inputs valid, an int field, a typo, its fix)
ROLES: dict[str, tuple[list[str], list[str], str, str, str]] = {
    "master": (["master"], [], "--port", "--prot", "port"),
    "peer": (["peer"], [], "--rounds", "--round", "rounds"),
    "train": (["train"], ["{tiny}"], "--total_steps", "--algo.quantisation", "algo.quantization"),
    "origin": (
        ["shardcast", "origin"],
        ["--dir", "{tmp}/o"],
        "--serve.port",
        "--scan_interval",
        "scan_interval_s",
    ),
    "publish": (
        ["shardcast", "publish"],
        ["{tmp}/f.bin", "--dir", "{tmp}/o", "--key", "{tmp}/k.pem"],
        "--keep_versions",
        "--shard_size",
        "shard_size_mb",
    ),
    "relay": (["shardcast", "relay"], [], "--keep_versions", "--upstream_ban", "upstream_ban_s"),
    "fetch": (["shardcast", "fetch"], ["--out", "{tmp}/x"], "--min_version", "--wait", "wait_s"),
    "generate": (
        ["toploc", "generate"],
        ["--out", "{tmp}/g.jsonl"],
        "--seed",
        "--max_new_token",
        "max_new_tokens",
    ),
    "verify": (
        ["toploc", "verify"],
        ["{tmp}/r.jsonl", "--model", "gpt-debug-seed0"],
        "--batch_size",
        "--max_record",
        "max_records",
    ),
    "launch": (["launch"], ["--nproc", "1", "{tiny}"], "--first_index", "--nprocs", "nproc"),
}

# mistake: (what is typed, what the error line says, * for any text); a config file mistake
# replaces the role's own config
MISTAKES: dict[str, tuple[list[str], str]] = {
    "unknown-key": (["{typo}", "2"], "unknown key '{key}' for * (did you mean '{fix}'?)"),
    "wrong-type": (["{int_field}", "many"], "Input should be a valid integer"),
    "missing-config": (["{tmp}/missing.toml"], "does not exist"),
    "bad-toml": (["{tmp}/bad.toml"], "is not valid TOML"),
}

# mistakes that need a running process, or a value only one role takes
PROCESS_CASES: dict[str, tuple[list[str], dict[str, str], str]] = {
    "master-port-in-use": (["master", "--port", "{busy}"], {"COTRAIN_SECRET": SECRET}, "is in use"),
    "origin-port-in-use": (
        ["shardcast", "origin", "--dir", "{tmp}/o", "--port", "{busy}"],
        {},
        "is in use",
    ),
    "relay-port-in-use": (
        [
            "shardcast",
            "relay",
            "--upstream",
            "http://127.0.0.1:1",
            "--publisher_key",
            KEY,
            "--dir",
            "{tmp}/r",
            "--port",
            "{busy}",
        ],
        {},
        "is in use",
    ),
    "peer-no-master": (
        ["peer", "--comm.master_port", "{closed}", "--comm.connect_timeout_s", "1"],
        {"COTRAIN_SECRET": SECRET},
        "cannot join the run",
    ),
    "peer-wrong-secret": (
        ["peer", "--comm.master_port", "{master}", "--comm.connect_timeout_s", "1"],
        {"COTRAIN_SECRET": "wrong"},
        "secret",
    ),
    "train-no-master": (
        ["train", "{tiny}", "--comm.master_port", "{closed}", "--comm.connect_timeout_s", "1"],
        {"COTRAIN_SECRET": SECRET},
        "cannot join the run",
    ),
    "train-wrong-secret": (
        ["train", "{tiny}", "--comm.master_port", "{master}", "--comm.connect_timeout_s", "1"],
        {"COTRAIN_SECRET": "wrong"},
        "secret",
    ),
    "train-bad-quantization": (["train", "{tiny}", "--algo.quantization", "int9"], {}, "int9"),
    "launch-nproc-0": (["launch", "--nproc", "0", "{tiny}"], {}, "nproc"),
    "launch-no-target": (["launch", "--nproc", "2"], {}, "give a CONFIG.toml or a script.py"),
    "unknown-command": (["trian"], {}, "No such command"),
}


def _fill(args: list[str], world: World, **more: str) -> list[str]:
    names = {**vars(world), **more}
    return [a.format(**{k: str(v) for k, v in names.items()}) for a in args]


def _one_error_line(ran: Ran, expect: str) -> None:
    lines = ran.stderr.splitlines()
    assert ran.code == 2, ran
    assert len(lines) == 1 and lines[0].startswith("error: "), ran.stderr
    assert "Traceback" not in ran.stderr + ran.stdout
    assert all(part in lines[0] for part in expect.split("*")), (expect, lines[0])
    assert ran.left == [], f"processes left behind: {ran.left}"


@pytest.mark.timeout(120)
@pytest.mark.parametrize("mistake", list(MISTAKES))
@pytest.mark.parametrize("role", list(ROLES))
def test_config_mistakes_are_one_line(
    role: str, mistake: str, world: World, cotrain: Cotrain
) -> None:
    words, valid, int_field, typo, fix = ROLES[role]
    typed, expect = MISTAKES[mistake]
    if mistake.endswith(("config", "toml")):  # the mistaken file replaces the role's own
        valid = [a for a in valid if a != "{tiny}"]
    names = {"typo": typo, "fix": fix, "int_field": int_field, "key": typo[2:]}
    args = _fill([*words, *typed, *valid], world, **names)
    _one_error_line(cotrain(*args), expect.format(**names))


@pytest.mark.timeout(120)
@pytest.mark.parametrize("case", list(PROCESS_CASES))
def test_process_mistakes_are_one_line(case: str, world: World, cotrain: Cotrain) -> None:
    args, env, expect = PROCESS_CASES[case]
    _one_error_line(cotrain(*_fill(args, world), env=env), expect)
