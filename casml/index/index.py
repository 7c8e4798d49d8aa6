"""The SQL metadata index: which artifacts exist, their blobs, names, versions, tags and edges.

Open one with ``Index("sqlite:///path/index.db")`` (or any SQLAlchemy URL: PostgreSQL through
``postgresql+psycopg://``, MySQL/MariaDB through ``mysql+pymysql://``). The index knows
nothing of the blob storage: it records what the Store tells it and answers queries.

Two execution paths share one connection pool:

- the hot paths (``add``, ``contains``, ``info``, ``blobs_of``, ``latest``) run SQLAlchemy
  Core statements compiled once for the engine's dialect, on the pooled DBAPI connection,
  one transaction per call. Going through ``Connection.execute`` costs 30-45 microseconds a
  statement on this kind of machine, more than SQLite itself; compiling once removes that.
  On SQLite each thread keeps its pooled connection between calls;
- everything else (queries with filters, deletes, schema set-up) uses ``Connection.execute``.

On SQLite the database runs in WAL mode and write transactions start with ``BEGIN IMMEDIATE``
so concurrent writers queue on the busy timeout instead of failing when a read lock cannot be
upgraded. On servers, a write that loses a race (two processes taking the same next version of
a name, a deadlock) is rolled back and retried, so versions stay unique and gap-free.
"""

from __future__ import annotations

import os
import random
import re
import threading
import time
import weakref
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager, nullcontext, suppress
from dataclasses import dataclass, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn, TypeVar

from sqlalchemy import (
    Connection,
    Row,
    Select,
    Table,
    and_,
    bindparam,
    create_engine,
    delete,
    event,
    exists,
    func,
    insert,
    inspect,
    literal_column,
    select,
    union_all,
    update,
)
from sqlalchemy.dialects.postgresql import insert as postgresql_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.engine import Dialect, make_url
from sqlalchemy.exc import ArgumentError, DBAPIError, SQLAlchemyError
from sqlalchemy.pool import PoolProxiedConnection, StaticPool
from sqlalchemy.sql import ClauseElement
from sqlalchemy.sql.dml import Insert

from casml.errors import InvalidHashError, NotFoundError, StorageError
from casml.index.tables import (
    CLASS_NAME_LENGTH,
    HASH_LENGTH,
    INDEX_TABLES,
    NAME_LENGTH,
    TAG_KEY_LENGTH,
    TAG_VALUE_LENGTH,
    UTCDateTime,
    artifact_blobs,
    artifacts,
    blobs,
    edges,
    leases,
    names,
    schema_info,
    tags,
)
from casml.info import ArtifactInfo

if TYPE_CHECKING:
    from typing_extensions import Unpack

__all__ = ["SCHEMA_VERSION", "ArtifactRecord", "Index", "insert_ignore"]

#: Version of the table layout; a database recording a newer one is refused.
SCHEMA_VERSION = 1

_SCHEMA_KEY = "schema_version"
_KINDS = frozenset({"value", "persistable"})
_HASH_RE = re.compile(r"[0-9a-f]{32}")
_HEX_DIGITS = "0123456789abcdef"
_MYSQL = frozenset({"mysql", "mariadb"})
# Retries of a write that lost a race; each waits a few jittered milliseconds.
_MAX_ATTEMPTS = 30
# Bound parameters per IN (...) list: SQLite before 3.32 allowed 999 in one statement.
_CHUNK = 500
# MySQL/MariaDB error codes worth a retry: deadlock, lock wait timeout.
_MYSQL_TRANSIENT = frozenset({1213, 1205})
# MySQL/MariaDB errors of two sessions creating the tables at once (DDL there is not
# transactional): table already exists, duplicate index name.
_MYSQL_DDL_RACE = frozenset({1050, 1061})
# PostgreSQL SQLSTATEs worth a retry: serialization failure, deadlock.
_PG_TRANSIENT = frozenset({"40001", "40P01"})

_T = TypeVar("_T")


@dataclass(frozen=True)
class ArtifactRecord:
    """Describe one artifact for :meth:`Index.add`: address, class, kind, size, blobs, edges.

    ``kind`` is ``"value"`` or ``"persistable"``. ``blobs`` lists ``(digest, size)`` in payload
    order (a digest may repeat). ``dependencies`` are the hashes of the artifacts this one
    references directly, in the order they should be reported back. ``created_at`` should be
    timezone-aware; a naive datetime is taken as UTC.
    """

    hash: str
    class_name: str
    kind: str
    size: int
    created_at: datetime
    blobs: Sequence[tuple[str, int]] = ()
    dependencies: Sequence[str] = ()


def insert_ignore(table: Table, dialect_name: str) -> Insert | None:
    """Return an INSERT on ``table`` that skips rows whose key exists, for ``dialect_name``.

    The statement's ``rowcount`` is 1 for an inserted row and 0 for a skipped one. Returns
    ``None`` for a dialect with no such form; callers then check and insert separately.
    """
    if dialect_name == "sqlite":
        return sqlite_insert(table).on_conflict_do_nothing()
    if dialect_name == "postgresql":
        return postgresql_insert(table).on_conflict_do_nothing()
    if dialect_name in _MYSQL:
        return insert(table).prefix_with("IGNORE")
    return None


def _tag_upsert(dialect_name: str) -> Insert | None:
    """Return an INSERT of a tag that replaces the value of an existing key, if supported."""
    if dialect_name == "sqlite":
        lite = sqlite_insert(tags)
        return lite.on_conflict_do_update(
            index_elements=[tags.c.artifact_hash, tags.c.key],
            set_={"value": lite.excluded.value},
        )
    if dialect_name == "postgresql":
        pg = postgresql_insert(tags)
        return pg.on_conflict_do_update(
            index_elements=[tags.c.artifact_hash, tags.c.key],
            set_={"value": pg.excluded.value},
        )
    if dialect_name in _MYSQL:
        from sqlalchemy.dialects.mysql import insert as mysql_insert

        my = mysql_insert(tags)
        return my.on_duplicate_key_update(value=my.inserted.value)
    return None


def _utc(value: datetime) -> datetime:
    """Return ``value`` as an aware UTC datetime (naive means UTC already)."""
    if value.tzinfo is None:
        return value.replace(tzinfo=timezone.utc)
    return value.astimezone(timezone.utc)


def _next_hex_prefix(prefix: str) -> str | None:
    """Return the smallest hex string above every string starting with ``prefix``."""
    chars = list(prefix)
    for i in range(len(chars) - 1, -1, -1):
        pos = _HEX_DIGITS.index(chars[i])
        if pos < 15:
            chars[i] = _HEX_DIGITS[pos + 1]
            return "".join(chars[: i + 1])
    return None


def _chunks(items: Sequence[_T], size: int = _CHUNK) -> Iterator[Sequence[_T]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def _check_hash(value: object, what: str) -> str:
    if not isinstance(value, str) or _HASH_RE.fullmatch(value) is None:
        raise InvalidHashError(f"{what} must be 32 lowercase hex characters, got {value!r}")
    return value


def _check_text(value: object, what: str, limit: int) -> str:
    if not isinstance(value, str):
        raise StorageError(
            f"the index stores {what} as text, got {type(value).__name__} {value!r}; pass a str"
        )
    if "\x00" in value:
        # PostgreSQL text cannot hold NUL; refuse it everywhere so backends agree.
        raise StorageError(f"{what} contains a NUL character, which the index cannot store")
    if len(value) > limit:
        raise StorageError(
            f"{what} is {len(value)} characters long; the index stores at most {limit}: "
            f"shorten it ({value[:40]!r}...)"
        )
    return value


def _on_sqlite_connect(dbapi_connection: Any, connection_record: Any) -> None:
    """Configure every new SQLite connection: own transactions, WAL, busy wait, FKs."""
    # casml emits BEGIN itself (IMMEDIATE for writers); the sqlite3 module must not.
    dbapi_connection.isolation_level = None
    cursor = dbapi_connection.cursor()
    try:
        # busy_timeout first: switching to WAL needs a lock another process may hold.
        cursor.execute("PRAGMA busy_timeout = 30000")
        cursor.execute("PRAGMA journal_mode = WAL")
        cursor.execute("PRAGMA synchronous = NORMAL")
        cursor.execute("PRAGMA foreign_keys = ON")
    finally:
        cursor.close()


class _Compiled:
    """A Core statement compiled once for one dialect, runnable on a raw DBAPI cursor."""

    __slots__ = ("defaults", "names", "processors", "sql")

    def __init__(self, stmt: ClauseElement, dialect: Dialect) -> None:
        compiled = stmt.compile(dialect=dialect)
        self.sql = compiled.string
        positiontup = getattr(compiled, "positiontup", None)
        # None means a named paramstyle: pass a dict.
        positional = bool(getattr(compiled, "positional", False))
        self.names: tuple[str, ...] | None = (
            tuple(positiontup) if positional and positiontup is not None else None
        )
        # Keyed by the names as rendered (anonymous binds such as LIMIT's get "param_1").
        rendered: dict[Any, str] = getattr(compiled, "bind_names", {})
        self.defaults: dict[str, Any] = {
            key: bp.value for bp, key in rendered.items() if not bp.required
        }
        self.processors: dict[str, Callable[[Any], Any]] = {}
        for bp, key in rendered.items():
            proc = bp.type.dialect_impl(dialect).bind_processor(dialect)
            if proc is not None:
                self.processors[key] = proc

    def params(self, values: Mapping[str, Any]) -> Any:
        """Return the DBAPI parameters for ``values`` (processed, in paramstyle order)."""
        if self.defaults:
            values = {**self.defaults, **values}
        if self.processors:
            values = {
                k: (self.processors[k](v) if k in self.processors else v) for k, v in values.items()
            }
        if self.names is None:
            return values
        return tuple(values[n] for n in self.names)


class _Tx:
    """A transaction on a raw DBAPI cursor, running :class:`_Compiled` statements."""

    __slots__ = ("cursor",)

    def __init__(self, cursor: Any) -> None:
        self.cursor = cursor

    def run(self, stmt: _Compiled, values: Mapping[str, Any]) -> Any:
        self.cursor.execute(stmt.sql, stmt.params(values))
        return self.cursor

    def many(self, stmt: _Compiled, rows: Sequence[Mapping[str, Any]]) -> None:
        if len(rows) == 1:
            self.cursor.execute(stmt.sql, stmt.params(rows[0]))
        else:
            self.cursor.executemany(stmt.sql, [stmt.params(r) for r in rows])


class _Slot:
    """A thread's pooled SQLite connection; returned to the pool when the thread ends."""

    __slots__ = ("__weakref__", "proxy", "raw")

    def __init__(self, proxy: PoolProxiedConnection) -> None:
        self.proxy = proxy
        self.raw: Any = proxy.driver_connection


def _close_quietly(proxy: PoolProxiedConnection) -> None:
    # The connection is being discarded: a failure to close it changes nothing.
    with suppress(Exception):
        proxy.close()


class Index:
    """Open the metadata index at a SQLAlchemy URL; create its tables if they are missing.

    ``Index("sqlite:////home/me/.casml/index.db")`` is the embedded default (the parent
    folder is created if missing). The schema version recorded in the database is checked: a
    database written by a newer casml is refused with :class:`~casml.errors.StorageError`.
    Every database failure surfaces as ``StorageError`` naming the URL (password masked) and
    the operation. An ``Index`` is safe to share between threads and survives ``fork``; call
    :meth:`close` when done.
    """

    def __init__(self, url: str, *, echo: bool = False) -> None:
        try:
            parsed = make_url(url)
        except (ArgumentError, ValueError) as exc:
            raise StorageError(
                f"index URL {url!r} is not a SQLAlchemy database URL ({exc}); write e.g. "
                "'sqlite:////abs/path/index.db' or 'postgresql+psycopg://user@host/db'"
            ) from exc
        self._display = parsed.render_as_string(hide_password=True)
        backend = parsed.get_backend_name()
        if backend == "sqlite":
            self._make_sqlite_folder(parsed.database, parsed.query)
        kwargs: dict[str, Any] = {"echo": echo}
        in_memory = backend == "sqlite" and self._sqlite_in_memory(parsed.database, parsed.query)
        # An in-memory database lives in one connection: share it, one operation at a time.
        self._serial: threading.RLock | None = threading.RLock() if in_memory else None
        if in_memory:
            kwargs["poolclass"] = StaticPool
            kwargs["connect_args"] = {"check_same_thread": False}
        elif backend == "sqlite":
            # Each thread keeps one pooled connection for the hot paths; with a bounded
            # overflow, the 16th thread would wait for a connection that never comes back.
            kwargs["max_overflow"] = -1
        else:
            # Servers drop idle connections; test one before handing it out.
            kwargs["pool_pre_ping"] = True
        try:
            engine = create_engine(parsed, **kwargs)
        except (SQLAlchemyError, ImportError) as exc:
            raise StorageError(
                f"cannot open the index database {self._display}: {exc}; install its driver "
                "(casml[postgres] or casml[mysql]) and check the URL"
            ) from exc
        self._engine = engine
        self._dialect = engine.dialect.name
        self._sqlite = self._dialect == "sqlite"
        self._dbapi: Any = engine.dialect.loaded_dbapi
        if self._sqlite:
            event.listen(engine, "connect", _on_sqlite_connect)
        self._local = threading.local()
        self._finalizers: list[weakref.finalize[Any, Any]] = []
        self._lock = threading.Lock()
        self._closed = False
        self._datetime_result = (
            UTCDateTime().dialect_impl(engine.dialect).result_processor(engine.dialect, None)
        )
        ref = weakref.ref(self)

        def forget_after_fork() -> None:
            index = ref()
            if index is not None:
                index._forget_connections()

        if hasattr(os, "register_at_fork"):
            os.register_at_fork(after_in_child=forget_after_fork)
        self._build_statements()
        self._init_schema()

    # ------------------------------------------------------------------ set-up

    @staticmethod
    def _sqlite_in_memory(database: str | None, query: Mapping[str, Any]) -> bool:
        return not database or database == ":memory:" or query.get("mode") == "memory"

    @classmethod
    def _make_sqlite_folder(cls, database: str | None, query: Mapping[str, Any]) -> None:
        if cls._sqlite_in_memory(database, query) or query.get("uri"):
            return
        assert database is not None
        if database.startswith("file:"):
            return
        try:
            Path(database).parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StorageError(
                f"cannot create the folder of the SQLite index {database!r}: {exc}; "
                "choose a writable location"
            ) from exc

    def _build_statements(self) -> None:
        d = self._engine.dialect

        def fast(stmt: ClauseElement) -> _Compiled:
            return _Compiled(stmt, d)

        def fast_ignore(table: Table) -> tuple[_Compiled, _Compiled | None]:
            # (statement, None) where the dialect can skip duplicates in the INSERT itself;
            # else (plain INSERT, primary-key lookup) for a check-then-insert fallback.
            stmt = insert_ignore(table, d.name)
            if stmt is not None:
                return fast(stmt), None
            keys = list(table.primary_key.columns)
            lookup = select(keys[0]).where(and_(*(c == bindparam(c.key) for c in keys)))
            return fast(insert(table)), fast(lookup)

        self._ins_artifact = fast_ignore(artifacts)
        self._ins_blob = fast_ignore(blobs)
        self._ins_link = fast(insert(artifact_blobs))
        self._ins_edge = fast(insert(edges))
        self._ins_name = fast(insert(names))
        upsert = _tag_upsert(d.name)
        self._upsert_tag = fast(upsert) if upsert is not None else None
        self._ins_tag = fast(insert(tags))
        self._del_tag = fast(
            delete(tags).where(
                tags.c.artifact_hash == bindparam("artifact_hash"), tags.c.key == bindparam("key")
            )
        )
        self._sel_exists = fast(select(artifacts.c.hash).where(artifacts.c.hash == bindparam("h")))
        # Both the highest version of the name and this artifact's version under it, if any;
        # two key lookups (primary key, unique key), whatever the number of versions.
        self._sel_name_versions = fast(
            select(
                select(func.max(names.c.version))
                .where(names.c.name == bindparam("n"))
                .scalar_subquery(),
                select(names.c.version)
                .where(names.c.name == bindparam("n"), names.c.artifact_hash == bindparam("h"))
                .scalar_subquery(),
            )
        )
        # The artifact with its most recent naming (outer join: unnamed artifacts too).
        self._sel_info = fast(
            select(
                artifacts.c.class_name,
                artifacts.c.size,
                artifacts.c.created_at,
                names.c.name,
                names.c.version,
            )
            .select_from(artifacts.outerjoin(names, names.c.artifact_hash == artifacts.c.hash))
            .where(artifacts.c.hash == bindparam("h"))
            .order_by(names.c.created_at.desc(), names.c.version.desc(), names.c.name.desc())
            .limit(1)
        )
        # Tags (kind 0) and dependencies (kind 1) of one artifact in one round trip.
        self._sel_tags_deps = fast(
            union_all(
                select(
                    literal_column("0").label("kind"),
                    tags.c.key.label("a"),
                    tags.c.value.label("b"),
                    literal_column("0").label("pos"),
                ).where(tags.c.artifact_hash == bindparam("h")),
                select(
                    literal_column("1"), edges.c.dependency, edges.c.dependency, edges.c.position
                ).where(edges.c.dependent == bindparam("h")),
            )
        )
        self._sel_blobs = fast(
            select(artifact_blobs.c.digest, blobs.c.size)
            .select_from(artifact_blobs.join(blobs, blobs.c.digest == artifact_blobs.c.digest))
            .where(artifact_blobs.c.artifact_hash == bindparam("h"))
            .order_by(artifact_blobs.c.position)
        )
        self._sel_latest = fast(
            select(names.c.artifact_hash)
            .where(names.c.name == bindparam("n"))
            .order_by(names.c.version.desc())
            .limit(1)
        )

    def _init_schema(self) -> None:
        for attempt in range(1, 6):
            try:
                with self._core(write=True) as conn:
                    self._check_schema(conn)
                return
            except StorageError:
                self._engine.dispose()
                raise
            except SQLAlchemyError as exc:
                # Two server sessions creating the tables at once: the loser retries and
                # finds them there. Anything else (unreachable server...) fails at once.
                orig = exc.orig if isinstance(exc, DBAPIError) else exc
                racy = isinstance(orig, (self._dbapi.IntegrityError, self._dbapi.ProgrammingError))
                if self._dialect in _MYSQL and isinstance(orig, self._dbapi.OperationalError):
                    racy = bool(orig.args) and orig.args[0] in _MYSQL_DDL_RACE
                if attempt < 5 and (racy or self._is_transient(exc)):
                    self._backoff(attempt)
                    continue
                self._engine.dispose()
                self._fail("create or check the index tables", exc)

    def _check_schema(self, conn: Connection) -> None:
        if inspect(conn).has_table(schema_info.name):
            stored = self._stored_schema(conn)
            if stored is not None:
                self._compare_schema(stored)
                return
        for table in INDEX_TABLES:
            table.create(conn, checkfirst=True)
        row = {"key": _SCHEMA_KEY, "value": str(SCHEMA_VERSION)}
        stmt = insert_ignore(schema_info, self._dialect)
        if stmt is not None:
            conn.execute(stmt, row)
        elif self._stored_schema(conn) is None:
            conn.execute(insert(schema_info), row)
        # A locking read on MySQL/MariaDB: under REPEATABLE READ a plain SELECT would read this
        # transaction's snapshot, older than the row a concurrent creator just committed.
        stored = self._stored_schema(conn, locking=self._dialect in _MYSQL)
        assert stored is not None
        self._compare_schema(stored)

    @staticmethod
    def _stored_schema(conn: Connection, *, locking: bool = False) -> str | None:
        stmt = select(schema_info.c.value).where(schema_info.c.key == _SCHEMA_KEY)
        if locking:
            stmt = stmt.with_for_update(read=True)
        found = conn.execute(stmt).scalar_one_or_none()
        return None if found is None else str(found)

    def _compare_schema(self, stored: str) -> None:
        try:
            version = int(stored)
        except ValueError:
            raise StorageError(
                f"index database {self._display} records schema version {stored!r}, which "
                "is not a number: its schema_info table is damaged; rebuild the index with "
                "store.reindex() into a fresh database"
            ) from None
        if version > SCHEMA_VERSION:
            raise StorageError(
                f"index database {self._display} has schema version {version}, newer than "
                f"this casml understands ({SCHEMA_VERSION}): upgrade casml "
                "(pip install -U casml) to use it"
            )
        if version < SCHEMA_VERSION:
            raise StorageError(
                f"index database {self._display} has schema version {version}, older than "
                f"this casml's {SCHEMA_VERSION}, and no migration exists: rebuild the index "
                "with store.reindex() into a fresh database"
            )

    # ------------------------------------------------------------------ plumbing

    @property
    def url(self) -> str:
        """The database URL, password masked (safe to print or log)."""
        return self._display

    def close(self) -> None:
        """Close every pooled connection; the Index must not be used afterwards."""
        with self._lock:
            self._closed = True
            finalizers, self._finalizers = self._finalizers, []
        for fin in finalizers:
            fin()
        self._local = threading.local()
        self._engine.dispose()

    def __enter__(self) -> Index:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Index({self._display!r})"

    def _forget_connections(self) -> None:
        """In a forked child: drop the parent's connections without touching them."""
        for fin in self._finalizers:
            fin.detach()
        self._finalizers = []
        self._local = threading.local()
        self._lock = threading.Lock()
        self._engine.dispose(close=False)

    def _fail(self, what: str, exc: BaseException) -> NoReturn:
        detail = exc.orig if isinstance(exc, DBAPIError) and exc.orig is not None else exc
        raise StorageError(
            f"index database {self._display}: could not {what}: {detail}. Check that the "
            "database is reachable and writable, then retry"
        ) from exc

    def _is_transient(self, exc: BaseException) -> bool:
        """Tell whether a failed write lost a race with another writer and may be rerun."""
        orig = exc.orig if isinstance(exc, DBAPIError) else exc
        if self._sqlite:
            # BEGIN IMMEDIATE serializes writers: a conflict there is a real error.
            return False
        if isinstance(orig, self._dbapi.IntegrityError):
            return True
        if not isinstance(orig, self._dbapi.OperationalError):
            return False
        if self._dialect == "postgresql":
            code = getattr(orig, "sqlstate", None) or getattr(orig, "pgcode", None)
            return code in _PG_TRANSIENT
        if self._dialect in _MYSQL:
            args: tuple[Any, ...] = getattr(orig, "args", ())
            return bool(args) and args[0] in _MYSQL_TRANSIENT
        return False

    @staticmethod
    def _backoff(attempt: int) -> None:
        time.sleep(random.uniform(0.0005, 0.003) * min(attempt, 10))

    def _sqlite_slot(self) -> _Slot:
        slot: _Slot | None = getattr(self._local, "slot", None)
        if slot is None:
            if self._closed:
                raise StorageError(f"the index {self._display} is closed; open a new Index")
            slot = _Slot(self._engine.raw_connection())
            with self._lock:
                self._finalizers = [f for f in self._finalizers if f.alive]
                self._finalizers.append(weakref.finalize(slot, _close_quietly, slot.proxy))
            self._local.slot = slot
        return slot

    def _drop_sqlite_slot(self) -> None:
        slot: _Slot | None = getattr(self._local, "slot", None)
        if slot is not None:
            self._local.slot = None
            with suppress(Exception):
                slot.proxy.invalidate()

    def _raw_once(self, write: bool, work: Callable[[_Tx], _T]) -> _T:
        if self._sqlite:
            raw = self._sqlite_slot().raw
            raw.execute("BEGIN IMMEDIATE" if write else "BEGIN")
            try:
                result = work(_Tx(raw.cursor()))
                raw.execute("COMMIT")
            except BaseException:
                try:
                    raw.execute("ROLLBACK")
                except Exception:
                    self._drop_sqlite_slot()
                raise
            return result
        proxy = self._engine.raw_connection()
        try:
            cursor = proxy.cursor()
            try:
                result = work(_Tx(cursor))
            finally:
                cursor.close()
            proxy.commit()
            return result
        except BaseException as exc:
            try:
                proxy.rollback()
            except Exception:
                proxy.invalidate()
            else:
                if isinstance(exc, self._dbapi.Error) and self._engine.dialect.is_disconnect(
                    exc, proxy.dbapi_connection, None
                ):
                    proxy.invalidate()
            raise
        finally:
            proxy.close()

    def _raw(self, what: str, work: Callable[[_Tx], _T], *, write: bool = False) -> _T:
        """Run ``work`` in one transaction on a raw pooled connection; retry lost races."""
        for attempt in range(1, _MAX_ATTEMPTS + 1):
            try:
                if self._serial is None:
                    return self._raw_once(write, work)
                with self._serial:
                    return self._raw_once(write, work)
            except (self._dbapi.Error, SQLAlchemyError) as exc:
                if write and attempt < _MAX_ATTEMPTS and self._is_transient(exc):
                    self._backoff(attempt)
                    continue
                self._fail(what, exc)
        raise AssertionError("unreachable")  # pragma: no cover

    @contextmanager
    def _core(self, *, write: bool = False) -> Iterator[Connection]:
        """Yield a Core connection inside one transaction (IMMEDIATE for SQLite writers)."""
        if self._closed:
            raise StorageError(f"the index {self._display} is closed; open a new Index")
        with self._serial or nullcontext(), self._engine.connect() as conn, conn.begin():
            if self._sqlite:
                conn.exec_driver_sql("BEGIN IMMEDIATE" if write else "BEGIN")
            yield conn

    def _read(self, what: str, work: Callable[[Connection], _T]) -> _T:
        try:
            with self._core() as conn:
                return work(conn)
        except SQLAlchemyError as exc:
            self._fail(what, exc)

    def _write(self, what: str, work: Callable[[Connection], _T]) -> _T:
        for attempt in range(1, _MAX_ATTEMPTS + 1):
            try:
                with self._core(write=True) as conn:
                    return work(conn)
            except SQLAlchemyError as exc:
                if attempt < _MAX_ATTEMPTS and self._is_transient(exc):
                    self._backoff(attempt)
                    continue
                self._fail(what, exc)
        raise AssertionError("unreachable")  # pragma: no cover

    def _aware(self, value: Any) -> datetime:
        """Turn a raw driver value of a timestamp column into an aware UTC datetime."""
        if self._datetime_result is not None:
            value = self._datetime_result(value)
        assert isinstance(value, datetime)
        return _utc(value)

    @staticmethod
    def _insert_ignoring(
        tx: _Tx, stmts: tuple[_Compiled, _Compiled | None], rows: Sequence[Mapping[str, Any]]
    ) -> int:
        """Insert ``rows`` skipping existing keys; return the number inserted (single row)."""
        stmt, lookup = stmts
        if lookup is None:
            if len(rows) == 1:
                return int(tx.run(stmt, rows[0]).rowcount)
            tx.many(stmt, rows)
            return -1
        added = 0
        for row in rows:
            if tx.run(lookup, row).fetchone() is None:
                tx.run(stmt, row)
                added += 1
        return added

    # ------------------------------------------------------------------ writes

    def add(
        self,
        record: ArtifactRecord,
        *,
        name: str | None = None,
        tags: Mapping[str, str] | None = None,
    ) -> ArtifactInfo:
        """Record an artifact (idempotent), optionally naming it and setting tags.

        The same record again changes nothing. With ``name``: an artifact already holding a
        version of that name keeps it; otherwise it becomes version max+1 (1 for a new
        name), unique and gap-free even with concurrent writers. ``tags`` are upserted: a
        new value for an existing key replaces it. Returns the artifact's info, carrying
        the name/version just assigned or found.
        """
        h = _check_hash(record.hash, "artifact hash")
        _check_text(record.class_name, "class name", CLASS_NAME_LENGTH)
        if record.kind not in _KINDS:
            raise StorageError(
                f"artifact kind must be 'value' or 'persistable', got {record.kind!r}"
            )
        if not isinstance(record.size, int) or record.size < 0:
            raise StorageError(f"artifact size must be an int >= 0, got {record.size!r}")
        if name is not None:
            _check_text(name, "name", NAME_LENGTH)
        tag_rows = [
            {
                "artifact_hash": h,
                "key": _check_text(k, "tag key", TAG_KEY_LENGTH),
                "value": _check_text(v, f"value of tag {k!r}", TAG_VALUE_LENGTH),
            }
            for k, v in (tags or {}).items()
        ]
        blob_list = [(_check_hash(d, "blob digest"), int(s)) for d, s in record.blobs]
        deps = list(dict.fromkeys(_check_hash(d, "dependency hash") for d in record.dependencies))
        row = {
            "hash": h,
            "class_name": record.class_name,
            "kind": record.kind,
            "size": record.size,
            "created_at": _utc(record.created_at),
        }

        def work(tx: _Tx) -> ArtifactInfo:
            return self._add_in(tx, row, blob_list, deps, name, tag_rows)

        return self._raw(f"add artifact {h}", work, write=True)

    def _add_in(
        self,
        tx: _Tx,
        row: dict[str, Any],
        blob_list: list[tuple[str, int]],
        deps: list[str],
        name: str | None,
        tag_rows: list[dict[str, Any]],
    ) -> ArtifactInfo:
        h: str = row["hash"]
        new = self._insert_ignoring(tx, self._ins_artifact, [row]) == 1
        if new:
            # Links and edges are written with the artifact row and only then: a repeated
            # add must not duplicate them.
            if blob_list:
                # Sorted: two server sessions inserting shared digests in one order cannot
                # deadlock on each other's uncommitted rows.
                sizes = sorted(dict(blob_list).items())
                self._insert_ignoring(
                    tx, self._ins_blob, [{"digest": d, "size": s} for d, s in sizes]
                )
                tx.many(
                    self._ins_link,
                    [
                        {"artifact_hash": h, "position": i, "digest": d}
                        for i, (d, _) in enumerate(blob_list)
                    ],
                )
            if deps:
                tx.many(
                    self._ins_edge,
                    [{"dependent": h, "dependency": d, "position": i} for i, d in enumerate(deps)],
                )
        version: int | None = None
        if name is not None:
            top, mine = tx.run(self._sel_name_versions, {"h": h, "n": name}).fetchone()
            if mine is not None:
                version = int(mine)
            else:
                version = int(top or 0) + 1
                # A concurrent server session taking the same version makes this INSERT
                # fail on the (name, version) key; _raw rolls back and reruns the add.
                tx.run(
                    self._ins_name,
                    {
                        "name": name,
                        "version": version,
                        "artifact_hash": h,
                        "created_at": datetime.now(timezone.utc),
                    },
                )
        if tag_rows:
            if self._upsert_tag is not None:
                tx.many(self._upsert_tag, tag_rows)
            else:
                for tag_row in tag_rows:
                    tx.run(self._del_tag, tag_row)
                tx.many(self._ins_tag, tag_rows)
        if new:
            return ArtifactInfo(
                hash=h,
                class_name=row["class_name"],
                name=name,
                version=version,
                size=row["size"],
                created_at=row["created_at"],
                tags={r["key"]: r["value"] for r in tag_rows},
                dependencies=tuple(deps),
            )
        info = self._info_in(tx, h)
        assert info is not None  # found by the INSERT in this very transaction
        if name is not None:
            info = replace(info, name=name, version=version)
        return info

    def delete(self, hash: str) -> bool:
        """Remove an artifact's row, blob links, names, tags and outgoing edges.

        Returns True if the artifact was indexed. Blob rows stay (other artifacts may share
        them; see :meth:`referenced_digests`), and so do edges *into* it from dependents.
        """

        def work(conn: Connection) -> bool:
            conn.execute(delete(artifact_blobs).where(artifact_blobs.c.artifact_hash == hash))
            conn.execute(delete(edges).where(edges.c.dependent == hash))
            conn.execute(delete(names).where(names.c.artifact_hash == hash))
            conn.execute(delete(tags).where(tags.c.artifact_hash == hash))
            return conn.execute(delete(artifacts).where(artifacts.c.hash == hash)).rowcount > 0

        return self._write(f"delete artifact {hash}", work)

    # ------------------------------------------------------------------ reads

    def contains(self, hash: str) -> bool:
        """Tell whether an artifact with exactly this hash is indexed."""

        def work(tx: _Tx) -> bool:
            return tx.run(self._sel_exists, {"h": hash}).fetchone() is not None

        return self._raw(f"look up artifact {hash}", work)

    def missing(self, hashes: Iterable[str]) -> set[str]:
        """Return those of ``hashes`` that are not indexed."""
        wanted = list(dict.fromkeys(hashes))

        def work(conn: Connection) -> set[str]:
            found: set[str] = set()
            for chunk in _chunks(wanted):
                stmt = select(artifacts.c.hash).where(artifacts.c.hash.in_(chunk))
                found.update(conn.execute(stmt).scalars())
            return found

        return set(wanted) - self._read("look up artifacts", work)

    def match_prefix(self, prefix: str, limit: int = 2) -> list[str]:
        """Return up to ``limit`` indexed hashes starting with ``prefix``, sorted.

        A prefix that is not lowercase hex matches nothing. Ask for ``limit=2`` to tell a
        unique prefix from an ambiguous one.
        """
        if len(prefix) > HASH_LENGTH or any(c not in _HEX_DIGITS for c in prefix):
            return []
        # A range on the primary key rather than LIKE: every backend serves it from the key.
        stmt = select(artifacts.c.hash).where(artifacts.c.hash >= prefix)
        upper = _next_hex_prefix(prefix)
        if upper is not None:
            stmt = stmt.where(artifacts.c.hash < upper)
        stmt = stmt.order_by(artifacts.c.hash).limit(limit)
        return self._read(
            f"look up hash prefix {prefix!r}", lambda conn: list(conn.execute(stmt).scalars())
        )

    def info(self, hash: str) -> ArtifactInfo:
        """Return what the index knows about one artifact.

        ``name``/``version`` are those of its most recent naming (None if never named).
        Raises :class:`~casml.errors.NotFoundError` if the hash is not indexed.
        """
        info = self._raw(f"read artifact {hash}", lambda tx: self._info_in(tx, hash))
        if info is None:
            raise NotFoundError(
                f"no artifact {hash} in the index {self._display}; check the hash "
                "(store.find() lists what is there)"
            )
        return info

    def _info_in(self, tx: _Tx, h: str) -> ArtifactInfo | None:
        row = tx.run(self._sel_info, {"h": h}).fetchone()
        if row is None:
            return None
        class_name, size, created_at, name, version = row
        tag_map: dict[str, str] = {}
        deps: list[tuple[int, str]] = []
        for kind, a, b, pos in tx.run(self._sel_tags_deps, {"h": h}).fetchall():
            if int(kind) == 0:
                tag_map[a] = b
            else:
                deps.append((int(pos), a))
        deps.sort()
        return ArtifactInfo(
            hash=h,
            class_name=class_name,
            name=name,
            version=None if version is None else int(version),
            size=int(size),
            created_at=self._aware(created_at),
            tags=tag_map,
            dependencies=tuple(d for _, d in deps),
        )

    def blobs_of(self, hash: str) -> list[tuple[str, int]]:
        """Return ``(digest, size)`` of an artifact's blobs in payload order (empty if none)."""

        def work(tx: _Tx) -> list[tuple[str, int]]:
            return [(str(d), int(s)) for d, s in tx.run(self._sel_blobs, {"h": hash}).fetchall()]

        return self._raw(f"read the blobs of {hash}", work)

    def latest(self, name: str) -> str:
        """Return the hash of the highest version of ``name``.

        Raises :class:`~casml.errors.NotFoundError` naming ``name`` if nothing carries it.
        """

        def work(tx: _Tx) -> Any:
            return tx.run(self._sel_latest, {"n": name}).fetchone()

        found = self._raw(f"look up name {name!r}", work)
        if found is None:
            raise NotFoundError(
                f"no artifact is named {name!r} in the index {self._display}; "
                "store.find() lists the names in use"
            )
        return str(found[0])

    def find(
        self,
        name: str | None = None,
        class_name: str | None = None,
        tags: Mapping[str, str] | None = None,
    ) -> list[ArtifactInfo]:
        """Return the artifacts matching every filter given, newest first.

        With ``name``: one entry per version of that name, highest version first, each
        carrying that name and version. Without: one entry per artifact, most recently
        created first (ties by hash), carrying its most recent naming. ``tags`` must all
        match exactly.
        """
        return self._select_infos(name, class_name, tags, newest_first=True)

    def versions(self, name: str) -> list[ArtifactInfo]:
        """Return every version of ``name``, oldest (version 1) first; empty if unknown."""
        return self._select_infos(name, None, None, newest_first=False)

    def _select_infos(
        self,
        name: str | None,
        class_name: str | None,
        tag_filter: Mapping[str, str] | None,
        *,
        newest_first: bool,
    ) -> list[ArtifactInfo]:
        a = artifacts.c
        stmt: Select[Unpack[tuple[Any, ...]]]
        if name is not None:
            stmt = (
                select(a.hash, a.class_name, a.size, a.created_at, names.c.name, names.c.version)
                .select_from(artifacts.join(names, names.c.artifact_hash == a.hash))
                .where(names.c.name == name)
                .order_by(names.c.version.desc() if newest_first else names.c.version)
            )
        else:
            stmt = select(a.hash, a.class_name, a.size, a.created_at).order_by(
                a.created_at.desc(), a.hash.desc()
            )
        if class_name is not None:
            stmt = stmt.where(a.class_name == class_name)
        for key, value in (tag_filter or {}).items():
            stmt = stmt.where(
                exists().where(
                    tags.c.artifact_hash == a.hash, tags.c.key == key, tags.c.value == value
                )
            )

        def work(conn: Connection) -> list[ArtifactInfo]:
            rows: list[Row[Unpack[tuple[Any, ...]]]] = list(conn.execute(stmt))
            hashes = list(dict.fromkeys(str(r[0]) for r in rows))
            tag_maps = self._tags_of(conn, hashes)
            dep_lists = self._deps_of(conn, hashes)
            namings = {} if name is not None else self._latest_namings(conn, hashes)
            out: list[ArtifactInfo] = []
            for r in rows:
                h = str(r[0])
                row_name: str | None
                row_version: int | None
                if name is not None:
                    row_name, row_version = r[4], int(r[5])
                else:
                    row_name, row_version = namings.get(h, (None, None))
                out.append(
                    ArtifactInfo(
                        hash=h,
                        class_name=r[1],
                        name=row_name,
                        version=row_version,
                        size=int(r[2]),
                        created_at=_utc(r[3]),
                        tags=tag_maps.get(h, {}),
                        dependencies=dep_lists.get(h, ()),
                    )
                )
            return out

        return self._read("query artifacts", work)

    @staticmethod
    def _tags_of(conn: Connection, hashes: list[str]) -> dict[str, dict[str, str]]:
        out: dict[str, dict[str, str]] = {}
        for chunk in _chunks(hashes):
            stmt = select(tags.c.artifact_hash, tags.c.key, tags.c.value).where(
                tags.c.artifact_hash.in_(chunk)
            )
            for h, k, v in conn.execute(stmt):
                out.setdefault(h, {})[k] = v
        return out

    @staticmethod
    def _deps_of(conn: Connection, hashes: list[str]) -> dict[str, tuple[str, ...]]:
        found: dict[str, list[tuple[int, str]]] = {}
        for chunk in _chunks(hashes):
            stmt = select(edges.c.dependent, edges.c.position, edges.c.dependency).where(
                edges.c.dependent.in_(chunk)
            )
            for h, pos, dep in conn.execute(stmt):
                found.setdefault(h, []).append((int(pos), dep))
        return {h: tuple(d for _, d in sorted(pairs)) for h, pairs in found.items()}

    @staticmethod
    def _latest_namings(
        conn: Connection, hashes: list[str]
    ) -> dict[str, tuple[str | None, int | None]]:
        best: dict[str, tuple[datetime, int, str]] = {}
        for chunk in _chunks(hashes):
            stmt = select(
                names.c.artifact_hash, names.c.created_at, names.c.version, names.c.name
            ).where(names.c.artifact_hash.in_(chunk))
            for h, created, version, name in conn.execute(stmt):
                # Same order as info(): newest naming, then highest version, then name.
                key = (_utc(created), int(version), str(name))
                if h not in best or key > best[h]:
                    best[h] = key
        return {h: (k[2], k[1]) for h, k in best.items()}

    def dependencies(self, hash: str) -> list[str]:
        """Return the hashes ``hash`` references directly, in recorded order."""
        stmt = select(edges.c.dependency).where(edges.c.dependent == hash)
        stmt = stmt.order_by(edges.c.position)
        return self._read(
            f"read the dependencies of {hash}", lambda conn: list(conn.execute(stmt).scalars())
        )

    def dependents(self, hash: str) -> list[str]:
        """Return the hashes of the artifacts that reference ``hash`` directly, sorted."""
        stmt = select(edges.c.dependent).where(edges.c.dependency == hash)
        stmt = stmt.order_by(edges.c.dependent)
        return self._read(
            f"read the dependents of {hash}", lambda conn: list(conn.execute(stmt).scalars())
        )

    def referenced_digests(self) -> set[str]:
        """Return every blob digest that an indexed artifact still links to."""
        stmt = select(artifact_blobs.c.digest).distinct()
        return self._read(
            "list referenced blobs", lambda conn: {str(d) for d in conn.execute(stmt).scalars()}
        )

    def count(self) -> int:
        """Return the number of indexed artifacts."""
        stmt = select(func.count()).select_from(artifacts)
        return self._read("count artifacts", lambda conn: int(conn.execute(stmt).scalar_one()))

    # ------------------------------------------------------------------ leases

    def claim_lease(self, hash: str, owner: str, seconds: float) -> bool:
        """Claim the right to build ``hash`` for ``seconds``; False if another owner holds it.

        A lease held by ``owner`` is renewed; an expired lease of anyone is taken over. The
        claim is one conditional statement, so two claimers can never both win.
        """
        h = _check_hash(hash, "artifact hash")
        now = datetime.now(timezone.utc)
        expires = datetime.fromtimestamp(now.timestamp() + seconds, timezone.utc)

        def work(conn: Connection) -> bool:
            taken = conn.execute(
                update(leases)
                .where(leases.c.artifact_hash == h)
                .where((leases.c.owner == owner) | (leases.c.expires_at < now))
                .values(owner=owner, expires_at=expires)
            ).rowcount
            if taken:
                return True
            if conn.execute(select(leases.c.owner).where(leases.c.artifact_hash == h)).first():
                return False
            conn.execute(insert(leases).values(artifact_hash=h, owner=owner, expires_at=expires))
            return True

        try:
            return self._write("claim a build lease", work)
        except StorageError as exc:
            # Two first claimers inserting at once: the loser's retry found the winner's row
            # only if the insert conflict was retried; otherwise report not claimed.
            if isinstance(exc.__cause__, SQLAlchemyError):
                orig = getattr(exc.__cause__, "orig", None)
                if isinstance(orig, self._dbapi.IntegrityError):
                    return False
            raise

    def release_lease(self, hash: str, owner: str) -> None:
        """Give up ``owner``'s lease on ``hash`` (nothing happens if it is not theirs)."""
        h = _check_hash(hash, "artifact hash")
        self._write(
            "release a build lease",
            lambda conn: conn.execute(
                delete(leases).where(leases.c.artifact_hash == h).where(leases.c.owner == owner)
            ),
        )

    def lease_holder(self, hash: str) -> tuple[str, datetime] | None:
        """The current owner of ``hash``'s lease and when it expires, or None."""
        h = _check_hash(hash, "artifact hash")

        def work(conn: Connection) -> tuple[str, datetime] | None:
            row = conn.execute(
                select(leases.c.owner, leases.c.expires_at).where(leases.c.artifact_hash == h)
            ).first()
            return None if row is None else (str(row[0]), _utc(row[1]))

        return self._read("read a build lease", work)
