"""blobs.placed_at, .collector and .collecting_since, upload_sessions.placed_sha256: a row
is written before bytes are placed, so bytes that no commit came to use can be collected

Revision ID: 0004
Revises: 0003
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("blobs") as batch:
        batch.add_column(sa.Column("placed_at", sa.Double(), nullable=True))
        batch.add_column(sa.Column("collector", sa.String(length=40), nullable=True))
        batch.add_column(sa.Column("collecting_since", sa.Double(), nullable=True))
    op.create_index("ix_blobs_refcount", "blobs", ["refcount"])
    with op.batch_alter_table("upload_sessions") as batch:
        batch.add_column(sa.Column("placed_sha256", sa.String(length=64), nullable=True))
    op.create_index("ix_upload_sessions_placed_sha256", "upload_sessions", ["placed_sha256"])


def downgrade() -> None:
    op.drop_index("ix_upload_sessions_placed_sha256", table_name="upload_sessions")
    with op.batch_alter_table("upload_sessions") as batch:
        batch.drop_column("placed_sha256")
    op.drop_index("ix_blobs_refcount", table_name="blobs")
    with op.batch_alter_table("blobs") as batch:
        batch.drop_column("collecting_since")
        batch.drop_column("collector")
        batch.drop_column("placed_at")
