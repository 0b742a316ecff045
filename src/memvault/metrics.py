"""Prometheus metrics, one registry per app (tests run several apps in one process).

Counters and histograms are updated where things happen; the gauges that describe stored
state (sessions by state, bytes stored and reserved, today's uploads) are read from the
metadata store when ``/metrics`` is scraped, so every process reports the same truth.
"""

from __future__ import annotations

from dataclasses import dataclass

import sqlalchemy as sa
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from memvault.admission import TransferSlots
from memvault.metadata import Database
from memvault.metadata.schema import assets, derivative_jobs, upload_sessions

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


@dataclass(frozen=True)
class Snapshot:
    sessions: dict[str, int]
    stored_bytes: int
    reserved_bytes: int
    uploaded_today: int
    jobs: dict[str, int]


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.bytes_received = Counter(
            "memvault_bytes_received", "Chunk bytes received and stored", registry=r)
        self.chunk_seconds = Histogram(
            "memvault_chunk_seconds", "Time to receive one chunk request",
            buckets=_LATENCY_BUCKETS, registry=r)
        self.chunk_bodies = Counter(
            "memvault_chunk_bodies", "Chunk request bodies by how they were read: 'direct' "
            "(memvault serve's protocol, into reused buffers) or 'asgi' (another server)",
            ["reader"], registry=r)
        self.finish_seconds = Histogram(
            "memvault_finish_seconds", "Time to verify and commit an upload",
            buckets=_LATENCY_BUCKETS, registry=r)
        self.errors = Counter(
            "memvault_errors", "Requests answered with an error, by code", ["code"], registry=r)
        self.rejections = Counter(
            "memvault_admission_rejections", "Requests refused by a limit or quota, by limit",
            ["limit"], registry=r)
        self.reaper_runs = Counter("memvault_reaper_runs", "Reaper passes", registry=r)
        self.expired = Counter("memvault_sessions_expired", "Sessions expired by TTL",
                               registry=r)
        self.sessions = Gauge("memvault_sessions", "Upload sessions by state", ["state"],
                              registry=r)
        self.slots_in_use = Gauge("memvault_transfer_slots_in_use",
                                  "Chunk transfers in flight in this process", registry=r)
        self.slots_limit = Gauge("memvault_transfer_slots_limit",
                                 "Chunk transfers this process accepts at once", registry=r)
        self.stored_bytes = Gauge("memvault_stored_bytes",
                                  "Bytes of assets stored, all owners", registry=r)
        self.reserved_bytes = Gauge("memvault_reserved_bytes",
                                    "Bytes reserved by pending sessions", registry=r)
        self.jobs = Gauge("memvault_derivative_jobs", "Derivative jobs by state", ["state"],
                          registry=r)
        self.uploaded_today = Gauge("memvault_uploaded_bytes_today",
                                    "Bytes begun today (UTC) by all principals, pending or "
                                    "committed", registry=r)

    def rejected(self, code: str, limit: str | None) -> None:
        self.errors.labels(code=code).inc()
        if limit is not None:
            self.rejections.labels(limit=limit).inc()

    async def render(self, db: Database, slots: TransferSlots, day_start: float) -> bytes:
        snap = await db.query(lambda conn: _snapshot(conn, day_start))
        for state in ("pending", "committed", "expired"):
            self.sessions.labels(state=state).set(snap.sessions.get(state, 0))
        self.stored_bytes.set(snap.stored_bytes)
        self.reserved_bytes.set(snap.reserved_bytes)
        self.uploaded_today.set(snap.uploaded_today)
        for state in ("pending", "running", "done", "failed", "unsupported"):
            self.jobs.labels(state=state).set(snap.jobs.get(state, 0))
        self.slots_in_use.set(slots.in_use)
        self.slots_limit.set(slots.total)
        return generate_latest(self.registry)


def _snapshot(conn: sa.Connection, day_start: float) -> Snapshot:
    by_state = {
        str(state): int(n)
        for state, n in conn.execute(
            sa.select(upload_sessions.c.state, sa.func.count()).group_by(upload_sessions.c.state)
        )
    }
    stored = conn.execute(sa.select(sa.func.coalesce(sa.func.sum(assets.c.size), 0))).scalar_one()
    reserved = conn.execute(
        sa.select(sa.func.coalesce(sa.func.sum(upload_sessions.c.size), 0))
        .where(upload_sessions.c.state == "pending")
    ).scalar_one()
    today = conn.execute(
        sa.select(sa.func.coalesce(sa.func.sum(upload_sessions.c.size), 0)).where(
            upload_sessions.c.state.in_(("pending", "committed")),
            upload_sessions.c.created_at >= day_start,
        )
    ).scalar_one()
    jobs = {
        str(state): int(n)
        for state, n in conn.execute(
            sa.select(derivative_jobs.c.state, sa.func.count()).group_by(derivative_jobs.c.state)
        )
    }
    return Snapshot(by_state, int(stored), int(reserved), int(today), jobs)
