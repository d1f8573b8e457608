"""The ledger, its tree and checkpoints, state objects and work units.

Revision ID: 0001
Revises:
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "entries",
        sa.Column("seq", sa.BigInteger, primary_key=True, autoincrement=False),
        sa.Column("ts", sa.BigInteger, nullable=False),
        sa.Column("kind", sa.String(40), nullable=False),
        sa.Column("author", sa.String(64), nullable=False),
        sa.Column("task", sa.String(20), nullable=True),
        sa.Column("leaf", sa.LargeBinary(32), nullable=False),
        sa.Column("data", sa.LargeBinary, nullable=False),
    )
    op.create_index("ix_entries_author", "entries", ["author"])
    op.create_index("ix_entries_task", "entries", ["task"])
    op.create_table(
        "tiles",
        sa.Column("idx", sa.BigInteger, primary_key=True, autoincrement=False),
        sa.Column("hash", sa.LargeBinary(32), nullable=False),
    )
    op.create_table(
        "checkpoints",
        sa.Column("size", sa.BigInteger, primary_key=True, autoincrement=False),
        sa.Column("ts", sa.BigInteger, nullable=False),
        sa.Column("root", sa.LargeBinary(32), nullable=False),
        sa.Column("state_root", sa.String(64), nullable=False),
        sa.Column("note", sa.Text, nullable=False),
    )
    op.create_table(
        "cosignatures",
        sa.Column("size", sa.BigInteger, primary_key=True, autoincrement=False),
        sa.Column("witness", sa.String(64), primary_key=True),
        sa.Column("line", sa.Text, nullable=False),
    )
    op.create_table(
        "objects",
        sa.Column("oid", sa.String(200), primary_key=True),
        sa.Column("data", sa.Text, nullable=False),
    )
    op.create_table(
        "work",
        sa.Column("key", sa.String(64), primary_key=True),
        sa.Column("task", sa.String(20), nullable=False),
        sa.Column("node", sa.String(64), nullable=False),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("seq", sa.BigInteger, nullable=False),
        sa.Column("data", sa.Text, nullable=False),
    )
    op.create_index("ix_work_task_node", "work", ["task", "node"])
    op.create_index("ix_work_task_seq", "work", ["task", "seq"])


def downgrade() -> None:
    for table in ("work", "objects", "cosignatures", "checkpoints", "tiles", "entries"):
        op.drop_table(table)
