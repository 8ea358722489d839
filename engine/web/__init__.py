"""The web side of the engine: the dashboard (an ASGI app, :func:`create_app`), served by
``engine dev`` and ``engine dashboard`` or mounted in one's own app."""

from .app import create_app

__all__ = ["create_app"]
