"""The database layer: the only module that talks to asyncpg.

Queries live in ``sql/queries.sql`` and are called by name. Errors the schema raises with its own
SQLSTATE codes become the engine's errors here, in one place.
"""

from __future__ import annotations

import asyncio
import hashlib
import re
import weakref
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager, suppress
from functools import cache
from importlib import resources
from typing import Any, TypeAlias

import asyncpg
import structlog
from asyncpg.pool import PoolConnectionProxy

from .errors import SQLSTATE_ERRORS, EngineError, SchemaMissingError
from .pg_schema import DEFAULT_SCHEMA, check_schema_name, render, wakeup_channel

Record = asyncpg.Record
# A caller's own connection, or one borrowed from the pool.
Connection: TypeAlias = "asyncpg.Connection[Record] | PoolConnectionProxy[Record]"
log = structlog.get_logger("engine")

_NAME = re.compile(r"^-- name: (\w+)\s*$", re.MULTILINE)
# SQLSTATEs meaning the engine schema (or one of its functions) is not there.
_MISSING_SCHEMA = {"3F000", "42883", "42P01"}
HELD_IDLE = 0.2  # seconds a held connection stays out of the pool unused (see HeldConnection)
POOL_LOOK_INTERVAL = 0.002  # seconds between a held connection's looks at its pool's free ones


def queries(schema: str = DEFAULT_SCHEMA) -> dict[str, str]:
    """All named queries of ``sql/queries.sql``, for the engine in ``schema`` (rendered once
    per name, see :mod:`engine.pg_schema`; a :class:`Database` keeps its schema's)."""
    return _queries(schema)


@cache
def _queries(schema: str) -> dict[str, str]:
    text = render(resources.files("engine").joinpath("sql/queries.sql").read_text(), schema)
    parts = _NAME.split(text)
    return {name: body.strip() for name, body in zip(parts[1::2], parts[2::2], strict=True)}


def schema_sql(schema: str = DEFAULT_SCHEMA) -> str:
    """The text of ``schema.sql`` as shipped in the package, for the engine in ``schema``."""
    return _schema_sql(schema)


@cache
def _schema_sql(schema: str) -> str:
    return render(resources.files("engine").joinpath("schema.sql").read_text(), schema)


# Errors that say the connection or the server went away (a restart, a partition, a query that
# timed out), not that the statement was wrong: its outcome is unknown (it may have committed),
# and the same statement may succeed on a new connection.
_CONNECTION_ERRORS: tuple[type[Exception], ...] = (
    OSError,
    TimeoutError,
    asyncpg.PostgresConnectionError,
    asyncpg.exceptions.OperatorInterventionError,  # admin or crash shutdown, starting up
    asyncpg.InternalClientError,  # a connection left mid-error by a dying server
)


def is_connection_error(exc: BaseException) -> bool:
    """True if ``exc`` says the connection failed rather than the statement (see above)."""
    # A bare InterfaceError is asyncpg's "connection is closed" or "another operation is in
    # progress" on a connection a dying server left behind; its subclasses (DataError, ...)
    # are the caller's mistakes.
    return isinstance(exc, _CONNECTION_ERRORS) or type(exc) is asyncpg.InterfaceError


# SQLSTATEs (classes, or exact codes) that say the database cannot be reached or used right now,
# whatever the statement: too many connections or another resource exhausted (class 53), a
# connection failure (class 08), a shutdown or a server still starting (57P01-57P03), a standby
# that became read-only after a failover (25006), a serialization failure or a deadlock that
# rolled the transaction back (40001, 40P01). The same statement may succeed later.
_INFRASTRUCTURE_CLASSES = ("08", "53")
_INFRASTRUCTURE_STATES = frozenset({"57P01", "57P02", "57P03", "25006", "40001", "40P01"})


def is_infrastructure_error(exc: BaseException) -> bool:
    """True if ``exc`` says the database cannot be reached or used right now (see above, and
    :func:`is_connection_error`), never that the caller's statement or data is wrong.

    Such an error is never a function's failure: the execution hands its run back and it goes
    on; a worker tick that hits one tries again after its backoff.
    """
    if is_connection_error(exc):
        return True
    state = getattr(exc, "sqlstate", None)
    if not isinstance(exc, asyncpg.PostgresError) or not isinstance(state, str):
        return False
    return state[:2] in _INFRASTRUCTURE_CLASSES or state in _INFRASTRUCTURE_STATES


def translate(exc: asyncpg.PostgresError, schema: str = DEFAULT_SCHEMA) -> Exception:
    """Maps a database error to the engine error it means (or returns it unchanged)."""
    state = getattr(exc, "sqlstate", None)
    error_class = SQLSTATE_ERRORS.get(state or "")
    if error_class is not None:
        return error_class(getattr(exc, "message", str(exc)))
    if state in _MISSING_SCHEMA and schema in str(exc):
        return SchemaMissingError(
            f"the database has no engine schema {schema!r} ({exc}); run"
            f" `{_migrate_command(schema)}` or apply schema.sql"
        )
    return exc


def _migrate_command(schema: str) -> str:
    return "engine migrate" + ("" if schema == DEFAULT_SCHEMA else f" --schema {schema}")


async def _keep_session(conn: asyncpg.Connection[Record]) -> None:
    """Releases a pooled connection without asyncpg's reset query (``RESET ALL``, ``UNLISTEN *``,
    ``CLOSE ALL``, advisory unlock): a round trip on every release, i.e. one more per query.

    The engine's pooled connections keep no session state: LISTEN uses its own connection,
    settings are never changed per session and advisory locks are transaction-scoped. asyncpg
    still rolls back a transaction left open before calling this.
    """


STATEMENT_CACHE_SIZE = 100  # asyncpg's own default


class Database:
    """A connection pool plus the named queries.

    Args:
        url: a PostgreSQL URL.
        min_size: connections kept open.
        max_size: connections at most.
        command_timeout: seconds after which a query is abandoned.
        listen_url: where the LISTEN connection goes (default: ``url``): a server directly when
            ``url`` is a pooler in transaction mode, the primary when ``url`` is a standby
            (neither can LISTEN).
        statement_cache_size: asyncpg's prepared statements cached per connection (default:
            asyncpg's, 100); 0 behind a pooler that cannot keep named prepared statements
            (PgBouncer before 1.21, or without ``max_prepared_statements``).
        schema: the PostgreSQL schema the engine lives in (see :mod:`engine.pg_schema`): its
            queries, :meth:`apply_schema` and the NOTIFY :attr:`channel` are that schema's.

    Raises:
        ConfigurationError: ``schema`` is not a valid schema name.
    """

    def __init__(
        self,
        url: str,
        *,
        min_size: int = 1,
        max_size: int = 10,
        command_timeout: float = 60.0,
        listen_url: str | None = None,
        statement_cache_size: int = STATEMENT_CACHE_SIZE,
        schema: str = DEFAULT_SCHEMA,
    ) -> None:
        self.url = url
        self.schema = check_schema_name(schema)
        self.channel = wakeup_channel(schema)
        """The channel the schema's triggers NOTIFY and the worker's listener LISTENs to."""
        self._queries = queries(schema)  # rendered once per schema name: no cost per query
        self.listen_url = listen_url or url
        self._statement_cache_size = statement_cache_size
        self._min_size, self._max_size = min_size, max_size
        # A query on a half-open connection (a partition, a dead NAT entry) would wait forever:
        # past this, it fails, the connection is dropped, and the caller's retry gets a new one.
        self._command_timeout = command_timeout
        self._pool: asyncpg.Pool | None = None
        # Given back before the pool closes (its close waits for every checked-out connection).
        self._held: weakref.WeakSet[HeldConnection] = weakref.WeakSet()

    async def open(self) -> None:
        """Opens the pool (idempotent)."""
        if self._pool is None:
            self._pool = await asyncpg.create_pool(
                self.url,
                min_size=self._min_size,
                max_size=self._max_size,
                command_timeout=self._command_timeout,
                reset=_keep_session,
                statement_cache_size=self._statement_cache_size,
            )

    async def close(self) -> None:
        """Closes the pool and every connection in it. Connections that cannot be closed
        politely (the server is gone, or silent) are dropped: closing never fails."""
        if self._pool is None:
            return
        for held in list(self._held):  # else pool.close() would wait for them
            await held.close()
        pool, self._pool = self._pool, None
        try:
            async with asyncio.timeout(self._command_timeout):
                await pool.close()
        except Exception as exc:
            if not is_connection_error(exc):
                raise
            pool.terminate()

    @property
    def pool(self) -> asyncpg.Pool:
        if self._pool is None:
            raise EngineError("the database is not open")
        return self._pool

    async def fetch(self, query: str, *args: Any, conn: Connection | None = None) -> list[Record]:
        """Runs a named query and returns its rows."""
        rows: list[Record] = await self._call(lambda c: c.fetch(self._queries[query], *args), conn)
        return rows

    async def fetch_on(self, conn: Connection, query: str, args: tuple[Any, ...]) -> list[Record]:
        """:meth:`fetch` on ``conn``, the path of every held round trip (a step's checkpoint):
        without the frames that choosing a connection adds."""
        try:
            rows: list[Record] = await conn.fetch(self._queries[query], *args)
        except asyncpg.PostgresError as exc:
            raise translate(exc, self.schema) from exc
        return rows

    async def fetchrow(
        self, query: str, *args: Any, conn: Connection | None = None
    ) -> Record | None:
        """Runs a named query and returns its first row."""
        row: Record | None = await self._call(
            lambda c: c.fetchrow(self._queries[query], *args), conn
        )
        return row

    async def fetchval(self, query: str, *args: Any, conn: Connection | None = None) -> Any:
        """Runs a named query and returns the first column of its first row."""
        return await self._call(lambda c: c.fetchval(self._queries[query], *args), conn)

    async def _call(
        self, action: Callable[[Connection], Awaitable[Any]], conn: Connection | None
    ) -> Any:
        try:
            if conn is not None:
                return await action(conn)
            async with self.pool.acquire() as pooled:
                try:
                    return await action(pooled)
                except Exception as exc:
                    if is_connection_error(exc):
                        await self._connection_failed(pooled)
                    raise
        except asyncpg.PostgresError as exc:
            raise translate(exc, self.schema) from exc

    @asynccontextmanager
    async def transaction(self) -> AsyncIterator[Connection]:
        """A pooled connection inside a transaction that commits when the block ends."""
        async with self.pool.acquire() as conn:
            try:
                async with conn.transaction():
                    yield conn
            except Exception as exc:
                if is_connection_error(exc):
                    await self._connection_failed(conn)
                raise

    async def _connection_failed(self, conn: Connection) -> None:
        """A connection failed (see :func:`is_connection_error`): it is never handed out again,
        nor are its siblings. After a restart or a partition they are all dead, and each would
        otherwise cost a query its timeout before the pool noticed."""
        with suppress(asyncpg.InterfaceError):  # one the server closed is already detached
            conn.terminate()
        await self.pool.expire_connections()

    def held(self, idle: float = HELD_IDLE) -> HeldConnection:
        """A pool connection for a caller that makes one round trip at a time, back to back
        (see :class:`HeldConnection`)."""
        held = HeldConnection(self, idle)
        self._held.add(held)
        return held

    async def dedicated(self) -> asyncpg.Connection[Record]:
        """A connection outside the pool (for LISTEN: a pool would UNLISTEN it on release), to
        ``listen_url``: LISTEN needs a session of its own on a server that takes writes."""
        return await asyncpg.connect(self.listen_url)

    async def apply_schema(self, *, attempts: int = 600) -> bool:
        """Applies ``schema.sql`` (rendered for :attr:`schema`, which it creates if need be)
        unless this very text was applied last; True if it ran.

        Re-applying an unchanged schema takes no lock at all (the text's hash is kept in the
        schema's own ``meta`` table). A change that needs a lock behind open application
        transactions waits at most ``MIGRATE_LOCK_TIMEOUT`` for it (sends queue behind a waiting
        DDL lock, so never longer), then rolls back and tries again with backoff, up to
        ``attempts`` times.
        """
        text = schema_sql(self.schema)
        digest = hashlib.sha256(text.encode()).hexdigest()
        conn = await asyncpg.connect(self.url)
        try:
            if await _applied_hash(conn, self._queries) == digest:
                return False
            await conn.execute(f"SET lock_timeout = '{MIGRATE_LOCK_TIMEOUT}'")
            await _apply_with_retries(conn, text, attempts)
            await conn.execute(self._queries["set_schema_hash"], digest)
            return True
        finally:
            await conn.close()


MIGRATE_LOCK_TIMEOUT = "200ms"


class HeldConnection:
    """A pool connection kept checked out between the back-to-back round trips of one caller
    that makes them one at a time (a worker's step checkpoints: ``engine.group_commit``).

    Taking a connection from the pool and giving it back costs a task, a shield and a queue
    operation each way: about a twelfth of a step's time, when a step is one round trip. Held,
    the connection goes back to the pool once unused for ``idle`` seconds (an idle worker keeps
    none), after any error (a connection error expires the pool's connections, as any query
    does), after a round trip that found the pool without a free connection (someone may be
    waiting for one; looked at every ``POOL_LOOK_INTERVAL`` at most), and at :meth:`close`.
    """

    def __init__(self, db: Database, idle: float) -> None:
        self._db = db
        self._idle = idle
        self._conn: PoolConnectionProxy[Record] | None = None
        self._busy = False
        self._closing = False  # close() was called during a round trip: give back at its end
        self._last_used = 0.0
        self._pool_looked_at = 0.0  # when _pool_exhausted last counted the pool's connections
        self._timer: asyncio.TimerHandle | None = None
        self._returning: set[asyncio.Task[None]] = set()

    async def fetch(self, query: str, *args: Any) -> list[Record]:
        """Runs a named query on the held connection (taken from the pool if none is held)."""
        if self._busy:
            raise RuntimeError("a HeldConnection makes one round trip at a time")
        self._busy = True
        try:
            conn = await self._connection()
            try:
                rows: list[Record] = await self._db.fetch_on(conn, query, args)
            except BaseException as exc:
                self._conn = None
                if isinstance(exc, Exception) and is_connection_error(exc):
                    await self._db._connection_failed(conn)
                await self._give_back(conn)
                raise
        finally:
            self._busy = False
            self._last_used = asyncio.get_running_loop().time()
        if self._closing or self._pool_exhausted():
            # Closed while this round trip was in flight; or the pool has no connection left
            # to give, and another caller may be waiting for one (a heartbeat must never wait
            # behind a stream of checkpoints).
            await self.close()
        return rows

    def _pool_exhausted(self) -> bool:
        # Looked at once per POOL_LOOK_INTERVAL at most: counting the pool's connections costs
        # as much as the rest of a held round trip's own Python, and waiting a few ms more for
        # a connection costs a waiter nothing it would notice.
        if self._last_used < self._pool_looked_at + POOL_LOOK_INTERVAL:
            return False
        self._pool_looked_at = self._last_used
        pool = self._db.pool
        return pool.get_idle_size() == 0 and pool.get_size() >= pool.get_max_size()

    async def close(self) -> None:
        """Gives the connection back to the pool, now or, if a round trip is in flight, when
        it ends (waits for any give-back under way). The next round trip takes one again."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._closing = self._busy
        if self._conn is not None and not self._busy:
            conn, self._conn = self._conn, None
            await self._give_back(conn)
        if self._returning:
            await asyncio.gather(*self._returning, return_exceptions=True)

    async def _connection(self) -> PoolConnectionProxy[Record]:
        conn = self._conn
        if conn is not None and _lost(conn):  # the server dropped it meanwhile
            self._conn = None
            await self._give_back(conn)
            conn = None
        if conn is None:
            conn = self._conn = await self._db.pool.acquire()
            self._arm_timer()
        return conn

    async def _give_back(self, conn: PoolConnectionProxy[Record]) -> None:
        """Releases ``conn`` to the pool. Never raises: a connection the pool cannot reset is
        terminated by the pool itself (and replaced when next needed)."""
        try:
            await self._db.pool.release(conn)
        except Exception as exc:
            log.debug("db.release_failed", error=f"{type(exc).__name__}: {exc}")

    def _arm_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._timer = asyncio.get_running_loop().call_later(self._idle, self._give_back_if_idle)

    def _give_back_if_idle(self) -> None:
        self._timer = None
        if self._conn is None:
            return
        unused = asyncio.get_running_loop().time() - self._last_used
        if self._busy or unused < self._idle:
            self._timer = asyncio.get_running_loop().call_later(
                self._idle - unused if not self._busy else self._idle, self._give_back_if_idle
            )
            return
        conn, self._conn = self._conn, None
        task = asyncio.create_task(self._give_back(conn))
        self._returning.add(task)
        task.add_done_callback(self._returning.discard)


def _lost(conn: PoolConnectionProxy[Record]) -> bool:
    """Whether a held connection is gone: closed, or released by asyncpg itself (a connection
    lost while checked out goes back to its pool at once, and its proxy then refuses every
    call, ``is_closed()`` included)."""
    try:
        return conn.is_closed()
    except asyncpg.InterfaceError:
        return True


async def _applied_hash(conn: asyncpg.Connection[Record], named: dict[str, str]) -> str | None:
    try:
        value: str | None = await conn.fetchval(named["schema_hash"])
    except (asyncpg.InvalidSchemaNameError, asyncpg.UndefinedTableError):
        return None  # a database without the schema
    return value


async def _apply_with_retries(conn: asyncpg.Connection[Record], text: str, attempts: int) -> None:
    pause = 0.05
    for attempt in range(1, attempts + 1):
        try:
            await conn.execute(text)
            return
        except asyncpg.LockNotAvailableError:
            await conn.execute("ROLLBACK")
            if attempt == attempts:
                raise
            log.warning("migrate.lock_busy", attempt=attempt, retry_in=pause)
            await asyncio.sleep(pause)
            pause = min(pause * 2, 2.0)
