"""Keep a store healthy: free unreferenced blobs (gc), check everything (verify), measure (du).

Each function takes a :class:`casml.Store` and works on its storage and its index together.
Storage is the truth: the live set of a garbage collection is every blob listed by *any*
manifest in storage (another machine may have stored artifacts this index has never seen),
plus every blob the index still links to. :meth:`Store.gc`, :meth:`Store.verify` and
:meth:`Store.du` call these; the ``casml`` command does too, with progress bars.

Why gc is safe while other processes put artifacts: a put writes its blobs first and its
manifest last, and a put that re-uses an existing local blob refreshes that blob's modified
time. gc only deletes an unreferenced blob whose modified time is older than the grace period,
lists the manifests a second time just before deleting (so a put that finished meanwhile keeps
its blobs), and deletes a local blob by first renaming it aside, then checking that no put
touched it in between. A put that started before ``now - grace`` and is still writing when gc
deletes is the remaining risk: keep the grace period longer than your slowest put.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import secrets
import time
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from datetime import timedelta
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

from casml.blobs import (
    MANIFESTS_DIR,
    OBJECTS_DIR,
    PACKS_DIR,
    RECORDS_DIR,
    TEMP_SUFFIX,
    BlobStore,
    digest_of,
)
from casml.errors import CasmlError, IntegrityError, NotFoundError, StorageError
from casml.manifest import Manifest, load_manifest

if TYPE_CHECKING:
    from casml.store import Store

__all__ = [
    "DEFAULT_GRACE",
    "PROBLEM_KINDS",
    "DiskUsage",
    "GcReport",
    "Problem",
    "Progress",
    "VerifyReport",
    "disk_usage",
    "gc",
    "no_progress",
    "reindex",
    "verify",
]

DEFAULT_GRACE = 3600.0
"""Seconds an unreferenced blob must have gone unused before gc deletes it."""

#: Problem kinds verify reports, each with whether it is an error (orphans are not: gc frees
#: them).
PROBLEM_KINDS: dict[str, bool] = {
    "missing_blob": True,
    "corrupt_blob": True,
    "corrupt_manifest": True,
    "corrupt_pack": True,
    "corrupt_record": True,
    "missing_dependency": True,
    "unindexed_manifest": True,
    "dangling_index_row": True,
    "index_mismatch": True,
    "orphan_blob": False,
}

# Temporary files and unreadable manifests younger than this are never removed, whatever the
# grace: a writer may still be busy with them, and removing them is never urgent.
_MIN_TEMP_AGE = 600.0
# With a short grace, gc waits until this long after it started before its second look at
# the manifests, so a put that was in flight when gc started has time to write its manifest.
_SETTLE_SECONDS = 1.0
_GC_TRASH = ".gc"

_T = TypeVar("_T")
_R = TypeVar("_R")


class Progress(Protocol):
    """Wrap an iterable to report progress: ``tqdm`` fits, so does :func:`no_progress`."""

    def __call__(self, iterable: Iterable[_T], *, desc: str, total: int | None) -> Iterable[_T]:
        """Yield the items of ``iterable`` while showing how far along they are."""
        ...


def no_progress(iterable: Iterable[_T], *, desc: str, total: int | None) -> Iterable[_T]:
    """Yield the items of ``iterable`` unchanged (the default: report nothing)."""
    return iterable


# ---------------------------------------------------------------------------- reports


@dataclass(frozen=True)
class GcReport:
    """What one garbage collection deleted (or, with ``dry_run``, would delete).

    ``blobs_live`` blobs are still referenced; ``blobs_recent`` are unreferenced but younger
    than the grace period (an in-flight put may need them; a later gc frees them).
    ``manifests_deleted`` counts unreadable manifests that no index row knows (nothing can load
    them, and they would block putting the artifact again); ``records_deleted`` counts name
    and tag records of artifacts that no longer exist.
    """

    blobs_deleted: int
    bytes_freed: int
    manifests_deleted: int
    records_deleted: int
    temp_files_deleted: int
    blobs_live: int
    blobs_recent: int
    dry_run: bool
    grace_seconds: float
    deleted: tuple[str, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        """Return a JSON-ready dict with the same field names."""
        return {**asdict(self), "deleted": list(self.deleted)}


@dataclass(frozen=True)
class Problem:
    """One thing verify found wrong (or, for ``orphan_blob``, merely unreferenced).

    ``kind`` is a key of :data:`PROBLEM_KINDS`; ``key`` is the blob digest, artifact address
    or record key concerned; ``artifacts`` the artifacts affected. ``action`` says what
    ``repair`` did about it, and ``fixed`` whether the store is sound again on that point.
    """

    kind: str
    key: str
    message: str
    artifacts: tuple[str, ...] = ()
    fixed: bool = False
    action: str | None = None

    @property
    def is_error(self) -> bool:
        """True unless this is a harmless finding (an orphan blob, which gc frees)."""
        return PROBLEM_KINDS[self.kind]

    def to_dict(self) -> dict[str, Any]:
        """Return a JSON-ready dict with the same field names plus ``is_error``."""
        return {
            "kind": self.kind,
            "key": self.key,
            "message": self.message,
            "artifacts": list(self.artifacts),
            "is_error": self.is_error,
            "fixed": self.fixed,
            "action": self.action,
        }


@dataclass(frozen=True)
class VerifyReport:
    """What verify checked and every problem it found, with what repair did about each.

    ``ok`` is True when no error remains unfixed: orphan blobs are not errors (they are what
    gc frees). ``repair`` tells whether repairs were attempted.
    """

    problems: tuple[Problem, ...]
    blobs_checked: int
    bytes_checked: int
    manifests_checked: int
    index_rows_checked: int
    records_checked: int
    repair: bool

    @property
    def ok(self) -> bool:
        """True when nothing is wrong (or everything wrong was fixed by repair)."""
        return not self.errors

    @property
    def errors(self) -> tuple[Problem, ...]:
        """The problems that are errors and were not fixed."""
        return tuple(p for p in self.problems if p.is_error and not p.fixed)

    @property
    def orphans(self) -> tuple[str, ...]:
        """Digests of the blobs no manifest and no index row references."""
        return tuple(p.key for p in self.problems if p.kind == "orphan_blob")

    def of_kind(self, kind: str) -> tuple[Problem, ...]:
        """The problems of one kind (a key of :data:`PROBLEM_KINDS`)."""
        if kind not in PROBLEM_KINDS:
            raise CasmlError(f"unknown problem kind {kind!r}; use one of {sorted(PROBLEM_KINDS)}")
        return tuple(p for p in self.problems if p.kind == kind)

    def to_dict(self) -> dict[str, Any]:
        """Return a JSON-ready dict: the counters, ``ok`` and the list of problems."""
        return {
            "ok": self.ok,
            "repair": self.repair,
            "blobs_checked": self.blobs_checked,
            "bytes_checked": self.bytes_checked,
            "manifests_checked": self.manifests_checked,
            "index_rows_checked": self.index_rows_checked,
            "records_checked": self.records_checked,
            "errors": len(self.errors),
            "problems": [p.to_dict() for p in self.problems],
        }


@dataclass(frozen=True)
class DiskUsage:
    """What the artifacts hold (logical bytes) against what storage holds (stored bytes).

    ``logical_bytes`` sums every artifact's size (payload plus buffers, as ``ArtifactInfo.size``
    counts it), before deduplication. ``stored_bytes`` is everything under the root: blobs,
    manifests and name/tag records. ``dedup_ratio`` is logical over stored: above 1 when
    artifacts share bytes.
    """

    artifacts: int
    indexed_artifacts: int
    blobs: int
    logical_bytes: int
    blob_bytes: int
    manifest_bytes: int
    record_bytes: int

    @property
    def stored_bytes(self) -> int:
        """Bytes the storage holds for this store: blobs, manifests and records."""
        return self.blob_bytes + self.manifest_bytes + self.record_bytes

    @property
    def dedup_ratio(self) -> float:
        """Logical bytes per stored byte (1.0 for an empty store)."""
        if self.stored_bytes == 0:
            return 1.0
        return self.logical_bytes / self.stored_bytes

    def to_dict(self) -> dict[str, Any]:
        """Return a JSON-ready dict with the fields plus ``stored_bytes`` and ``dedup_ratio``."""
        return {
            "artifacts": self.artifacts,
            "indexed_artifacts": self.indexed_artifacts,
            "blobs": self.blobs,
            "logical_bytes": self.logical_bytes,
            "stored_bytes": self.stored_bytes,
            "blob_bytes": self.blob_bytes,
            "manifest_bytes": self.manifest_bytes,
            "record_bytes": self.record_bytes,
            "dedup_ratio": round(self.dedup_ratio, 4),
        }


# ---------------------------------------------------------------------------- helpers


def _grace_seconds(grace: float | timedelta) -> float:
    seconds = grace.total_seconds() if isinstance(grace, timedelta) else grace
    if (
        isinstance(seconds, bool)
        or not isinstance(seconds, (int, float))
        or not math.isfinite(seconds)
        or seconds < 0
    ):
        raise CasmlError(
            f"grace must be a number of seconds >= 0 or a timedelta, got {grace!r}; "
            f"the default is {DEFAULT_GRACE:g} seconds"
        )
    return float(seconds)


def _scan(blobs: BlobStore, area: str) -> dict[str, int]:
    """Return ``{key: size}`` of every object in one storage area, in one listing pass."""
    top = f"{blobs.root.rstrip('/')}/{area}"
    found: dict[str, int] = {}
    if blobs.is_local:
        try:
            with os.scandir(top) as it:
                prefixes = [(e.name, e.path) for e in it if _is_hex(e.name, 2) and e.is_dir()]
        except FileNotFoundError:
            return found
        except OSError as exc:
            raise StorageError(f"could not list {top}: {exc}; check the storage") from exc
        for prefix, directory in prefixes:
            try:
                with os.scandir(directory) as it:
                    for entry in it:
                        if _is_hex(entry.name, 30):
                            with contextlib.suppress(FileNotFoundError):
                                found[prefix + entry.name] = entry.stat().st_size
            except FileNotFoundError:
                continue
        return found
    fs = blobs.fs
    with contextlib.suppress(Exception):
        # A cached listing could hide objects written since it was taken.
        fs.invalidate_cache(top)
    try:
        listing: dict[str, dict[str, Any]] = fs.find(top, detail=True)
    except FileNotFoundError:
        return found
    except OSError as exc:
        raise StorageError(f"could not list {top}: {exc}; check the storage") from exc
    for path, info in listing.items():
        parts = str(path).rstrip("/").rsplit("/", 2)
        if len(parts) == 3 and _is_hex(parts[1], 2) and _is_hex(parts[2], 30):
            found[parts[1] + parts[2]] = int(info.get("size") or 0)
    return found


def _is_hex(name: str, length: int) -> bool:
    return len(name) == length and all(c in "0123456789abcdef" for c in name)


def _parallel(
    blobs: BlobStore, fn: Callable[[_T], _R], items: Sequence[_T]
) -> Iterator[tuple[_T, _R]]:
    """Yield ``(item, fn(item))`` for every item, reading several at once on remote storage."""
    workers = blobs.workers if blobs.is_local else max(blobs.workers, 8)
    if workers <= 1 or len(items) <= 1:
        for item in items:
            yield item, fn(item)
        return
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="casml-maint") as pool:
        # Bounded look-ahead keeps memory flat when reading many large blobs.
        window = workers * 2
        pending: list[Any] = []
        for item in items:
            pending.append((item, pool.submit(fn, item)))
            if len(pending) >= window:
                done_item, future = pending.pop(0)
                yield done_item, future.result()
        for done_item, future in pending:
            yield done_item, future.result()


_Read = tuple[Manifest | None, str | None]


def _read_manifest(blobs: BlobStore, address: str) -> _Read:
    """Return ``(manifest, None)``, ``(None, reason)`` if unreadable, ``(None, None)`` if gone."""
    try:
        data = blobs.get_manifest(address)
    except NotFoundError:
        return None, None
    try:
        manifest = load_manifest(data, address)
    except IntegrityError as exc:
        return None, str(exc)
    inline = manifest.inline_payload
    if inline is not None and digest_of(inline) != manifest.payload_digest:
        return None, (
            f"manifest of artifact {address} carries an inline payload that does not match "
            "its digest"
        )
    return manifest, None


def _read_manifests(
    store: Store, addresses: Sequence[str], progress: Progress, desc: str
) -> tuple[dict[str, Manifest], dict[str, str]]:
    """Read many manifests: ``({address: manifest}, {address: why unreadable})``."""
    good: dict[str, Manifest] = {}
    bad: dict[str, str] = {}
    blobs = store._blobs
    results = _parallel(blobs, lambda a: _read_manifest(blobs, a), addresses)
    for address, (manifest, reason) in progress(results, desc=desc, total=len(addresses)):
        if manifest is not None:
            good[address] = manifest
        elif reason is not None:
            bad[address] = reason
    return good, bad


def _record_path(blobs: BlobStore, key: str) -> str:
    return f"{blobs.root.rstrip('/')}/{RECORDS_DIR}/{key[:2]}/{key[2:]}"


def _record_address(blobs: BlobStore, key: str) -> str | None:
    """The artifact address a name/tag record is about; None if it is unreadable."""
    get_record = getattr(blobs, "get_record", None)
    if get_record is None:
        return None
    try:
        record = json.loads(get_record(key))
    except (IntegrityError, NotFoundError, ValueError, RecursionError):
        return None
    address = record.get("address") if isinstance(record, dict) else None
    return address if isinstance(address, str) and _is_hex(address, 32) else None


def _delete_record(blobs: BlobStore, key: str) -> None:
    delete_record = getattr(blobs, "delete_record", None)
    if delete_record is not None:
        delete_record(key)


def _record_mtime(blobs: BlobStore, key: str) -> float | None:
    path = _record_path(blobs, key)
    try:
        if blobs.is_local:
            return os.stat(path).st_mtime
        value = blobs.fs.modified(path)
        return float(value.timestamp())
    except FileNotFoundError:
        return None
    except (OSError, NotImplementedError, AttributeError):
        return 0.0  # no time known: treat as old, the manifest check already protects it


def _blob_mtime(blobs: BlobStore, digest: str) -> float | None:
    """The blob's modified time as a timestamp; None if it is gone, 0 if unknown."""
    try:
        when = blobs.modified_time(digest)
    except NotFoundError:
        return None
    return 0.0 if when is None else when.timestamp()


def _delete_blob_if_old(blobs: BlobStore, digest: str, cutoff: float) -> bool:
    """Delete a blob unless it was used since ``cutoff``; return True if it was deleted."""
    if not blobs.is_local:
        mtime = _blob_mtime(blobs, digest)
        if mtime is None or mtime >= cutoff:
            return False
        blobs.delete(digest)
        return True
    path = os.path.join(blobs.root, OBJECTS_DIR, digest[:2], digest[2:])
    directory, name = os.path.split(path)
    # Rename first, check after: a put that touches the blob before the rename leaves a fresh
    # mtime on the moved file (so it is put back); one that touches it after the rename finds
    # it missing and writes it again. Either way the put's blob survives.
    trash = os.path.join(directory, f".{name}.{secrets.token_hex(6)}{_GC_TRASH}{TEMP_SUFFIX}")
    try:
        os.rename(path, trash)
    except FileNotFoundError:
        return False
    except OSError as exc:
        raise StorageError(f"could not delete blob {digest} at {path}: {exc}") from exc
    try:
        if os.stat(trash).st_mtime >= cutoff:
            with contextlib.suppress(FileExistsError):
                os.link(trash, path)
            return False
        return True
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(trash)


def _manifest_mtime(blobs: BlobStore, address: str) -> float | None:
    path = f"{blobs.root.rstrip('/')}/{MANIFESTS_DIR}/{address[:2]}/{address[2:]}"
    try:
        if blobs.is_local:
            return os.stat(path).st_mtime
        return float(blobs.fs.modified(path).timestamp())
    except FileNotFoundError:
        return None
    except (OSError, NotImplementedError, AttributeError):
        return None  # unknown: keep it


def _list_records(blobs: BlobStore) -> list[str]:
    iter_records = getattr(blobs, "iter_records", None)
    return [] if iter_records is None else list(iter_records())


# ---------------------------------------------------------------------------- gc


def gc(
    store: Store,
    *,
    grace: float | timedelta = DEFAULT_GRACE,
    dry_run: bool = False,
    progress: Progress = no_progress,
) -> GcReport:
    """Delete the blobs no artifact references, once unused for ``grace`` (seconds or timedelta).

    The live set is every blob listed by every manifest in storage plus every blob the index
    links to. Also removes temporary files left by crashed writers, name/tag records of
    deleted artifacts, and unreadable manifests no index row knows (all only once older than
    the grace, and temporary files and manifests never younger than 10 minutes). With
    ``dry_run`` nothing is deleted and the report says what would be. ``progress`` wraps the
    long loops (pass ``tqdm``).
    """
    seconds = _grace_seconds(grace)
    blobs = store._blobs
    started = time.time()
    cutoff = started - seconds

    live: set[str] = set(store._index.referenced_digests())
    indexed = _indexed_hashes(store)
    addresses = list(blobs.iter_manifests())
    manifests, unreadable = _read_manifests(store, addresses, progress, "gc: reading manifests")
    for manifest in manifests.values():
        live.update(d for d, _ in manifest.blob_list())

    stored = _scan(blobs, OBJECTS_DIR)
    candidates: dict[str, int] = {}
    recent = 0
    unreferenced = [d for d in stored if d not in live]
    for digest in progress(unreferenced, desc="gc: checking blobs", total=len(unreferenced)):
        mtime = _blob_mtime(blobs, digest)
        if mtime is None:
            continue
        if mtime >= cutoff:
            recent += 1
        else:
            candidates[digest] = stored[digest]

    if candidates:
        # A put in flight when gc started may finish its manifest in the meantime.
        wait = _SETTLE_SECONDS - seconds - (time.time() - started)
        if wait > 0 and not dry_run:
            time.sleep(wait)
        fresh = [a for a in blobs.iter_manifests() if a not in manifests]
        late, late_bad = _read_manifests(store, fresh, no_progress, "")
        unreadable.update(late_bad)
        for manifest in late.values():
            manifests[manifest.address] = manifest
            for digest, _ in manifest.blob_list():
                if candidates.pop(digest, None) is not None:
                    recent += 1

    deleted: list[str] = []
    freed = 0
    for digest in progress(list(candidates), desc="gc: deleting blobs", total=len(candidates)):
        if dry_run or _delete_blob_if_old(blobs, digest, cutoff):
            deleted.append(digest)
            freed += candidates[digest]
        else:
            recent += 1

    slow_cutoff = started - max(seconds, _MIN_TEMP_AGE)
    manifests_deleted = 0
    for address in unreadable:
        if address in indexed:
            continue  # verify reports it; `verify --repair` decides
        mtime = _manifest_mtime(blobs, address)
        if mtime is not None and mtime < slow_cutoff:
            if not dry_run:
                blobs.delete_manifest(address)
            manifests_deleted += 1

    records_deleted = 0
    for key in _list_records(blobs):
        about = _record_address(blobs, key)
        if about is None or about in manifests or about in unreadable:
            continue  # unreadable records are verify's business
        mtime = _record_mtime(blobs, key)
        if mtime is None or mtime >= cutoff or blobs.has_manifest(about):
            continue
        if not dry_run:
            _delete_record(blobs, key)
        records_deleted += 1

    temp_files = blobs.clean_temp_files(older_than=max(seconds, _MIN_TEMP_AGE), dry_run=dry_run)

    return GcReport(
        blobs_deleted=len(deleted),
        bytes_freed=freed,
        manifests_deleted=manifests_deleted,
        records_deleted=records_deleted,
        temp_files_deleted=temp_files,
        blobs_live=sum(1 for d in stored if d in live),
        blobs_recent=recent,
        dry_run=dry_run,
        grace_seconds=seconds,
        deleted=tuple(sorted(deleted)),
    )


def _indexed_hashes(store: Store) -> set[str]:
    return {info.hash for info in store._index.find()}


# ---------------------------------------------------------------------------- reindex


def reindex(store: Store, *, progress: Progress = no_progress) -> tuple[int, list[str]]:
    """Index every manifest the index lacks, then replay name/tag records from storage.

    Returns ``(added, warnings)``: how many artifacts were added, and what was skipped
    (damaged manifests or records), as messages. Unlike a failed read, a damaged manifest
    does not stop the rest.
    """
    blobs = store._blobs
    stored = list(blobs.iter_manifests())
    missing = sorted(store._index.missing(stored))
    added = 0
    manifests, bad = _read_manifests(store, missing, progress, "reindex: reading manifests")
    for address in missing:
        manifest = manifests.get(address)
        if manifest is not None and not store._index.contains(address):
            store._index.add(store._record(manifest))
            added += 1
    # The Store's own reindex also restores names, versions and tags from their records;
    # every readable manifest is indexed by now, so it only replays those.
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        added += store.reindex()
    problems = list(dict.fromkeys(str(w.message) for w in caught))
    for address, reason in bad.items():
        if not any(address in message for message in problems):
            problems.append(f"skipped a damaged artifact: {reason}")
    return added, problems


# ---------------------------------------------------------------------------- verify


@dataclass
class _Finding:
    kind: str
    key: str
    message: str
    artifacts: tuple[str, ...] = ()
    fixed: bool = False
    action: str | None = None

    def freeze(self) -> Problem:
        return Problem(self.kind, self.key, self.message, self.artifacts, self.fixed, self.action)


@dataclass
class _Verification:
    findings: list[_Finding] = field(default_factory=list)

    def add(self, kind: str, key: str, message: str, artifacts: Iterable[str] = ()) -> _Finding:
        finding = _Finding(kind, key, message, tuple(sorted(set(artifacts))))
        self.findings.append(finding)
        return finding


def _check_blob(blobs: BlobStore, digest: str) -> tuple[int, str | None] | None:
    """Re-hash one blob: ``(size, None)`` if sound, ``(0, reason)`` if corrupt, None if gone."""
    try:
        data = blobs.get_bytes(digest)
    except NotFoundError:
        return None
    except IntegrityError as exc:
        return 0, str(exc)
    return len(data), None


def verify(
    store: Store,
    *,
    repair: bool = False,
    source: Store | None = None,
    progress: Progress = no_progress,
) -> VerifyReport:
    """Re-hash every blob and cross-check manifests, index rows and records; report problems.

    Finds missing and corrupt blobs, corrupt or truncated manifests and records, manifests the
    index lacks, index rows without a manifest, index rows that disagree with their manifest,
    dependencies that are gone, and orphan blobs (not errors: gc frees them). With
    ``repair=True`` it fixes what storage allows: indexes unindexed manifests (names and tags
    come back from their records), rebuilds mismatched index rows, removes index rows whose
    manifest is gone, and deletes corrupt blobs, manifests and records. Missing or corrupt
    blobs are copied back from ``source`` (default: the store's ``remote``), any store that
    holds the same bytes: blobs are keyed by content, so any copy is the right one.
    """
    blobs = store._blobs
    index = store._index
    v = _Verification()

    # Order matters under concurrent puts (blobs, then manifest, then index row): listing the
    # index first, then manifests, then blobs, never sees a row without its manifest or a
    # manifest without its blobs, except through a real fault.
    index_rows = _indexed_hashes(store)
    addresses = list(blobs.iter_manifests())
    manifests, unreadable = _read_manifests(store, addresses, progress, "verify: manifests")
    stored = _scan(blobs, OBJECTS_DIR)

    users: dict[str, set[str]] = {}
    for address, manifest in manifests.items():
        for digest, _ in manifest.blob_list():
            users.setdefault(digest, set()).add(address)
    index_digests = set(index.referenced_digests())

    corrupt_manifests: dict[str, _Finding] = {}
    for address, reason in sorted(unreadable.items()):
        corrupt_manifests[address] = v.add("corrupt_manifest", address, reason, [address])

    for key in blobs.iter_packs():
        try:
            blobs._read_pack(key)
        except (IntegrityError, NotFoundError) as exc:
            v.add(
                "corrupt_pack",
                key,
                f"pack {key} is damaged ({exc}); the manifests it held cannot be read: pull "
                "those artifacts again from a store that has them",
            )

    missing_blobs: list[_Finding] = []
    for digest in sorted(set(users) - set(stored)):
        if blobs.exists(digest):
            continue  # written after the listing
        missing_blobs.append(
            v.add(
                "missing_blob",
                digest,
                f"blob {digest} is listed by {len(users[digest])} artifact(s) but is not "
                "stored; `casml verify --repair --from URL` copies it back from any store "
                "holding it, or `casml rm` the artifact and put it again",
                users[digest],
            )
        )

    corrupt_blobs: list[_Finding] = []
    bytes_checked = 0
    digests = sorted(stored)
    checks = _parallel(blobs, lambda d: _check_blob(blobs, d), digests)
    for digest, outcome in progress(checks, desc="verify: re-hashing blobs", total=len(digests)):
        if outcome is None:
            continue
        size, damage = outcome
        bytes_checked += size
        if damage is not None:
            needed = len(users.get(digest, ()))
            message = (
                f"blob {digest} is damaged: its bytes no longer hash to its digest "
                f"(needed by {needed} artifact(s)); `casml verify --repair --from URL` "
                "replaces it with a good copy from any store holding it"
            )
            corrupt_blobs.append(v.add("corrupt_blob", digest, message, users.get(digest, ())))

    for digest in digests:
        if digest not in users and digest not in index_digests:
            v.add(
                "orphan_blob",
                digest,
                f"blob {digest} ({stored[digest]} bytes) is referenced by nothing; "
                "`casml gc` frees it",
            )

    for address, manifest in sorted(manifests.items()):
        for dependency in manifest.dependencies:
            if dependency in manifests:
                continue
            if dependency in unreadable:
                state = "whose manifest is damaged"
            elif blobs.has_manifest(dependency):
                continue  # stored after the listing
            else:
                state = "which is not stored"
            v.add(
                "missing_dependency",
                dependency,
                f"artifact {address} depends on {dependency}, {state}; "
                "put or pull the dependency again",
                [address],
            )

    unindexed: list[_Finding] = []
    for address in sorted(set(manifests) - index_rows):
        if index.contains(address):
            continue
        unindexed.append(
            v.add(
                "unindexed_manifest",
                address,
                f"artifact {address} is in storage but not in the index, so queries miss it; "
                "`casml reindex` adds it",
                [address],
            )
        )

    dangling: list[_Finding] = []
    for address in sorted(index_rows - set(manifests) - set(unreadable)):
        if blobs.has_manifest(address) or not index.contains(address):
            continue
        dangling.append(
            v.add(
                "dangling_index_row",
                address,
                f"the index lists artifact {address} but storage has no manifest for it; "
                "pull it from a remote, or `casml verify --repair` drops the row",
                [address],
            )
        )

    mismatched: list[_Finding] = []
    for address in sorted(set(manifests) & index_rows):
        manifest = manifests[address]
        expected_blobs = [(d, s) for d, s in manifest.blob_list()]
        try:
            size = index.info(address).size
        except NotFoundError:
            continue  # deleted meanwhile
        if (
            size != manifest.size
            or index.blobs_of(address) != expected_blobs
            or index.dependencies(address) != list(manifest.dependencies)
        ):
            mismatched.append(
                v.add(
                    "index_mismatch",
                    address,
                    f"the index row of artifact {address} disagrees with its manifest "
                    "(blobs, dependencies or size); `casml verify --repair` rebuilds it",
                    [address],
                )
            )

    records = _list_records(blobs)
    corrupt_records: list[_Finding] = []
    get_record = getattr(blobs, "get_record", None)
    for key in records:
        if get_record is None:
            break
        try:
            data = get_record(key)
            json.loads(data)
        except NotFoundError:
            continue
        except (IntegrityError, ValueError, RecursionError) as exc:
            corrupt_records.append(v.add("corrupt_record", key, f"record {key}: {exc}"))

    if repair:
        _repair(
            store,
            source=source if source is not None else store.remote,
            manifests=manifests,
            corrupt_manifests=corrupt_manifests,
            missing_blobs=missing_blobs,
            corrupt_blobs=corrupt_blobs,
            corrupt_records=corrupt_records,
            unindexed=unindexed,
            dangling=dangling,
            mismatched=mismatched,
        )

    order = list(PROBLEM_KINDS)
    problems = sorted((f.freeze() for f in v.findings), key=lambda p: (order.index(p.kind), p.key))
    return VerifyReport(
        problems=tuple(problems),
        blobs_checked=len(digests),
        bytes_checked=bytes_checked,
        manifests_checked=len(addresses),
        index_rows_checked=len(index_rows),
        records_checked=len(records),
        repair=repair,
    )


def _repair(
    store: Store,
    *,
    source: Store | None,
    manifests: dict[str, Manifest],
    corrupt_manifests: dict[str, _Finding],
    missing_blobs: list[_Finding],
    corrupt_blobs: list[_Finding],
    corrupt_records: list[_Finding],
    unindexed: list[_Finding],
    dangling: list[_Finding],
    mismatched: list[_Finding],
) -> None:
    blobs = store._blobs
    index = store._index
    if dangling and not manifests and not corrupt_manifests:
        # Every row dangling at once means the wrong storage, not a store that lost it all:
        # dropping the rows would throw away names and tags for nothing.
        raise CasmlError(
            f"storage at {store.root} holds no manifest at all while the index "
            f"{store.index_url} lists {len(dangling)} artifact(s); check --root/--index "
            "before repairing (nothing was changed)"
        )
    for finding in corrupt_blobs:
        blobs.delete(finding.key)
        finding.action = "deleted the damaged copy"
        finding.fixed = not finding.artifacts
    for finding in [*corrupt_blobs, *missing_blobs]:
        if not finding.artifacts or source is None:
            continue
        restored = _copy_blob(source, store, finding.key)
        before = f"{finding.action}; " if finding.action else ""
        if restored:
            finding.action = f"{before}copied a good copy from {source.root}"
            finding.fixed = True
        else:
            finding.action = f"{before}{source.root} has no good copy either"
    for finding in corrupt_manifests.values():
        blobs.delete_manifest(finding.key)
        index.delete(finding.key)
        finding.action = (
            "deleted the damaged manifest and its index row; put the object again or pull it "
            "from a remote to restore it"
        )
        finding.fixed = True
    for finding in corrupt_records:
        _delete_record(blobs, finding.key)
        finding.action = "deleted the damaged record"
        finding.fixed = True
    for finding in dangling:
        index.delete(finding.key)
        finding.action = "removed the index row (its names and tags went with it)"
        finding.fixed = True
    for finding in mismatched:
        index.delete(finding.key)
    for finding in unindexed:
        index.add(store._record(manifests[finding.key]))
    if unindexed or mismatched:
        for finding in mismatched:
            index.add(store._record(manifests[finding.key]))
        # Names, versions and tags live in records in storage: replay them.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            store.reindex()
    for finding in [*unindexed, *mismatched]:
        finding.fixed = index.contains(finding.key)
        finding.action = (
            "indexed it from its manifest (names and tags restored from their records)"
            if finding.kind == "unindexed_manifest"
            else "rebuilt the index row from the manifest (names and tags from their records)"
        )


def _copy_blob(source: Store, target: Store, digest: str) -> bool:
    """Copy one blob between stores, verified on read; False if the source has no good copy."""
    try:
        data = source._blobs.get_bytes(digest)
    except (NotFoundError, IntegrityError):
        return False
    return target._blobs.put_bytes(data) == digest


# ---------------------------------------------------------------------------- du


def disk_usage(store: Store, *, progress: Progress = no_progress) -> DiskUsage:
    """Measure logical bytes (what artifacts hold) against stored bytes (what storage holds).

    Artifact sizes come from the manifests in storage (every artifact, indexed or not);
    stored bytes from one listing of each storage area.
    """
    blobs = store._blobs
    manifest_sizes = _scan(blobs, MANIFESTS_DIR)
    # Packed manifests count as artifacts too; the packs themselves as manifest bytes.
    addresses = sorted(blobs.iter_manifests())
    manifest_sizes.update(_scan(blobs, PACKS_DIR))
    manifests, _ = _read_manifests(store, addresses, progress, "du: reading manifests")
    blob_sizes = _scan(blobs, OBJECTS_DIR)
    record_sizes = _scan(blobs, RECORDS_DIR)
    return DiskUsage(
        artifacts=len(manifests),
        indexed_artifacts=store._index.count(),
        blobs=len(blob_sizes),
        logical_bytes=sum(m.size for m in manifests.values()),
        blob_bytes=sum(blob_sizes.values()),
        manifest_bytes=sum(manifest_sizes.values()),
        record_bytes=sum(record_sizes.values()),
    )
