"""shardcast pieces in one process: manifests and trust, server choice, store, publisher."""

from __future__ import annotations

import hashlib
import json

import pytest

import cotrain.shardcast as sc
from cotrain.core.identity import Identity
from cotrain.core.signed import Envelope, EnvelopeError
from cotrain.shardcast.errors import (
    ForgedManifestError,
    ManifestError,
    ReplayedManifestError,
    StaleVersionError,
)
from cotrain.shardcast.manifest import DOMAIN, SignedManifest, TrustPolicy
from cotrain.shardcast.selection import ServerSelector
from cotrain.shardcast.store import VersionStore


class FakeClock:
    def __init__(self) -> None:
        self.t = 0.0

    def monotonic(self) -> float:
        return self.t


def test_public_surface_is_pinned() -> None:
    assert sorted(sc.__all__) == sorted(
        [
            "ClientConfig", "FaultConfig", "FetchResult", "Manifest", "Origin", "OriginConfig",
            "PublishConfig", "PublishResult", "Relay", "RelayConfig", "ShardcastError",
            "SignedManifest", "TransferConfig", "TrustPolicy", "fetch", "fetch_async",
            "load_into", "publish", "watch",
        ]
    )  # fmt: skip


@pytest.fixture
def published(tmp_path):
    ident = Identity.generate()
    data = bytes(range(256)) * 1000  # 256 kB
    cfg = sc.PublishConfig(shard_size_mb=0.1, keep_versions=2)
    results = [sc.publish(data, dir=tmp_path, identity=ident, config=cfg) for _ in range(3)]
    return ident, data, results, tmp_path


def test_publish_cuts_hashes_and_retires(published) -> None:
    ident, data, results, root = published
    assert [r.version for r in results] == [1, 2, 3]
    store = VersionStore(root)
    assert store.versions() == [2, 3]  # keep_versions=2 retired v1
    assert not store.version_dir(1).exists()
    m = results[-1].manifest
    assert [s.size for s in m.shards] == [100_000, 100_000, 56_000]
    assert m.file_sha256 == hashlib.sha256(data).hexdigest()
    whole = store.data_path(3).read_bytes()  # the origin keeps the file whole
    assert whole == data
    for s in m.shards:
        assert hashlib.sha256(whole[s.offset : s.offset + s.size]).hexdigest() == s.sha256
    # A file is linked (file_mode="link") or copied, then hashed as placed.
    src = root / "ckpt.bin"
    src.write_bytes(data)
    linked = sc.publish(src, dir=root, identity=ident,
                        config=sc.PublishConfig(shard_size_mb=0.1, file_mode="link"))  # fmt: skip
    assert store.data_path(linked.version).stat().st_ino == src.stat().st_ino
    assert linked.manifest.file_sha256 == m.file_sha256
    copied = sc.publish(src, dir=root, identity=ident)
    assert store.data_path(copied.version).stat().st_ino != src.stat().st_ino
    signed = SignedManifest.parse(store.read_manifest(3) or b"")
    assert TrustPolicy(ident.public_hex).check(signed, expected_version=3) == m


def test_forged_manifests_are_rejected(published) -> None:
    ident, _, results, root = published
    raw = VersionStore(root).read_manifest(3) or b""
    policy = TrustPolicy(ident.public_hex)
    env = json.loads(raw)
    assert env["domain"] == "cotrain.shardcast.manifest/1" and env["signer"] == ident.public_hex
    env["body"]["shards"][0]["sha256"] = "1" * 64
    with pytest.raises(ForgedManifestError, match="does not verify"):
        SignedManifest.parse(json.dumps(env).encode())
    # Signed by someone else who claims to be the publisher, or names itself: both refused.
    mallory = Identity.generate()
    genuine = results[-1].signed.envelope
    claimed = Envelope(genuine.domain, genuine.signer, genuine.body, mallory.sign(b"x").hex())
    with pytest.raises(ForgedManifestError, match="bad signature"):
        policy.check(SignedManifest(results[-1].manifest, claimed))
    other = sc.publish(b"evil", dir=root / "m", identity=mallory)
    with pytest.raises(ForgedManifestError, match="names publisher"):
        policy.check(other.signed)
    # A signature made for another kind of statement does not pass as a manifest.
    elsewhere = Envelope.seal(ident, "cotrain.other/1", genuine.body).to_bytes()
    with pytest.raises(ForgedManifestError, match=r"expected 'cotrain\.shardcast\.manifest/1'"):
        SignedManifest.parse(elsewhere)
    for junk in (
        b'{"manifest": "{}", "signature": "00"}',
        b"[" * 100_000,
        b'{"a": Infinity}',
        b"1" * 500,
    ):
        with pytest.raises(ManifestError, match="malformed"):
            SignedManifest.parse(junk)
    # Well signed but unsound: a version past 2^53 cannot even be signed (JCS refuses it), and
    # shards that do not tile the file are refused after the signature checked out.
    body = dict(genuine.body, shards=genuine.body["shards"][:1])
    with pytest.raises(ManifestError, match=r"tile|add up"):
        SignedManifest.parse(Envelope.seal(ident, DOMAIN, body).to_bytes())
    with pytest.raises(EnvelopeError):
        Envelope.seal(ident, DOMAIN, dict(genuine.body, version=2**60))


def test_replayed_manifests_are_rejected(published) -> None:
    ident, _, results, _ = published
    old = results[1].signed  # v2, genuine
    with pytest.raises(ReplayedManifestError, match="asked for version 3"):
        TrustPolicy(ident.public_hex).check(old, expected_version=3)
    with pytest.raises(ReplayedManifestError, match="older than the minimum"):
        TrustPolicy(ident.public_hex, min_version=3).check(old)
    with pytest.raises(ReplayedManifestError, match="channel"):
        TrustPolicy(ident.public_hex, channel="run-2").check(old)
    with pytest.raises(StaleVersionError, match="signed"):
        TrustPolicy(ident.public_hex, max_age_s=-1.0).check(old)


def test_selector_prefers_fast_explores_and_bans() -> None:
    clock = FakeClock()
    sel = ServerSelector(["a", "b", "c"], exploration=0.0, seed=1, clock=clock)
    sel.record_success("a", 100_000_000, 1.0)  # 100 MB/s
    sel.record_success("b", 10_000_000, 1.0)  # 10 MB/s
    # c was never measured: it is assumed as good as the best, so it gets tried.
    picks = {sel.choose() for _ in range(20)}
    assert picks == {"a", "c"}
    sel.record_success("c", 1_000_000, 1.0)
    assert all(sel.choose() == "a" for _ in range(20))
    # Load spreads: with 9 transfers in flight on a, b (10x slower, idle) wins the next one.
    for _ in range(10):
        sel.started("a")
    assert sel.choose() == "b"
    # A failure cools a server down (others first), but a lone server is still retried.
    sel.record_failure("b", "reset")
    assert sel.choose(avoid={"a"}) == "c"
    clock.t += 10
    sel.ban("a", "corrupt shard 1")
    assert "a" not in {sel.choose() for _ in range(50)}
    assert sel.report() == {"a": "corrupt shard 1"}
    explorer = ServerSelector(["a", "b"], exploration=1.0, seed=2, clock=clock)
    explorer.record_success("a", 10**9, 1.0)
    explorer.record_success("b", 1, 1.0)
    assert {explorer.choose() for _ in range(50)} == {"a", "b"}


def test_configs_explain_bad_keys(tmp_path) -> None:
    from cotrain.core.config import load_config
    from cotrain.core.errors import ConfigError

    with pytest.raises(ValueError, match="64 hex"):
        sc.ClientConfig(publisher_key="abc")
    p = tmp_path / "c.toml"
    p.write_text('servers = ["http://x:1/"]\n[transfer]\nparallel_downloads = 3\n')
    cfg = load_config(sc.ClientConfig, p)
    assert cfg.servers == ["http://x:1"] and cfg.transfer.parallel_downloads == 3
    p.write_text("[transfer]\nparalel = 3\n")
    with pytest.raises(ConfigError, match="paralel"):
        load_config(sc.ClientConfig, p)


@pytest.mark.parametrize("name", ["shardcast_relay.toml", "shardcast_client.toml"])
def test_shipped_configs_parse(name: str) -> None:
    from pathlib import Path

    from cotrain.core.config import load_config

    path = Path(__file__).resolve().parents[2] / "configs" / name
    model = sc.RelayConfig if "relay" in name else sc.ClientConfig
    cfg = load_config(model, path)
    assert cfg.transfer.stall_timeout_s == 10.0


def test_store_lists_versions_past_eight_digits(tmp_path) -> None:
    store = VersionStore(tmp_path)
    for v in (7, 10**9, 2**53):
        store.write_manifest(v, b"{}")
    assert store.versions() == [7, 10**9, 2**53] and store.latest() == 2**53


def test_a_publish_killed_midway_is_discarded_not_skipped(published) -> None:
    ident, data, _, root = published
    store = VersionStore(root)
    # what a publisher SIGKILLed after creating v4 leaves: the directory, a part file, no
    # manifest (a resumed RL trainer then published v5 after step 3 and stopped)
    store.version_dir(4).mkdir()
    (store.version_dir(4) / "data.bin.part").write_bytes(data[:1000])
    assert store.latest() == 3 and store.next_version() == 5
    assert store.discard_partial() == [4]
    assert not store.version_dir(4).exists() and store.next_version() == 4
    again = sc.publish(data, dir=root, identity=ident, config=sc.PublishConfig(shard_size_mb=0.1))
    assert again.version == 4
    assert store.discard_partial() == []
