"""Where the CLI finds its server and token.

``memvault login`` writes ``config.json`` in the user's config directory (``platformdirs``:
``~/.config/memvault`` on Linux, following ``XDG_CONFIG_HOME``) with mode 0600, since the
token is a password. ``MEMVAULT_URL`` and ``MEMVAULT_TOKEN`` override what the file says.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import platformdirs


class NotLoggedIn(Exception):
    pass


@dataclass(frozen=True)
class Login:
    url: str
    token: str


def config_file() -> Path:
    return Path(platformdirs.user_config_dir("memvault")) / "config.json"


def save(login: Login) -> Path:
    path = config_file()
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".config-")  # created 0600
    try:
        with os.fdopen(fd, "w") as f:
            json.dump({"url": login.url, "token": login.token}, f)
            f.write("\n")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def load() -> Login:
    """The login in force: environment first, then the config file."""
    stored: dict[str, str] = {}
    try:
        raw = json.loads(config_file().read_text())
        if isinstance(raw, dict):
            stored = {k: v for k, v in raw.items() if isinstance(v, str)}
    except FileNotFoundError:
        pass
    except ValueError as exc:
        raise NotLoggedIn(f"{config_file()} is not valid JSON ({exc}) — log in again with "
                          "`memvault login URL --token TOKEN`") from exc
    url = os.environ.get("MEMVAULT_URL") or stored.get("url")
    token = os.environ.get("MEMVAULT_TOKEN") or stored.get("token")
    if not url or not token:
        raise NotLoggedIn("not logged in — run `memvault login URL --token TOKEN` "
                          "(or set MEMVAULT_URL and MEMVAULT_TOKEN)")
    return Login(url.rstrip("/"), token)
