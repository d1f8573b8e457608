"""Configs the one way: defaults < TOML < COTRAIN_* variables < command line; every field in
``--help``; every shipped config parsed by its role's model; values read for their type."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from cotrain.cli import app
from cotrain.cli.comm import MASTER, PEER
from cotrain.cli.launch import LAUNCH
from cotrain.cli.rl import ROLES as RL_ROLES
from cotrain.cli.role import Role, parse_args
from cotrain.cli.shardcast import FETCH, ORIGIN, PUBLISH, RELAY
from cotrain.cli.toploc import GENERATE, VERIFY
from cotrain.cli.train import TRAIN
from cotrain.comm.config import CommConfig
from cotrain.core.config import (
    REDACTED,
    config_from_env,
    describe,
    env_name,
    load_config,
    to_overrides,
)
from cotrain.core.errors import ConfigError
from cotrain.demo.peer import PeerProgramConfig

ROOT = Path(__file__).resolve().parents[2]
ROLES: list[Role] = [
    *[MASTER, PEER, TRAIN, ORIGIN, PUBLISH, RELAY, FETCH, GENERATE, VERIFY, LAUNCH],
    *RL_ROLES,
]


@pytest.fixture(autouse=True)
def _no_cotrain_variables(monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    for name in [n for n in os.environ if n.startswith("COTRAIN_")]:
        monkeypatch.delenv(name)


def test_precedence_defaults_toml_env_cli(tmp_path: Path) -> None:
    toml = tmp_path / "p.toml"
    toml.write_text("rounds = 2\n[comm]\nchunk_kb = 1\nstreams = 1\n")
    env = {"COTRAIN_COMM__CHUNK_KB": "2", "COTRAIN_ROUNDS": "3", "COTRAIN_UNRELATED": "x"}
    assert load_config(PeerProgramConfig, environ={}).comm.chunk_kb == 512  # the default
    assert load_config(PeerProgramConfig, toml, environ={}).comm.chunk_kb == 1
    cfg = load_config(PeerProgramConfig, toml, environ=env)
    assert (cfg.comm.chunk_kb, cfg.rounds, cfg.comm.streams) == (2, 3, 1)
    cfg = load_config(PeerProgramConfig, toml, ["--comm.chunk_kb=4"], environ=env)
    assert (cfg.comm.chunk_kb, cfg.rounds) == (4, 3)
    assert load_config(PeerProgramConfig, toml, env=False).comm.chunk_kb == 1
    assert env_name("comm.master_port") == "COTRAIN_COMM__MASTER_PORT"


def test_environment_is_read_by_default_and_names_its_source(monkeypatch) -> None:
    monkeypatch.setenv("COTRAIN_COMM__MASTER_PORT", "48401")
    assert load_config(PeerProgramConfig).comm.master_port == 48401
    monkeypatch.setenv("COTRAIN_COMM__MASTER_PORT", "0")
    with pytest.raises(
        ConfigError, match=r"comm\.master_port: .*\(from COTRAIN_COMM__MASTER_PORT\)"
    ):
        load_config(PeerProgramConfig)


def test_secret_alias_and_redaction() -> None:
    env = {"COTRAIN_SECRET": "s3cret"}
    cfg = load_config(PeerProgramConfig, environ=env)
    assert cfg.comm.secret == "s3cret"
    assert json.loads(cfg.dump_json())["comm"]["secret"] == REDACTED
    assert "s3cret" not in cfg.dump_json()
    env["COTRAIN_COMM__SECRET"] = "specific"
    assert load_config(PeerProgramConfig, environ=env).comm.secret == "specific"


def test_config_from_env_for_a_users_script() -> None:
    env = {
        "COTRAIN_COMM__MASTER_HOST": "10.0.0.7",
        "COTRAIN_COMM__MASTER_PORT": "48402",
        "COTRAIN_SECRET": "abc",
        "COTRAIN_WORKER_INDEX": "3",  # not a CommConfig field: ignored
    }
    cfg = config_from_env(CommConfig, "COTRAIN_COMM__", environ=env)
    assert (cfg.master_host, cfg.master_port, cfg.secret) == ("10.0.0.7", 48402, "abc")


def test_values_are_read_for_their_type() -> None:
    def peer(*argv: str) -> PeerProgramConfig:
        inv = parse_args(PEER, PeerProgramConfig, argv)
        return load_config(PeerProgramConfig, inv.config, inv.overrides, env=False)

    assert peer("--join").join is True  # a bool alone is true
    assert peer("--join", "--rounds", "3").join is True
    assert peer("--join", "false").join is False
    assert peer("--join=no", "--rounds=3").rounds == 3
    assert peer("--comm.key-file", "k.pem").comm.key_file == "k.pem"  # - reads as _
    assert peer("--comm.key_file", "null").comm.key_file is None
    assert peer("--comm.master_host", "'10.0.0.1'").comm.master_host == "10.0.0.1"
    assert peer("--retry_timeout_s", "inf").retry_timeout_s == float("inf")
    faults = '[{kind = "kill", at_collective = 2}]'
    assert peer("--faults.faults", faults).faults.faults[0].at_collective == 2
    relay = RELAY.model()
    for text in ("http://a:1,http://b:2", '["http://a:1", "http://b:2"]'):
        assert load_config(relay, None, {"upstreams": text}).upstreams == [
            "http://a:1",
            "http://b:2",
        ]
    # a section given in part keeps its default's other values (RelayConfig.transfer: 8)
    assert load_config(relay, None, {"transfer.seed": "1"}).transfer.parallel_downloads == 8


def test_unknown_keys_say_the_closest() -> None:
    for overrides, hint in [
        (["--master_port=1"], "did you mean 'comm.master_port'?"),
        (["--comm.stream=1"], "did you mean 'comm.streams'?"),
        (["--rounds.x=1"], "'rounds' is a value, not a section"),
    ]:
        with pytest.raises(ConfigError, match=hint.replace("?", r"\?")):
            load_config(PeerProgramConfig, None, overrides, env=False)


def test_to_overrides_rebuilds_the_config() -> None:
    cfg = load_config(
        PeerProgramConfig,
        None,
        {"faults.faults": '[{kind = "cut", at_collective = 1}]', "comm.master_host": "a b"},
        env=False,
    )
    cfg.comm.chunk_kb, cfg.retry_timeout_s, cfg.join = 64, float("inf"), True
    assert load_config(PeerProgramConfig, None, to_overrides(cfg), env=False) == cfg


@pytest.mark.parametrize("role", ROLES, ids=lambda r: r.name.replace(" ", "-"))
def test_help_lists_every_field(role: Role) -> None:
    res = CliRunner().invoke(app, [*role.name.split(), "--help"])
    assert res.exit_code == 0, res.output
    assert res.stdout.startswith(f"Usage: cotrain {role.name}")
    for doc in describe(role.model()):
        assert f"  --{doc.key}  {doc.type} = {doc.default}" in res.stdout, doc
        assert doc.doc.split()[0] in res.stdout, doc  # the docstring's first word at least


# every shipped config, the role that reads it, and what its command line must add
SHIPPED: dict[str, tuple[Role, list[str]]] = {
    "diloco-10m.toml": (TRAIN, []),
    "master.toml": (MASTER, []),
    "peer-debug.toml": (PEER, []),
    "rl-debug.toml": (RL_ROLES[-1], []),
    "shardcast_client.toml": (FETCH, ["--out", "model.safetensors"]),
    "shardcast_relay.toml": (RELAY, []),
    "smollm2-lora.toml": (TRAIN, []),
    "train-debug.toml": (TRAIN, []),
}


def test_every_shipped_config_has_a_role() -> None:
    assert sorted(p.name for p in (ROOT / "configs").glob("*.toml")) == sorted(SHIPPED)


@pytest.mark.parametrize("name", sorted(SHIPPED))
def test_shipped_configs_parse_with_their_role(name: str) -> None:
    role, extra = SHIPPED[name]
    res = CliRunner().invoke(
        app, [*role.name.split(), str(ROOT / "configs" / name), *extra, "--print-config"]
    )
    assert res.exit_code == 0, res.output
    model = role.model()
    overrides = parse_args(role, model, extra).overrides
    expected = load_config(model, ROOT / "configs" / name, overrides, env=False)
    assert json.loads(res.stdout) == json.loads(expected.dump_json())
