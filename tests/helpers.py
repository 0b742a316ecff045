"""A thin test client over the v1 API (the real SDK is tested on its own)."""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import shutil
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families


@dataclass
class Api:
    http: httpx.Client

    def capsule(self, name: str | None = None) -> str:
        r = self.http.post("/v1/capsules", json={"name": name or secrets.token_hex(6)})
        assert r.status_code == 201, r.text
        return str(r.json()["id"])

    def begin(self, capsule_id: str, size: int, **extra: Any) -> httpx.Response:
        body = {"capsule_id": capsule_id, "filename": "f.bin", "size": size,
                "content_type": "application/octet-stream",
                "idempotency_key": secrets.token_hex(8), **extra}
        return self.http.post("/v1/uploads", json=body)

    def session(self, capsule_id: str, size: int, **extra: Any) -> dict[str, Any]:
        r = self.begin(capsule_id, size, **extra)
        assert r.status_code == 201, r.text
        body: dict[str, Any] = r.json()
        return body

    def put(self, session: dict[str, Any], index: int, data: bytes,
            **headers: str) -> httpx.Response:
        cs = session["chunk_size"]
        return self.http.put(f"/v1/uploads/{session['id']}/chunks/{index}",
                             content=data[index * cs:(index + 1) * cs], headers=headers)

    def finish(self, session: dict[str, Any], data: bytes,
               sha256: str | None = None) -> httpx.Response:
        return self.http.post(
            f"/v1/uploads/{session['id']}/finish",
            json={"size": len(data), "sha256": sha256 or hashlib.sha256(data).hexdigest()},
        )

    def upload(self, capsule_id: str, data: bytes, order: list[int] | None = None,
               **extra: Any) -> dict[str, Any]:
        """begin → put every chunk (in ``order``) → finish; returns finish's body."""
        s = self.session(capsule_id, len(data), **extra)
        for i in order if order is not None else range(s["chunk_count"]):
            r = self.put(s, i, data)
            assert r.status_code == 200, r.text
        r = self.finish(s, data)
        assert r.status_code == 200, r.text
        body: dict[str, Any] = r.json()
        return body

    def read(self, memory_id: str, role: str = "original", **headers: str) -> httpx.Response:
        return self.http.get(f"/v1/memories/{memory_id}/assets/{role}", headers=headers)


def problem(r: httpx.Response, status: int, code: str) -> dict[str, Any]:
    """Assert ``r`` is an RFC 9457 problem with this status and code; return its body."""
    assert r.status_code == status, r.text
    assert r.headers["content-type"].startswith("application/problem+json"), r.headers
    body: dict[str, Any] = r.json()
    assert body["code"] == code, body
    assert body["status"] == status
    assert body["detail"]
    return body


def metric(server: Any, name: str, **labels: str) -> float:
    text = httpx.get(f"{server.url}/metrics", timeout=10).text
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return float(sample.value)
    return 0.0


def mint_token(server: Any, name: str) -> str:
    out = subprocess.run(
        [sys.executable, "-m", "memvault", "token", "create", name, "--data",
         str(server.data_dir)],
        check=True, capture_output=True, text=True,
    )
    return out.stdout.strip().splitlines()[-1].strip()


def unprivileged(argv: list[str]) -> list[str]:
    """``argv`` subject to file modes even when run as root (tests run as root in CI): without
    root's right to read or write any file or folder."""
    if os.geteuid() != 0:
        return argv
    setpriv = shutil.which("setpriv")
    if setpriv is None:
        pytest.skip("running as root without setpriv (util-linux) to drop DAC override")
    return [setpriv, "--bounding-set=-dac_override,-dac_read_search", *argv]


def one_sentence(done: subprocess.CompletedProcess[str]) -> str:
    """The command failed as a usage/operator error with a single line and no traceback
    (beside log lines, JSON when not on a terminal; nothing on stdout)."""
    assert done.returncode == 2, (done.returncode, done.stderr)
    assert "Traceback" not in done.stderr, done.stderr
    assert done.stdout == "", done.stdout
    lines = [line for line in done.stderr.strip().splitlines()
             if not (line.startswith("{") and "event" in json.loads(line))]
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith("memvault: ")
    return lines[0]


def settled(api: Api, memory_id: str, timeout: float = 60.0) -> dict[str, Any]:
    """The memory once no derived role is pending any more (bounded wait)."""
    deadline = time.monotonic() + timeout
    while True:
        memory: dict[str, Any] = api.http.get(f"/v1/memories/{memory_id}").json()
        if "pending" not in memory["derivatives"].values():
            return memory
        if time.monotonic() > deadline:
            raise AssertionError(f"derivatives still pending: {memory}")
        time.sleep(0.1)


def read_all(sock: socket.socket) -> bytes:
    """Everything the server sends on a raw connection, until it closes it."""
    answer = b""
    while more := sock.recv(65536):
        answer += more
    return answer
