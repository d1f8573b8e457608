"""Errors of ``cotrain.netem``, the emulated WAN links.

::

    CotrainError
    └── NetemError                       anything netem raises on purpose
        ├── NetnsUnavailable             we cannot build namespaces here (not root, no ip/tc/nft)
        ├── NetemCommandError            an ``ip``/``tc``/``nft`` command failed (command, stderr)
        ├── AnnounceError                a child exited or printed garbage, not its JSON line
        └── ProxyError                   a delay proxy did not start or died
    TimeoutExpired (cotrain.core)        a command, a proxy start or a process wait ran too long

Wrong arguments (a negative rate, a host index out of range) raise ``ValueError`` with a message
that says what is allowed.
"""

from __future__ import annotations

from collections.abc import Sequence

from cotrain.core.errors import CotrainError


class NetemError(CotrainError):
    """Base class of the errors raised by ``cotrain.netem``."""


class NetnsUnavailable(NetemError):
    """Network namespaces cannot be built on this machine; the message says why."""


class NetemCommandError(NetemError):
    """A network command (``ip``, ``tc``, ``nft``) exited with an error."""

    def __init__(self, argv: Sequence[str], returncode: int, stderr: str) -> None:
        self.argv = list(argv)
        self.returncode = returncode
        self.stderr = stderr.strip()
        super().__init__(f"{' '.join(self.argv)!r} failed (exit {returncode}): {self.stderr}")


class AnnounceError(NetemError):
    """A child process closed stdout or printed garbage instead of its ``{"port": N}`` line."""


class ProxyError(NetemError):
    """A delay proxy failed to start (bad target, port in use) or exited early."""
