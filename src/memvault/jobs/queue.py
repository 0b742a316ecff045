"""Durable derivative jobs: a row per memory, claimed with a lease, retried with backoff.

A job row is written in the same transaction that commits a memory's original, so no
original is ever left without its job, whatever crashes when. Workers claim a job by a
compare-and-set on its state (and, for a ``running`` job, on its lapsed lease): on SQLite the
single writer makes the claim atomic; on PostgreSQL the same conditional UPDATE decides, one
row at a time, which worker won. A worker that dies stops renewing its lease, and the job is
claimed again after ``lease`` seconds. ``complete`` checks the lease is still its own, so a
worker that lost its job (it was too slow and someone else took over) changes nothing a user
can see. Failures back off exponentially and end as ``failed`` with the reason after
``max_attempts``; files that are not images end as ``unsupported`` at once.
"""

from __future__ import annotations

from dataclasses import dataclass

import sqlalchemy as sa

from memvault.capsules import DERIVED_ROLES, add_asset
from memvault.clock import Clock
from memvault.metadata import Database
from memvault.metadata.blobs import record_blob
from memvault.metadata.schema import assets, blobs, derivative_jobs, memories, upload_sessions

PENDING, RUNNING, DONE, FAILED, UNSUPPORTED = (
    "pending", "running", "done", "failed", "unsupported"
)


@dataclass(frozen=True)
class Job:
    memory_id: str
    attempts: int
    storage_key: str
    size: int
    content_type: str
    missing: tuple[str, ...]
    """Derived roles the memory lacks: the client may have uploaded some already."""
    coming: frozenset[str] = frozenset()
    """Of ``missing``, the roles a client's pending upload session is sending right now."""


@dataclass(frozen=True)
class StoredDerivative:
    role: str
    sha256: str
    size: int
    storage_key: str
    content_type: str
    # Its blob row was reserved before the bytes were placed (``memvault.placement``).
    reserved: bool = False


def enqueue(conn: sa.Connection, memory_id: str, now: float) -> None:
    """Add the memory's job (inside the transaction that commits its original), unless the
    memory already has every derived role (a client uploaded them first)."""
    present = conn.execute(_DERIVED_PRESENT, {"memory_id": memory_id}).scalar_one()
    if present == len(DERIVED_ROLES):
        return
    exists = conn.execute(_JOB_OF, {"memory_id": memory_id}).first()
    if exists is None:
        conn.execute(_NEW_JOB, {"memory_id": memory_id, "state": PENDING, "attempts": 0,
                                "run_after": now, "created_at": now, "updated_at": now})


# Built once: they run inside every finish of an original (docs/decisions.md, "Statements
# built once").
_DERIVED_PRESENT = sa.select(sa.func.count()).select_from(assets).where(
    assets.c.memory_id == sa.bindparam("memory_id"), assets.c.role.in_(DERIVED_ROLES))
_JOB_OF = sa.select(derivative_jobs.c.memory_id).where(
    derivative_jobs.c.memory_id == sa.bindparam("memory_id"))
_NEW_JOB = sa.insert(derivative_jobs)


class JobQueue:
    def __init__(self, db: Database, clock: Clock, *, lease: float = 60.0,
                 max_attempts: int = 3, backoff: float = 10.0) -> None:
        self.db = db
        self.clock = clock
        self.lease = lease
        self.max_attempts = max_attempts
        self.backoff = backoff

    def _claimable(self, now: float) -> sa.ColumnElement[bool]:
        return sa.or_(
            sa.and_(derivative_jobs.c.state == PENDING, derivative_jobs.c.run_after <= now),
            sa.and_(derivative_jobs.c.state == RUNNING, derivative_jobs.c.lease_until < now),
        )

    async def claim(self, worker: str) -> Job | None:
        """The oldest job due (or abandoned), now leased to ``worker``; None if there is none."""
        now = self.clock.now()

        def claim(conn: sa.Connection) -> Job | None:
            while True:
                memory_id = conn.execute(
                    sa.select(derivative_jobs.c.memory_id).where(self._claimable(now))
                    .order_by(derivative_jobs.c.run_after).limit(1)
                ).scalar_one_or_none()
                if memory_id is None:
                    return None
                won = conn.execute(
                    sa.update(derivative_jobs)
                    .where(derivative_jobs.c.memory_id == memory_id, self._claimable(now))
                    .values(state=RUNNING, lease_owner=worker, lease_until=now + self.lease,
                            attempts=derivative_jobs.c.attempts + 1, updated_at=now)
                )
                if won.rowcount == 1:
                    return _job(conn, memory_id)

        job = await self.db.transact(claim)
        if job is not None and job.storage_key == "":
            # The original is gone (memory deleted meanwhile): nothing to derive.
            await self.finish(job, worker, UNSUPPORTED, "the original is no longer stored")
            return await self.claim(worker)
        return job

    async def renew(self, job: Job, worker: str) -> bool:
        """Extend the lease while working; False if it was lost (another worker took over)."""
        now = self.clock.now()
        done = await self.db.transact(lambda conn: conn.execute(
            sa.update(derivative_jobs)
            .where(derivative_jobs.c.memory_id == job.memory_id,
                   derivative_jobs.c.state == RUNNING,
                   derivative_jobs.c.lease_owner == worker)
            .values(lease_until=now + self.lease, updated_at=now)
        ).rowcount, durable=False)
        return bool(done == 1)

    async def complete(self, job: Job, worker: str, made: list[StoredDerivative],
                       thumbhash: str | None) -> bool:
        """Attach the derivatives and mark the job done, in one transaction, if the lease is
        still ``worker``'s. Roles the memory gained meanwhile (a client upload) are kept."""
        now = self.clock.now()

        def complete(conn: sa.Connection) -> bool:
            if not _holds(conn, job.memory_id, worker):
                return False
            present = _roles(conn, job.memory_id)
            coming = _roles_being_uploaded(conn, job.memory_id)
            for d in made:
                if d.role in present or d.role in coming:
                    continue  # never overwrite, nor race, what a client uploads
                record_blob(conn, d.sha256, d.size, d.storage_key, now, reserved=d.reserved)
                add_asset(conn, job.memory_id, d.role, d.size, d.sha256, d.content_type,
                          None, now)
            if thumbhash is not None:  # a client's ThumbHash (PATCH) is kept, like its roles
                conn.execute(sa.update(memories)
                             .where(memories.c.id == job.memory_id,
                                    memories.c.thumbhash.is_(None))
                             .values(thumbhash=thumbhash))
            unmade = set(job.missing) - present - {d.role for d in made} - coming
            if coming - present:
                # A client is uploading a role right now: look again later (without using up
                # an attempt); by then it is committed, or its session ended and we make it.
                conn.execute(_later(job.memory_id, now, self.backoff))
            elif unmade:
                # A client upload this job left a role to ended without it since the claim:
                # run again now (no attempt used) and make it.
                conn.execute(_later(job.memory_id, now, 0.0))
            else:
                _end(conn, job.memory_id, DONE, None, now)
            return True

        return await self.db.transact(complete)

    async def postpone(self, job: Job, worker: str, delay: float) -> None:
        """Run the job again in ``delay`` seconds without using up an attempt (it met a
        passing condition, such as its content being collected at that moment)."""
        later = _later(job.memory_id, self.clock.now(), delay).where(
            derivative_jobs.c.lease_owner == worker, derivative_jobs.c.state == RUNNING)
        await self.db.transact(lambda conn: conn.execute(later))

    async def fail(self, job: Job, worker: str, reason: str) -> str:
        """Back off and retry, or give up after ``max_attempts``; returns the new state."""
        if job.attempts >= self.max_attempts:
            await self.finish(job, worker, FAILED, reason)
            return FAILED
        now = self.clock.now()
        delay = self.backoff * 2 ** (job.attempts - 1)

        def retry(conn: sa.Connection) -> None:
            conn.execute(
                sa.update(derivative_jobs)
                .where(derivative_jobs.c.memory_id == job.memory_id,
                       derivative_jobs.c.lease_owner == worker,
                       derivative_jobs.c.state == RUNNING)
                .values(state=PENDING, lease_owner=None, lease_until=None,
                        run_after=now + delay, reason=reason, updated_at=now)
            )

        await self.db.transact(retry)
        return PENDING

    async def finish(self, job: Job, worker: str, state: str, reason: str | None) -> bool:
        """End the job as ``failed`` or ``unsupported`` (with the reason), if still ours."""
        now = self.clock.now()

        def end(conn: sa.Connection) -> bool:
            if not _holds(conn, job.memory_id, worker):
                return False
            _end(conn, job.memory_id, state, reason, now)
            return True

        return await self.db.transact(end)

    async def unnamed(self, stored: list[StoredDerivative]) -> set[str]:
        """The storage keys of ``stored`` that no blob row names (looked up by content)."""
        if not stored:
            return set()
        query = sa.select(blobs.c.sha256, blobs.c.storage_key).where(
            blobs.c.sha256.in_({d.sha256 for d in stored}))
        rows = await self.db.query(lambda conn: conn.execute(query).all())
        named = {(r.sha256, r.storage_key) for r in rows}
        return {d.storage_key for d in stored if (d.sha256, d.storage_key) not in named}

    async def counts(self) -> dict[str, int]:
        query = sa.select(derivative_jobs.c.state, sa.func.count()).group_by(
            derivative_jobs.c.state)
        rows = await self.db.query(lambda conn: conn.execute(query).all())
        return {str(state): int(n) for state, n in rows}


def _holds(conn: sa.Connection, memory_id: str, worker: str) -> bool:
    row = conn.execute(
        sa.select(derivative_jobs.c.state, derivative_jobs.c.lease_owner)
        .where(derivative_jobs.c.memory_id == memory_id)
    ).first()
    return row is not None and row.state == RUNNING and row.lease_owner == worker


def _end(conn: sa.Connection, memory_id: str, state: str, reason: str | None,
         now: float) -> None:
    conn.execute(
        sa.update(derivative_jobs).where(derivative_jobs.c.memory_id == memory_id)
        .values(state=state, reason=reason, lease_owner=None, lease_until=None, updated_at=now)
    )


def _roles(conn: sa.Connection, memory_id: str) -> set[str]:
    rows = conn.execute(sa.select(assets.c.role).where(assets.c.memory_id == memory_id))
    return {str(r) for (r,) in rows}


def _roles_being_uploaded(conn: sa.Connection, memory_id: str) -> set[str]:
    """Roles of the memory a pending upload session holds (its exclusive ``memory/role``)."""
    rows = conn.execute(
        sa.select(upload_sessions.c.exclusive_key).where(
            upload_sessions.c.exclusive_key.startswith(f"{memory_id}/", autoescape=True),
            upload_sessions.c.state == "pending",
        )
    )
    return {str(key).split("/", 1)[1] for (key,) in rows}


def _job(conn: sa.Connection, memory_id: str) -> Job:
    job = conn.execute(
        sa.select(derivative_jobs.c.attempts).where(derivative_jobs.c.memory_id == memory_id)
    ).one()
    original = conn.execute(
        sa.select(blobs.c.storage_key, assets.c.size, assets.c.content_type)
        .join(blobs, blobs.c.sha256 == assets.c.blob_sha256)
        .where(assets.c.memory_id == memory_id, assets.c.role == "original")
    ).first()
    present = _roles(conn, memory_id)
    missing = tuple(r for r in DERIVED_ROLES if r not in present)
    coming = frozenset(_roles_being_uploaded(conn, memory_id) & set(missing))
    if original is None:
        return Job(memory_id, int(job.attempts), "", 0, "", missing, coming)
    return Job(memory_id, int(job.attempts), str(original.storage_key), int(original.size),
               str(original.content_type), missing, coming)


def _later(memory_id: str, now: float, delay: float) -> sa.Update:
    """Back to pending in ``delay`` seconds, the attempt its claim counted given back."""
    return (sa.update(derivative_jobs).where(derivative_jobs.c.memory_id == memory_id)
            .values(state=PENDING, run_after=now + delay, lease_owner=None, lease_until=None,
                    attempts=derivative_jobs.c.attempts - 1, updated_at=now))
