"""Every participant is a key: who is admitted (allow-list, admission token, run secret), nobody
can take over another member's id, the master proves its key, and the master's log names the
key behind every event."""

from __future__ import annotations

import json
import socket
import threading
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from comm_harness import MasterThread, handshake, parallel, peer_config

from cotrain.comm import AuthError, CommConfig, Communicator
from cotrain.comm import messages as m
from cotrain.comm.auth import issue_token
from cotrain.comm.frames import pack_json, recv_json
from cotrain.core.clock import Deadline
from cotrain.core.identity import Identity


def _keyed_config(master: MasterThread, ident: Identity, tmp_path: Path, **kw: Any) -> CommConfig:
    key_file = tmp_path / f"{ident.public_hex[:8]}.pem"
    ident.save(key_file)
    return peer_config(
        master.port,
        secret="",
        key_file=str(key_file),
        master_key=master.master.identity.public_hex,
        **kw,
    )


def _ring_of(comms: list[Communicator]) -> None:
    for c in comms:
        c.connect()
    parallel([lambda c=c: c.wait_for_world(len(comms), timeout_s=30) for c in comms])
    xs = [np.full(100, float(i + 1), np.float32) for i in range(len(comms))]
    parallel([lambda c=c, x=x: c.all_reduce(x, op="sum") for c, x in zip(comms, xs, strict=True)])
    total = sum(range(1, len(comms) + 1))
    assert all(np.all(x == total) for x in xs)


@pytest.mark.timeout(60)
def test_allow_list_admits_its_keys_and_refuses_others(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("COTRAIN_SECRET", raising=False)
    a, b, stranger = Identity.generate(), Identity.generate(), Identity.generate()
    master = MasterThread(secret="", allow_keys=[a.public_hex, b.public_hex])
    comms = [Communicator(_keyed_config(master, k, tmp_path)) for k in (a, b)]
    try:
        assert [c.peer_id for c in comms] == [a.public_hex, b.public_hex]
        _ring_of(comms)
        intruder = Communicator(_keyed_config(master, stranger, tmp_path, connect_timeout_s=2))
        with pytest.raises(AuthError, match="not admitted"):
            intruder.connect(timeout_s=2)
        intruder.close()
        # the master must prove the key the peers pinned
        wrong = _keyed_config(master, a, tmp_path, connect_timeout_s=2)
        wrong = wrong.model_copy(update={"master_key": stranger.public_hex})
        pinned = Communicator(wrong)
        with pytest.raises(AuthError, match="expected key"):
            pinned.connect(timeout_s=2)
        pinned.close()
        # no secret and no pinned master key: a peer refuses to start
        with pytest.raises(ValueError, match="master_key"):
            Communicator(peer_config(master.port, secret=""))
    finally:
        for c in comms:
            c.close()
        master.stop()


@pytest.mark.timeout(60)
def test_admission_tokens(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("COTRAIN_SECRET", raising=False)
    issuer, rogue = Identity.generate(), Identity.generate()
    master = MasterThread(secret="", token_issuers=[issuer.public_hex], run_id="run-7")
    peers = [Identity.generate() for _ in range(2)]
    comms = []
    try:
        for i, ident in enumerate(peers):
            tok = tmp_path / f"token{i}.json"
            tok.write_bytes(
                issue_token(issuer, ident.public_hex, run="run-7", ttl_s=600).to_bytes()
            )
            comms.append(Communicator(_keyed_config(master, ident, tmp_path, token_file=str(tok))))
        _ring_of(comms)
        other = Identity.generate()
        cases = {
            "issued to another key": issue_token(
                issuer, peers[0].public_hex, run="run-7", ttl_s=60
            ),
            "for run": issue_token(issuer, other.public_hex, run="run-8", ttl_s=60),
            "expired": issue_token(issuer, other.public_hex, run="run-7", ttl_s=-1),
            "do not accept": issue_token(rogue, other.public_hex, run="run-7", ttl_s=60),
        }
        for why, env in cases.items():
            tok = tmp_path / "bad.json"
            tok.write_bytes(env.to_bytes())
            cfg = _keyed_config(master, other, tmp_path, token_file=str(tok), connect_timeout_s=2)
            c = Communicator(cfg)
            with pytest.raises(AuthError, match=why):
                c.connect(timeout_s=2)
            c.close()
        # a token whose body was edited after signing
        forged = issue_token(issuer, peers[0].public_hex, run="run-7", ttl_s=60).to_json()
        forged["body"]["peer"] = other.public_hex
        (tmp_path / "forged.json").write_text(json.dumps(forged))
        cfg = _keyed_config(master, other, tmp_path, token_file=str(tmp_path / "forged.json"))
        c = Communicator(cfg.model_copy(update={"connect_timeout_s": 2}))
        with pytest.raises(AuthError, match="forged"):
            c.connect(timeout_s=2)
        c.close()
    finally:
        for c in comms:
            c.close()
        master.stop()


def _hello_as(master: MasterThread, claimed: Communicator, ident: Identity) -> dict[str, Any]:
    """Authenticate with ``ident`` and claim to be ``claimed``, resuming its membership."""
    s = socket.create_connection(("127.0.0.1", master.port), timeout=5)
    try:
        handshake(s, identity=ident)
        hello = m.Hello(
            peer_id=claimed.peer_id,
            host="127.0.0.1",
            port=1,
            resume=m.Resume(epoch=claimed.epoch, ring=claimed.ring, revision=None),
        )
        s.sendall(pack_json(hello.dump()))
        s.settimeout(5)
        try:
            return recv_json(s, 1 << 20)
        except ConnectionError:
            return {}
    finally:
        s.close()


@pytest.mark.timeout(60)
def test_nobody_resumes_another_members_id(tmp_path: Path) -> None:
    events = tmp_path / "events.jsonl"
    master = MasterThread(events_file=str(events))
    comms = [Communicator(peer_config(master.port), name=f"p{i}") for i in range(3)]
    try:
        _ring_of(comms)
        victim = comms[1]
        # a stranger who knows the run secret, with its own key, claims the victim's id
        assert _hello_as(master, victim, Identity.generate()) == {}
        # the victim is still the member, with its own connection, and the run goes on
        assert master.call(lambda: master.master.peers[victim.peer_id].writer is not None)
        xs = [np.ones(10, np.float32) for _ in comms]
        parallel(
            [lambda c=c, x=x: c.all_reduce(x, op="sum") for c, x in zip(comms, xs, strict=True)]
        )
        assert all(np.all(x == 3) for x in xs)
        # the master's log names the key behind each event
        comms[2].close()

        def left() -> bool:
            return any(r["event"] == "left" for r in master.master.events)

        deadline = Deadline.after(10)
        while not master.call(left):
            threading.Event().wait(min(0.02, deadline.check("the master to log the leave")))
        log = master.call(lambda: list(master.master.events))
        by_event: dict[str, set[str]] = {}
        for rec in log:
            by_event.setdefault(rec["event"], set()).add(rec.get("key", ""))
        keys = {c.peer_id for c in comms}
        assert keys <= by_event["joined"]
        assert comms[2].peer_id in by_event["left"]
        contributed = [r for r in log if r["event"] == "collective"]
        assert contributed and set(contributed[-1]["keys"]) == keys
        on_disk = [json.loads(line) for line in events.read_text().splitlines()]
        assert [r["event"] for r in on_disk] == [r["event"] for r in log]
        assert {r["name"] for r in on_disk if r["event"] == "joined"} == {"p0", "p1", "p2"}
    finally:
        for c in comms:
            c.close()
        master.stop()


@pytest.mark.timeout(60)
def test_a_stranger_on_a_data_port_is_never_kept(monkeypatch: pytest.MonkeyPatch) -> None:
    """In a run without a secret any key can finish the handshake with a peer's data server,
    but ring, state and probe connections are kept only from members the master announced."""
    monkeypatch.delenv("COTRAIN_SECRET", raising=False)
    a, b = Identity.generate(), Identity.generate()
    master = MasterThread(secret="", allow_keys=[a.public_hex, b.public_hex])
    key = master.master.identity.public_hex
    cfg = dict(secret="", master_key=key, connect_timeout_s=2.0)
    comms = [Communicator(peer_config(master.port, **cfg), identity=k) for k in (a, b)]
    try:
        _ring_of(comms)
        target = comms[0]
        port = target.data_port
        for hello in (
            m.RingHello(epoch=target.epoch, stream=0),
            m.RingHello(epoch=target.epoch + 10**6, stream=0),
            m.StateHello(epoch=target.epoch, seq=0),
            m.ProbeHello(nbytes=10),
        ):
            s = socket.create_connection(("127.0.0.1", port), timeout=5)
            handshake(s, None, expect_key=target.peer_id)
            s.sendall(pack_json(hello.dump()))
            s.settimeout(5)
            assert s.recv(1) == b"", hello  # closed without a word
            s.close()
        assert target._ms.pending_streams == 0
        # a wrong expected key is caught by the client: nobody can stand in for a member
        s = socket.create_connection(("127.0.0.1", port), timeout=5)
        with pytest.raises(AuthError, match="expected key"):
            handshake(s, None, expect_key=comms[1].peer_id)
        s.close()
        xs = [np.ones(10, np.float32) for _ in comms]
        parallel(
            [lambda c=c, x=x: c.all_reduce(x, op="sum") for c, x in zip(comms, xs, strict=True)]
        )
        assert all(np.all(x == 2) for x in xs)
    finally:
        for c in comms:
            c.close()
        master.stop()


def test_a_master_without_an_admission_rule_refuses_to_start(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from cotrain.comm import Master, MasterConfig

    monkeypatch.delenv("COTRAIN_SECRET", raising=False)
    with pytest.raises(ValueError, match="no admission rule"):
        Master(MasterConfig(secret=""))
    with pytest.raises(ValueError, match="64-hex"):
        MasterConfig(allow_keys=["not-a-key"])


@pytest.mark.timeout(60)
def test_a_banned_key_is_dropped_and_never_readmitted(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from cotrain.comm.errors import CommError, KickedError

    monkeypatch.delenv("COTRAIN_SECRET", raising=False)
    a, b, c = Identity.generate(), Identity.generate(), Identity.generate()
    master = MasterThread(secret="", allow_keys=[k.public_hex for k in (a, b, c)])
    comms = [Communicator(_keyed_config(master, k, tmp_path)) for k in (a, b, c)]
    try:
        _ring_of(comms)
        master.call(lambda: master.master.ban(c.public_hex, "ejected by the coordinator"))
        with pytest.raises(CommError):  # kicked: its next collective fails at once
            comms[2].all_reduce(np.ones(100, np.float32), op="sum")
        assert master.call(lambda: dict(master.master.banned)) == {
            c.public_hex: "ejected by the coordinator"
        }
        events = master.call(lambda: [e["event"] for e in master.master.events])
        assert "banned" in events
        # on the allow-list, with its key: still refused
        again = Communicator(_keyed_config(master, c, tmp_path, connect_timeout_s=2))
        with pytest.raises((KickedError, AuthError), match="banned"):
            again.connect(timeout_s=2)
        again.close()
        # the others go on without it
        parallel([lambda x=x: x.update_topology() for x in comms[:2]])
        assert [x.world_size for x in comms[:2]] == [2, 2]
        xs = [np.full(100, 1.0, np.float32) for _ in range(2)]
        parallel(
            [lambda x=x, v=v: x.all_reduce(v, op="sum") for x, v in zip(comms[:2], xs, strict=True)]
        )
        assert all(np.all(v == 2.0) for v in xs)
    finally:
        for x in comms:
            x.close()
        master.stop()
