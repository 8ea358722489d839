"""The PostgreSQL schema the engine lives in: ``engine`` unless ``Engine(schema=...)`` says
otherwise, so that several apps keep independent engines in one database (docs/scaling.md).

``schema.sql`` and ``sql/queries.sql`` are written for the schema ``engine``. For another name
they are rewritten once, by the explicit rules below, and the result is cached per name: a
query costs nothing more than with the default schema. The rules touch only what names the
schema, never text that merely contains the word (event names such as
``engine/function.finished``, role names such as ``engine_reader``, log messages):

* ``engine.`` followed by an identifier, ``%`` (``format('... engine.%I')``) or a closing
  quote (``'engine.' || p_name``), and not part of a longer name: a qualified reference;
* ``SCHEMA engine`` and ``SCHEMA IF NOT EXISTS engine`` (``GRANT ... ON SCHEMA engine``);
* the literal ``'engine'::regnamespace``;
* the NOTIFY channel ``'engine_wakeup'``, which becomes :func:`wakeup_channel`: two apps in
  two schemas never wake each other.

Whatever else the texts hold that derives from these (the migration's advisory lock key
``hashtext('engine.schema')``, the schema hash kept in ``engine.meta``) follows the name.
``tests/test_schemas.py`` renders both files for another name and checks that nothing naming
``engine`` is left.
"""

from __future__ import annotations

import re

from .errors import ConfigurationError

DEFAULT_SCHEMA = "engine"
"""The schema of an Engine that names none."""

_WAKEUP_SUFFIX = "_wakeup"
# NOTIFY channels and role names are identifiers too (at most 63 bytes): the longest name
# leaves room for "_wakeup" (and the "_sender", "_worker", "_reader" of ops/roles.sql).
MAX_SCHEMA_LENGTH = 63 - len(_WAKEUP_SUFFIX)
_VALID = re.compile(rf"[a-z_][a-z0-9_]{{0,{MAX_SCHEMA_LENGTH - 1}}}")
# PostgreSQL keeps the pg_ prefix for its own schemas; information_schema and public are not
# the engine's to fill.
_REFUSED = ("pg_",)
_RESERVED = frozenset({"public", "information_schema"})


def check_schema_name(name: object) -> str:
    """Returns ``name`` if it can be the engine's schema: a plain lowercase identifier (a
    letter or ``_``, then letters, digits or ``_``; at most 56 characters), never quoted, so
    that it is safe to put in SQL text as it is.

    Raises:
        ConfigurationError: anything else (it says what a name may hold).
    """
    if not isinstance(name, str) or not _VALID.fullmatch(name):
        raise ConfigurationError(
            f"schema {name!r} is not a valid schema name: a lowercase letter or _, then"
            f" lowercase letters, digits or _, {MAX_SCHEMA_LENGTH} characters at most"
        )
    if name.startswith(_REFUSED) or name in _RESERVED:
        raise ConfigurationError(f"schema {name!r} is reserved: choose a name of your own")
    return name


def wakeup_channel(schema: str) -> str:
    """The NOTIFY channel of the engine in ``schema`` (``engine_wakeup`` for ``engine``)."""
    return check_schema_name(schema) + _WAKEUP_SUFFIX


_QUALIFIED = re.compile(r"(?<![\w/.$])engine\.(?=[A-Za-z_%'])")
_SCHEMA_KEYWORD = re.compile(r"\b(SCHEMA (?:IF NOT EXISTS )?)engine\b(?![.\w])")
_NAMESPACE = "'engine'::regnamespace"
_CHANNEL = f"'{wakeup_channel(DEFAULT_SCHEMA)}'"


def render(text: str, schema: str) -> str:
    """``text`` (written for the schema ``engine``) for ``schema``, by the rules above; the
    text itself for ``engine``."""
    schema = check_schema_name(schema)
    if schema == DEFAULT_SCHEMA:
        return text
    text = _QUALIFIED.sub(f"{schema}.", text)
    text = _SCHEMA_KEYWORD.sub(rf"\g<1>{schema}", text)
    text = text.replace(_NAMESPACE, f"'{schema}'::regnamespace")
    return text.replace(_CHANNEL, f"'{wakeup_channel(schema)}'")
