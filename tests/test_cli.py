"""The ``memvault`` client commands, run as subprocesses against a live server.

Each test gets its own home (config and state folders), so logins and resume records never
leak between tests; output and exit codes are what a person or a script would see.
"""

from __future__ import annotations

import contextlib
import json
import os
import pty
import signal
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from PIL import Image

from tests.conftest import SMALL_CHUNKS, LiveServer
from tests.helpers import Api, mint_token, unprivileged

MiB = 1024 * 1024


@dataclass
class Cli:
    home: Path
    server: LiveServer

    def env(self, **extra: str) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("MEMVAULT_")}
        return {**env, "HOME": str(self.home), "XDG_CONFIG_HOME": str(self.home / "config"),
                "XDG_STATE_HOME": str(self.home / "state"), "COLUMNS": "200", **extra}

    def argv(self, *args: str) -> list[str]:
        return [sys.executable, "-m", "memvault", *args]

    def __call__(self, *args: str, **extra: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(self.argv(*args), env=self.env(**extra), capture_output=True,
                              text=True, timeout=300, check=False)

    def json(self, *args: str) -> Any:
        done = self(*args, "--json")
        assert done.returncode == 0, done.stderr
        return json.loads(done.stdout)

    def login(self, token: str | None = None) -> None:
        done = self("login", self.server.url, "--token", token or self.server.token)
        assert done.returncode == 0, done.stderr


@pytest.fixture(scope="module")
def cli_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    """Small chunks (so uploads take many steps), a size limit to fail one file on purpose."""
    s = LiveServer(tmp_path_factory.mktemp("cli") / "data",
                   env={**SMALL_CHUNKS, "MEMVAULT_MAX_UPLOAD_SIZE": str(100 * MiB)})
    s.start()
    try:
        yield s
    finally:
        s.kill(signal.SIGTERM)


@pytest.fixture
def cli(cli_server: LiveServer, tmp_path: Path) -> Cli:
    return Cli(tmp_path / "home", cli_server)


def photo(path: Path, size: tuple[int, int]) -> None:
    Image.effect_noise(size, 50).convert("RGB").save(path, "JPEG", quality=90)


def test_login_checks_the_token_and_keeps_it_private(cli: Cli) -> None:
    done = cli("ls", "family")
    assert done.returncode == 2
    assert "not logged in — run `memvault login URL --token TOKEN`" in done.stderr

    done = cli("login", cli.server.url, "--token", "mvt_wrong")
    assert done.returncode == 1
    assert "did not accept your token" in done.stderr
    assert not (cli.home / "config" / "memvault" / "config.json").exists()

    cli.login()
    config = cli.home / "config" / "memvault" / "config.json"
    assert stat.S_IMODE(config.stat().st_mode) == 0o600
    assert json.loads(config.read_text()) == {"url": cli.server.url, "token": cli.server.token}

    # The environment wins over the file.
    done = cli("capsule", "list", MEMVAULT_TOKEN="mvt_wrong")
    assert done.returncode == 1
    assert "unauthenticated" in done.stderr


def test_capsules_and_sentences_a_person_can_act_on(cli: Cli) -> None:
    cli.login()
    done = cli("ls", "cli-family")
    assert done.returncode == 1
    assert ("capsule 'cli-family' not found — create it with "
            "`memvault capsule create cli-family`") in done.stderr
    done = cli("capsule", "create", "cli-family")
    assert done.returncode == 0, done.stderr
    assert "created capsule 'cli-family' (cap_" in done.stdout
    done = cli("capsule", "create", "cli-family")
    assert done.returncode == 1
    assert "you already have a capsule named 'cli-family'" in done.stderr
    names = [c["name"] for c in cli.json("capsule", "list")]
    assert "cli-family" in names
    assert "cli-family" in cli("capsule", "list").stdout
    assert cli("ls", "cli-family").stdout.strip() == "capsule 'cli-family' is empty"


def test_server_down_is_said_quickly_and_plainly(cli: Cli) -> None:
    cli.login()
    done = cli("capsule", "list", MEMVAULT_URL="http://127.0.0.1:9")
    assert done.returncode == 1
    assert "cannot reach the memvault server at http://127.0.0.1:9" in done.stderr
    assert "is it running?" in done.stderr
    # Transfers too: the patient retries are for a server that has answered once (before,
    # a mistyped port was retried nine times, over a minute).
    for args in (("upload", __file__, "-c", "x"), ("get", "mem_" + "0" * 32)):
        done = cli(*args, MEMVAULT_URL="http://127.0.0.1:9")
        assert done.returncode == 1, args
        assert "cannot reach the memvault server at http://127.0.0.1:9" in done.stderr
        assert done.stderr.count("retrying") <= 2, done.stderr


def test_upload_a_folder_then_list_get_and_skip_what_is_there(cli: Cli, tmp_path: Path) -> None:
    cli.login()
    folder = tmp_path / "trip"
    (folder / "day2").mkdir(parents=True)
    photo(folder / "beach.jpg", (1200, 800))
    photo(folder / "day2" / "dunes.jpg", (900, 1200))
    (folder / "notes.pdf").write_bytes(b"%PDF-1.4\n" + os.urandom(200_000))
    (folder / ".DS_Store").write_bytes(b"hidden")

    done = cli("upload", str(folder), "--capsule", "cli-trip", "--create")
    assert done.returncode == 0, done.stderr
    lines = done.stdout.strip().splitlines()
    assert sum(line.startswith("✓ ") for line in lines) == 3
    assert ", 4 assets)" in next(line for line in lines if "beach.jpg" in line)
    assert ", 1 asset)" in next(line for line in lines if "notes.pdf" in line)
    assert lines[-1] == ("3 uploaded, 0 already present, 0 failed "
                         "(capsule 'cli-trip', created by this run)")

    listing = cli("ls", "cli-trip").stdout
    assert "beach.jpg" in listing
    assert "original,display,thumb,placeholder" in listing
    memories = cli.json("ls", "cli-trip")
    assert len(memories) == 3
    beach = next(m for m in memories if m["assets"]["original"]["filename"] == "beach.jpg")

    out = tmp_path / "out"
    out.mkdir()
    done = cli("get", beach["id"], "--role", "display", "-o", str(out))
    assert done.returncode == 0, done.stderr
    assert "verified" in done.stdout
    with Image.open(out / "beach.display.jpg") as image:
        assert image.size == (1200, 800)  # fits 1920x1080 already: never enlarged
    got = cli.json("get", beach["id"], "-o", str(out / "copy.jpg"))
    assert Path(got["path"]).read_bytes() == (folder / "beach.jpg").read_bytes()
    done = cli("get", beach["id"], "--role", "poster")
    assert done.returncode == 2
    assert "--role must be one of original, display, thumb, placeholder, not 'poster'" in (
        done.stderr)

    again = cli("upload", str(folder), "--capsule", "cli-trip", "--json")
    assert again.returncode == 0, again.stderr
    report = json.loads(again.stdout)
    assert (report["uploaded"], report["skipped"], report["failed"]) == (0, 3, 0)
    assert {f["memory_id"] for f in report["files"]} == {m["id"] for m in memories}

    # Remembered digests: a record unused for half a year goes with the next upload run;
    # those of the files just uploaded were used (so refreshed) and stay.
    hashes = cli.home / "state" / "memvault" / "hashes"
    assert len(list(hashes.glob("*.json"))) == 3
    stale = hashes / ("0" * 64 + ".json")
    stale.write_text('{"sha256": "' + "a" * 64 + '", "saved_at": 0}')
    long_ago = time.time() - 200 * 86400
    os.utime(stale, (long_ago, long_ago))
    assert cli("upload", str(folder), "--capsule", "cli-trip").returncode == 0
    assert not stale.exists()
    assert len(list(hashes.glob("*.json"))) == 3


def test_get_never_replaces_another_file_without_force(cli: Cli, tmp_path: Path) -> None:
    """Two memories' ``IMG_0001.JPG`` into one folder: the second is refused, not written
    over the first; a file with the same bytes is kept and said so (a CLI review found
    every existing file replaced without a word)."""
    cli.login()
    first, second = tmp_path / "a" / "IMG_0001.JPG", tmp_path / "b" / "IMG_0001.JPG"
    for path, data in ((first, b"first" * 1000), (second, b"second" * 1000)):
        path.parent.mkdir()
        path.write_bytes(data)
    done = cli("upload", str(first), str(second), "--capsule", "cli-get", "--create",
               "--no-derivatives", "--json")
    assert done.returncode == 0, done.stderr
    ids = {Path(f["path"]).parent.name: f["memory_id"] for f in json.loads(done.stdout)["files"]}
    out = tmp_path / "out"
    out.mkdir()
    assert cli("get", ids["a"], "-o", str(out)).returncode == 0
    done = cli("get", ids["b"], "-o", str(out))
    assert done.returncode == 1
    assert "IMG_0001.JPG already exists and holds other bytes — pass --force" in done.stderr
    assert (out / "IMG_0001.JPG").read_bytes() == first.read_bytes()
    kept = cli.json("get", ids["a"], "-o", str(out))
    assert kept["kept"] is True
    assert kept["path"] == str(out / "IMG_0001.JPG")
    assert "already there, the same bytes" in cli("get", ids["a"], "-o", str(out)).stdout
    assert cli("get", ids["b"], "-o", str(out), "--force").returncode == 0
    assert (out / "IMG_0001.JPG").read_bytes() == second.read_bytes()
    # A final "/" means a folder: never a file of that name.
    notes = tmp_path / "notes.txt"
    notes.write_text("mine")
    done = cli("get", ids["a"], "-o", f"{notes}/")
    assert done.returncode == 2
    assert "is not a folder" in done.stderr
    assert notes.read_text() == "mine"


def test_names_with_control_characters_are_shown_escaped(cli: Cli, tmp_path: Path) -> None:
    """A file name may hold ESC, BEL or a line break; on a terminal they would recolour or
    clear it, or forge lines (another principal's names reach ``admin sessions``)."""
    cli.login()
    folder = tmp_path / "odd"
    folder.mkdir()
    evil = "red\x1b[31mX\x1b[0m\x07 two\nlines.bin"
    (folder / evil).write_bytes(b"bytes")
    done = cli("upload", str(folder), "--capsule", "cli-odd-names", "--create",
               "--no-derivatives")
    assert done.returncode == 0, done.stderr
    for text in (done.stdout, cli("ls", "cli-odd-names").stdout):
        assert not set(text) & {"\x1b", "\x07"}, text
        assert "red\\x1b[31mX\\x1b[0m\\x07 two\\nlines.bin" in text, text
    token = mint_token(cli.server, "cli-bob")
    with httpx.Client(base_url=cli.server.url,
                      headers={"Authorization": f"Bearer {token}"}) as http:
        bob = Api(http)
        begun = bob.begin(bob.capsule(), 10, filename="\x1b]0;pwned\x07\x1b[2Jevil.jpg")
        assert begun.status_code == 201, begun.text
        admin = cli("admin", "sessions")
        assert http.delete(f"/v1/uploads/{begun.json()['id']}").status_code == 204
    assert admin.returncode == 0, admin.stderr
    assert not set(admin.stdout) & {"\x1b", "\x07"}, admin.stdout
    assert "\\x1b]0;pwned\\x07\\x1b[2Jevil.jpg" in admin.stdout


def _on_a_terminal(cli: Cli, *args: str) -> tuple[subprocess.CompletedProcess[str], str]:
    """Run the CLI with stdout to a pipe and stderr to a terminal (a pty); returns the run
    and what was drawn on the terminal."""
    controller, terminal = pty.openpty()
    drawn = bytearray()

    def drain() -> None:  # a terminal nobody reads would fill and stop the bars' writes
        with contextlib.suppress(OSError):
            while piece := os.read(controller, 65536):
                drawn.extend(piece)

    reader = threading.Thread(target=drain, daemon=True)
    reader.start()
    try:
        done = subprocess.run(cli.argv(*args), env=cli.env(), stdout=subprocess.PIPE,
                              stderr=terminal, text=True, timeout=300, check=False)
    finally:
        os.close(terminal)
        reader.join(timeout=10)
        os.close(controller)
    return done, drawn.decode(errors="replace")


def test_results_go_to_stdout_while_bars_are_drawn_on_a_terminal(
        cli: Cli, tmp_path: Path) -> None:
    """``memvault upload ... > log`` in a terminal: the bars on stderr, and every file's line
    in the log (they went to the terminal with the bars, and the log had the summary only).
    The total bar counts the bytes this run sends: files already stored are out of it."""
    cli.login()
    folder = tmp_path / "logged"
    folder.mkdir()
    for i in range(3):
        (folder / f"f{i}.bin").write_bytes(os.urandom(200_000))
    args = ("upload", str(folder), "--capsule", "cli-log", "--create", "--no-derivatives")
    done, drawn = _on_a_terminal(cli, *args)
    assert done.returncode == 0
    assert "600.0 kB" in drawn, drawn
    lines = done.stdout.strip().splitlines()
    assert sorted(line.split(" → ")[0] for line in lines[:-1]) == [
        f"✓ {folder / f'f{i}.bin'}" for i in range(3)], done.stdout
    assert lines[-1] == ("3 uploaded, 0 already present, 0 failed "
                         "(capsule 'cli-log', created by this run)")
    (folder / "f3.bin").write_bytes(os.urandom(300_000))
    done, drawn = _on_a_terminal(cli, *args)
    assert done.returncode == 0
    assert done.stdout.strip().splitlines()[-1] == (
        "1 uploaded, 3 already present, 0 failed (capsule 'cli-log')")
    # The last frame (before the fix: 900.0/900.0 kB; the first frames may show that total
    # still, drawn before the run found the three files stored).
    assert "300.0/300.0 kB" in drawn, drawn


def test_a_missing_path_fails_that_path_and_the_others_upload(cli: Cli, tmp_path: Path) -> None:
    cli.login()
    good = tmp_path / "good.bin"
    good.write_bytes(b"good")
    dangling = tmp_path / "dangling"
    dangling.symlink_to(tmp_path / "nowhere")
    done = cli("upload", str(good), str(tmp_path / "missing.bin"), str(dangling),
               "--capsule", "cli-missing", "--create", "--no-derivatives")
    assert done.returncode == 1, done.stderr
    assert "missing.bin: file_not_found: no such file or folder" in done.stderr
    assert "dangling: file_not_found" in done.stderr
    assert done.stdout.strip().endswith("1 uploaded, 0 already present, 2 failed "
                                        "(capsule 'cli-missing', created by this run)")
    assert len(cli.json("ls", "cli-missing")) == 1


def test_no_derivatives_and_a_failing_file_give_exit_code_1(cli: Cli, tmp_path: Path) -> None:
    cli.login()
    folder = tmp_path / "mixed"
    folder.mkdir()
    photo(folder / "ok.jpg", (640, 480))
    with (folder / "huge.bin").open("wb") as f:  # sparse: over the server's 100 MiB limit
        f.truncate(101 * MiB)
    done = cli("upload", str(folder), "--capsule", "cli-mixed", "--create", "--no-derivatives")
    assert done.returncode == 1
    assert "✓ " in done.stdout
    assert ", 1 asset)" in done.stdout
    assert "✗ " in done.stderr
    assert "huge.bin: payload_too_large" in done.stderr
    assert "the server does not take files this large" in done.stderr
    assert done.stdout.strip().endswith("1 uploaded, 0 already present, 1 failed "
                                        "(capsule 'cli-mixed', created by this run)")
    report = json.loads(cli("upload", str(folder), "--capsule", "cli-mixed",
                            "--no-derivatives", "--json").stdout)
    failed = next(f for f in report["files"] if f["status"] == "failed")
    assert failed["errors"][0]["code"] == "payload_too_large"


def interrupt_upload(cli: Cli, api: Api, *args: str, chunks: int = 10, presses: int = 1) -> str:
    """Run ``memvault upload ARGS`` and Ctrl-C it (``presses`` times, a millisecond apart)
    once the server holds ``chunks`` chunks of its one file (but not all); its stderr."""
    proc = subprocess.Popen(cli.argv("upload", *args, "--parallel", "1"), env=cli.env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while True:
        sessions = api.http.get("/v1/uploads").json()["items"]
        if sessions and sessions[0]["received_count"] >= chunks:
            break
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "the upload never got going"
        time.sleep(0.02)
    for press in range(presses):
        if press:
            time.sleep(0.001)
        proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 130, stderr
    return stderr


@pytest.mark.parametrize("presses", [1, 2])
def test_ctrl_c_then_the_same_command_resumes(cli: Cli, tmp_path: Path, presses: int) -> None:
    # Once: the CLI ends its requests and says how to resume. Twice, a millisecond apart (an
    # impatient user, while the first one's clean-up runs): it quits at once, with a sentence
    # and no event-loop traceback. Either way the same command resumes.
    cli.login()
    folder = tmp_path / "videos"
    folder.mkdir()
    (folder / "long.mov").write_bytes(os.urandom(48 * MiB))
    api = cli.server.api()
    try:
        stderr = interrupt_upload(cli, api, str(folder), "--capsule", "cli-videos", "--create",
                                  presses=presses)
        assert "run the same command again to resume" in stderr
        assert "Traceback" not in stderr, stderr
        assert "Fatal error" not in stderr, stderr
        [session] = api.http.get("/v1/uploads").json()["items"]
        held = session["received_count"]
        assert 10 <= held < session["chunk_count"]

        sessions_out = cli("sessions").stdout
        assert session["id"] in sessions_out
        assert "long.mov" in sessions_out

        done = cli("upload", str(folder), "--capsule", "cli-videos", "--json")
        assert done.returncode == 0, done.stderr
        [file] = json.loads(done.stdout)["files"]
        assert file["status"] == "uploaded"
        assert file["resumed_chunks"] >= held
        memory = api.http.get(f"/v1/memories/{file['memory_id']}").json()
        assert memory["id"] == session["memory_id"]
        assert api.http.get("/v1/uploads").json()["items"] == []
    finally:
        api.http.close()


SECOND_PRESS_IN_A_CALLBACK = """
import asyncio, os, signal, socket
from memvault.commands.library import run_loop

class Poke(asyncio.Protocol):
    def data_received(self, data):
        os.kill(os.getpid(), signal.SIGINT)  # the second press, inside a transport callback

async def main():
    try:
        os.kill(os.getpid(), signal.SIGINT)  # the first press
        await asyncio.sleep(30)
    except asyncio.CancelledError:
        # A clean-up that takes a while, with a transport on the loop (the requests ended,
        # the derivative worker's pipes).
        near, far = socket.socketpair()
        await asyncio.get_running_loop().create_connection(Poke, sock=near)
        far.send(b"x")
        await asyncio.sleep(30)
        raise
    return 0

raise SystemExit(run_loop(main()))
"""


def test_a_second_ctrl_c_inside_a_loop_callback_quits_with_a_sentence() -> None:
    # The moment that printed uvloop's "Fatal error on transport" traceback: asyncio's own
    # handler raises KeyboardInterrupt in whatever callback is running.
    proc = subprocess.Popen([sys.executable, "-c", SECOND_PRESS_IN_A_CALLBACK],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        _, stderr = proc.communicate(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()
        pytest.fail(f"a second Ctrl-C did not end the process:\n{proc.communicate()[1]}")
    assert proc.returncode == 130, stderr
    assert "Traceback" not in stderr, stderr
    assert "interrupted again — quitting now" in stderr


def test_a_file_found_stored_has_its_interrupted_upload_aborted(
        cli: Cli, tmp_path: Path) -> None:
    # Interrupted, then its bytes reach the capsule another way (a copy under another name):
    # the next run skips the file and must not leave its old session holding a place.
    cli.login()
    data = os.urandom(24 * MiB)
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    (tmp_path / "a" / "clip.mov").write_bytes(data)
    (tmp_path / "b" / "copy.mov").write_bytes(data)
    api = cli.server.api()
    try:
        interrupt_upload(cli, api, str(tmp_path / "a"), "--capsule", "cli-aborts", "--create",
                         "--no-derivatives", chunks=3)
        assert len(api.http.get("/v1/uploads").json()["items"]) == 1
        done = cli("upload", str(tmp_path / "b"), "--capsule", "cli-aborts",
                   "--no-derivatives")
        assert done.returncode == 0, done.stderr
        done = cli("upload", str(tmp_path / "a"), "--capsule", "cli-aborts",
                   "--no-derivatives")
        assert done.returncode == 0, done.stderr
        assert "clip.mov: already in 'cli-aborts'" in done.stdout
        assert "its interrupted upload was aborted" in done.stdout
        assert api.http.get("/v1/uploads").json()["items"] == []
        assert list((cli.home / "state").rglob("uploads/*.json")) == []
    finally:
        api.http.close()


def test_sessions_abort_ends_an_interrupted_upload_and_its_record(
        cli: Cli, tmp_path: Path) -> None:
    cli.login()
    (tmp_path / "v").mkdir()
    (tmp_path / "v" / "clip.mov").write_bytes(os.urandom(16 * MiB))
    api = cli.server.api()
    try:
        interrupt_upload(cli, api, str(tmp_path / "v"), "--capsule", "cli-abort", "--create",
                         "--no-derivatives", chunks=3)
        [session] = api.http.get("/v1/uploads").json()["items"]
        assert len(list((cli.home / "state").rglob("uploads/*.json"))) == 1
        done = cli("sessions", "--abort", session["id"])
        assert done.returncode == 0, done.stderr
        assert f"aborted {session['id']}" in done.stdout
        assert api.http.get("/v1/uploads").json()["items"] == []
        assert list((cli.home / "state").rglob("uploads/*.json")) == []
        assert cli("sessions").stdout.strip() == "no upload sessions in progress"
        done = cli("sessions", "--abort", session["id"], "--abort", "ses_" + "0" * 32,
                   "--json")
        assert done.returncode == 1
        result = json.loads(done.stdout)
        assert result["aborted"] == []
        assert [e["code"] for e in result["errors"]] == ["not_found", "not_found"]
    finally:
        api.http.close()


def test_admin_sessions_needs_an_admin(cli: Cli) -> None:
    cli.login(mint_token(cli.server, "cli-user"))
    done = cli("admin", "sessions")
    assert done.returncode == 1
    assert "this needs an administrator's token" in done.stderr
    cli.login()
    assert cli("admin", "sessions").returncode == 0
    assert cli.json("admin", "sessions") == []


def test_unreadable_folders_and_odd_paths_fail_the_run_and_say_so(
        cli: Cli, tmp_path: Path) -> None:
    cli.login()
    folder = tmp_path / "photos"
    (folder / "2023").mkdir(parents=True)
    (folder / "ok.bin").write_bytes(os.urandom(1000))
    (folder / "2023" / "hidden-by-mode.bin").write_bytes(b"x")
    (folder / "2023").chmod(0)
    pipe = tmp_path / "pipe"
    os.mkfifo(pipe)
    empty = tmp_path / "empty"
    empty.mkdir()
    try:
        args = ["upload", str(folder), str(pipe), str(empty), "--capsule", "cli-odd",
                "--create"]
        done = subprocess.run(unprivileged(cli.argv(*args)), env=cli.env(),
                              capture_output=True, text=True, timeout=300, check=False)
        assert done.returncode == 1, done.stderr
        assert ("2023: permission_denied: Permission denied — check that you may read it"
                in done.stderr)
        assert "pipe: not_a_regular_file" in done.stderr
        assert "not a regular file or a folder" in done.stderr
        assert "no files to upload in" in done.stderr
        assert done.stdout.strip().endswith("1 uploaded, 0 already present, 2 failed "
                                            "(capsule 'cli-odd', created by this run)")
        done = subprocess.run(unprivileged(cli.argv(*args, "--json")), env=cli.env(),
                              capture_output=True, text=True, timeout=300, check=False)
        report = json.loads(done.stdout)
        assert report["failed"] == 2
        assert report["skipped"] == 1
        assert report["capsule_created"] is False
        assert {Path(f["path"]).name: f["errors"][0]["code"] for f in report["files"]
                if f["status"] == "failed"} == {
            "2023": "permission_denied", "pipe": "not_a_regular_file"}
    finally:
        (folder / "2023").chmod(0o755)


def test_identical_files_of_one_run_are_stored_once(cli: Cli, tmp_path: Path) -> None:
    cli.login()
    folder = tmp_path / "dups"
    folder.mkdir()
    data = os.urandom(300_000)
    for name in ("a.bin", "b.bin", "c.bin"):
        (folder / name).write_bytes(data)
    done = cli("upload", str(folder), "--capsule", "cli-dups", "--create", "--jobs", "3",
               "--no-derivatives")
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().endswith("1 uploaded, 2 already present, 0 failed "
                                        "(capsule 'cli-dups', created by this run)")
    assert len(cli.json("ls", "cli-dups")) == 1


def test_json_is_printed_when_the_whole_command_fails(cli: Cli, tmp_path: Path) -> None:
    cli.login()
    cases = [
        (("ls", "cli-nowhere"), "not_found"),
        (("upload", str(tmp_path), "--capsule", "cli-nowhere"), "not_found"),
        (("get", "mem_" + "0" * 32), "not_found"),
    ]
    for args, code in cases:
        done = cli(*args, "--json")
        assert done.returncode == 1, (args, done.stderr)
        error = json.loads(done.stdout)["error"]
        assert error["code"] == code, (args, error)
        assert error["message"] in done.stderr
    done = cli("capsule", "list", "--json", MEMVAULT_URL="http://127.0.0.1:9")
    assert done.returncode == 1
    assert json.loads(done.stdout)["error"]["code"] == "connection_failed"
    cli("capsule", "create", "cli-json-dup")
    done = cli("capsule", "create", "cli-json-dup", "--json")
    assert json.loads(done.stdout)["error"]["code"] == "conflict"
    # Usage errors too, with exit code 2.
    for args in [("get", "mem_" + "0" * 32, "--role", "poster"),
                 ("upload", "--capsule", "x"), ("ls", "x", "--bogus")]:
        done = cli(*args, "--json")
        assert done.returncode == 2, (args, done.stderr)
        error = json.loads(done.stdout)["error"]
        assert error["code"] == "usage", (args, error)
        assert error["message"] in done.stderr


def test_a_remembered_hash_that_went_stale_is_forgotten(cli: Cli, tmp_path: Path) -> None:
    """Same size, same time, same first and last MiB, other bytes in the middle: the
    remembered SHA-256 is wrong. The upload says so once; the next run hashes afresh."""
    cli.login()
    path = tmp_path / "mid.bin"
    path.write_bytes(os.urandom(3 * MiB))
    stamp = path.stat()
    done = cli("upload", str(path), "--capsule", "cli-stale-a", "--create", "--no-derivatives")
    assert done.returncode == 0, done.stderr
    with path.open("r+b") as f:
        f.seek(3 * MiB // 2)
        f.write(b"XXXXXXXX")
    os.utime(path, ns=(stamp.st_atime_ns, stamp.st_mtime_ns))
    args = ["upload", str(path), "--capsule", "cli-stale-b", "--create", "--no-derivatives"]
    first = cli(*args)
    assert first.returncode == 1
    assert "mid.bin: " in first.stderr
    second = cli(*args)
    assert second.returncode == 0, second.stderr
    assert "1 uploaded" in second.stdout
