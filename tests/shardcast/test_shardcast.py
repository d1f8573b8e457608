"""shardcast with real processes on loopback: origin, relays and clients, faults injected.

Servers run as ``cotrain shardcast origin|relay`` subprocesses on port 0; clients run in this
process (``fetch``) or as ``cotrain shardcast fetch``. Every test ends by checking that no file
was written that does not match the publisher's bytes.
"""

from __future__ import annotations

import json
import os
import selectors
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from shardcast_harness import blob as payload

from cotrain.core.identity import Identity
from cotrain.shardcast import ClientConfig, PublishConfig, fetch, load_into, publish, watch
from cotrain.shardcast.errors import OutputError, UpstreamUnavailable, VersionNotFound

CLI = [sys.executable, "-c", "from cotrain.cli import main; main()", "shardcast"]
START_TIMEOUT_S = 30.0


class Server:
    """A shardcast server subprocess; ``url`` once it announced itself."""

    def __init__(self, args: list[str], log: Path) -> None:
        self.log = log
        self._err = open(log, "wb")  # noqa: SIM115
        self.proc = subprocess.Popen([*CLI, *args], stdout=subprocess.PIPE, stderr=self._err)
        assert self.proc.stdout is not None
        sel = selectors.DefaultSelector()
        sel.register(self.proc.stdout, selectors.EVENT_READ)
        if not sel.select(timeout=START_TIMEOUT_S):
            self.stop()
            raise AssertionError(f"server did not start: {log.read_text()}")
        line = self.proc.stdout.readline()
        if not line:
            self.stop()
            raise AssertionError(f"server exited: {log.read_text()}")
        self.url: str = json.loads(line)["url"]

    def get(self, path: str, timeout_s: float = 30.0) -> dict:
        with urllib.request.urlopen(self.url + path, timeout=timeout_s) as r:
            return json.loads(r.read())

    def wait_version(self, after: int) -> list[int]:
        """Long-poll until the server holds a version newer than ``after``."""
        versions = self.get(f"/v1/versions?after={after}&wait_s=20")["versions"]
        assert versions and versions[-1] > after, f"no version > {after}: {versions}"
        return versions

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        if self.proc.stdout is not None:
            self.proc.stdout.close()
        self._err.close()


class Cluster:
    """Starts servers for one test and stops them all at the end."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.ident = Identity.generate()
        self.key = self.ident.public_hex
        self.origin_dir = tmp / "origin"
        self.servers: list[Server] = []

    def _start(self, name: str, args: list[str]) -> Server:
        s = Server(args, self.tmp / f"{name}.log")
        self.servers.append(s)
        return s

    def origin(self, *sets: str) -> Server:
        args = ["origin", "--dir", str(self.origin_dir), "--port", "0"]
        return self._start("origin", args + [a for s in sets for a in ("--set", s)])

    def relay(self, name: str, upstreams: list[Server | str], *sets: str) -> Server:
        ups = ",".join(u if isinstance(u, str) else u.url for u in upstreams)
        args = ["relay", "--upstream", ups, "--dir", str(self.tmp / name), "--port", "0",
                "--publisher-key", self.key, "--set", "retry_interval_s=0.2"]  # fmt: skip
        return self._start(name, args + [a for s in sets for a in ("--set", s)])

    def publish(self, data: bytes, shard_kb: int = 64, keep: int = 5) -> int:
        cfg = PublishConfig(shard_size_mb=shard_kb / 1000, keep_versions=keep)
        return publish(data, dir=self.origin_dir, identity=self.ident, config=cfg).version

    def fetch(self, servers: list[Server | str], out: Path, **kw) -> object:
        urls = [s if isinstance(s, str) else s.url for s in servers]
        cfg = ClientConfig(timeout_s=60.0, **kw.pop("config", {}))
        return fetch(urls, publisher_key=self.key, out=out, config=cfg, **kw)

    def close(self) -> None:
        for s in reversed(self.servers):
            s.stop()


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[Cluster]:
    c = Cluster(tmp_path)
    try:
        yield c
    finally:
        c.close()


def leftovers(d: Path) -> list[str]:
    return sorted(p.name for p in d.iterdir()) if d.exists() else []


@pytest.mark.timeout(90)
def test_chain_of_relays_delivers_a_model(cluster: Cluster, tmp_path: Path) -> None:
    import torch

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.GELU(), torch.nn.Linear(256, 64))
    origin = cluster.origin()
    r1 = cluster.relay("r1", [origin])
    r2 = cluster.relay("r2", [r1])  # a relay whose upstream is another relay
    cfg = PublishConfig(shard_size_mb=0.02)
    res = publish(model.state_dict(), dir=cluster.origin_dir, identity=cluster.ident, config=cfg)
    assert len(res.manifest.shards) > 5
    # The client may arrive while r2 is still mirroring: shards are served as they land.
    out = tmp_path / "client" / "model.safetensors"
    got = cluster.fetch([r2], out, wait_s=20.0)
    fresh = torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.GELU(), torch.nn.Linear(256, 64))
    load_into(fresh, got.path)
    for a, b in zip(model.state_dict().values(), fresh.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    assert got.version == 1 and got.bad_servers == {}
    assert leftovers(out.parent) == ["model.safetensors"]
    health = r2.get("/v1/health")
    assert health["role"] == "relay" and health["upstreams"] == {r1.url: "ok"}


@pytest.mark.timeout(90)
def test_versions_are_retired_everywhere(cluster: Cluster, tmp_path: Path) -> None:
    origin = cluster.origin()
    relay = cluster.relay("r", [origin], "keep_versions=2")
    blobs = [payload(200_000, seed) for seed in range(4)]
    for v, blob in enumerate(blobs, start=1):
        assert cluster.publish(blob, keep=2) == v
        relay.wait_version(after=v - 1)
    assert origin.get("/v1/versions")["versions"] == [3, 4]
    assert relay.get("/v1/versions")["versions"] == [3, 4]
    assert leftovers(tmp_path / "r") == ["v00000003", "v00000004"]
    assert leftovers(cluster.origin_dir) == [".publish.lock", "v00000003", "v00000004"]
    with pytest.raises(VersionNotFound, match="v1"):
        cluster.fetch([relay, origin], tmp_path / "old.bin", version=1)
    got = cluster.fetch([relay], tmp_path / "v3.bin", version=3, wait_s=10.0)
    assert got.path.read_bytes() == blobs[2]
    assert not (tmp_path / "old.bin").exists()


@pytest.mark.timeout(90)
def test_relay_killed_mid_transfer(cluster: Cluster, tmp_path: Path) -> None:
    blob = payload(6_000_000)
    cluster.publish(blob, shard_kb=512)
    origin = cluster.origin()
    # 'dying' exits (like kill -9) halfway through the second shard it serves.
    dying = cluster.relay("dying", [origin], "fault.exit_after_bytes=786432")
    healthy = cluster.relay("healthy", [origin])
    out = tmp_path / "out.bin"
    got = cluster.fetch([dying, healthy], out, wait_s=10.0,
                        config={"transfer": {"exploration": 0.0, "seed": 1}})  # fmt: skip
    assert dying.proc.wait(timeout=10) == 9
    assert out.read_bytes() == blob
    assert got.bytes_by_server[dying.url] < len(blob) // 2
    assert got.bad_servers == {}  # a dead relay is avoided, not accused of lying


@pytest.mark.timeout(90)
def test_relay_serving_corrupt_shards(cluster: Cluster, tmp_path: Path) -> None:
    blob = payload(2_000_000)
    cluster.publish(blob, shard_kb=100)
    origin = cluster.origin()
    liar = cluster.relay("liar", [origin], "fault.corrupt_shards=[0,1,2,3,4,5,6,7,8,9]")
    honest = cluster.relay("honest", [origin])
    got = cluster.fetch([liar, honest], tmp_path / "a.bin", wait_s=10.0)
    assert (tmp_path / "a.bin").read_bytes() == blob
    assert list(got.bad_servers) == [liar.url] and "corrupt" in got.bad_servers[liar.url]
    reports = honest.get("/v1/reports")
    assert [r["server"] for r in reports] == [liar.url]
    # With only the liar to ask, the fetch fails and no file appears.
    with pytest.raises(UpstreamUnavailable, match=r"misbehaved|failed"):
        cluster.fetch([liar], tmp_path / "b.bin")
    assert not (tmp_path / "b.bin").exists()


@pytest.mark.timeout(90)
def test_relay_behind_a_lying_upstream(cluster: Cluster, tmp_path: Path) -> None:
    """A relay forwards shards while they arrive; corrupt ones never reach a client's file."""
    blob = payload(1_000_000)
    cluster.publish(blob, shard_kb=100)
    origin = cluster.origin()
    liar_args = ["origin", "--dir", str(cluster.origin_dir), "--port", "0"]
    liar = cluster._start("liar", [*liar_args, "--set", f"fault.corrupt_shards={list(range(10))}"])
    relay = cluster.relay("r", [liar, origin])
    got = cluster.fetch([relay], tmp_path / "a.bin", wait_s=10.0)
    assert (tmp_path / "a.bin").read_bytes() == blob
    assert got.bad_servers == {}  # the relay is honest: it retracted what it could not verify
    relay.wait_version(after=0)
    assert liar.url in relay.get("/v1/health")["bad_upstreams"]


@pytest.mark.timeout(90)
def test_forged_and_replayed_manifests(cluster: Cluster, tmp_path: Path) -> None:
    old, new = payload(300_000, 1), payload(300_000, 2)
    cluster.publish(old)
    cluster.publish(new)
    origin = cluster.origin()
    forger = cluster.relay("forger", [origin], "fault.manifest='forged'")
    replayer = cluster.relay("replayer", [origin], "fault.manifest='replayed'")
    for bad in (forger, replayer):
        bad.wait_version(after=1)
    with pytest.raises(UpstreamUnavailable, match="trustworthy"):
        cluster.fetch([forger], tmp_path / "f.bin")
    with pytest.raises(UpstreamUnavailable, match="trustworthy"):
        cluster.fetch([replayer], tmp_path / "r.bin")
    got = cluster.fetch([forger, replayer, origin], tmp_path / "ok.bin")
    assert got.version == 2 and (tmp_path / "ok.bin").read_bytes() == new
    assert "bad signature" in got.bad_servers[forger.url]
    assert "asked for version 2" in got.bad_servers[replayer.url]
    assert not (tmp_path / "f.bin").exists() and not (tmp_path / "r.bin").exists()
    # A relay never mirrors what a forger hands it.
    downstream = cluster.relay("downstream", [forger])
    health = downstream.get("/v1/versions?after=0&wait_s=2")
    assert health["versions"] == []
    assert forger.url in downstream.get("/v1/health")["bad_upstreams"]


@pytest.mark.timeout(90)
def test_upstream_unreachable(cluster: Cluster, tmp_path: Path) -> None:
    import socket

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{s.getsockname()[1]}"
    relay = cluster.relay("r", [dead])
    status = relay.get("/v1/health")["upstreams"][dead]
    assert status.startswith(("unreachable", "not contacted"))
    t0 = time.monotonic()
    with pytest.raises(VersionNotFound, match="no server offers"):
        cluster.fetch([relay], tmp_path / "x.bin")
    with pytest.raises(UpstreamUnavailable, match="none of the servers answered"):
        cluster.fetch([dead], tmp_path / "x.bin")
    assert time.monotonic() - t0 < 15
    x = str(tmp_path / "x.bin")
    cmd = [*CLI, "fetch", "--servers", dead, "--out", x, "--publisher-key", cluster.key]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    assert r.returncode == 1 and "none of the servers answered" in r.stderr
    assert leftovers(tmp_path).count("x.bin") == 0


@pytest.mark.timeout(90)
def test_disk_full_leaves_nothing(cluster: Cluster, tmp_path: Path) -> None:
    blob = payload(3_000_000)
    cluster.publish(blob)
    origin = cluster.origin()
    small = tmp_path / "small"
    small.mkdir()
    mounted = (
        os.geteuid() == 0
        and subprocess.run(
            ["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(small)], capture_output=True
        ).returncode
        == 0
    )
    try:
        out = str(small / "m.bin")
        cmd = [*CLI, "fetch", "--servers", origin.url, "--out", out, "--publisher-key", cluster.key]
        if mounted:
            r = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
        else:  # no tmpfs: a file-size limit makes writes fail the same way
            import resource
            import signal

            def limit() -> None:
                signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
                resource.setrlimit(resource.RLIMIT_FSIZE, (1_000_000, 1_000_000))

            r = subprocess.run(cmd, capture_output=True, text=True, timeout=60, preexec_fn=limit)
        assert r.returncode == 1, r.stdout
        assert "not enough space" in r.stderr
        assert leftovers(small) == []
    finally:
        if mounted:
            subprocess.run(["umount", str(small)], check=True)
    with pytest.raises(OutputError):  # the Python API raises the typed error
        cluster.fetch([origin], Path("/proc/no/such/dir/m.bin"))


@pytest.mark.timeout(90)
def test_client_started_while_publishing(cluster: Cluster, tmp_path: Path) -> None:
    first, second = payload(100_000, 1), payload(8_000_000, 2)
    cluster.publish(first)
    origin = cluster.origin()
    relay = cluster.relay("r", [origin])
    relay.wait_version(after=0)
    src = tmp_path / "second.bin"
    src.write_bytes(second)
    key_file = tmp_path / "key.pem"
    cluster.ident.save(key_file)
    out = tmp_path / "client" / "m.bin"
    fetch_cmd = [*CLI, "fetch", "--servers", relay.url, "--out", str(out)]
    fetch_cmd += ["--publisher-key", cluster.key, "--min-version", "2", "--wait-s", "30"]
    fetch_cmd += ["--progress"]
    client = subprocess.Popen(fetch_cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    pub_cmd = [*CLI, "publish", str(src), "--dir", str(cluster.origin_dir)]
    pub_cmd += ["--key", str(key_file), "--shard-size-mb", "0.25"]
    pub = subprocess.run(pub_cmd, capture_output=True, text=True, timeout=60)
    assert pub.returncode == 0, pub.stderr
    assert json.loads(pub.stdout)["version"] == 2
    stdout, stderr = client.communicate(timeout=60)
    assert client.returncode == 0, stderr
    assert json.loads(stdout)["version"] == 2
    assert "v2" in stderr and "8.0" in stderr  # the progress bar: label and MB done
    assert out.read_bytes() == second
    assert leftovers(out.parent) == ["m.bin"]


@pytest.mark.timeout(90)
def test_stalled_transfer_retried_and_resumed(cluster: Cluster, tmp_path: Path) -> None:
    blob = payload(3_000_000)
    cluster.publish(blob, shard_kb=500)
    origin = cluster.origin()
    staller = cluster.relay("staller", [origin], "fault.stall_shards=[1,3,5]")
    staller.wait_version(after=0)
    out = tmp_path / "m.bin"
    quick = {"transfer": {"stall_timeout_s": 1.0, "max_attempts_per_shard": 1}}
    with pytest.raises(UpstreamUnavailable, match=r"shard [135]"):
        cluster.fetch([staller], out, config=quick)
    assert not out.exists()
    assert (tmp_path / "m.bin.part").exists() and (tmp_path / "m.bin.part.json").exists()
    # A second run resumes: shards already verified are not downloaded again.
    got = cluster.fetch([staller, origin], out, config={"transfer": {"stall_timeout_s": 1.0}})
    assert out.read_bytes() == blob
    assert got.resumed_shards >= 1
    assert got.bytes_downloaded == len(blob) - sum(
        s.size for s in got.manifest.shards[: got.resumed_shards]
    ) or got.bytes_downloaded < len(blob)
    assert leftovers(tmp_path).count("m.bin.part") == 0


@pytest.mark.timeout(90)
def test_watch_yields_each_new_version(cluster: Cluster, tmp_path: Path) -> None:
    origin = cluster.origin()
    relay = cluster.relay("r", [origin])
    blobs = [payload(150_000, seed) for seed in range(3)]
    cluster.publish(blobs[0])
    out = tmp_path / "w.bin"
    versions = watch([relay.url], publisher_key=cluster.key, out=out,
                     config=ClientConfig(timeout_s=60.0))  # fmt: skip
    try:
        first = next(versions)
        assert first.version == 1 and out.read_bytes() == blobs[0]
        cluster.publish(blobs[1])
        assert next(versions).version == 2 and out.read_bytes() == blobs[1]
        cluster.publish(blobs[2])
        assert next(versions).version == 3 and out.read_bytes() == blobs[2]
    finally:
        versions.close()
    assert leftovers(tmp_path).count("w.bin.part") == 0
