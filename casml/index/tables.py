"""SQLModel table classes of the metadata index: one class per table, typed, portable.

Use these classes through :class:`casml.index.Index`; nothing else should write the tables.
They live in their own SQLAlchemy registry (``INDEX_METADATA``) so that an application which
defines its own SQLModel tables (a ``tags`` table, say) never collides with casml's.

Portability notes (SQLite, PostgreSQL, MySQL/MariaDB):

- every string column has an explicit length, because MySQL's VARCHAR requires one;
- names and tag keys/values use a binary collation on MySQL so that they compare literally
  (the default ``*_ci`` collations would make ``"Model"`` and ``"model"`` one name);
- byte sizes are ``BIGINT``;
- on SQLite the tables are ``WITHOUT ROWID`` (clustered on their primary key);
- timestamps go through :class:`UTCDateTime`, which stores UTC with microseconds everywhere
  and always hands back timezone-aware UTC datetimes.
"""

from datetime import datetime, timezone
from typing import Any

from sqlalchemy import (
    BigInteger,
    DateTime,
    ForeignKeyConstraint,
    Index,
    Integer,
    PrimaryKeyConstraint,
    String,
    Table,
    UniqueConstraint,
)
from sqlalchemy.dialects import mysql
from sqlalchemy.engine import Dialect
from sqlalchemy.orm import registry
from sqlalchemy.types import TypeDecorator, TypeEngine
from sqlmodel import Field, SQLModel

__all__ = [
    "HASH_LENGTH",
    "INDEX_METADATA",
    "INDEX_TABLES",
    "NAME_LENGTH",
    "TAG_KEY_LENGTH",
    "TAG_VALUE_LENGTH",
    "ArtifactBlobRow",
    "ArtifactRow",
    "BlobRow",
    "EdgeRow",
    "NameRow",
    "SchemaInfoRow",
    "TagRow",
    "UTCDateTime",
]

HASH_LENGTH = 32
NAME_LENGTH = 255
TAG_KEY_LENGTH = 255
TAG_VALUE_LENGTH = 1024
CLASS_NAME_LENGTH = 255
KIND_LENGTH = 16
SCHEMA_KEY_LENGTH = 64
SCHEMA_VALUE_LENGTH = 255

_MYSQL = ("mysql", "mariadb")
# Every key here is text: SQLite then keeps each row once, in its primary-key B-tree, instead
# of a rowid table plus a separate key index (half the pages written per insert).
_SQLITE_OPTIONS: dict[str, Any] = {"sqlite_with_rowid": False}


def _literal_string(length: int) -> TypeEngine[str]:
    """Return a VARCHAR(length) that compares byte-for-byte on MySQL/MariaDB too."""
    return String(length).with_variant(
        mysql.VARCHAR(length, charset="utf8mb4", collation="utf8mb4_bin"), *_MYSQL
    )


def _hash_string() -> TypeEngine[str]:
    """Return the column type of a 32-hex-character hash or digest."""
    # ascii_bin keeps MySQL keys 32 bytes wide instead of 128 (utf8mb4).
    return String(HASH_LENGTH).with_variant(
        mysql.VARCHAR(HASH_LENGTH, charset="ascii", collation="ascii_bin"), *_MYSQL
    )


class UTCDateTime(TypeDecorator[datetime]):
    """Store a datetime as UTC with microseconds; always return it timezone-aware in UTC.

    A naive datetime given to the database is taken to be UTC already. SQLite and MySQL have
    no time zone in their column types and hand back naive values, which get UTC attached;
    PostgreSQL's ``timestamptz`` returns the session's zone, which gets converted to UTC.
    """

    impl = DateTime(timezone=True)
    cache_ok = True

    def load_dialect_impl(self, dialect: Dialect) -> TypeEngine[Any]:
        """Pick DATETIME(6) on MySQL/MariaDB (plain DATETIME drops microseconds)."""
        if dialect.name in _MYSQL:
            return dialect.type_descriptor(mysql.DATETIME(fsp=6))
        return dialect.type_descriptor(DateTime(timezone=True))

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        """Convert to UTC; keep the zone only where the column type can hold it."""
        if value is None:
            return None
        if value.tzinfo is None:
            value = value.replace(tzinfo=timezone.utc)
        else:
            value = value.astimezone(timezone.utc)
        if dialect.name == "postgresql":
            return value
        return value.replace(tzinfo=None)

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        """Return an aware UTC datetime whatever the driver produced."""
        if value is None:
            return None
        if value.tzinfo is None:
            return value.replace(tzinfo=timezone.utc)
        return value.astimezone(timezone.utc)


class _IndexTable(SQLModel, registry=registry()):
    """Base of casml's tables: a registry of their own, apart from ``SQLModel.metadata``."""


class ArtifactRow(_IndexTable, table=True):
    """One stored artifact, keyed by its address (the hash ``store.get`` takes).

    ``kind`` is ``"value"`` for a plain value, ``"persistable"`` for a Persistable; ``size``
    is the logical payload size in bytes, before deduplication.
    """

    __tablename__ = "artifacts"
    __table_args__ = (_SQLITE_OPTIONS,)

    hash: str = Field(sa_type=_hash_string(), primary_key=True)
    class_name: str = Field(sa_type=_literal_string(CLASS_NAME_LENGTH), index=True)
    kind: str = Field(sa_type=String(KIND_LENGTH))
    size: int = Field(sa_type=BigInteger)
    created_at: datetime = Field(sa_type=UTCDateTime)


class BlobRow(_IndexTable, table=True):
    """One content-addressed blob, keyed by the xxh3-128 digest of its bytes."""

    __tablename__ = "blobs"
    __table_args__ = (_SQLITE_OPTIONS,)

    digest: str = Field(sa_type=_hash_string(), primary_key=True)
    size: int = Field(sa_type=BigInteger)


class ArtifactBlobRow(_IndexTable, table=True):
    """The ordered blob list of an artifact: its ``position``-th payload blob is ``digest``.

    One digest may appear at several positions (an artifact holding two equal buffers).
    """

    __tablename__ = "artifact_blobs"
    __table_args__ = (
        PrimaryKeyConstraint("artifact_hash", "position"),
        ForeignKeyConstraint(["artifact_hash"], ["artifacts.hash"]),
        ForeignKeyConstraint(["digest"], ["blobs.digest"]),
        _SQLITE_OPTIONS,
    )

    artifact_hash: str = Field(sa_type=_hash_string())
    position: int = Field(sa_type=Integer, sa_column_kwargs={"autoincrement": False})
    digest: str = Field(sa_type=_hash_string(), index=True)


class EdgeRow(_IndexTable, table=True):
    """A dependency edge: artifact ``dependent`` references artifact ``dependency``.

    ``position`` keeps the order in which the dependent recorded its dependencies. The
    dependency has no foreign key: it may be indexed later (a pull, a reindex) or be gone.
    """

    __tablename__ = "edges"
    __table_args__ = (
        PrimaryKeyConstraint("dependent", "dependency"),
        ForeignKeyConstraint(["dependent"], ["artifacts.hash"]),
        _SQLITE_OPTIONS,
    )

    dependent: str = Field(sa_type=_hash_string())
    dependency: str = Field(sa_type=_hash_string(), index=True)
    position: int = Field(sa_type=Integer)


class NameRow(_IndexTable, table=True):
    """A naming: ``version`` number ``version`` of ``name`` is artifact ``artifact_hash``.

    Versions of one name count 1, 2, 3... and an artifact holds at most one version per name.
    """

    __tablename__ = "names"
    __table_args__ = (
        PrimaryKeyConstraint("name", "version"),
        UniqueConstraint("name", "artifact_hash", name="uq_names_name_artifact"),
        ForeignKeyConstraint(["artifact_hash"], ["artifacts.hash"]),
        _SQLITE_OPTIONS,
    )

    name: str = Field(sa_type=_literal_string(NAME_LENGTH))
    version: int = Field(sa_type=Integer, sa_column_kwargs={"autoincrement": False})
    artifact_hash: str = Field(sa_type=_hash_string(), index=True)
    created_at: datetime = Field(sa_type=UTCDateTime)


class TagRow(_IndexTable, table=True):
    """A tag ``key=value`` on an artifact; one value per key."""

    __tablename__ = "tags"
    __table_args__ = (
        PrimaryKeyConstraint("artifact_hash", "key"),
        ForeignKeyConstraint(["artifact_hash"], ["artifacts.hash"]),
        # InnoDB caps index keys at 3072 bytes: index a prefix of the value there.
        Index("ix_tags_key_value", "key", "value", mysql_length={"value": 255}),
        _SQLITE_OPTIONS,
    )

    artifact_hash: str = Field(sa_type=_hash_string())
    key: str = Field(sa_type=_literal_string(TAG_KEY_LENGTH))
    value: str = Field(sa_type=_literal_string(TAG_VALUE_LENGTH))


class LeaseRow(_IndexTable, table=True):
    """A builder's claim on an artifact address while it builds it; expires unless renewed."""

    __tablename__ = "leases"
    __table_args__ = (_SQLITE_OPTIONS,)

    artifact_hash: str = Field(sa_type=_hash_string(), primary_key=True)
    owner: str = Field(sa_type=String(64))
    expires_at: datetime = Field(sa_type=UTCDateTime)


class SchemaInfoRow(_IndexTable, table=True):
    """Key/value facts about the database itself, such as ``schema_version``."""

    __tablename__ = "schema_info"
    __table_args__ = (_SQLITE_OPTIONS,)

    key: str = Field(sa_type=String(SCHEMA_KEY_LENGTH), primary_key=True)
    value: str = Field(sa_type=String(SCHEMA_VALUE_LENGTH))


def _table(model: type[SQLModel]) -> Table:
    table = model.__table__  # type: ignore[attr-defined]
    assert isinstance(table, Table)
    return table


artifacts = _table(ArtifactRow)
blobs = _table(BlobRow)
artifact_blobs = _table(ArtifactBlobRow)
edges = _table(EdgeRow)
names = _table(NameRow)
tags = _table(TagRow)
schema_info = _table(SchemaInfoRow)
leases = _table(LeaseRow)

#: Every table of the index, parents before children (the order ``create_all`` needs).
INDEX_TABLES: tuple[Table, ...] = (
    artifacts,
    blobs,
    artifact_blobs,
    edges,
    names,
    tags,
    leases,
    schema_info,
)
INDEX_METADATA = _IndexTable.metadata
