"""The schema is declared twice on purpose (the tables in db.py, the Alembic migrations that
create them): the migrated database must be exactly what db.py declares."""

from __future__ import annotations

from pathlib import Path

from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext

from cotrain.protocol.db import engine_for, metadata, migrate


def test_migrations_build_the_declared_tables(db_url: str, tmp_path: Path) -> None:
    engine = engine_for(db_url)
    try:
        migrate(engine)
        migrate(engine)  # a second upgrade is a no-op
        with engine.connect() as conn:
            diff = compare_metadata(MigrationContext.configure(conn), metadata)
        assert diff == [], diff
    finally:
        engine.dispose()
