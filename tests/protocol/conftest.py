"""Protocol fixtures: ``db_url`` runs a test on SQLite and on PostgreSQL.

PostgreSQL is a throwaway cluster for the whole session (as in ../shared/MACHINE.md): ``initdb``
as the ``postgres`` user on a free port, fsync off, stopped and removed at the end. Each test
gets a fresh database in it. Where the cluster cannot be built (not root, no server binaries,
no psycopg) the ``[postgresql]`` variants skip with the reason.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from pg_harness import Cluster, Unavailable, postgres_cluster


@pytest.fixture(scope="session")
def pg_cluster() -> Iterator[Cluster]:
    context = postgres_cluster()
    try:
        cluster = context.__enter__()
    except Unavailable as e:
        pytest.skip(f"postgresql: {e}")
    try:
        yield cluster
    finally:
        context.__exit__(None, None, None)


_names = itertools.count()


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A fresh, empty database: a SQLite file in ``tmp_path``, or a new PostgreSQL database."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'coord.db'}"
        return
    cluster: Cluster = request.getfixturevalue("pg_cluster")
    name = f"cotrain_{os.getpid()}_{next(_names)}"
    url = cluster.create_database(name)
    try:
        yield url
    finally:
        cluster.drop_database(name)
