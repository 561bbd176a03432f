"""Ray token authentication, as vlp uses it.

A Ray cluster without auth runs any code anyone who can reach it sends. vlp's local Ray always starts
with token auth (RAY_AUTH_MODE=token, set explicitly rather than relying on one Ray version's default),
and the token file is the user's alone (0600): Ray 2.60 writes ~/.ray/auth_token world-readable.
The token is found as Ray finds it: RAY_AUTH_TOKEN, else the file RAY_AUTH_TOKEN_PATH, else
~/.ray/auth_token.

A local run's Ray also listens on the loopback only (`loopback_only`): by default Ray 2.60 binds the GCS,
the raylet, every worker and the metrics exporter (which asks no token) on all interfaces.
"""
from __future__ import annotations

import os
import secrets
import stat
from pathlib import Path


def token_path() -> Path:
    return Path(os.environ.get("RAY_AUTH_TOKEN_PATH") or Path.home() / ".ray" / "auth_token").expanduser()


def auth_token() -> str | None:
    token = os.environ.get("RAY_AUTH_TOKEN")
    if token:
        return token.strip()
    path = token_path()
    return path.read_text().strip() if path.is_file() else None


def secure_local_token() -> Path | None:
    """Before a local Ray starts: token auth on, and a token file only its owner can read (made with
    mode 0600 if there is none, tightened to 0600 if it is readable by others). Returns the file, or
    None when the token comes from RAY_AUTH_TOKEN."""
    _token_mode()
    if os.environ.get("RAY_AUTH_TOKEN"):
        return None
    path = token_path()
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        if path.stat().st_mode & (stat.S_IRWXG | stat.S_IRWXO):
            path.chmod(0o600)
        return path
    with os.fdopen(fd, "w") as f:
        f.write(secrets.token_hex(32))
    return path


# Ray's switch for a node whose address is the loopback: its own name speaks of Windows and macOS, where
# it is the default; on Linux it binds the GCS, raylet, workers and agents to 127.0.0.1 (measured:
# tests/test_local_ray.py). `ray.init(_node_ip_address="127.0.0.1")` does not: Ray swaps a loopback
# address for the machine's reachable one.
_LOOPBACK_NODE = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"


def loopback_only() -> None:
    """Before a local Ray starts: it and every process it starts listen on 127.0.0.1 only."""
    os.environ[_LOOPBACK_NODE] = "0"   # Ray's processes read it when they start
    # The driver read it when Ray was first imported (a stage module imports Ray early).
    from ray._private import ray_constants

    ray_constants.ENABLE_RAY_CLUSTER = False


def use_token_if_available() -> None:
    """Before joining a cluster (`ray.init(address=...)`): token auth on if a token is there, unless the
    user set RAY_AUTH_MODE. A token-auth cluster refuses a client in "disabled" mode even with the token."""
    if os.environ.get("RAY_AUTH_MODE") is None and auth_token() is not None:
        _token_mode()


def _token_mode() -> None:
    os.environ["RAY_AUTH_MODE"] = "token"
    # Ray reads the mode once, when it is first imported (a stage module imports it early), and caches it:
    # without this the driver stays in "disabled" mode and the cluster refuses it. Ray's own default path
    # (ray.init with the mode unset) refreshes it the same way.
    from ray._raylet import Config

    Config.initialize("")
