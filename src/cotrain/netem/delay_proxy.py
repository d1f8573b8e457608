"""``DelayProxy``: the parent's handle on one delay proxy process (see ``cotrain.netem.proxy``)."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

from cotrain.core.errors import TimeoutExpired
from cotrain.netem.announce import read_json_line
from cotrain.netem.errors import AnnounceError, ProxyError
from cotrain.netem.netns import in_ns

START_TIMEOUT_S = 10.0
STOP_TIMEOUT_S = 5.0


def child_env(env: dict[str, str] | None = None) -> dict[str, str]:
    """``env`` (default: ours) with cotrain's source root on PYTHONPATH, so children import it."""
    out = dict(os.environ if env is None else env)
    src_root = str(Path(__file__).resolve().parents[2])
    parts = [p for p in out.get("PYTHONPATH", "").split(os.pathsep) if p]
    if src_root not in parts:
        out["PYTHONPATH"] = os.pathsep.join([src_root, *parts])
    return out


@dataclass
class DelayProxy:
    """A running proxy: connect to ``port`` (in its namespace) to reach ``target`` with delay.

    Start one with ``Host.start_delay_proxy`` or, outside namespaces (plain loopback, no root
    needed), with ``DelayProxy.start(None, ...)``. ``stop()`` is idempotent.
    """

    port: int
    target: tuple[str, int]
    delay_ms: float
    namespace: str | None
    process: subprocess.Popen[bytes] = field(repr=False)
    _stderr: IO[bytes] = field(repr=False)

    @classmethod
    def start(
        cls,
        namespace: str | None,
        target: tuple[str, int],
        delay_ms: float,
        *,
        listen_port: int = 0,
        listen_host: str = "0.0.0.0",
        max_buffer_kb: int = 4096,
        coalesce_ms: float | None = None,
        timeout_s: float = START_TIMEOUT_S,
    ) -> DelayProxy:
        """Start ``python -m cotrain.netem.proxy`` (in ``namespace``; None: here) and wait for its
        port. ``coalesce_ms`` None picks delay/20 capped at 2 ms (see the proxy module)."""
        if delay_ms < 0:
            raise ValueError(f"delay_ms must be >= 0, got {delay_ms}")
        if not 0 <= listen_port < 65536:
            raise ValueError(f"listen_port must be in [0, 65535], got {listen_port}")
        args = [
            "--target", f"{target[0]}:{target[1]}", "--delay-ms", str(delay_ms),
            "--listen-host", listen_host, "--listen-port", str(listen_port),
            "--max-buffer-kb", str(max_buffer_kb),
        ]  # fmt: skip
        if coalesce_ms is not None:
            args += ["--coalesce-ms", str(coalesce_ms)]
        process, port, stderr = spawn_proxy(namespace, args, timeout_s)
        return cls(port, (target[0], int(target[1])), delay_ms, namespace, process, stderr)

    @property
    def running(self) -> bool:
        return self.process.poll() is None

    def stop(self, timeout_s: float = STOP_TIMEOUT_S) -> None:
        """SIGTERM the proxy (SIGKILL after ``timeout_s``); its connections are cut."""
        terminate(self.process, timeout_s)
        if self.process.stdout is not None:
            self.process.stdout.close()
        self._stderr.close()

    def __enter__(self) -> DelayProxy:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def spawn_proxy(
    namespace: str | None, args: list[str], timeout_s: float
) -> tuple[subprocess.Popen[bytes], int, IO[bytes]]:
    """Start the proxy program with ``args`` and wait for its port: (process, port, stderr)."""
    process, stderr = launch_proxy(namespace, args)
    return process, await_port(process, stderr, timeout_s), stderr


def launch_proxy(
    namespace: str | None, args: list[str]
) -> tuple[subprocess.Popen[bytes], IO[bytes]]:
    """Start the proxy program with ``args``; ``await_port`` then learns its port."""
    argv = [sys.executable, "-m", "cotrain.netem.proxy", *args, "--parent-pid", str(os.getpid())]
    if namespace is not None:
        argv = in_ns(namespace, argv)
    # stderr goes to a file: nobody has to drain it, and it explains a failed start.
    stderr = tempfile.TemporaryFile()  # noqa: SIM115 (lives as long as the proxy)
    process = subprocess.Popen(
        argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=stderr, env=child_env()
    )
    return process, stderr


def await_port(process: subprocess.Popen[bytes], stderr: IO[bytes], timeout_s: float) -> int:
    """The port the proxy reports; on failure it is stopped and ``ProxyError`` says why."""
    try:
        return _read_port(process, timeout_s, stderr)
    except BaseException:
        terminate(process)
        stderr.close()
        raise


def _read_port(process: subprocess.Popen[bytes], timeout_s: float, stderr: IO[bytes]) -> int:
    """The port from the proxy's ``{"port": N}`` line; its stderr explains a failed start."""
    try:
        return int(read_json_line(process, timeout_s, "the delay proxy to report its port")["port"])
    except (AnnounceError, KeyError, ValueError, TypeError) as exc:
        try:
            process.wait(timeout=1.0)
        except subprocess.TimeoutExpired:
            pass
        stderr.seek(0)
        message = stderr.read().decode(errors="replace").strip() or "(no output)"
        raise ProxyError(f"delay proxy did not start ({exc}): {message}") from exc


def terminate(process: subprocess.Popen[bytes], timeout_s: float = STOP_TIMEOUT_S) -> None:
    if process.poll() is not None:
        return
    process.terminate()
    try:
        process.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        process.kill()
        try:
            process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired as exc:
            raise TimeoutExpired(f"delay proxy pid {process.pid} did not die") from exc
