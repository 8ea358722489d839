"""``python -m engine`` is the ``engine`` command."""

from .cli import main

main()
