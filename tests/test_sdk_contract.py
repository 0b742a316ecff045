"""The SDK's contract with its users: what a type checker sees of ``memvault``, which URLs a
client takes, and what every answer that is not a plain success is raised as.

Type checks run the real ``mypy --strict`` on a small user program (from the repository, so
its cache makes a run take a fraction of a second); answers are the real app's
(``httpx.ASGITransport``), with a proxy's or a stranger's answers injected in front of it.
"""

from __future__ import annotations

import re
import subprocess
import sys
import textwrap
from pathlib import Path

import memvault

ROOT = Path(__file__).resolve().parent.parent


def mypy_errors(tmp_path: Path, program: str) -> dict[int, str]:
    """``mypy --strict`` on ``program``: its error messages by line number."""
    path = tmp_path / "user_program.py"
    path.write_text(textwrap.dedent(program))
    run = subprocess.run(
        [sys.executable, "-m", "mypy", "--strict", "--no-error-summary",
         "--hide-error-context", str(path)],
        cwd=ROOT, capture_output=True, text=True, timeout=300, check=False)
    assert run.returncode in (0, 1), run.stderr + run.stdout
    errors: dict[int, str] = {}
    for line in run.stdout.splitlines():
        found = re.match(rf"{re.escape(str(path))}:(\d+): error: (.*)", line)
        if found:
            errors[int(found[1])] = errors.get(int(found[1]), "") + found[2]
    return errors


# -- what a type checker sees --------------------------------------------------------------------


def test_a_misspelled_name_from_memvault_is_a_type_error(tmp_path: Path) -> None:
    """The lazy ``__getattr__`` is hidden from type checkers: it made every name ``Any``."""
    errors = mypy_errors(tmp_path, """\
        import memvault

        def main(url: str, token: str) -> None:
            try:
                with memvault.Clinet(url, token) as mv:
                    mv.list_capsules()
            except memvault.Error:
                pass
            try:
                with memvault.Client(url, token) as mv:
                    mv.list_capsules()
            except memvault.MemvaultError as exc:
                print(exc.code, exc.status)
        """)
    assert sorted(errors) == [5, 7], errors
    assert '"Clinet"' in errors[5]
    assert '"Error"' in errors[7]


def test_the_package_lists_its_lazy_names() -> None:
    names = dir(memvault)
    assert {"Client", "AsyncClient", "MemvaultError", "__version__"} <= set(names)
    assert set(memvault.__all__) <= set(names)
    assert memvault.Client is memvault.client.Client


def test_importing_memvault_does_not_import_the_client() -> None:
    """The server imports ``memvault``; the client stack (httpx, derivatives) comes only with
    the first use of a client name, and ``dir()`` is not a use."""
    code = ("import sys, memvault; dir(memvault); "
            "assert 'memvault.client' not in sys.modules, 'imported by dir'; "
            "memvault.Client; assert 'memvault.client' in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
