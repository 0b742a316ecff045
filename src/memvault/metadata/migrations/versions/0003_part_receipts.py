"""upload_parts.receipt: the blob store's answer for each part (S3 ETag and checksum);
upload_sessions.staging_key widened for S3 upload ids, and indexed for the staging sweep

Revision ID: 0003
Revises: 0002
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("upload_parts") as batch:
        batch.add_column(sa.Column("receipt", sa.String(length=500), nullable=True))
    with op.batch_alter_table("upload_sessions") as batch:
        batch.alter_column("staging_key", type_=sa.String(length=1024),
                           existing_type=sa.String(length=300), existing_nullable=False)
    op.create_index("ix_upload_sessions_staging_key", "upload_sessions", ["staging_key"])


def downgrade() -> None:
    op.drop_index("ix_upload_sessions_staging_key", table_name="upload_sessions")
    with op.batch_alter_table("upload_sessions") as batch:
        batch.alter_column("staging_key", type_=sa.String(length=300),
                           existing_type=sa.String(length=1024), existing_nullable=False)
    with op.batch_alter_table("upload_parts") as batch:
        batch.drop_column("receipt")
