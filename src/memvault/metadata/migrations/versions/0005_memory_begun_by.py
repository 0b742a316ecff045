"""memories.begun_by: the upload session whose begin created the memory, so that whichever
session holding it ends last unfinished (the original's or a derivative's) removes it empty

Revision ID: 0005
Revises: 0004
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("memories") as batch:
        batch.add_column(sa.Column("begun_by", sa.String(length=40), nullable=True))
    # Pending sessions begun before this revision said so in their attributes.
    sessions = sa.table("upload_sessions", sa.column("id"), sa.column("state"),
                        sa.column("attrs", sa.JSON))
    memories = sa.table("memories", sa.column("id"), sa.column("begun_by"))
    conn = op.get_bind()
    rows = conn.execute(sa.select(sessions.c.id, sessions.c.attrs)
                        .where(sessions.c.state == "pending")).all()
    for session_id, attrs in rows:
        if attrs and attrs.get("created_memory") and attrs.get("memory_id"):
            conn.execute(sa.update(memories).where(memories.c.id == attrs["memory_id"])
                         .values(begun_by=session_id))


def downgrade() -> None:
    with op.batch_alter_table("memories") as batch:
        batch.drop_column("begun_by")
