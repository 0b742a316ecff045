"""Capsules and memories over HTTP: finding a file by digest, editing a memory's fields."""

from __future__ import annotations

import hashlib
import os

from tests.conftest import LiveServer
from tests.helpers import Api, mint_token, problem


def test_memories_can_be_found_by_the_digest_of_their_original(api: Api) -> None:
    capsule, other_capsule = api.capsule(), api.capsule()
    wanted, other = os.urandom(5000), os.urandom(5000)
    found = api.upload(capsule, wanted)["memory_id"]
    api.upload(capsule, other)
    api.upload(other_capsule, wanted)  # same bytes, another capsule: not listed
    # The same bytes as a derivative of another memory are not "this file is here".
    holder = api.upload(capsule, os.urandom(100))["memory_id"]
    api.upload(capsule, wanted, memory_id=holder, role="display")

    digest = hashlib.sha256(wanted).hexdigest()
    r = api.http.get(f"/v1/capsules/{capsule}/memories", params={"sha256": digest.upper()})
    assert r.status_code == 200, r.text
    assert [m["id"] for m in r.json()["items"]] == [found]

    missing = hashlib.sha256(b"never uploaded").hexdigest()
    r = api.http.get(f"/v1/capsules/{capsule}/memories", params={"sha256": missing})
    assert r.json() == {"items": [], "next_cursor": None}
    problem(api.http.get(f"/v1/capsules/{capsule}/memories", params={"sha256": "abc"}),
            400, "invalid_argument")


def test_a_memory_is_edited_field_by_field(api: Api, server: LiveServer) -> None:
    capsule = api.capsule()
    r = api.http.post(f"/v1/capsules/{capsule}/memories",
                      json={"title": "beach", "taken_at": "2019-07-01", "metadata": {"a": 1}})
    memory = r.json()["id"]

    r = api.http.patch(f"/v1/memories/{memory}",
                       json={"thumbhash": "1QcSHQRnh493V4dIh4eXh1h4kJUI"})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["thumbhash"] == "1QcSHQRnh493V4dIh4eXh1h4kJUI"
    assert (body["title"], body["taken_at"], body["metadata"]) == ("beach", "2019-07-01", {"a": 1})

    r = api.http.patch(f"/v1/memories/{memory}", json={"title": None, "metadata": {"b": 2}})
    assert r.status_code == 200, r.text
    body = api.http.get(f"/v1/memories/{memory}").json()
    assert (body["title"], body["taken_at"], body["metadata"], body["thumbhash"]) == (
        None, "2019-07-01", {"b": 2}, "1QcSHQRnh493V4dIh4eXh1h4kJUI")

    for bad in ({"thumbhash": "not base64!"}, {"thumbhash": "A" * 65}, {"colour": "red"},
                {"title": "x" * 501}):
        problem(api.http.patch(f"/v1/memories/{memory}", json=bad), 400, "invalid_argument")

    # Another principal cannot tell the memory exists, let alone change it.
    mallory = server.api(mint_token(server, "mallory"))
    try:
        problem(mallory.http.patch(f"/v1/memories/{memory}", json={"title": "mine"}),
                404, "not_found")
    finally:
        mallory.http.close()
    assert api.http.get(f"/v1/memories/{memory}").json()["title"] is None
