"""Store immutable byte objects and manifests, content-addressed, behind fsspec.

This layer knows nothing of SQL or of what the bytes mean. Under a root (a local folder,
``memory://...``, ``s3://bucket/prefix``, any fsspec URL) it keeps::

    objects/<2 hex>/<30 hex>     blobs, keyed by the xxh3-128 hex digest of their bytes
    manifests/<2 hex>/<30 hex>   opaque immutable documents keyed by an artifact address

Writes are atomic and create-only. On a local disk a blob is written to a temporary file
(``.<name>.<random>.tmp``) in its final directory and then hard-linked into place, so a reader
never sees a partial object, two writers of one blob both succeed with one copy remaining, and
the first writer of a manifest wins. Other backends write whole objects with
``fs.pipe_file`` (object stores publish an object atomically); see :meth:`BlobStore._put_generic`.

On S3 (s3fs) every write is a conditional PUT (``If-None-Match: *``), so the first writer of
a key wins there too; existence is checked with one HEAD, or one listing per prefix directory
for a batch (:meth:`BlobStore.missing`); chunks move with several requests in flight; and
transient failures (timeouts, dropped connections, throttling, 5xx) are retried a bounded
number of times with exponential backoff.

Every read of a blob re-hashes its bytes and raises :class:`~casml.errors.IntegrityError` on a
mismatch. Every key is validated before a path is built, so hostile input never reaches the
filesystem.
"""

from __future__ import annotations

import contextlib
import errno
import inspect
import os
import random
import re
import secrets
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any, TypeVar

import fsspec
import fsspec.core
import msgpack
import xxhash
from fsspec.implementations.local import LocalFileSystem
from fsspec.implementations.memory import MemoryFileSystem

from casml.errors import (
    CasmlError,
    IntegrityError,
    InvalidHashError,
    NotFoundError,
    StorageError,
)

__all__ = [
    "DEFAULT_CHUNK_SIZE",
    "BlobStore",
    "WriteStats",
    "digest_of",
    "is_digest",
]

DEFAULT_CHUNK_SIZE = 4 * 1024 * 1024
"""Size of the pieces :meth:`BlobStore.put_chunked` cuts a large buffer into."""

OBJECTS_DIR = "objects"
MANIFESTS_DIR = "manifests"
RECORDS_DIR = "records"
PACKS_DIR = "packs"
TOMBSTONES_DIR = "tombstones"
# Packs re-listed at most this often when a put only checks for an existing manifest.
_PACK_RELIST_SECONDS = 1.0
_PACK_CACHE = 8
TEMP_SUFFIX = ".tmp"

_DIGEST_RE = re.compile(r"[0-9a-f]{32}")
_PREFIX_RE = re.compile(r"[0-9a-f]{2,32}")
_HEX2_RE = re.compile(r"[0-9a-f]{2}")
_HEX30_RE = re.compile(r"[0-9a-f]{30}")

# Linux caps a single write()/read() at 0x7ffff000 bytes; stay below it on every OS.
_MAX_IO = 1 << 30
_O_BINARY: int = getattr(os, "O_BINARY", 0)
# xxhash keeps the GIL while hashing but file and network I/O release it, so a couple of
# threads overlap one chunk's hashing with another's write; more threads only add contention.
_DEFAULT_WORKERS = max(1, min(4, os.cpu_count() or 1))
# Remote stores: each request waits mostly on the network and the server, so more requests in
# flight pay off; past 8 a 2-core SeaweedFS gains nothing and real S3 little per client.
_REMOTE_WORKERS = 8

_S3_PROTOCOLS = frozenset({"s3", "s3a"})
# Below this size an S3 object is written with a conditional PUT straight away (a 412 means
# "already there"), saving the HEAD request; above it, a HEAD first avoids re-sending the bytes.
_CONDITIONAL_PUT_LIMIT = 256 * 1024
# Transient failures of a remote store (timeouts, dropped connections, 5xx): retried this many
# times in all, waiting 0.1, 0.2, 0.4... s with jitter, at most _RETRY_MAX_WAIT each.
_RETRY_ATTEMPTS = 3
_RETRY_FIRST_WAIT = 0.1
_RETRY_MAX_WAIT = 2.0
_TRANSIENT_ERRNOS = frozenset(
    getattr(errno, name)
    for name in (
        "EIO",
        "EREMOTEIO",
        "EAGAIN",
        "EBUSY",
        "ETIMEDOUT",
        "ECONNRESET",
        "ECONNREFUSED",
        "ECONNABORTED",
        "EPIPE",
        "ENETUNREACH",
        "EHOSTUNREACH",
    )
    if hasattr(errno, name)
)
# Exception classes of botocore, aiohttp and fsspec that mean "try again"; matched by name
# (anywhere in the class hierarchy) so that none of those libraries has to be imported here.
_TRANSIENT_CLASS_NAMES = frozenset(
    {
        "HTTPClientError",
        "EndpointConnectionError",
        "ConnectionClosedError",
        "ReadTimeoutError",
        "ConnectTimeoutError",
        "IncompleteReadError",
        "ResponseStreamingError",
        "ClientPayloadError",
        "ClientConnectionError",
        "ServerDisconnectedError",
        "FSTimeoutError",
    }
)
_TRANSIENT_S3_CODES = frozenset(
    {
        "SlowDown",
        "Throttling",
        "ThrottlingException",
        "RequestTimeout",
        "RequestTimeTooSkewed",
        "InternalError",
        "ServiceUnavailable",
        "503",
        "500",
    }
)

_T = TypeVar("_T")
_R = TypeVar("_R")


def is_digest(s: object) -> bool:
    """Return True if ``s`` is a digest or address: exactly 32 lowercase hex characters."""
    return isinstance(s, str) and _DIGEST_RE.fullmatch(s) is not None


def digest_of(data: bytes | bytearray | memoryview) -> str:
    """Return the blob key of ``data``: the xxh3-128 hex digest of its exact bytes."""
    return xxhash.xxh3_128_hexdigest(data)


def _require_digest(value: object, what: str = "blob digest") -> str:
    if not is_digest(value):
        shown = repr(value)
        if len(shown) > 80:
            shown = shown[:77] + "..."
        raise InvalidHashError(
            f"{shown} is not a valid {what}: expected exactly 32 lowercase hex characters "
            "(an xxh3-128 hex digest); pass the full hash as casml returned it"
        )
    assert isinstance(value, str)
    return value


def _byte_view(data: bytes | bytearray | memoryview, what: str) -> memoryview:
    """Return a flat unsigned-byte view of ``data`` without copying it."""
    view = data if isinstance(data, memoryview) else memoryview(data)
    if view.ndim == 1 and view.format == "B":
        return view
    if not view.c_contiguous:
        raise CasmlError(
            f"the {what} buffer is not C-contiguous, so its bytes cannot be viewed without a "
            "copy; pass a contiguous buffer (for a Fortran-ordered numpy array, pass arr.T)"
        )
    return view.cast("B")


@dataclass(frozen=True)
class WriteStats:
    """Count what this BlobStore wrote, cumulatively since it was created.

    ``objects_written``/``bytes_written`` count blobs this store actually wrote (a blob that
    already existed counts nothing); ``manifests_written``/``manifest_bytes_written`` count
    manifests this store created. :attr:`BlobStore.stats` returns a snapshot, so two
    snapshots compare equal exactly when nothing was written in between.
    """

    objects_written: int = 0
    bytes_written: int = 0
    manifests_written: int = 0
    manifest_bytes_written: int = 0


class BlobStore:
    """Keep content-addressed blobs and create-only manifests under one fsspec root.

    Build one with :meth:`from_url` (``"/some/folder"``, ``"memory://name"``,
    ``"s3://bucket/prefix"``) or from an existing filesystem object. Nothing is created on disk
    until the first write. Instances are safe to share between threads.
    """

    def __init__(
        self,
        fs: fsspec.AbstractFileSystem,
        root: str,
        *,
        chunk_size: int = DEFAULT_CHUNK_SIZE,
        fsync: bool = False,
        workers: int | None = None,
    ) -> None:
        """Open the store rooted at ``root`` on ``fs``; ``workers`` caps the I/O threads."""
        if not isinstance(chunk_size, int) or chunk_size <= 0:
            raise CasmlError(f"chunk_size must be a positive int, got {chunk_size!r}")
        if workers is not None and workers < 1:
            raise CasmlError(f"workers must be at least 1, got {workers!r}")
        self.fs = fs
        self.chunk_size = chunk_size
        self.fsync = fsync
        self._local = isinstance(fs, LocalFileSystem)
        self._memory = isinstance(fs, MemoryFileSystem)
        protocols = fs.protocol if isinstance(fs.protocol, (tuple, list)) else (fs.protocol,)
        # s3fs: HEAD and conditional PUT through its client, single-request GETs.
        self._s3 = (
            not self._local
            and bool(_S3_PROTOCOLS.intersection(protocols))
            and hasattr(fs, "call_s3")
            and hasattr(fs, "split_path")
        )
        remote = not (self._local or self._memory)
        self.workers = workers or (_REMOTE_WORKERS if remote else _DEFAULT_WORKERS)
        stripped = fs._strip_protocol(root)
        if self._local:
            stripped = os.path.abspath(os.path.expanduser(stripped))
        # "/" (a filesystem root) must survive the trailing-slash strip.
        self.root: str = stripped.rstrip("/") or stripped
        self._base = self.root if self.root.endswith("/") else self.root + "/"
        self._lock = threading.Lock()
        self._stats = WriteStats()
        # Which manifests live in packs: learnt from listings, refreshed on misses.
        self._packed: dict[str, str] = {}
        self._pack_keys: set[str] = set()
        self._tombstones: set[str] = set()
        self._pack_cache: dict[str, dict[str, bytes]] = {}
        self._packs_listed_at = -float("inf")
        self._pipe_has_mode = "mode" in _parameters(fs.pipe_file)
        # s3fs's cat_file first asks for the size (one more request) to decide on ranged
        # parallel reads; a single GET is what a blob of a known, modest size wants.
        self._single_get: dict[str, Any] = (
            {"max_concurrency": 1}
            if self._s3 and "max_concurrency" in _parameters(fs.cat_file)
            else {}
        )

    @classmethod
    def from_url(
        cls,
        url: str,
        storage_options: Mapping[str, Any] | None = None,
        **kw: Any,
    ) -> BlobStore:
        """Open a store from a URL or a plain path (a plain path means a local folder).

        ``storage_options`` go to the fsspec backend (for ``s3://``: s3fs's ``key``,
        ``secret``, ``client_kwargs={"endpoint_url": ...}``...). For S3, unless given, the
        listings cache is off (another machine may add objects at any time) and the
        connection pool fits the I/O threads.
        """
        options = dict(storage_options or {})
        protocol, _ = fsspec.core.split_protocol(os.fspath(url))
        if protocol in _S3_PROTOCOLS:
            options = _s3_defaults(options, kw.get("workers") or _REMOTE_WORKERS)
        try:
            fs, path = fsspec.core.url_to_fs(os.fspath(url), **options)
        except (ValueError, ImportError, OSError) as exc:
            raise StorageError(
                f"cannot open storage {url!r}: {exc}; check the URL and, for a remote "
                "protocol, that its fsspec backend (e.g. s3fs) is installed"
            ) from exc
        return cls(fs, path, **kw)

    # ------------------------------------------------------------------ properties

    @property
    def url(self) -> str:
        """The root as a URL-ish string: a plain absolute path when local."""
        if self._local:
            return self.root
        return str(self.fs.unstrip_protocol(self.root))

    @property
    def is_local(self) -> bool:
        """True when the root is a local folder (the fast ``os``-based path is used)."""
        return self._local

    @property
    def stats(self) -> WriteStats:
        """A snapshot of the cumulative write counters."""
        return self._stats

    def __repr__(self) -> str:
        return f"BlobStore({self.url!r})"

    # ------------------------------------------------------------------ paths

    def _object_path(self, digest: str) -> str:
        _require_digest(digest)
        return f"{self._base}{OBJECTS_DIR}/{digest[:2]}/{digest[2:]}"

    def _manifest_path(self, address: str) -> str:
        _require_digest(address, "artifact address")
        return f"{self._base}{MANIFESTS_DIR}/{address[:2]}/{address[2:]}"

    def _count(
        self, *, objects: int = 0, nbytes: int = 0, manifests: int = 0, mbytes: int = 0
    ) -> None:
        with self._lock:
            s = self._stats
            self._stats = WriteStats(
                s.objects_written + objects,
                s.bytes_written + nbytes,
                s.manifests_written + manifests,
                s.manifest_bytes_written + mbytes,
            )

    # ------------------------------------------------------------------ blobs: write

    def put_bytes(self, data: bytes | bytearray | memoryview) -> str:
        """Store ``data`` as one blob and return its digest; writes nothing if it exists."""
        view = _byte_view(data, "blob")
        digest, _, written = self._put_one(view)
        if written:
            self._count(objects=1, nbytes=len(view))
        return digest

    def put_chunked(
        self, data: bytes | bytearray | memoryview, digests: Sequence[str] | None = None
    ) -> list[tuple[str, int]]:
        """Store ``data`` cut into ``chunk_size`` pieces; return ``[(digest, size), ...]``.

        Only missing pieces are written. The pieces are memoryview slices of ``data`` (no
        copies), hashed and written by a small thread pool. A buffer of at most
        ``chunk_size`` bytes (also an empty one) is a single chunk. ``digests``, when the
        caller already hashed these very pieces, names them without hashing them again; it
        must hold one digest per piece.
        """
        view = _byte_view(data, "blob")
        n = len(view)
        size = self.chunk_size
        pieces = [view[i : i + size] for i in range(0, n, size)] or [view]
        if digests is None:
            results = self._map(self._put_one, pieces)
        else:
            if len(digests) != len(pieces):
                raise CasmlError(
                    f"put_chunked got {len(digests)} digests for {len(pieces)} pieces of "
                    f"{n} bytes cut every {size} bytes"
                )
            named = [(_require_digest(d), piece) for d, piece in zip(digests, pieces, strict=True)]
            results = self._map(self._put_named, named)
        objects = sum(1 for _, _, w in results if w)
        nbytes = sum(s for _, s, w in results if w)
        if objects:
            self._count(objects=objects, nbytes=nbytes)
        return [(d, s) for d, s, _ in results]

    def _put_one(self, view: memoryview) -> tuple[str, int, bool]:
        """Hash and store one piece; return (digest, size, whether this call wrote it)."""
        return self._put_named((xxhash.xxh3_128_hexdigest(view), view))

    def _put_named(self, job: tuple[str, memoryview]) -> tuple[str, int, bool]:
        """Store one piece under its known digest; return (digest, size, whether written)."""
        digest, view = job
        path = self._object_path(digest)
        if self._local:
            if self._local_touch_existing(path):
                return digest, len(view), False
            written = self._local_put(path, view)
        else:
            written = self._put_generic(path, view, exclusive=False)
        return digest, len(view), written

    def _map(self, fn: Callable[[_T], _R], items: Sequence[_T]) -> list[_R]:
        """Apply ``fn`` to every item, in a thread pool when there is more than one."""
        return _run_in_pool(fn, items, self.workers)

    # ------------------------------------------------------------------ local backend

    def _local_touch_existing(self, path: str) -> bool:
        """Return True if ``path`` exists, refreshing its mtime.

        A blob that a put relies on must not look old to a garbage collector that deletes
        unreferenced blobs after a grace period, so a deduplicated put counts as a fresh use.
        """
        try:
            os.utime(path)
            return True
        except FileNotFoundError:
            return False
        except OSError:
            # A read-only or foreign-owned store: existence is all that matters then.
            return os.path.exists(path)

    def _local_put(self, path: str, view: memoryview) -> bool:
        """Write ``view`` to ``path`` atomically; return False if ``path`` already existed.

        The bytes go to a temporary file in the same directory, which is then hard-linked to
        the final name: ``link`` fails with FileExistsError instead of replacing, so the first
        writer wins and nobody ever observes a partially written file.
        """
        directory, name = path.rsplit("/", 1)
        tmp = f"{directory}/.{name}.{secrets.token_hex(6)}{TEMP_SUFFIX}"
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | _O_BINARY
        try:
            try:
                fd = os.open(tmp, flags, 0o644)
            except FileNotFoundError:
                self._local_makedirs(directory)
                fd = os.open(tmp, flags, 0o644)
        except OSError as exc:
            raise _storage_error("create a temporary file for", path, exc) from exc
        try:
            self._write_fd(fd, view)
            try:
                os.link(tmp, path)
                created = True
            except FileExistsError:
                created = False
            except OSError as exc:
                if exc.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.ENOSYS):
                    raise
                # No hard links here (some network or FAT mounts): fall back to an exclusive
                # create, which keeps create-only semantics but not atomic visibility.
                created = self._local_put_exclusive(path, view)
        except OSError as exc:
            raise _storage_error("write", path, exc) from exc
        finally:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
        if created and self.fsync:
            try:
                _fsync_dir(directory)
            except OSError as exc:
                raise _storage_error("sync the directory of", path, exc) from exc
        return created

    def _local_put_exclusive(self, path: str, view: memoryview) -> bool:
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | _O_BINARY, 0o644)
        except FileExistsError:
            return False
        self._write_fd(fd, view)
        return True

    def _write_fd(self, fd: int, view: memoryview) -> None:
        """Write all of ``view`` to ``fd`` (fsync'd when asked), then close it."""
        try:
            pos, total = 0, len(view)
            while pos < total:
                pos += os.write(fd, view[pos : pos + _MAX_IO])
            if self.fsync:
                os.fsync(fd)
        finally:
            os.close(fd)

    def _local_makedirs(self, directory: str) -> None:
        missing: list[str] = []
        d = directory
        while d and not os.path.isdir(d) and d != os.path.dirname(d):
            missing.append(d)
            d = os.path.dirname(d)
        os.makedirs(directory, exist_ok=True)
        if self.fsync:
            # A new directory entry is durable only once its parent directory is synced.
            for new_dir in missing:
                _fsync_dir(os.path.dirname(new_dir))

    def _local_read_all(self, path: str, what: str, key: str) -> bytes:
        try:
            with open(path, "rb", buffering=0) as f:
                return f.readall()
        except FileNotFoundError as exc:
            raise self._not_found(what, key, path) from exc
        except OSError as exc:
            raise _storage_error("read", path, exc) from exc

    # ------------------------------------------------------------------ generic backend

    def _retrying(self, fn: Callable[[], _T]) -> _T:
        """Run one remote operation, retrying transient failures with bounded backoff.

        "Not found" and "already exists" are answers, not failures, and propagate at once, as
        do permanent errors (bad credentials, a missing bucket). The caller turns what
        escapes into casml errors.
        """
        attempt = 1
        while True:
            try:
                return fn()
            except (FileNotFoundError, FileExistsError):
                raise
            except Exception as exc:
                if attempt >= _RETRY_ATTEMPTS or not _is_transient(exc):
                    raise
            wait = min(_RETRY_MAX_WAIT, _RETRY_FIRST_WAIT * 2 ** (attempt - 1))
            time.sleep(wait * random.uniform(0.5, 1.0))
            attempt += 1

    def _generic_exists(self, path: str) -> bool:
        def check() -> bool:
            if self._s3:
                # One HEAD; s3fs's isfile would add a listing for a missing key and would
                # report a network failure as "missing".
                self._s3_head(path)
                return True
            info: dict[str, Any] = self.fs.info(path)
            return bool(info.get("type", "file") == "file")

        try:
            return self._retrying(check)
        except FileNotFoundError:
            return False
        except CasmlError:
            raise
        except Exception as exc:
            raise _storage_error("check", path, exc) from exc

    def _put_generic(self, path: str, view: memoryview, *, exclusive: bool) -> bool:
        """Write one whole object on a non-local backend; return False if it already existed.

        Object stores publish an object atomically when its upload completes, so readers never
        see a partial object. On S3 every write is a conditional PUT (``If-None-Match: *``):
        the first writer wins and a later one learns that the object exists (HTTP 412), so a
        small object needs no HEAD before it; a large one gets a HEAD first, so that existing
        bytes are not sent again. Other backends check first, then write manifests with
        ``mode="create"`` where supported and blobs (identical bytes whoever writes them)
        plainly.
        """
        conditional = self._s3 and self._pipe_has_mode
        probe_first = not (conditional and len(view) <= _CONDITIONAL_PUT_LIMIT)

        def attempt() -> bool:
            if probe_first and self._generic_exists(path):
                return False
            data = bytes(view)  # remote clients (botocore) want bytes, not memoryviews
            try:
                if self._pipe_has_mode and (exclusive or conditional):
                    self.fs.pipe_file(path, data, mode="create")
                else:
                    self.fs.pipe_file(path, data)
            except Exception as exc:
                if _is_precondition_failure(exc):
                    return False
                if not self._s3:
                    # Backends that write in place (not object stores) may leave a partial
                    # object at its final key; it was not there before, so it is ours.
                    with contextlib.suppress(Exception):
                        self.fs.rm_file(path)
                raise
            return True

        try:
            return self._retrying(attempt)
        except CasmlError:
            raise
        except Exception as exc:
            raise _storage_error("write", path, exc) from exc

    def _generic_read_all(
        self, path: str, what: str, key: str, *, size_hint: int | None = None
    ) -> bytes:
        kwargs = self._single_get
        if size_hint is not None and size_hint > 2 * DEFAULT_CHUNK_SIZE:
            kwargs = {}  # large: let s3fs read it in parallel ranges
        try:
            return bytes(self._retrying(lambda: self.fs.cat_file(path, **kwargs)))
        except FileNotFoundError as exc:
            raise self._not_found(what, key, path) from exc
        except CasmlError:
            raise
        except Exception as exc:
            raise _storage_error("read", path, exc) from exc

    def _generic_list(self, directory: str) -> list[str]:
        """Return the base names in ``directory`` (empty when it does not exist)."""
        with contextlib.suppress(Exception):
            # A cached listing could claim a deleted object still exists.
            self.fs.invalidate_cache(directory)
        try:
            entries = self._retrying(lambda: self.fs.ls(directory, detail=False))
        except FileNotFoundError:
            return []
        except CasmlError:
            raise
        except Exception as exc:
            raise _storage_error("list", directory, exc) from exc
        return [str(e).rstrip("/").rsplit("/", 1)[-1] for e in entries]

    # ------------------------------------------------------------------ blobs: read

    def get_bytes(self, digest: str) -> bytes:
        """Return the bytes of blob ``digest``, verified against the digest."""
        return self._read_verified(self._object_path(digest), "blob", digest)

    def _read_verified(self, path: str, what: str, key: str) -> bytes:
        """Read a whole content-addressed object and check it hashes to its key."""
        if self._local:
            data = self._local_read_all(path, what, key)
        else:
            data = self._generic_read_all(path, what, key)
        self._verify(key, path, data)
        return data

    def check_sizes(self, chunks: Sequence[tuple[str, int]]) -> None:
        """Check that local chunks exist with the sizes a manifest claims, before reading.

        A caller about to reserve memory for a large buffer asks first, so a forged manifest
        claiming gigabytes fails here instead of reserving them. One ``stat`` per chunk on a
        local folder; other backends are checked as each chunk is read.
        """
        if not self._local:
            return
        for digest, size in chunks:
            path = self._object_path(digest)
            try:
                stored = os.stat(path).st_size
            except FileNotFoundError:
                raise self._not_found("blob", digest, path) from None
            except OSError as exc:
                raise _storage_error("inspect", path, exc) from exc
            if stored != size:
                raise self._corrupt(
                    digest, path, f"it holds {stored} bytes where the manifest says {size}"
                )

    def read_into(self, chunks: Sequence[tuple[str, int]], out: memoryview) -> None:
        """Reassemble ``chunks`` into the writable buffer ``out``, verifying every chunk.

        ``out`` must hold exactly the total size. Local files are read straight into the
        buffer (``readinto``), with no intermediate copy.
        """
        view = _byte_view(out, "output")
        if view.readonly:
            raise CasmlError("read_into needs a writable buffer, got a read-only one")
        jobs: list[tuple[str, str, memoryview]] = []
        pos = 0
        for digest, size in chunks:
            path = self._object_path(digest)
            if not isinstance(size, int) or size < 0:
                raise IntegrityError(f"chunk {digest} has an invalid size {size!r}")
            jobs.append((digest, path, view[pos : pos + size]))
            pos += size
        if pos != len(view):
            raise IntegrityError(
                f"the chunk sizes add up to {pos} bytes but the output buffer holds "
                f"{len(view)}; the manifest listing these chunks is inconsistent, run "
                "`casml verify`"
            )
        reader = self._local_read_chunk if self._local else self._generic_read_chunk
        self._map(reader, jobs)

    def copy_from(self, source: BlobStore, digests: Iterable[str]) -> int:
        """Copy the blobs among ``digests`` that this store lacks from ``source``; return bytes.

        One batched :meth:`missing` check, then the missing blobs are read (verified against
        their digests) and written with up to ``workers`` transfers in flight, the larger of
        the two stores' settings. Each blob is published atomically, so an interrupted copy
        leaves only whole blobs and a rerun copies what is still missing.
        """
        lacking = sorted(self.missing(digests))

        def copy(digest: str) -> tuple[int, bool]:
            data = source.get_bytes(digest)
            _, size, written = self._put_one(memoryview(data))
            return size, written

        pool = max(self.workers, source.workers)
        results = _run_in_pool(copy, lacking, pool)
        objects = sum(1 for _, w in results if w)
        nbytes = sum(n for n, w in results if w)
        if objects:
            self._count(objects=objects, nbytes=nbytes)
        return nbytes

    def _local_read_chunk(self, job: tuple[str, str, memoryview]) -> None:
        digest, path, target = job
        try:
            with open(path, "rb", buffering=0) as f:
                stored = os.fstat(f.fileno()).st_size
                if stored != len(target):
                    raise self._corrupt(
                        digest, path, f"it holds {stored} bytes where {len(target)} were expected"
                    )
                pos = 0
                while pos < len(target):
                    n = f.readinto(target[pos : pos + _MAX_IO])
                    if not n:
                        raise self._corrupt(digest, path, "it was truncated while being read")
                    pos += n
        except FileNotFoundError as exc:
            raise self._not_found("blob", digest, path) from exc
        except OSError as exc:
            raise _storage_error("read", path, exc) from exc
        self._verify(digest, path, target)

    def _generic_read_chunk(self, job: tuple[str, str, memoryview]) -> None:
        digest, path, target = job
        data = self._generic_read_all(path, "blob", digest, size_hint=len(target))
        if len(data) != len(target):
            raise self._corrupt(
                digest, path, f"it holds {len(data)} bytes where {len(target)} were expected"
            )
        self._verify(digest, path, data)
        target[:] = data

    def _verify(self, digest: str, path: str, data: bytes | memoryview) -> None:
        actual = xxhash.xxh3_128_hexdigest(data)
        if actual != digest:
            raise self._corrupt(digest, path, f"its bytes hash to {actual}")

    def _corrupt(self, digest: str, path: str, detail: str) -> IntegrityError:
        return IntegrityError(
            f"blob {digest} at {path} is corrupt: {detail}. The stored bytes are damaged; "
            "run `casml verify` to find every damaged object, then restore it from a remote "
            "(`casml pull`) or put the object again"
        )

    def _not_found(self, what: str, key: str, path: str) -> NotFoundError:
        return NotFoundError(
            f"{what} {key} is not stored in {self.url} (no file at {path}); it was never "
            "written there or has been deleted: pull it from a remote or put it again"
        )

    # ------------------------------------------------------------------ blobs: queries

    def exists(self, digest: str) -> bool:
        """Return True if blob ``digest`` is stored (its content is not checked)."""
        path = self._object_path(digest)
        if self._local:
            return os.path.isfile(path)
        return self._generic_exists(path)

    def missing(self, digests: Iterable[str]) -> set[str]:
        """Return the subset of ``digests`` that is not stored.

        Local: one ``stat`` per digest (cheaper than listing large prefix directories).
        Other backends: one listing per prefix directory holding several of the digests,
        one existence check (a HEAD) for a lone digest, with up to ``workers`` requests in
        flight.
        """
        wanted = {_require_digest(d) for d in digests}
        if self._local:
            return {d for d in wanted if not os.path.isfile(self._object_path(d))}
        groups: dict[str, list[str]] = {}
        for d in wanted:
            groups.setdefault(d[:2], []).append(d)

        def missing_in(group: list[str]) -> list[str]:
            if len(group) == 1:
                return [] if self._generic_exists(self._object_path(group[0])) else group
            present = set(self._generic_list(f"{self._base}{OBJECTS_DIR}/{group[0][:2]}"))
            return [d for d in group if d[2:] not in present]

        out: set[str] = set()
        for found in self._map(missing_in, sorted(groups.values())):
            out.update(found)
        return out

    def size(self, digest: str) -> int:
        """Return the stored size in bytes of blob ``digest``."""
        return self._stat_blob(digest, lambda path: os.stat(path).st_size, self._generic_size)

    def _generic_size(self, path: str) -> int:
        if self._s3:
            return int(self._s3_head(path)["ContentLength"])
        return int(self.fs.size(path))

    def _stat_blob(
        self, digest: str, local: Callable[[str], _T], generic: Callable[[str], _T]
    ) -> _T:
        """Ask ``local`` or (retrying) ``generic`` about blob ``digest``'s file; clear errors."""
        path = self._object_path(digest)
        try:
            if self._local:
                return local(path)
            return self._retrying(lambda: generic(path))
        except FileNotFoundError as exc:
            raise self._not_found("blob", digest, path) from exc
        except CasmlError:
            raise
        except Exception as exc:
            raise _storage_error("stat", path, exc) from exc

    def _s3_head(self, path: str) -> dict[str, Any]:
        bucket, key, _ = self.fs.split_path(path)
        head: dict[str, Any] = self.fs.call_s3("head_object", Bucket=bucket, Key=key)
        return head

    def modified_time(self, digest: str) -> datetime | None:
        """Return when blob ``digest`` was last written or re-put (UTC), None if unknown."""

        def local(path: str) -> datetime | None:
            return datetime.fromtimestamp(os.stat(path).st_mtime, tz=timezone.utc)

        return self._stat_blob(digest, local, self._generic_mtime)

    def _generic_mtime(self, path: str) -> datetime | None:
        if self._s3:
            return _as_utc(self._s3_head(path).get("LastModified"))
        try:
            value: Any = self.fs.modified(path)
        except NotImplementedError:
            info = self.fs.info(path)
            value = next(
                (
                    info[k]
                    for k in ("mtime", "LastModified", "last_modified", "created")
                    if info.get(k)
                ),
                None,
            )
        return _as_utc(value)

    def delete(self, digest: str) -> None:
        """Delete blob ``digest``; deleting a blob that is not stored is not an error."""
        self._delete_path(self._object_path(digest))

    def _delete_path(self, path: str) -> None:
        try:
            if self._local:
                os.unlink(path)
            else:
                self._retrying(lambda: self.fs.rm_file(path))
        except FileNotFoundError:
            pass
        except CasmlError:
            raise
        except Exception as exc:
            raise _storage_error("delete", path, exc) from exc

    def iter_digests(self) -> Iterator[str]:
        """Yield the digest of every stored blob (in no particular order)."""
        return self._iter_keys(OBJECTS_DIR)

    def _iter_keys(self, area: str) -> Iterator[str]:
        top = f"{self._base}{area}"
        if self._local:
            try:
                with os.scandir(top) as it:
                    prefixes = sorted(e.name for e in it if _HEX2_RE.fullmatch(e.name))
            except FileNotFoundError:
                return
            except OSError as exc:
                raise _storage_error("list", top, exc) from exc
            for prefix in prefixes:
                try:
                    with os.scandir(f"{top}/{prefix}") as it:
                        names = [e.name for e in it if _HEX30_RE.fullmatch(e.name)]
                except FileNotFoundError:
                    continue
                except OSError as exc:
                    raise _storage_error("list", f"{top}/{prefix}", exc) from exc
                for name in sorted(names):
                    yield prefix + name
            return
        with contextlib.suppress(Exception):
            self.fs.invalidate_cache(top)
        try:
            found = self._retrying(lambda: self.fs.find(top, detail=False))
        except FileNotFoundError:
            return
        except CasmlError:
            raise
        except Exception as exc:
            raise _storage_error("list", top, exc) from exc
        for p in sorted(str(x) for x in found):
            parts = p.rstrip("/").rsplit("/", 2)
            if len(parts) == 3 and _HEX2_RE.fullmatch(parts[1]) and _HEX30_RE.fullmatch(parts[2]):
                yield parts[1] + parts[2]

    # ------------------------------------------------------------------ manifests

    def put_manifest(self, address: str, data: bytes) -> bool:
        """Create the manifest of ``address``; return False (keeping the old one) if it exists.

        The first writer wins: a manifest is immutable once stored. Its content is not
        checked here; the caller embeds its own checksum.
        """
        path = self._manifest_path(address)
        view = _byte_view(data, "manifest")
        if self._local:
            if os.path.exists(path):
                return False
            created = self._local_put(path, view)
        else:
            created = self._put_generic(path, view, exclusive=True)
        if created:
            self._count(manifests=1, mbytes=len(view))
        return created

    def get_manifest(self, address: str, *, fresh: bool = True) -> bytes:
        """Return the stored manifest of ``address``; NotFoundError if there is none.

        A manifest is a file of its own or an entry of a pack. ``fresh=False`` lets a miss
        trust a pack listing up to a second old (a put checking for an existing artifact);
        the default re-lists packs on a miss, so a pack pushed by another machine is seen.
        """
        path = self._manifest_path(address)
        if self._local and not fresh and not os.path.exists(path):
            # A put asking "is this new?": most answers are yes, and a stat says so several
            # times faster than a failed open raising through the read path.
            packed = self._packed_manifest(address, fresh)
            if packed is None:
                raise self._not_found("manifest of artifact", address, path)
            return packed
        try:
            if self._local:
                return self._local_read_all(path, "manifest of artifact", address)
            return self._generic_read_all(path, "manifest of artifact", address)
        except NotFoundError:
            packed = self._packed_manifest(address, fresh)
            if packed is None:
                raise
            return packed

    def has_manifest(self, address: str) -> bool:
        """Return True if a manifest is stored for ``address`` (on its own or in a pack)."""
        path = self._manifest_path(address)
        found = os.path.isfile(path) if self._local else self._generic_exists(path)
        return found or self._pack_of(address, fresh=True) is not None

    def delete_manifest(self, address: str) -> None:
        """Delete the manifest of ``address``; a missing manifest is not an error.

        Packs are immutable: a packed manifest is hidden by a tombstone instead.
        """
        self._delete_path(self._manifest_path(address))
        if self._pack_of(address, fresh=True) is not None:
            path = self._tombstone_path(address)
            if self._local:
                self._local_put(path, memoryview(b""))
            else:
                self._put_generic(path, memoryview(b""), exclusive=False)
            with self._lock:
                self._tombstones.add(address)

    def iter_manifests(self) -> Iterator[str]:
        """Yield every address that has a manifest (in no particular order)."""
        loose = set(self._iter_keys(MANIFESTS_DIR))
        yield from loose
        self._refresh_packs(force=True)
        with self._lock:
            packed = [a for a in self._packed if a not in self._tombstones and a not in loose]
        yield from packed

    def manifests_with_prefix(self, prefix: str) -> list[str]:
        """Return the sorted addresses starting with ``prefix`` (2 to 32 lowercase hex chars).

        Only the one prefix directory is listed, never the whole store.
        """
        if not isinstance(prefix, str) or _PREFIX_RE.fullmatch(prefix) is None:
            raise InvalidHashError(
                f"{prefix!r} is not a valid address prefix: expected 2 to 32 lowercase hex "
                "characters"
            )
        directory = f"{self._base}{MANIFESTS_DIR}/{prefix[:2]}"
        rest = prefix[2:]
        if self._local:
            try:
                names = os.listdir(directory)
            except FileNotFoundError:
                return []
            except OSError as exc:
                raise _storage_error("list", directory, exc) from exc
        else:
            names = self._generic_list(directory)
        found = {prefix[:2] + n for n in names if n.startswith(rest) and _HEX30_RE.fullmatch(n)}
        self._refresh_packs(force=True)
        with self._lock:
            found.update(
                a for a in self._packed if a.startswith(prefix) and a not in self._tombstones
            )
        return sorted(found)

    # ------------------------------------------------------------------ packs

    def _pack_path(self, key: str) -> str:
        _require_digest(key, "pack key")
        return f"{self._base}{PACKS_DIR}/{key[:2]}/{key[2:]}"

    def _tombstone_path(self, address: str) -> str:
        _require_digest(address, "artifact address")
        return f"{self._base}{TOMBSTONES_DIR}/{address[:2]}/{address[2:]}"

    def put_pack(self, manifests: Mapping[str, bytes]) -> str:
        """Store many manifests as one object; return the pack's key (its digest).

        Object stores charge a request per object, so a push of many small artifacts writes
        one pack instead of one object per manifest. Readers see packed manifests exactly as
        loose ones. Manifests already stored (loose or packed) must not be given again.
        """
        for address in manifests:
            _require_digest(address, "artifact address")
        body = msgpack.packb(
            {"casml_pack": 1, "manifests": {a: bytes(m) for a, m in sorted(manifests.items())}},
            use_bin_type=True,
        )
        key = digest_of(body)
        path = self._pack_path(key)
        view = memoryview(body)
        created = (
            self._local_put(path, view)
            if self._local
            else self._put_generic(path, view, exclusive=True)
        )
        if created:
            self._count(manifests=len(manifests), mbytes=len(body))
        with self._lock:
            for address in manifests:
                self._packed[address] = key
            self._pack_keys.add(key)
        return key

    def _read_pack(self, key: str) -> dict[str, bytes]:
        with self._lock:
            cached = self._pack_cache.get(key)
        if cached is not None:
            return cached
        path = self._pack_path(key)
        data = self._read_verified(path, "pack", key)
        try:
            document = msgpack.unpackb(data, raw=False, strict_map_key=True)
            entries = document["manifests"]
            if document.get("casml_pack") != 1 or not isinstance(entries, dict):
                raise ValueError("not a casml pack")
            manifests = {
                str(a): bytes(m)
                for a, m in entries.items()
                if is_digest(a) and isinstance(m, bytes)
            }
        except (ValueError, KeyError, TypeError, msgpack.UnpackException) as exc:
            raise self._corrupt(key, path, f"unreadable pack: {exc}") from None
        with self._lock:
            if len(self._pack_cache) >= _PACK_CACHE:
                self._pack_cache.pop(next(iter(self._pack_cache)))
            self._pack_cache[key] = manifests
        return manifests

    def _refresh_packs(self, *, force: bool) -> None:
        """Learn which manifests live in packs (and which are tombstoned) from the listing."""
        now = time.monotonic()
        with self._lock:
            if not force and now - self._packs_listed_at < _PACK_RELIST_SECONDS:
                return
        keys = set(self._iter_keys(PACKS_DIR))
        tombstones = set(self._iter_keys(TOMBSTONES_DIR))
        with self._lock:
            new = keys - self._pack_keys
        for key in sorted(new):
            try:
                entries = self._read_pack(key)
            except (IntegrityError, NotFoundError):
                continue  # `casml verify` reports damaged packs
            with self._lock:
                for address in entries:
                    self._packed.setdefault(address, key)
                self._pack_keys.add(key)
        with self._lock:
            self._tombstones = tombstones
            self._packs_listed_at = now

    def _pack_of(self, address: str, *, fresh: bool) -> str | None:
        with self._lock:
            key = self._packed.get(address)
            hidden = address in self._tombstones
        if key is None or hidden:
            self._refresh_packs(force=fresh)
            with self._lock:
                key = self._packed.get(address)
                hidden = address in self._tombstones
        return None if hidden else key

    def _packed_manifest(self, address: str, fresh: bool) -> bytes | None:
        key = self._pack_of(address, fresh=fresh)
        if key is None:
            return None
        return self._read_pack(key).get(address)

    def iter_packs(self) -> Iterator[str]:
        """Yield the key of every stored pack."""
        return self._iter_keys(PACKS_DIR)

    # ------------------------------------------------------------------ records

    def _record_path(self, key: str) -> str:
        _require_digest(key, "record key")
        return f"{self._base}{RECORDS_DIR}/{key[:2]}/{key[2:]}"

    def put_record(self, data: bytes) -> str:
        """Store a small immutable document keyed by its own digest; return the key.

        Records carry what happens to artifacts after their manifest is written (names,
        versions, tags), so that the index can be rebuilt from storage alone.
        """
        view = _byte_view(data, "record")
        key = digest_of(view)
        path = self._record_path(key)
        if self._local:
            if not os.path.exists(path):
                self._local_put(path, view)
        else:
            self._put_generic(path, view, exclusive=True)
        return key

    def get_record(self, key: str) -> bytes:
        """Return a stored record, verified against its key."""
        return self._read_verified(self._record_path(key), "record", key)

    def iter_records(self) -> Iterator[str]:
        """Yield the key of every stored record (in no particular order)."""
        return self._iter_keys(RECORDS_DIR)

    def delete_record(self, key: str) -> None:
        """Delete a record; a missing one is not an error."""
        self._delete_path(self._record_path(key))

    # ------------------------------------------------------------------ maintenance

    def clean_temp_files(self, older_than: float = 3600.0, *, dry_run: bool = False) -> int:
        """Remove temporary files left by crashed local writers; return how many were removed.

        Only files older than ``older_than`` seconds are touched, so in-flight writes of other
        processes are safe. Non-local backends never leave temporary files behind. With
        ``dry_run`` nothing is removed and the count is what would be.
        """
        if not self._local:
            return 0
        cutoff = time.time() - older_than
        removed = 0
        for area in (OBJECTS_DIR, MANIFESTS_DIR, RECORDS_DIR, PACKS_DIR, TOMBSTONES_DIR):
            top = f"{self._base}{area}"
            try:
                with os.scandir(top) as it:
                    dirs = [e.path for e in it if _HEX2_RE.fullmatch(e.name)]
            except FileNotFoundError:
                continue
            for d in dirs:
                with os.scandir(d) as it:
                    for e in it:
                        if not (e.name.startswith(".") and e.name.endswith(TEMP_SUFFIX)):
                            continue
                        with contextlib.suppress(FileNotFoundError):
                            if e.stat().st_mtime < cutoff:
                                if not dry_run:
                                    os.unlink(e.path)
                                removed += 1
        return removed


def _run_in_pool(fn: Callable[[_T], _R], items: Sequence[_T], workers: int) -> list[_R]:
    """Apply ``fn`` to every item, in order, with up to ``workers`` threads."""
    if len(items) <= 1 or workers == 1:
        return [fn(item) for item in items]
    with ThreadPoolExecutor(
        max_workers=min(workers, len(items)), thread_name_prefix="casml-blobs"
    ) as pool:
        return list(pool.map(fn, items))


def _parameters(fn: Any) -> set[str]:
    try:
        return set(inspect.signature(fn).parameters)
    except (TypeError, ValueError):
        return set()


def _as_utc(value: object) -> datetime | None:
    if isinstance(value, (int, float)):
        return datetime.fromtimestamp(value, tz=timezone.utc)
    if isinstance(value, datetime):
        return value if value.tzinfo else value.replace(tzinfo=timezone.utc)
    return None


def _s3_defaults(options: dict[str, Any], workers: int) -> dict[str, Any]:
    """Fill in the s3fs options casml relies on, keeping every option the caller gave."""
    out = dict(options)
    # Another writer may add an object at any moment: a cached listing would hide it.
    out.setdefault("use_listings_cache", False)
    config = dict(out.get("config_kwargs") or {})
    # botocore keeps 10 connections by default; the I/O threads plus s3fs's own parallel
    # parts must not queue for one.
    config.setdefault("max_pool_connections", max(32, 2 * workers))
    # Bounded: botocore's retries multiply with casml's own (see _retrying).
    config.setdefault("retries", {"total_max_attempts": 2, "mode": "standard"})
    out["config_kwargs"] = config
    return out


def _is_transient(exc: BaseException) -> bool:
    """Tell whether a failed remote operation is worth retrying (network, throttling, 5xx)."""
    permanent = (
        FileNotFoundError,
        FileExistsError,
        PermissionError,
        IsADirectoryError,
        NotADirectoryError,
    )
    if isinstance(exc, permanent):
        return False
    if isinstance(exc, (TimeoutError, ConnectionError)):
        return True
    if any(cls.__name__ in _TRANSIENT_CLASS_NAMES for cls in type(exc).__mro__):
        return True
    for candidate in (exc, exc.__cause__):
        response = getattr(candidate, "response", None)
        if isinstance(response, dict):
            code = str(response.get("Error", {}).get("Code", ""))
            status = response.get("ResponseMetadata", {}).get("HTTPStatusCode")
            if code in _TRANSIENT_S3_CODES or status == 429:
                return True
            if isinstance(status, int) and status >= 500:
                return True
    return isinstance(exc, OSError) and exc.errno in _TRANSIENT_ERRNOS


def _is_precondition_failure(exc: BaseException) -> bool:
    """Tell whether a create-only write failed because the object already exists.

    s3fs raises FileExistsError for AWS's 412; SeaweedFS's 412 carries no condition name, so
    s3fs turns it into OSError(EINVAL) with the botocore ClientError as its cause.
    """
    if isinstance(exc, FileExistsError):
        return True
    if not (isinstance(exc, OSError) and exc.errno == errno.EINVAL):
        return False
    response = getattr(exc.__cause__, "response", None)
    if not isinstance(response, dict):
        return False
    code = str(response.get("Error", {}).get("Code", ""))
    status = response.get("ResponseMetadata", {}).get("HTTPStatusCode")
    return code in ("PreconditionFailed", "412") or status == 412


def _fsync_dir(directory: str) -> None:
    if os.name == "nt":  # directories cannot be opened for fsync on Windows
        return
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _storage_error(action: str, path: str, exc: BaseException) -> StorageError:
    return StorageError(
        f"could not {action} {path}: {type(exc).__name__}: {exc}. Check that the storage is "
        "reachable and that you may read and write there (permissions, credentials, free space)"
    )
