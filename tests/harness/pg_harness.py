"""A throwaway PostgreSQL cluster (../shared/MACHINE.md), for the protocol tests and the
coordinator benchmark: ``initdb`` as the ``postgres`` user, a free port, fsync off.

    with postgres_cluster() as pg:        # raises Unavailable(reason) when it cannot start
        url = pg.create_database("t1")    # postgresql://postgres@127.0.0.1:PORT/t1
"""

from __future__ import annotations

import contextlib
import glob
import os
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path


class Unavailable(Exception):
    """Why no cluster can start here (not root, no server binaries, no psycopg)."""


@dataclass(frozen=True)
class Cluster:
    port: int
    directory: str

    def _admin(self) -> str:
        return f"host=127.0.0.1 port={self.port} user=postgres dbname=postgres"

    def create_database(self, name: str) -> str:
        import psycopg

        with psycopg.connect(self._admin(), autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        return f"postgresql://postgres@127.0.0.1:{self.port}/{name}"

    def drop_database(self, name: str) -> None:
        import psycopg

        with psycopg.connect(self._admin(), autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def binaries() -> str:
    """The newest installed server's bin directory."""
    found = sorted(
        glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: int(p.split("/")[-3])
    )
    if not found:
        raise Unavailable(
            "no PostgreSQL server in /usr/lib/postgresql (apt-get install postgresql)"
        )
    return os.path.dirname(found[-1])


def _as_postgres(*cmd: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["runuser", "-u", "postgres", "--", *cmd],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


@contextlib.contextmanager
def postgres_cluster() -> Iterator[Cluster]:
    if os.geteuid() != 0:
        raise Unavailable("initdb must run as the postgres user, which needs root")
    if shutil.which("runuser") is None:
        raise Unavailable("runuser is missing")
    try:
        import psycopg  # noqa: F401
    except ImportError:
        raise Unavailable("psycopg is not installed (pip install -e '.[postgres]')") from None
    pgbin = binaries()
    d = tempfile.mkdtemp(prefix="cotrain-pg-")
    shutil.chown(d, "postgres")
    data = os.path.join(d, "data")
    log = os.path.join(d, "pg.log")
    try:
        init = _as_postgres(
            f"{pgbin}/initdb", *("-D", data, "-U", "postgres", "-A", "trust", "--no-sync"),
            *("-E", "UTF8", "--locale=C.UTF-8"),
        )  # fmt: skip
        if init.returncode != 0:
            raise Unavailable(f"initdb failed: {init.stderr.strip()[-300:]}")
        port = None
        for _ in range(3):  # another process may take the free port before the server does
            candidate = _free_port()
            opts = (
                f"-k {d} -p {candidate} -c listen_addresses=127.0.0.1 -c fsync=off "
                "-c max_connections=200"
            )
            r = _as_postgres(
                f"{pgbin}/pg_ctl", *("-D", data, "-l", log, "-w", "-t", "60", "-o", opts),
                "start",
            )  # fmt: skip
            if r.returncode == 0:
                port = candidate
                break
        if port is None:
            tail = Path(log).read_text()[-300:] if os.path.exists(log) else ""
            raise Unavailable(f"pg_ctl start failed: {tail}")
    except BaseException:
        shutil.rmtree(d, ignore_errors=True)
        raise
    try:
        yield Cluster(port, d)
    finally:
        _as_postgres(f"{pgbin}/pg_ctl", "-D", data, "-m", "immediate", "-w", "stop")
        shutil.rmtree(d, ignore_errors=True)
