"""``Host``: one emulated machine, a network namespace with one WAN link and its own ``lo``."""

from __future__ import annotations

import socket
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from cotrain.core.clock import Deadline
from cotrain.core.errors import TimeoutExpired
from cotrain.netem.delay_proxy import START_TIMEOUT_S, STOP_TIMEOUT_S, DelayProxy, child_env
from cotrain.netem.netns import call_in_netns, in_ns

RUN_TIMEOUT_S = 10.0


@dataclass
class Host:
    """A host of a ``WanNetwork``: ``name`` is its namespace, ``ip`` its address on the WAN.

    Processes started here (``popen``, ``run``, ``start_delay_proxy``) see only this host's
    interfaces: ``lo`` (127.0.0.1) and the WAN link (``ip``); every other host is reached
    through the shaped link. The network stops them all when it closes.
    """

    name: str
    ip: str
    index: int
    _processes: list[subprocess.Popen[Any]] = field(default_factory=list, repr=False)
    _proxies: list[DelayProxy] = field(default_factory=list, repr=False)

    def popen(self, args: Sequence[str], **kwargs: Any) -> subprocess.Popen[Any]:
        """``subprocess.Popen(args, **kwargs)`` inside this host; ``cotrain`` stays importable."""
        kwargs["env"] = child_env(kwargs.get("env"))
        process: subprocess.Popen[Any] = subprocess.Popen(in_ns(self.name, list(args)), **kwargs)
        self._processes.append(process)
        return process

    def run(
        self,
        args: Sequence[str],
        *,
        timeout_s: float = RUN_TIMEOUT_S,
        check: bool = False,
        input: str | None = None,
        env: dict[str, str] | None = None,
    ) -> subprocess.CompletedProcess[str]:
        """Run ``args`` here to completion, capturing text output; ``check`` raises on failure.

        Raises ``TimeoutExpired`` (after killing it) when it runs past ``timeout_s``.
        """
        try:
            return subprocess.run(
                in_ns(self.name, list(args)),
                input=input,
                capture_output=True,
                text=True,
                timeout=timeout_s,
                check=check,
                env=child_env(env),
            )
        except subprocess.TimeoutExpired as exc:
            raise TimeoutExpired(
                f"{list(args)!r} on host {self.name} ran over {timeout_s} s"
            ) from exc

    def start_delay_proxy(
        self,
        listen_port: int = 0,
        *,
        target: tuple[str, int],
        delay_ms: float,
        max_buffer_kb: int = 4096,
        coalesce_ms: float | None = None,
        timeout_s: float = START_TIMEOUT_S,
    ) -> DelayProxy:
        """A delay proxy in this host, listening on ``ip`` and 127.0.0.1, forwarding to ``target``.

        Connections to ``(host.ip, proxy.port)`` reach ``target`` with ``delay_ms`` added each
        way. ``target`` is resolved inside this host: ``("127.0.0.1", p)`` is a server here.
        """
        proxy = DelayProxy.start(
            self.name,
            target,
            delay_ms,
            listen_port=listen_port,
            max_buffer_kb=max_buffer_kb,
            coalesce_ms=coalesce_ms,
            timeout_s=timeout_s,
        )
        self._proxies.append(proxy)
        return proxy

    def connect(
        self, address: tuple[str, int], *, timeout_s: float = RUN_TIMEOUT_S
    ) -> socket.socket:
        """A TCP socket of *this* process, opened from inside this host to ``address``.

        Like ``socket.create_connection``, the socket keeps ``timeout_s`` as its timeout.
        """
        return call_in_netns(self.name, lambda: socket.create_connection(address, timeout_s))

    def listen(self, port: int = 0, *, backlog: int = 128) -> socket.socket:
        """A listening TCP socket of this process inside this host, on all its addresses."""

        def make() -> socket.socket:
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(("0.0.0.0", port))
            sock.listen(backlog)
            return sock

        return call_in_netns(self.name, make)

    def stop_processes(self, timeout_s: float = STOP_TIMEOUT_S) -> None:
        """Stop this host's proxies and processes: SIGTERM, then SIGKILL after ``timeout_s``."""
        processes = [proxy.process for proxy in self._proxies] + self._processes
        for process in processes:
            if process.poll() is None:
                process.terminate()
        deadline = Deadline.after(timeout_s)
        for process in processes:
            try:
                process.wait(timeout=deadline.remaining())
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=timeout_s)
        for proxy in self._proxies:
            proxy.stop(timeout_s)  # reaped already; closes its pipes
        self._proxies.clear()
        self._processes.clear()
