"""A throwaway PostgreSQL cluster (../shared/MACHINE.md): for protocol tests and the benchmark.

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


class Unavailable(Exception):
    """Why no cluster can start here (not root, no PostgreSQL binaries, no psycopg)."""


@dataclass
class Cluster:
    port: int
    directory: str

    def create_database(self, name: str) -> str:
        import psycopg

        with psycopg.connect(
            f"host=127.0.0.1 port={self.port} user=postgres dbname=postgres", autocommit=True
        ) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        return f"postgresql://postgres@127.0.0.1:{self.port}/{name}"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def binaries() -> str:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/pg_ctl"))
    if not found:
        raise Unavailable("no PostgreSQL server binaries (apt-get install postgresql)")
    return os.path.dirname(found[-1])


@contextlib.contextmanager
def postgres_cluster() -> Iterator[Cluster]:
    if os.geteuid() != 0:
        raise Unavailable("starting a PostgreSQL cluster here needs root (initdb runs as postgres)")
    try:
        import psycopg  # noqa: F401
    except ImportError:
        raise Unavailable("psycopg is not installed (pip install -e '.[postgres]')") from None
    pgbin = binaries()
    d = tempfile.mkdtemp(prefix="cotrain-pg-")
    shutil.chown(d, "postgres")
    port = _free_port()
    run = ["runuser", "-u", "postgres", "--"]
    data = os.path.join(d, "data")
    try:
        subprocess.run(
            [
                *run,
                f"{pgbin}/initdb",
                "-D",
                data,
                "-U",
                "postgres",
                "-A",
                "trust",
                "--no-sync",
                "-E",
                "UTF8",
                "--locale=C.UTF-8",
            ],
            check=True,
            capture_output=True,
            timeout=120,
        )
        subprocess.run(
            [
                *run,
                f"{pgbin}/pg_ctl",
                "-D",
                data,
                "-l",
                os.path.join(d, "pg.log"),
                "-w",
                "-t",
                "60",
                "-o",
                f"-k {d} -p {port} -c listen_addresses=127.0.0.1 -c fsync=off "
                "-c max_connections=200",
                "start",
            ],
            check=True,
            capture_output=True,
            timeout=120,
        )
    except (subprocess.CalledProcessError, subprocess.TimeoutExpired) as e:
        shutil.rmtree(d, ignore_errors=True)
        out = getattr(e, "stderr", b"") or b""
        raise Unavailable(
            f"PostgreSQL did not start: {out.decode(errors='replace')[-300:]}"
        ) from None
    try:
        yield Cluster(port, d)
    finally:
        subprocess.run(
            [*run, f"{pgbin}/pg_ctl", "-D", data, "-m", "immediate", "-w", "-t", "60", "stop"],
            capture_output=True,
            timeout=120,
        )
        shutil.rmtree(d, ignore_errors=True)
