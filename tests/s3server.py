"""A real S3 server for the tests: moto in server mode, a process of its own on loopback.

moto enforces S3's 5 MiB minimum part size and answers the multipart calls the store makes;
it does not verify checksums, and it dates every multipart upload in 2010 (so "older than"
can be tested only against the far past or the future).
"""

from __future__ import annotations

import os
import secrets
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
    with log.open("ab") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
            stdout=out, stderr=subprocess.STDOUT, env={**os.environ, **CREDENTIALS},
        )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"moto exited: {log.read_text()[-2000:]}")
            try:
                httpx.get(f"{url}/moto-api/", timeout=1)
                break
            except httpx.TransportError:
                if time.monotonic() > deadline:
                    raise RuntimeError("moto did not start in 30 s") from None
                time.sleep(0.1)
        yield S3Server(url)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
