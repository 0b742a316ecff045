"""``POST /v1/uploads/finish``: several sessions verified, then committed in one transaction.

Against a real server process: an original and its derivatives land together, a bad item
commits nothing and names itself, a repeat replays, and nobody finishes another's session.
"""

from __future__ import annotations

import hashlib
import os
from typing import Any

import httpx

from tests.conftest import SMALL_CHUNKS, LiveServer
from tests.helpers import Api, mint_token, problem

ROLES = ("original", "display", "thumb", "placeholder")
CHUNK = int(SMALL_CHUNKS["MEMVAULT_CHUNK_SIZE"])


Sent = dict[str, tuple[dict[str, Any], bytes]]
"""role → (its session, its bytes)"""


def _sent(api: Api, cap: str, sizes: dict[str, int]) -> tuple[str, Sent]:
    """Begin the original (a new memory) and its derivatives; send every chunk; finish none."""
    sessions: Sent = {}
    memory_id = ""
    for role in ROLES:
        data = os.urandom(sizes[role])
        extra = {"role": role} | ({"memory_id": memory_id} if memory_id else {})
        s = api.session(cap, len(data), **extra)
        memory_id = s["memory_id"]
        for i in range(s["chunk_count"]):
            assert api.put(s, i, data).status_code == 200
        sessions[role] = (s, data)
    return memory_id, sessions


def _items(sessions: Sent, **wrong_sha: str) -> list[dict[str, Any]]:
    return [{"id": s["id"], "size": len(data),
             "sha256": wrong_sha.get(role) or hashlib.sha256(data).hexdigest()}
            for role, (s, data) in sessions.items()]


def _finish(api: Api, items: list[dict[str, Any]]) -> httpx.Response:
    return api.http.post("/v1/uploads/finish", json={"uploads": items})


SIZES = {"original": 3 * CHUNK + 5, "display": 70_000, "thumb": 5_000, "placeholder": 300}


def test_an_original_and_its_derivatives_commit_together(api: Api) -> None:
    cap = api.capsule()
    memory_id, sessions = _sent(api, cap, SIZES)
    r = _finish(api, _items(sessions))
    assert r.status_code == 200, r.text
    items = r.json()["items"]
    assert [i["role"] for i in items] == list(ROLES)
    for item, role in zip(items, ROLES, strict=True):
        data = sessions[role][1]
        assert item["memory_id"] == memory_id
        assert item["asset"]["sha256"] == hashlib.sha256(data).hexdigest()
        assert item["asset"]["size"] == len(data)
        # Each answer carries the memory as it reads after the one commit: all four there.
        assert set(item["memory"]["assets"]) == set(ROLES)
        assert api.read(memory_id, role).content == data
    listed = api.http.get(f"/v1/capsules/{cap}/memories").json()["items"]
    assert [m["id"] for m in listed] == [memory_id]
    assert api.http.get("/v1/uploads").json()["items"] == []
    # The same finish again is a retry: the same commit, nothing new.
    again = _finish(api, _items(sessions))
    assert again.status_code == 200, again.text
    assert [i["asset"] for i in again.json()["items"]] == [i["asset"] for i in items]


def test_one_bad_digest_commits_nothing_and_names_its_upload(api: Api) -> None:
    cap = api.capsule()
    memory_id, sessions = _sent(api, cap, SIZES)
    thumb_id = sessions["thumb"][0]["id"]
    body = problem(_finish(api, _items(sessions, thumb="0" * 64)), 422, "checksum_mismatch")
    assert body["upload_id"] == thumb_id, body
    memory = api.http.get(f"/v1/memories/{memory_id}").json()
    assert memory["assets"] == {}, memory
    pending = {s["id"] for s in api.http.get("/v1/uploads").json()["items"]}
    assert pending == {s["id"] for s, _ in sessions.values()}
    # Nothing accepted was lost: the right digests finish every session.
    r = _finish(api, _items(sessions))
    assert r.status_code == 200, r.text
    assert set(r.json()["items"][0]["memory"]["assets"]) == set(ROLES)


def test_a_missing_chunk_is_reported_as_incomplete_for_that_upload(api: Api) -> None:
    cap = api.capsule()
    data = os.urandom(2 * CHUNK + 1)
    whole = api.session(cap, len(data))
    for i in range(whole["chunk_count"]):
        assert api.put(whole, i, data).status_code == 200
    gap = api.session(cap, len(data))
    assert api.put(gap, 0, data).status_code == 200
    sha = hashlib.sha256(data).hexdigest()
    items = [{"id": s["id"], "size": len(data), "sha256": sha} for s in (whole, gap)]
    body = problem(_finish(api, items), 409, "incomplete")
    assert body["upload_id"] == gap["id"], body
    assert body["missing"] == [1, 2], body
    assert api.http.get(f"/v1/uploads/{whole['id']}").json()["state"] == "pending"


def test_another_callers_session_is_not_found_and_nothing_commits(
    server: LiveServer, api: Api
) -> None:
    cap = api.capsule()
    memory_id, sessions = _sent(api, cap, SIZES)
    stranger = server.api(mint_token(server, "stranger-finish"))
    problem(_finish(stranger, _items(sessions)), 404, "not_found")
    # Mixing one's own session with another's commits neither.
    own_cap = stranger.capsule()
    data = os.urandom(1000)
    own = stranger.session(own_cap, len(data))
    assert stranger.put(own, 0, data).status_code == 200
    mixed = [{"id": own["id"], "size": len(data), "sha256": hashlib.sha256(data).hexdigest()},
             *_items(sessions)[:1]]
    body = problem(_finish(stranger, mixed), 404, "not_found")
    assert body["upload_id"] == sessions["original"][0]["id"]
    assert stranger.http.get(f"/v1/uploads/{own['id']}").json()["state"] == "pending"
    assert api.http.get(f"/v1/memories/{memory_id}").json()["assets"] == {}
    stranger.http.close()


def test_malformed_batches_are_invalid_arguments(api: Api) -> None:
    cap = api.capsule()
    data = os.urandom(10)
    s = api.session(cap, len(data))
    item = {"id": s["id"], "size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    problem(_finish(api, []), 400, "invalid_argument")
    problem(_finish(api, [item, item]), 400, "invalid_argument")
    problem(_finish(api, [item] * 17), 400, "invalid_argument")
    problem(_finish(api, [{**item, "sha256": "xyz"}]), 400, "invalid_argument")
    problem(api.http.post("/v1/uploads/finish", json={"uploads": [{"id": s["id"]}]}),
            400, "invalid_argument")
    assert api.http.get(f"/v1/uploads/{s['id']}").json()["state"] == "pending"
