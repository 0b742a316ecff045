"""derivative jobs, memory thumbhash, sessions by owner and time

Revision ID: 0002
Revises: 0001
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("memories") as batch:
        batch.add_column(sa.Column("thumbhash", sa.String(length=64), nullable=True))
    op.create_index("ix_upload_sessions_owner_created", "upload_sessions",
                    ["owner", "created_at"])
    op.create_table(
        "derivative_jobs",
        sa.Column("memory_id", sa.String(length=40), nullable=False),
        sa.Column("state", sa.String(length=16), nullable=False),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("lease_owner", sa.String(length=64), nullable=True),
        sa.Column("lease_until", sa.Double(), nullable=True),
        sa.Column("run_after", sa.Double(), nullable=False),
        sa.Column("reason", sa.Text(), nullable=True),
        sa.Column("created_at", sa.Double(), nullable=False),
        sa.Column("updated_at", sa.Double(), nullable=False),
        sa.ForeignKeyConstraint(["memory_id"], ["memories.id"], ondelete="CASCADE",
                                name=op.f("fk_derivative_jobs_memory_id_memories")),
        sa.PrimaryKeyConstraint("memory_id", name=op.f("pk_derivative_jobs")),
    )
    op.create_index("ix_derivative_jobs_state_run_after", "derivative_jobs",
                    ["state", "run_after"])


def downgrade() -> None:
    op.drop_index("ix_derivative_jobs_state_run_after", table_name="derivative_jobs")
    op.drop_table("derivative_jobs")
    op.drop_index("ix_upload_sessions_owner_created", table_name="upload_sessions")
    with op.batch_alter_table("memories") as batch:
        batch.drop_column("thumbhash")
