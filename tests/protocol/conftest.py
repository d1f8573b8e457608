"""Protocol fixtures: ``db_url`` runs a test on SQLite and on PostgreSQL.

PostgreSQL is a throwaway cluster for the whole session (as in ../shared/MACHINE.md): ``initdb``
as the ``postgres`` user on a free port, fsync off, stopped and removed at the end. Each test
gets a fresh database in it. Where the cluster cannot be built (not root, no server binaries,
no psycopg) the ``[postgresql]`` variants skip with the reason.
"""

from __future__ import annotations

import glob
import itertools
import os
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest


@dataclass(frozen=True)
class PgCluster:
    host: str
    port: int

    def url(self, dbname: str) -> str:
        return f"postgresql://postgres@{self.host}:{self.port}/{dbname}"


def _pg_bin() -> str | None:
    """The newest installed server's bin directory, preferring 15 (what the image ships)."""
    dirs = sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=lambda d: int(d.split("/")[-2]))
    dirs = [d for d in dirs if os.path.exists(os.path.join(d, "initdb"))]
    preferred = [d for d in dirs if d.split("/")[-2] == "15"]
    return (preferred or dirs or [None])[-1]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _run(*cmd: str, timeout_s: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["runuser", "-u", "postgres", "--", *cmd],
        capture_output=True,
        text=True,
        timeout=timeout_s,
        check=False,
    )


@pytest.fixture(scope="session")
def pg_cluster() -> Iterator[PgCluster]:
    if os.geteuid() != 0:
        pytest.skip("postgresql: initdb must run as the postgres user, which needs root")
    pgbin = _pg_bin()
    if pgbin is None:
        pytest.skip("postgresql: no server in /usr/lib/postgresql/*/bin")
    try:
        import psycopg  # noqa: F401
    except ImportError:
        pytest.skip("postgresql: psycopg is not installed")
    if shutil.which("runuser") is None:
        pytest.skip("postgresql: runuser is missing")
    root = Path(tempfile.mkdtemp(prefix="cotrain-pg-"))
    shutil.chown(root, user="postgres")
    data = root / "data"
    try:
        init = _run(
            f"{pgbin}/initdb",
            *("-D", str(data), "-U", "postgres", "-A", "trust", "--no-sync"),
            *("-E", "UTF8", "--locale=C.UTF-8"),
        )
        if init.returncode != 0:
            pytest.skip(f"postgresql: initdb failed: {init.stderr.strip()[-300:]}")
        started = None
        for _ in range(3):  # another process may take the free port before the server does
            port = _free_port()
            opts = f"-k {root} -p {port} -c listen_addresses=127.0.0.1 -c fsync=off"
            r = _run(
                f"{pgbin}/pg_ctl",
                *("-D", str(data), "-l", str(root / "pg.log"), "-w", "-t", "30"),
                *("-o", opts, "start"),
            )
            if r.returncode == 0:
                started = port
                break
        if started is None:
            log = (root / "pg.log").read_text()[-500:] if (root / "pg.log").exists() else ""
            pytest.skip(f"postgresql: pg_ctl start failed: {log}")
        try:
            yield PgCluster("127.0.0.1", started)
        finally:
            _run(f"{pgbin}/pg_ctl", "-D", str(data), "-m", "immediate", "-w", "stop")
    finally:
        shutil.rmtree(root, ignore_errors=True)


_names = itertools.count()


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A fresh, empty database: a SQLite file in ``tmp_path``, or a new PostgreSQL database."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'coord.db'}"
        return
    cluster: PgCluster = request.getfixturevalue("pg_cluster")
    import psycopg

    name = f"cotrain_{os.getpid()}_{next(_names)}"
    admin = cluster.url("postgres")
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    try:
        yield cluster.url(name)
    finally:
        with psycopg.connect(admin, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
