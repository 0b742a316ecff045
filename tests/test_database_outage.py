"""A PostgreSQL that goes away and comes back: requests answer 503 with ``Retry-After``
meanwhile (never a 500), nothing received is lost, and the upload finishes afterwards.

Needs PostgreSQL (``MEMVAULT_TEST_POSTGRES``); the database sits behind a TCP proxy the test
cuts, as a network partition or a database restart would.
"""

from __future__ import annotations

import os
from pathlib import Path

import httpx
from sqlalchemy.engine import make_url

from tests.conftest import SMALL_CHUNKS, LiveServer
from tests.faults import tcp_proxy
from tests.helpers import problem


def test_a_database_outage_is_503_and_loses_nothing(postgres_url: str, tmp_path: Path) -> None:
    real = make_url(postgres_url)
    with tcp_proxy(real.host or "127.0.0.1", real.port or 5432) as proxy:
        proxied = real.set(host="127.0.0.1", port=proxy.port).render_as_string(
            hide_password=False)
        server = LiveServer(tmp_path / "data", env={
            **SMALL_CHUNKS, "MEMVAULT_DATABASE_URL": proxied, "MEMVAULT_AUTO_MIGRATE": "true",
            "MEMVAULT_DERIVATIVE_WORKERS": "0"})
        server.start()
        api = server.api()
        try:
            cap = api.capsule()
            data = os.urandom(2 * 256 * 1024 + 10)
            session = api.session(cap, len(data))
            assert api.put(session, 0, data).status_code == 200

            proxy.cut()
            during = [
                api.http.get(f"/v1/uploads/{session['id']}"),
                api.put(session, 1, data),
                api.begin(cap, 10),
                httpx.get(f"{server.url}/readyz"),
            ]
            for r in during:
                body = problem(r, 503, "unavailable")
                assert "Traceback" not in body["detail"]
                assert int(r.headers["retry-after"]) >= 1
            assert "unreachable" in during[-1].json()["checks"]["metadata"]

            proxy.restore()
            status = api.http.get(f"/v1/uploads/{session['id']}")
            assert status.status_code == 200, status.text
            assert status.json()["received"] == [0]
            for index in (1, 2):
                assert api.put(session, index, data).status_code == 200
            assert api.finish(session, data).status_code == 200
            assert api.read(session["memory_id"]).content == data
        finally:
            api.http.close()
            server.kill()
