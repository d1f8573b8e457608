"""Alembic migrations of the coordinator's database (``cotrain.protocol.db.migrate``)."""
