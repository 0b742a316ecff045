"""SDK benchmark: the 4-asset memory against tuspyserver, and SDK throughput against the engine.

Run as ``./run bench sdk [options]`` (that is ``.venv/bin/python bench/sdk.py``). It starts
``memvault serve`` (default settings: 8 MiB chunks, fdatasync per chunk, SHA-256 verified) and
tuspyserver itself on 127.0.0.1, works in a temporary directory under /tmp (removed at the
end) and prints figures; it asserts nothing about speed. What it measures:

1. **The 4-asset memory**: ``AsyncClient.upload_memory`` of a 20 MiB original with a
   ~200 KB display, ~50 KB thumb and ~1 KB placeholder, both lanes in parallel, end to end
   (call → memory with four assets returned), beside tuspyserver receiving the same 20 MiB
   file alone (tuspy client, 8 MiB PATCHes) in the same run, and beside the time the disk
   alone takes to make the same 20 MiB durable the way memvault must (8 MiB chunks, each
   written and fdatasynced, four writer threads, no HTTP). Three SDK variants:
   ``given`` (the derivatives passed as bytes: the issue's figure), ``auto`` (a real 20 MiB
   JPEG, the derivatives made by the SDK's worker process during the call; the worker is warm)
   and the original alone through ``upload_file``. Where the time goes is read from the SDK's
   own progress events: begin, the original's chunks, waiting for lane B, finish, and reading
   the memory back. The first ``auto`` call of the run (cold worker) is shown on its own.
2. **Throughput on a 1 GiB file** at ``parallel`` 1, 4 and 8 through ``upload_file`` (it reads
   and SHA-256-hashes the file as it sends) on asyncio's loop, and at 4 on uvloop (what the
   CLI runs on), beside the engine's ceiling measured in the same run with
   ``bench/upload.py``'s client (a thread pool of plain PUTs, SHA-256 computed before the
   timer starts). Each SDK upload runs in a fresh process, whose CPU time and peak RSS above
   its idle RSS are its own: memory is bounded by ``parallel`` + 1 chunks, not the file.

Every upload gets bytes never uploaded before (memvault stores blobs by content), and every
result is verified (finish's SHA-256 against the file's).

Examples::

    ./run bench sdk                 # the full run (~3 minutes)
    ./run bench sdk --quick         # smoke run: 3 rounds, 256 MiB instead of 1 GiB
    ./run bench sdk --big 4G --repeat 5
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import platform
import random
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path

from PIL import Image

from _common import (
    KiB,
    MiB,
    ServerProcess,
    durable_write_seconds,
    format_size,
    free_port,
    make_file,
    mb_per_s,
    median,
    parse_size,
    print_table,
)
from memvault.client import AsyncClient, Progress
from memvault.derivatives import make_derivatives
from tus_peer import bypass_proxies_for_loopback, run_tuspyserver, tus_endpoint, upload_with_tuspy
from upload import Api, Source, blob_path, read_token, start_memvault

ORIGINAL_SIZE = 20 * MiB
GIVEN = {"display": 200 * 1000, "thumb": 50 * 1000, "placeholder": 1000}
PARALLEL = (1, 4, 8)
ENGINE_IN_FLIGHT = (1, 4)


def say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def hwm_kib() -> int:
    with open("/proc/self/status", encoding="ascii") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    return 0


def rss_kib() -> int:
    with open("/proc/self/status", encoding="ascii") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def reset_hwm() -> bool:
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as f:
            f.write("5")
    except OSError:
        return False
    return True


# --- inputs ------------------------------------------------------------------------------------


def make_photo(path: Path, target: int) -> None:
    """A real JPEG of about ``target`` bytes: a smooth scene with fine grain (like a camera's
    high-ISO photo), grown until it is big enough, with 8 spare bytes after its end marker
    that each run overwrites (decoders stop at the end marker)."""
    width, height = 4000, 3000
    while True:
        scene = Image.linear_gradient("L").resize((width, height)).convert("RGB")
        grain = Image.effect_noise((width, height), 48).convert("RGB")
        image = Image.blend(scene, grain, 0.6)
        buf = io.BytesIO()
        image.save(buf, "JPEG", quality=97)
        if buf.tell() >= target * 0.95 or width > 12000:
            break
        width, height = int(width * 1.2), int(height * 1.2)
    path.write_bytes(buf.getvalue() + b"\0" * 8)


class Stamp:
    """New bytes for every upload: a counter over a file's last 8 bytes."""

    counter = 0

    @classmethod
    def file(cls, path: Path) -> None:
        cls.counter += 1
        with path.open("r+b") as f:
            f.seek(-8, os.SEEK_END)
            f.write(cls.counter.to_bytes(8, "big"))
            f.flush()
            os.fsync(f.fileno())

    @classmethod
    def given(cls, rng: random.Random) -> dict[str, bytes]:
        return {role: rng.randbytes(size) for role, size in GIVEN.items()}


# --- section 1: the 4-asset memory ---------------------------------------------------------------


@dataclass
class Trace:
    """Times (perf_counter) of one upload_memory call, from its progress events."""

    start: float
    begun: float = 0.0
    sent: float = 0.0
    finishing: float = 0.0
    done: float = 0.0
    end: float = 0.0
    lane_b_done: list[float] = field(default_factory=list)

    def on(self, step: Progress) -> None:
        now = time.perf_counter()
        if step.role != "original":
            if step.phase == "done":
                self.lane_b_done.append(now)
            return
        if step.phase == "begin" and not self.begun:
            self.begun = now
        elif step.phase == "transfer" and step.bytes_done == step.total:
            self.sent = now
        elif step.phase == "finish":
            self.finishing = now
        elif step.phase == "done":
            self.done = now

    def parts(self) -> dict[str, float]:
        sent = self.sent or self.begun
        return {
            "begin": self.begun - self.start,
            "original's chunks": sent - self.begun,
            "wait for lane B": self.finishing - sent,
            "finish": self.done - self.finishing,
            "read memory": self.end - self.done,
        }


class Cpu:
    """CPU seconds a timed upload cost the server process and this (client) process.

    Read right after the call returns: a server's work after its last answer (a background
    unlink, a derivative job) is not counted; nor is the CPU of the SDK's derivative worker
    process (``derivatives="auto"``)."""

    def __init__(self, server: ServerProcess) -> None:
        self.server = server
        self.server_start = server.cpu_seconds()
        self.client_start = time.process_time()

    def add_to(self, row: Row) -> None:
        row.server_cpu.append(self.server.cpu_seconds() - self.server_start)
        row.client_cpu.append(time.process_time() - self.client_start)


@dataclass
class Row:
    label: str
    size: int
    seconds: list[float] = field(default_factory=list)
    traces: list[Trace] = field(default_factory=list)
    note: str = ""
    server_cpu: list[float] = field(default_factory=list)
    client_cpu: list[float] = field(default_factory=list)


async def memory_runs(args: argparse.Namespace, work: Path, server: ServerProcess, base: str,
                      token: str, rows: dict[str, Row], cold: list[Trace]) -> None:
    rng = random.Random(1)
    plain = work / "original.bin"
    plain.write_bytes(rng.randbytes(ORIGINAL_SIZE - 8) + b"\0" * 8)
    photo = work / "IMG_0001.jpg"
    say(f"making a ~{format_size(ORIGINAL_SIZE)} JPEG and its derivatives ...")
    make_photo(photo, ORIGINAL_SIZE)
    made = make_derivatives(str(photo))
    sizes = {d.role: len(d.data) for d in (made.display, made.thumb, made.placeholder)}
    rows["auto"].size = photo.stat().st_size
    rows["auto"].note = "made: " + ", ".join(f"{r} {s / 1000:.1f} KB" for r, s in sizes.items())
    async with AsyncClient(base, token, state_dir=work / "sdk-state") as mv:
        cap = await mv.create_capsule("bench-sdk")
        trace = Trace(time.perf_counter())
        Stamp.file(photo)
        memory = await mv.upload_memory(photo, capsule=cap, on_progress=trace.on)
        trace.end = time.perf_counter()
        assert len(memory.assets) == 4, memory
        cold.append(trace)
        # Warm the connections and the server's SQLite caches, untimed.
        Stamp.file(plain)
        await mv.upload_memory(plain, capsule=cap, derivatives=Stamp.given(rng))
        tus_store = work / "tus-store"
        with run_tuspyserver(tus_store, (port := free_port())) as tus:
            for i in range(args.rounds):
                os.sync()
                cpu = Cpu(tus)
                seconds = upload_with_tuspy(tus_endpoint(port), plain, files_dir=tus_store)
                cpu.add_to(rows["tus"])
                rows["tus"].seconds.append(seconds)
                for entry in tus_store.iterdir():
                    if entry.is_file():
                        entry.unlink()
                # What the disk alone needs to make the file durable chunk by chunk.
                os.sync()
                rows["disk"].seconds.append(
                    durable_write_seconds(plain, ORIGINAL_SIZE, work / "durable.bin"))
                for key, path, derivatives in (("given", plain, "given"),
                                               ("auto", photo, "auto"),
                                               ("alone", plain, None)):
                    Stamp.file(path)
                    os.sync()
                    cpu = Cpu(server)
                    trace = Trace(time.perf_counter())
                    if derivatives is None:
                        done = await mv.upload_file(path, cap, on_progress=trace.on)
                        trace.end = time.perf_counter()
                        memory = done.memory
                    else:
                        given = Stamp.given(rng) if derivatives == "given" else "auto"
                        memory = await mv.upload_memory(path, capsule=cap, derivatives=given,
                                                        on_progress=trace.on)
                        trace.end = time.perf_counter()
                        assert len(memory.assets) == 4, memory
                    assert memory.assets["original"].size == path.stat().st_size
                    cpu.add_to(rows[key])
                    rows[key].seconds.append(trace.end - trace.start)
                    rows[key].traces.append(trace)
                say(f"  round {i + 1}/{args.rounds}: tus {rows['tus'].seconds[-1]:.3f} s, "
                    f"given {rows['given'].seconds[-1]:.3f} s, auto "
                    f"{rows['auto'].seconds[-1]:.3f} s, original alone "
                    f"{rows['alone'].seconds[-1]:.3f} s")


def print_memory_section(rows: dict[str, Row], cold: list[Trace]) -> None:
    tus = median(rows["tus"].seconds)
    table = []
    for key in ("tus", "disk", "alone", "given", "auto"):
        row = rows[key]
        s = median(row.seconds)
        table.append([row.label, format_size(row.size) if row.size % KiB == 0
                      else f"{row.size / MiB:.1f} MiB", len(row.seconds),
                      f"{s * 1000:.0f}", f"{min(row.seconds) * 1000:.0f}",
                      f"{max(row.seconds) * 1000:.0f}", f"{s / tus:.2f}",
                      _ms(row.server_cpu), _ms(row.client_cpu), row.note])
    print("1. 20 MiB original: tuspyserver receiving it alone vs memvault's SDK building the "
          "memory (end to end, warm client; median of the rounds)")
    print_table(["what", "original", "runs", "ms (med)", "min", "max", "x tus",
                 "server CPU ms", "client CPU ms", "note"], table)
    print("   CPU: medians over the rounds, read as each call returns; two cores allow "
          "2 CPU-ms per ms")
    print("   where the time goes (ms, median over the rounds; from the SDK's progress events)")
    parts_rows = []
    for key in ("alone", "given", "auto"):
        traces = rows[key].traces
        names = list(traces[0].parts())
        parts_rows.append([rows[key].label, *(
            f"{statistics.median(t.parts()[n] for t in traces) * 1000:.0f}" for n in names)])
    print_table(["what", *list(rows["given"].traces[0].parts())], parts_rows)
    if cold:
        c = cold[0]
        print(f"   first auto call of the run (worker process cold): "
              f"{(c.end - c.start) * 1000:.0f} ms end to end")
    ratio = median(rows["given"].seconds) / tus
    print(f"   target (issue 3): 4-asset memory <= 1.2 x tuspyserver's 20 MiB: "
          f"{ratio:.2f} x ({'met' if ratio <= 1.2 else 'NOT met'}); the disk alone took "
          f"{median(rows['disk'].seconds) / tus:.2f} x to make the 20 MiB durable\n")


def _ms(seconds: list[float]) -> str:
    return f"{median(seconds) * 1000:.0f}" if seconds else "-"


# --- section 2: throughput on a big file ---------------------------------------------------------


@dataclass
class Throughput:
    label: str
    seconds: list[float] = field(default_factory=list)
    cpu: list[float] = field(default_factory=list)
    peak_above_idle_kib: list[int] = field(default_factory=list)


def sdk_upload_in_child(base: str, token: str, path: Path, cap: str, parallel: int,
                        state: Path, loop: str) -> dict[str, float | str]:
    """One ``upload_file`` in a fresh process, so its memory figures are its own (a process
    that has uploaded before keeps freed memory, which hides the next upload's peak)."""
    out = subprocess.run(
        [sys.executable, __file__, "--child", base, token, str(path), cap, str(parallel),
         str(state), loop], capture_output=True, text=True, check=False)
    if out.returncode != 0:
        raise RuntimeError(f"child upload failed:\n{out.stderr[-3000:]}")
    result: dict[str, float | str] = json.loads(out.stdout)
    return result


def child(argv: Sequence[str]) -> None:
    base, token, path, cap, parallel, state, loop = argv

    async def upload() -> None:
        async with AsyncClient(base, token, state_dir=state) as mv:
            await mv.list_capsules()  # connection made, modules loaded: now "idle"
            idle = rss_kib()
            reset_hwm()
            cpu0 = time.process_time()
            started = time.perf_counter()
            done = await mv.upload_file(path, cap, parallel=int(parallel))
            seconds = time.perf_counter() - started
            print(json.dumps({"seconds": seconds, "cpu": time.process_time() - cpu0,
                              "peak_above_idle_kib": max(0, hwm_kib() - idle),
                              "sha256": done.asset.sha256}))

    if loop == "uvloop":
        import uvloop

        uvloop.run(upload())
    else:
        asyncio.run(upload())


def throughput_runs(args: argparse.Namespace, work: Path, data_dir: Path, base: str,
                    token: str) -> list[Throughput]:
    size = args.big
    path = work / "big.bin"
    say(f"writing the {format_size(size)} source file ...")
    make_file(path, size)
    src = Source(path, size)
    results = {f"sdk x{p}": Throughput(f"SDK upload_file, parallel {p}") for p in PARALLEL}
    results["sdk x4 uvloop"] = Throughput("SDK upload_file, parallel 4, on uvloop (as the CLI)")
    results.update({f"engine x{n}": Throughput(f"engine ceiling (bench/upload.py client), "
                                               f"{n} in flight") for n in ENGINE_IN_FLIGHT})
    pool = ThreadPoolExecutor(max(ENGINE_IN_FLIGHT))
    api = Api(base, token, max(ENGINE_IN_FLIGHT))
    try:
        cap = api.capsule()
        for i in range(args.repeat):
            for key, result in results.items():
                sha = src.next_variant()
                os.sync()
                if key.startswith("sdk"):
                    parallel, _, loop = key[5:].partition(" ")
                    run = sdk_upload_in_child(base, token, path, cap, int(parallel),
                                              work / "sdk-state", loop or "asyncio")
                    got, seconds = str(run["sha256"]), float(run["seconds"])
                    result.cpu.append(float(run["cpu"]))
                    result.peak_above_idle_kib.append(int(run["peak_above_idle_kib"]))
                else:
                    cpu0 = time.process_time()
                    timing = api.upload(cap, src, int(key[8:]), pool)
                    got, seconds = timing.sha256, timing.seconds
                    result.cpu.append(time.process_time() - cpu0)
                result.seconds.append(seconds)
                if got != sha:
                    raise AssertionError(f"{key}: finish said {got}, the file is {sha}")
                blob_path(data_dir, sha).unlink(missing_ok=True)
                say(f"  {result.label:54} run {i + 1}/{args.repeat}: {seconds:6.2f} s "
                    f"{mb_per_s(size, seconds):6.1f} MB/s")
    finally:
        api.close()
        pool.shutdown()
        src.close()
        path.unlink()
    return list(results.values())


def print_throughput_section(results: list[Throughput], size: int) -> None:
    print(f"2. {format_size(size)} through the SDK vs the engine's ceiling, same server, "
          "same run (median; client CPU s; the SDK's peak RSS above its idle RSS, each upload "
          "in a fresh process, max over runs)")
    rows = []
    for r in results:
        s = median(r.seconds)
        peak = f"{max(r.peak_above_idle_kib) / 1024:.0f}" if r.peak_above_idle_kib else "-"
        rows.append([r.label, len(r.seconds), f"{s:.2f}", mb_per_s(size, s),
                     f"{mb_per_s(size, max(r.seconds)):.0f}-{mb_per_s(size, min(r.seconds)):.0f}",
                     f"{statistics.median(r.cpu):.2f}", peak])
    print_table(["client", "runs", "s (med)", "MB/s", "MB/s range", "client CPU s",
                 "peak-idle MiB"], rows)


# --- main ----------------------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> None:
    raw = list(sys.argv[1:] if argv is None else argv)
    if raw[:1] == ["--child"]:
        child(raw[1:])
        return
    parser = argparse.ArgumentParser(
        description="memvault SDK: the 4-asset memory vs tuspyserver, and upload throughput "
        "vs the engine. Prints figures; asserts no speed.")
    parser.add_argument("--rounds", type=int, default=None,
                        help="rounds of section 1 (default 9)")
    parser.add_argument("--big", type=parse_size, default=None,
                        help="file size of section 2 (default 1G)")
    parser.add_argument("--repeat", type=int, default=None,
                        help="uploads per configuration in section 2 (default 3)")
    parser.add_argument("--skip-throughput", action="store_true", help="section 1 only")
    parser.add_argument("--quick", action="store_true",
                        help="smoke run: 3 rounds, 256 MiB, 1 repeat")
    parser.add_argument("--tmp-dir", type=Path, default=None,
                        help="parent of the working directory (default: the system's)")
    args = parser.parse_args(raw)
    args.rounds = args.rounds or (3 if args.quick else 9)
    args.big = args.big or parse_size("256M" if args.quick else "1G")
    args.repeat = args.repeat or (1 if args.quick else 3)

    versions = ", ".join(f"{p} {metadata.version(p)}" for p in
                         ("httpx", "uvicorn", "tuspyserver", "tuspy", "pillow"))
    print(f"memvault SDK benchmark — {platform.node()}, {os.cpu_count()} CPUs, Linux "
          f"{platform.release()}, Python {platform.python_version()}; {versions}")
    print(f"command: ./run bench sdk {shlex.join(raw)}".rstrip() + "\n", flush=True)
    bypass_proxies_for_loopback()
    with tempfile.TemporaryDirectory(prefix="memvault-bench-sdk-", dir=args.tmp_dir) as tmp:
        work = Path(tmp)
        data_dir = work / "data"
        server, base = start_memvault(data_dir, "uvicorn")
        try:
            token = read_token(data_dir)
            rows = {
                "tus": Row("tuspyserver (tuspy, 8 MiB PATCHes, no fsync)", ORIGINAL_SIZE),
                "disk": Row("disk alone: 8 MiB chunks, fdatasync each", ORIGINAL_SIZE,
                            note="4 writer threads, no HTTP, no hashing"),
                "alone": Row("SDK upload_file, original alone", ORIGINAL_SIZE),
                "given": Row("SDK upload_memory, derivatives given", ORIGINAL_SIZE,
                             note="display 200 KB, thumb 50 KB, placeholder 1 KB"),
                "auto": Row("SDK upload_memory, derivatives=auto (real JPEG)", 0),
            }
            cold: list[Trace] = []
            asyncio.run(memory_runs(args, work, server, base, token, rows, cold))
            print_memory_section(rows, cold)
            if not args.skip_throughput:
                results = throughput_runs(args, work, data_dir, base, token)
                print_throughput_section(results, args.big)
        finally:
            server.stop()
            shutil.rmtree(data_dir, ignore_errors=True)


if __name__ == "__main__":
    main()
