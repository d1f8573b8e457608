"""Linux network namespaces: the ``ip``/``tc``/``nft`` commands we run and the names we give.

Everything netem creates lives inside namespaces it names ``ctn-<pid>-<start>-<n>-<role>``:
``pid`` and ``start`` (the process start time in clock ticks, from ``/proc``) identify the
owning process even after its pid is reused, ``n`` counts networks within that process. A
namespace whose owner is gone is a leftover of a crashed run, and :func:`cleanup_leftovers`
removes it. Interfaces are created directly inside our namespaces (never in the root one), so
deleting the namespaces deletes the links too and parallel runs cannot collide.
"""

from __future__ import annotations

import ctypes
import functools
import os
import re
import shutil
import signal
import subprocess
import tempfile
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TypeVar

from cotrain.core.errors import TimeoutExpired
from cotrain.core.pids import start_ticks
from cotrain.netem.errors import NetemCommandError, NetnsUnavailable

PREFIX = "ctn-"
COMMAND_TIMEOUT_S = 10.0
_NAME_RE = re.compile(r"^ctn-(?P<pid>\d+)-(?P<start>\d+)-(?P<n>\d+)-(?P<role>[a-z0-9_]+)$")
_CLONE_NEWNET = 0x40000000
T = TypeVar("T")

_counter_lock = threading.Lock()
_counter = 0


def netns_unavailable_reason() -> str | None:
    """Why we cannot build namespaces here (not root, a tool missing), or None when we can.

    Beyond the cheap checks it builds one throwaway namespace with a ``tbf`` qdisc and an
    nftables table (once per process, ~50 ms), so a root without the capabilities or kernel
    modules we need gets a reason too instead of a failure half-way through a test.
    """
    if os.geteuid() != 0:
        return "network namespaces need root (euid is not 0)"
    for tool, package in (("ip", "iproute2"), ("tc", "iproute2"), ("nft", "nftables")):
        if shutil.which(tool) is None:
            return f"`{tool}` not found on PATH; install the Debian package {package}"
    if not os.path.exists("/proc/self/ns/net"):
        return "/proc/self/ns/net is missing: this kernel has no network namespaces"
    return _probe_once()


@functools.cache
def _probe_once() -> str | None:
    ns = f"{new_network_tag()}-probe"
    steps = [
        ["ip", "netns", "add", ns],
        ["ip", "-n", ns, "link", "set", "lo", "up"],
        in_ns(ns, ["tc", "qdisc", "add", "dev", "lo", "root", "tbf", "rate", "1mbit",
                   "burst", "16384", "limit", "65536"]),
        in_ns(ns, ["nft", "add", "table", "inet", "cotrain_probe"]),
        in_ns(ns, ["nft", "add", "table", "bridge", "cotrain_probe"]),  # the links' loss rules
    ]  # fmt: skip
    try:
        for argv in steps:
            run_cmd(argv)
    except (NetemCommandError, TimeoutExpired) as exc:
        return f"cannot build a test namespace: {exc}"
    finally:
        try:
            delete_netns(ns)
        except (NetemCommandError, TimeoutExpired):
            pass
    return None


def require_netns() -> None:
    """Raise ``NetnsUnavailable`` with the reason when namespaces cannot be built."""
    reason = netns_unavailable_reason()
    if reason is not None:
        raise NetnsUnavailable(reason)


def run_cmd(
    argv: Sequence[str], *, input_text: str | None = None, timeout_s: float = COMMAND_TIMEOUT_S
) -> str:
    """Run one network command; return its stdout or raise ``NetemCommandError``."""
    try:
        done = subprocess.run(
            list(argv), input=input_text, capture_output=True, text=True, timeout=timeout_s
        )
    except subprocess.TimeoutExpired as exc:
        raise TimeoutExpired(f"{' '.join(argv)!r} ran over {timeout_s} s") from exc
    if done.returncode != 0:
        raise NetemCommandError(argv, done.returncode, done.stderr)
    return done.stdout


def in_ns(ns: str, argv: Sequence[str]) -> list[str]:
    """``argv`` run inside namespace ``ns`` (the command is exec'd, so its pid is the child's)."""
    return ["ip", "netns", "exec", ns, *argv]


def new_network_tag() -> str:
    """A unique ``ctn-<pid>-<start>-<n>`` tag for one network of this process."""
    global _counter
    with _counter_lock:
        _counter += 1
        n = _counter
    return f"{PREFIX}{os.getpid()}-{start_ticks(os.getpid())}-{n}"


@dataclass(frozen=True)
class NamespaceName:
    """A parsed netem namespace name."""

    name: str
    owner_pid: int
    owner_start: int
    network: int
    role: str

    @property
    def owner_alive(self) -> bool:
        return start_ticks(self.owner_pid) == self.owner_start


def parse_name(name: str) -> NamespaceName | None:
    m = _NAME_RE.match(name)
    if m is None:
        return None
    return NamespaceName(name, int(m["pid"]), int(m["start"]), int(m["n"]), m["role"])


def list_netns() -> list[str]:
    """Names of all namespaces known to ``ip netns`` (ours and others')."""
    out = run_cmd(["ip", "netns", "list"])
    return [line.split()[0] for line in out.splitlines() if line.strip()]


def netns_pids(ns: str) -> list[int]:
    try:
        out = run_cmd(["ip", "netns", "pids", ns])
    except NetemCommandError:
        return []
    return [int(tok) for tok in out.split()]


def kill_netns_processes(ns: str) -> None:
    """SIGKILL every process inside ``ns`` (the ones we started were asked to stop already)."""
    for pid in netns_pids(ns):
        if pid == os.getpid():
            continue
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def delete_netns(ns: str) -> None:
    """Kill what runs in ``ns`` and delete it (its veth ends go with it); missing is fine."""
    kill_netns_processes(ns)
    try:
        run_cmd(["ip", "netns", "delete", ns])
    except NetemCommandError as exc:
        if "No such file" not in exc.stderr:
            raise


def cleanup_leftovers(*, include_live: bool = False) -> list[str]:
    """Delete netem namespaces whose owning process is dead (all of them if ``include_live``),
    with the processes inside them, and the delay agents' control folders in the temp dir.

    Returns the names deleted. Safe while other runs are live: their owners are alive.
    """
    removed = []
    for name in list_netns():
        parsed = parse_name(name)
        if parsed is None or (parsed.owner_alive and not include_live):
            continue
        delete_netns(name)
        removed.append(name)
    tmp = tempfile.gettempdir()
    for entry in os.listdir(tmp):
        # Folders are named "<tag>-<random>"; parse them as if the random part were a role.
        parsed = parse_name(entry.lower())
        if parsed is None or (parsed.owner_alive and not include_live):
            continue
        path = os.path.join(tmp, entry)
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
    return removed


def call_in_netns(ns: str, fn: Callable[[], T]) -> T:
    """Run ``fn`` on a helper thread that has entered ``ns``'s network namespace.

    Sockets keep the namespace they were created in, so this is how the parent process opens
    a listening or connected socket inside a host without a child process. ``setns`` on a
    thread moves only that thread, and the thread ends right after, so nothing else moves.
    """
    libc = ctypes.CDLL(None, use_errno=True)
    result: list[T] = []
    error: list[BaseException] = []

    def body() -> None:
        try:
            fd = os.open(f"/run/netns/{ns}", os.O_RDONLY)
            try:
                if libc.setns(fd, _CLONE_NEWNET) != 0:
                    err = ctypes.get_errno()
                    raise OSError(err, f"setns into {ns}: {os.strerror(err)}")
            finally:
                os.close(fd)
            result.append(fn())
        except BaseException as exc:
            error.append(exc)

    thread = threading.Thread(target=body, name=f"netns-{ns}", daemon=True)
    thread.start()
    thread.join(COMMAND_TIMEOUT_S + 60.0)
    if thread.is_alive():
        raise TimeoutExpired(f"call inside namespace {ns} did not return")
    if error:
        raise error[0]
    return result[0]
