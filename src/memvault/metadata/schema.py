"""Tables, in SQLAlchemy Core. Alembic migrations in ``migrations/`` create exactly these.

Times are float seconds since the epoch (portable between SQLite and PostgreSQL, and exact
through JSON for pagination cursors).
"""

from __future__ import annotations

import sqlalchemy as sa

metadata = sa.MetaData(
    naming_convention={
        "ix": "ix_%(table_name)s_%(column_0_N_name)s",
        "uq": "uq_%(table_name)s_%(column_0_N_name)s",
        "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
        "pk": "pk_%(table_name)s",
    }
)

principals = sa.Table(
    "principals",
    metadata,
    sa.Column("id", sa.String(40), primary_key=True),
    sa.Column("name", sa.String(200), nullable=False, unique=True),
    sa.Column("is_admin", sa.Boolean, nullable=False, default=False),
    sa.Column("created_at", sa.Double, nullable=False),
)

tokens = sa.Table(
    "tokens",
    metadata,
    # SHA-256 of the bearer token: tokens are 256 random bits, so a fast hash is enough.
    sa.Column("token_hash", sa.String(64), primary_key=True),
    sa.Column(
        "principal_id", sa.String(40), sa.ForeignKey("principals.id", ondelete="CASCADE"),
        nullable=False, index=True,
    ),
    sa.Column("created_at", sa.Double, nullable=False),
)

capsules = sa.Table(
    "capsules",
    metadata,
    sa.Column("id", sa.String(40), primary_key=True),
    sa.Column(
        "owner_id", sa.String(40), sa.ForeignKey("principals.id"), nullable=False
    ),
    sa.Column("name", sa.String(200), nullable=False),
    sa.Column("created_at", sa.Double, nullable=False),
    sa.UniqueConstraint("owner_id", "name"),
)

memories = sa.Table(
    "memories",
    metadata,
    sa.Column("id", sa.String(40), primary_key=True),
    sa.Column(
        "capsule_id", sa.String(40), sa.ForeignKey("capsules.id", ondelete="CASCADE"),
        nullable=False,
    ),
    sa.Column("title", sa.String(500), nullable=True),
    sa.Column("taken_at", sa.String(40), nullable=True),
    sa.Column("meta", sa.JSON, nullable=False),
    sa.Column("created_by", sa.String(40), nullable=False),
    sa.Column("created_at", sa.Double, nullable=False),
    # ThumbHash of the placeholder, so a page can paint it without a request.
    sa.Column("thumbhash", sa.String(64), nullable=True),
    # The upload session whose begin created the memory (None: made with POST .../memories).
    # Whichever session holding such a memory ends last unfinished removes it if it is empty.
    sa.Column("begun_by", sa.String(40), nullable=True),
    sa.Index("ix_memories_capsule_created", "capsule_id", "created_at", "id"),
)

blobs = sa.Table(
    "blobs",
    metadata,
    # Content address: identical bytes are stored once and counted by reference.
    sa.Column("sha256", sa.String(64), primary_key=True),
    sa.Column("size", sa.BigInteger, nullable=False),
    sa.Column("storage_key", sa.String(300), nullable=False),
    # Assets using it. 0 while bytes are being placed for a commit that has not happened
    # (yet, or ever: a crash, an abort, a refused commit); such rows are collected.
    sa.Column("refcount", sa.Integer, nullable=False),
    sa.Column("created_at", sa.Double, nullable=False),
    # When bytes were last placed for this content (``memvault.placement``).
    sa.Column("placed_at", sa.Double, nullable=True),
    # Set while its file is being deleted (the collector's token, and since when): nothing
    # may place or commit this content then, nor another collector take it before a lease.
    sa.Column("collector", sa.String(40), nullable=True),
    sa.Column("collecting_since", sa.Double, nullable=True),
    sa.Index("ix_blobs_refcount", "refcount"),
)

assets = sa.Table(
    "assets",
    metadata,
    sa.Column(
        "memory_id", sa.String(40), sa.ForeignKey("memories.id", ondelete="CASCADE"),
        primary_key=True,
    ),
    sa.Column("role", sa.String(20), primary_key=True),
    sa.Column("blob_sha256", sa.String(64), sa.ForeignKey("blobs.sha256"), nullable=False),
    sa.Column("size", sa.BigInteger, nullable=False),
    sa.Column("content_type", sa.String(200), nullable=False),
    sa.Column("filename", sa.String(500), nullable=True),
    sa.Column("created_at", sa.Double, nullable=False),
)

upload_sessions = sa.Table(
    "upload_sessions",
    metadata,
    sa.Column("id", sa.String(40), primary_key=True),
    sa.Column("owner", sa.String(40), nullable=False),
    sa.Column("idem_scope", sa.String(200), nullable=False),
    sa.Column("idem_key", sa.String(200), nullable=False),
    # At most one pending session may hold a given exclusive key (e.g. memory + role).
    sa.Column("exclusive_key", sa.String(200), nullable=True, unique=True),
    sa.Column("state", sa.String(16), nullable=False),
    sa.Column("size", sa.BigInteger, nullable=False),
    sa.Column("chunk_size", sa.BigInteger, nullable=False),
    sa.Column("declared_sha256", sa.String(64), nullable=True),
    # The blob store's name for the session's staging area (S3: object name + upload id,
    # whose length S3 does not bound: hence the room).
    sa.Column("staging_key", sa.String(1024), nullable=False),
    # The whole-object SHA-256 over the contiguous received prefix [0, hashed_offset).
    sa.Column("hashed_offset", sa.BigInteger, nullable=False),
    sa.Column("hash_state", sa.LargeBinary, nullable=False),
    sa.Column("result_sha256", sa.String(64), nullable=True),
    # While pending: the content whose bytes a finish has moved into place for this session
    # (they are no longer in its staging area), so they are not collected under it.
    sa.Column("placed_sha256", sa.String(64), nullable=True),
    sa.Column("attrs", sa.JSON, nullable=False),
    sa.Column("created_at", sa.Double, nullable=False),
    sa.Column("last_seen", sa.Double, nullable=False),
    sa.Column("expires_at", sa.Double, nullable=False),
    sa.Column("ended_at", sa.Double, nullable=True),
    sa.Index("ix_upload_sessions_owner_state", "owner", "state"),
    sa.Index("ix_upload_sessions_owner_created", "owner", "created_at"),
    sa.Index("ix_upload_sessions_state_expires", "state", "expires_at"),
    # The staging sweep looks sessions up by the staging areas the store lists.
    sa.Index("ix_upload_sessions_staging_key", "staging_key"),
    sa.Index("ix_upload_sessions_placed_sha256", "placed_sha256"),
    sa.Index(
        "uq_upload_sessions_pending_idem", "owner", "idem_scope", "idem_key",
        unique=True,
        sqlite_where=sa.text("state = 'pending'"),
        postgresql_where=sa.text("state = 'pending'"),
    ),
)

upload_parts = sa.Table(
    "upload_parts",
    metadata,
    sa.Column(
        "session_id", sa.String(40), sa.ForeignKey("upload_sessions.id", ondelete="CASCADE"),
        primary_key=True,
    ),
    sa.Column("offset", sa.BigInteger, primary_key=True),
    sa.Column("length", sa.BigInteger, nullable=False),
    # 'writing' while one request holds the claim to write this range; 'received' after.
    sa.Column("state", sa.String(16), nullable=False),
    sa.Column("claim", sa.String(40), nullable=True),
    sa.Column("claimed_at", sa.Double, nullable=False),
    sa.Column("crc32c", sa.BigInteger, nullable=True),
    sa.Column("received_at", sa.Double, nullable=True),
    # What the blob store answered for the part (S3: part number, ETag, checksum), handed
    # back to it when the upload is sealed; opaque to the core, NULL for the local store.
    sa.Column("receipt", sa.String(500), nullable=True),
)

derivative_jobs = sa.Table(
    "derivative_jobs",
    metadata,
    # One job per memory: made in the transaction that commits its original.
    sa.Column(
        "memory_id", sa.String(40), sa.ForeignKey("memories.id", ondelete="CASCADE"),
        primary_key=True,
    ),
    # pending → running → done | failed | unsupported; running with a lapsed lease is
    # claimable again (its worker died).
    sa.Column("state", sa.String(16), nullable=False),
    sa.Column("attempts", sa.Integer, nullable=False),
    sa.Column("lease_owner", sa.String(64), nullable=True),
    sa.Column("lease_until", sa.Double, nullable=True),
    sa.Column("run_after", sa.Double, nullable=False),
    sa.Column("reason", sa.Text, nullable=True),
    sa.Column("created_at", sa.Double, nullable=False),
    sa.Column("updated_at", sa.Double, nullable=False),
    sa.Index("ix_derivative_jobs_state_run_after", "state", "run_after"),
)
