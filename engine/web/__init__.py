"""The dashboard: a small ASGI app (Starlette, Jinja2 templates) over the run history."""
