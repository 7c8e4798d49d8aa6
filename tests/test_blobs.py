"""Tests for casml.blobs: content-addressed blobs and create-only manifests behind fsspec."""

from __future__ import annotations

import array
import multiprocessing
import os
import random
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest
import xxhash
from fsspec.implementations.memory import MemoryFileSystem

from casml.blobs import DEFAULT_CHUNK_SIZE, BlobStore, WriteStats, digest_of, is_digest
from casml.errors import (
    CasmlError,
    IntegrityError,
    InvalidHashError,
    NotFoundError,
    StorageError,
)
from tests.processes import collect

MiB = 1024 * 1024
BACKENDS = ["local", "memory"]


def _memory_snapshot() -> tuple[frozenset[str], frozenset[str]]:
    return frozenset(MemoryFileSystem.store), frozenset(MemoryFileSystem.pseudo_dirs)


def _purge_memory(root: str) -> None:
    for key in [k for k in MemoryFileSystem.store if k == root or k.startswith(root + "/")]:
        del MemoryFileSystem.store[key]
    MemoryFileSystem.pseudo_dirs[:] = [
        d for d in MemoryFileSystem.pseudo_dirs if not (d == root or d.startswith(root + "/"))
    ]


def _open(backend: str, tmp_path: Path, **kw: Any) -> BlobStore:
    if backend == "local":
        return BlobStore.from_url(str(tmp_path / "store"), **kw)
    return BlobStore.from_url(f"memory://casml-test-{uuid.uuid4().hex}", **kw)


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def store(backend: str, tmp_path: Path) -> Iterator[BlobStore]:
    s = _open(backend, tmp_path)
    yield s
    if backend == "memory":
        _purge_memory(s.root)


@pytest.fixture
def small_store(backend: str, tmp_path: Path) -> Iterator[BlobStore]:
    s = _open(backend, tmp_path, chunk_size=1 * MiB)
    yield s
    if backend == "memory":
        _purge_memory(s.root)


def all_files(s: BlobStore) -> list[str]:
    """Every file under the store root, temporary files included."""
    if s.is_local:
        found: list[str] = []
        for dirpath, _, names in os.walk(s.root):
            found.extend(os.path.join(dirpath, n) for n in names)
        return sorted(found)
    return sorted(k for k in MemoryFileSystem.store if k.startswith(s.root + "/"))


def blob_path(s: BlobStore, digest: str) -> str:
    return f"{s.root}/objects/{digest[:2]}/{digest[2:]}"


def rewrite(s: BlobStore, path: str, data: bytes) -> None:
    """Replace a stored file's bytes behind the store's back (simulating disk corruption)."""
    if s.is_local:
        Path(path).write_bytes(data)
    else:
        s.fs.pipe_file(path, data)


def read_raw(s: BlobStore, path: str) -> bytes:
    return Path(path).read_bytes() if s.is_local else bytes(s.fs.cat_file(path))


def rand_bytes(n: int, seed: int = 0) -> bytes:
    return random.Random(seed).randbytes(n)


# --------------------------------------------------------------------------- basics


def test_is_digest() -> None:
    assert is_digest("0123456789abcdef" * 2)
    for bad in ["0123456789ABCDEF" * 2, "0" * 31, "0" * 33, "0" * 32 + "\n", "g" * 32, None, 7]:
        assert not is_digest(bad)


def test_from_url_local_and_memory(tmp_path: Path) -> None:
    local = BlobStore.from_url(str(tmp_path / "a"))
    assert local.is_local
    assert local.url == str(tmp_path / "a")
    assert not (tmp_path / "a").exists()  # opening creates nothing
    mem = BlobStore.from_url("memory://casml-url-test")
    assert not mem.is_local
    assert mem.url.startswith("memory://")
    assert mem.url.rstrip("/").endswith("casml-url-test")
    assert local.chunk_size == DEFAULT_CHUNK_SIZE


def test_round_trip_and_layout(store: BlobStore) -> None:
    data = b"hello casml" * 1000
    digest = store.put_bytes(data)
    assert digest == xxhash.xxh3_128_hexdigest(data) == digest_of(data)
    assert is_digest(digest)
    assert store.get_bytes(digest) == data
    assert store.exists(digest)
    assert store.size(digest) == len(data)
    assert all_files(store) == [blob_path(store, digest)]
    assert store.stats == WriteStats(objects_written=1, bytes_written=len(data))
    mtime = store.modified_time(digest)
    assert mtime is not None and mtime.tzinfo is not None
    assert abs(datetime.now(timezone.utc) - mtime) < timedelta(minutes=5)


def test_put_accepts_bytearray_and_typed_memoryview(store: BlobStore) -> None:
    values = array.array("d", [1.5, -2.0, 3.25] * 100)
    as_bytes = values.tobytes()
    assert store.put_bytes(memoryview(values)) == digest_of(as_bytes)
    assert store.put_bytes(bytearray(as_bytes)) == digest_of(as_bytes)
    assert store.put_chunked(memoryview(values)) == [(digest_of(as_bytes), len(as_bytes))]
    assert store.stats.objects_written == 1


def test_empty_blob(store: BlobStore) -> None:
    digest = store.put_bytes(b"")
    assert store.get_bytes(digest) == b""
    assert store.put_chunked(memoryview(b"")) == [(digest, 0)]
    store.read_into([(digest, 0)], memoryview(bytearray()))


def test_second_put_writes_nothing(store: BlobStore) -> None:
    data = rand_bytes(300_000)
    digest = store.put_bytes(data)
    before_stats, before_files = store.stats, all_files(store)
    assert store.put_bytes(data) == digest
    assert store.put_chunked(memoryview(data)) == [(digest, len(data))]
    assert store.stats == before_stats
    assert all_files(store) == before_files


# --------------------------------------------------------------------------- chunking


def test_chunking_and_partial_change(small_store: BlobStore) -> None:
    s = small_store
    buf = bytearray(rand_bytes(10 * MiB, seed=1))
    chunks = s.put_chunked(memoryview(buf))
    assert len(chunks) == 10
    assert [size for _, size in chunks] == [MiB] * 10
    assert s.stats == WriteStats(objects_written=10, bytes_written=10 * MiB)

    out = bytearray(len(buf))
    s.read_into(chunks, memoryview(out))
    assert out == buf

    # Change 1% of the bytes, contiguously, straddling a chunk boundary (worst case: 2 chunks).
    start = 3 * MiB - 50_000
    span = len(buf) // 100
    buf[start : start + span] = rand_bytes(span, seed=2)
    before = s.stats
    chunks2 = s.put_chunked(memoryview(buf))
    new_objects = s.stats.objects_written - before.objects_written
    assert 1 <= new_objects <= 2
    assert s.stats.bytes_written - before.bytes_written <= 2 * MiB
    assert sum(a != b for a, b in zip(chunks, chunks2, strict=True)) == new_objects
    out2 = bytearray(len(buf))
    s.read_into(chunks2, memoryview(out2))
    assert out2 == buf


def test_uneven_tail_and_single_chunk(small_store: BlobStore) -> None:
    data = rand_bytes(2 * MiB + 123, seed=3)
    chunks = small_store.put_chunked(memoryview(data))
    assert [size for _, size in chunks] == [MiB, MiB, 123]
    assert small_store.put_chunked(memoryview(data[:MiB])) == [chunks[0]]
    out = bytearray(len(data))
    small_store.read_into(chunks, memoryview(out))
    assert bytes(out) == data


def test_read_into_rejects_wrong_total_and_readonly(small_store: BlobStore) -> None:
    data = rand_bytes(1000)
    chunks = small_store.put_chunked(memoryview(data))
    with pytest.raises(IntegrityError, match="add up to 1000"):
        small_store.read_into(chunks, memoryview(bytearray(999)))
    with pytest.raises(CasmlError, match="writable"):
        small_store.read_into(chunks, memoryview(bytes(1000)))


# --------------------------------------------------------------------------- integrity


def test_flipped_byte_is_integrity_error(small_store: BlobStore) -> None:
    s = small_store
    data = rand_bytes(3 * MiB, seed=4)
    chunks = s.put_chunked(memoryview(data))
    digest = chunks[1][0]
    path = blob_path(s, digest)
    raw = bytearray(read_raw(s, path))
    raw[12345] ^= 0x01
    rewrite(s, path, bytes(raw))

    with pytest.raises(IntegrityError) as info:
        s.get_bytes(digest)
    message = str(info.value)
    assert digest in message and path in message and "casml verify" in message
    with pytest.raises(IntegrityError, match=digest):
        s.read_into(chunks, memoryview(bytearray(len(data))))
    # Untouched chunks still read fine.
    assert s.get_bytes(chunks[0][0]) == data[:MiB]


def test_truncated_blob_is_integrity_error(small_store: BlobStore) -> None:
    s = small_store
    data = rand_bytes(5000, seed=5)
    chunks = s.put_chunked(memoryview(data))
    rewrite(s, blob_path(s, chunks[0][0]), data[:4000])
    with pytest.raises(IntegrityError, match="4000 bytes"):
        s.read_into(chunks, memoryview(bytearray(5000)))
    with pytest.raises(IntegrityError):
        s.get_bytes(chunks[0][0])


def test_missing_blob_is_not_found(store: BlobStore) -> None:
    absent = "ab" + "0" * 30
    for call in (
        lambda: store.get_bytes(absent),
        lambda: store.size(absent),
        lambda: store.modified_time(absent),
        lambda: store.read_into([(absent, 3)], memoryview(bytearray(3))),
        lambda: store.get_manifest(absent),
    ):
        with pytest.raises(NotFoundError) as info:
            call()
        assert absent in str(info.value)
        assert isinstance(info.value, KeyError)
    assert not store.exists(absent)
    assert not store.has_manifest(absent)
    store.delete(absent)  # deleting what is not there is fine
    store.delete_manifest(absent)


def test_delete(store: BlobStore) -> None:
    digest = store.put_bytes(b"to be deleted")
    store.delete(digest)
    assert not store.exists(digest)
    assert list(store.iter_digests()) == []
    with pytest.raises(NotFoundError):
        store.get_bytes(digest)
    # It can be stored again afterwards.
    assert store.put_bytes(b"to be deleted") == digest
    assert store.get_bytes(digest) == b"to be deleted"


# --------------------------------------------------------------------------- hostile keys

HOSTILE = [
    "../../etc/passwd",
    "../" + "0" * 29,
    "/" * 32,
    "0" * 31,
    "0" * 33,
    "0" * 32 + "\n",
    "ABCDEF0123456789" * 2,
    "..%2f" * 6 + "00",
    "",
    None,
    123,
]


def _tree(base: Path) -> list[tuple[str, float]]:
    return sorted(
        (str(p.relative_to(base)), p.stat().st_mtime) for p in base.rglob("*") if p.exists()
    )


@pytest.mark.parametrize("bad", HOSTILE, ids=repr)
def test_hostile_keys_touch_nothing(backend: str, tmp_path: Path, bad: Any) -> None:
    work = tmp_path / "work"
    (work / "etc").mkdir(parents=True)
    (work / "etc" / "passwd").write_text("root:x:0:0")
    s = BlobStore.from_url(str(work / "a" / "b" / "store")) if backend == "local" else None
    if s is None:
        s = BlobStore.from_url(f"memory://casml-test-{uuid.uuid4().hex}")
    s.put_manifest("cd" * 16, b"existing")
    before_disk, before_mem = _tree(tmp_path), _memory_snapshot()
    calls: list[Callable[[], object]] = [
        lambda: s.get_bytes(bad),
        lambda: s.exists(bad),
        lambda: s.size(bad),
        lambda: s.delete(bad),
        lambda: s.modified_time(bad),
        lambda: s.missing(["cd" * 16, bad]),
        lambda: s.read_into([(bad, 0)], memoryview(bytearray())),
        lambda: s.put_manifest(bad, b"evil"),
        lambda: s.get_manifest(bad),
        lambda: s.has_manifest(bad),
        lambda: s.delete_manifest(bad),
    ]
    try:
        for call in calls:
            with pytest.raises(InvalidHashError):
                call()
        assert _tree(tmp_path) == before_disk
        assert _memory_snapshot() == before_mem
        assert (work / "etc" / "passwd").read_text() == "root:x:0:0"
    finally:
        if not s.is_local:
            _purge_memory(s.root)


def test_hostile_prefix(store: BlobStore) -> None:
    for bad in ["", "a", "../", "AB", "ab/", "0" * 33]:
        with pytest.raises(InvalidHashError):
            store.manifests_with_prefix(bad)


# --------------------------------------------------------------------------- concurrency


def test_threads_writing_the_same_blob(backend: str, tmp_path: Path) -> None:
    root = str(tmp_path / "store") if backend == "local" else f"memory://t-{uuid.uuid4().hex}"
    stores = [BlobStore.from_url(root, chunk_size=MiB) for _ in range(8)]
    data = rand_bytes(3 * MiB + 7, seed=6)
    barrier = threading.Barrier(len(stores))
    results: list[list[tuple[str, int]]] = []
    errors: list[BaseException] = []

    def work(s: BlobStore) -> None:
        try:
            barrier.wait()
            results.append(s.put_chunked(memoryview(data)))
        except BaseException as exc:  # collected and re-raised by the assertions below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(s,)) for s in stores]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    try:
        assert errors == []
        assert len(results) == 8 and all(r == results[0] for r in results)
        files = all_files(stores[0])
        assert files == sorted(blob_path(stores[0], d) for d, _ in results[0])
        assert not any(f.endswith(".tmp") for f in files)
        written = sum(s.stats.objects_written for s in stores)
        if backend == "local":
            assert written == 4  # the hard link lets exactly one writer win per chunk
        else:
            assert written >= 4
        out = bytearray(len(data))
        stores[0].read_into(results[0], memoryview(out))
        assert bytes(out) == data
    finally:
        if backend == "memory":
            _purge_memory(stores[0].root)


def _process_writer(root: str, barrier: Any, queue: Any) -> None:
    s = BlobStore.from_url(root, chunk_size=MiB)
    data = rand_bytes(4 * MiB, seed=7)
    barrier.wait()
    chunks = s.put_chunked(memoryview(data))
    created = s.put_manifest("ef" * 16, str(os.getpid()).encode())
    queue.put((chunks, s.stats.objects_written, created))


def test_processes_writing_the_same_blob(tmp_path: Path) -> None:
    root = str(tmp_path / "store")
    ctx = multiprocessing.get_context("spawn")
    barrier, queue = ctx.Barrier(4), ctx.Queue()
    procs = [ctx.Process(target=_process_writer, args=(root, barrier, queue)) for _ in range(4)]
    results = collect(procs, queue, timeout=60)
    chunks = results[0][0]
    assert len(chunks) == 4 and all(r[0] == chunks for r in results)
    assert sum(r[1] for r in results) == 4
    assert sum(r[2] for r in results) == 1  # exactly one process created the manifest
    s = BlobStore.from_url(root)
    files = all_files(s)
    assert len(files) == 5 and not any(f.endswith(".tmp") for f in files)
    out = bytearray(4 * MiB)
    s.read_into(chunks, memoryview(out))
    assert bytes(out) == rand_bytes(4 * MiB, seed=7)


# --------------------------------------------------------------------------- manifests


def test_manifest_create_only(store: BlobStore) -> None:
    address = "12" * 16
    assert not store.has_manifest(address)
    assert store.put_manifest(address, b"first") is True
    assert store.put_manifest(address, b"second") is False
    assert store.get_manifest(address) == b"first"
    assert store.has_manifest(address)
    assert store.stats.manifests_written == 1
    assert store.stats.objects_written == 0
    store.delete_manifest(address)
    assert not store.has_manifest(address)
    with pytest.raises(NotFoundError, match=address):
        store.get_manifest(address)
    assert store.put_manifest(address, b"third") is True
    assert store.get_manifest(address) == b"third"


def test_manifest_race_first_writer_wins(backend: str, store: BlobStore) -> None:
    address = "34" * 16
    barrier = threading.Barrier(8)
    outcomes: dict[bytes, bool] = {}

    def work(i: int) -> None:
        payload = f"writer-{i}".encode()
        barrier.wait()
        outcomes[payload] = store.put_manifest(address, payload)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    winners = [p for p, created in outcomes.items() if created]
    assert len(outcomes) == 8 and winners
    assert store.get_manifest(address) in winners
    if backend == "local":
        assert len(winners) == 1
        assert not any(f.endswith(".tmp") for f in all_files(store))


# --------------------------------------------------------------------------- listings


def test_iterators(store: BlobStore) -> None:
    digests = {store.put_bytes(f"blob {i}".encode()) for i in range(20)}
    addresses = {f"{i:02x}" * 16 for i in range(5)}
    for a in addresses:
        store.put_manifest(a, b"m")
    if store.is_local:
        # Leftovers of a crashed writer are not blobs.
        some = next(iter(digests))
        Path(blob_path(store, some) + "x.tmp").write_bytes(b"junk")
    assert set(store.iter_digests()) == digests
    assert len(list(store.iter_digests())) == 20
    assert set(store.iter_manifests()) == addresses
    gone = next(iter(digests))
    store.delete(gone)
    assert set(store.iter_digests()) == digests - {gone}


def test_iterators_on_empty_store(store: BlobStore) -> None:
    assert list(store.iter_digests()) == []
    assert list(store.iter_manifests()) == []
    assert store.manifests_with_prefix("ab") == []
    assert store.missing([]) == set()


def test_missing(store: BlobStore) -> None:
    present = [store.put_bytes(f"item {i}".encode()) for i in range(60)]
    # Absent digests in the same prefix directories as present ones exercise the listing path.
    absent = {d[:2] + "f" * 30 for d in present[:10]} | {"00" + "1" * 30}
    absent -= set(present)
    assert store.missing(present + sorted(absent)) == absent
    assert store.missing(present) == set()
    store.delete(present[0])
    assert store.missing(present) == {present[0]}


def test_manifests_with_prefix(store: BlobStore) -> None:
    a1, a2, a3 = "ab12" + "0" * 28, "ab13" + "1" * 28, "ac12" + "2" * 28
    for a in (a1, a2, a3):
        store.put_manifest(a, a.encode())
    assert store.manifests_with_prefix("ab") == [a1, a2]
    assert store.manifests_with_prefix("ab12") == [a1]
    assert store.manifests_with_prefix(a3) == [a3]
    assert store.manifests_with_prefix("ff") == []
    assert store.manifests_with_prefix("ab1") == [a1, a2]


# --------------------------------------------------------------------------- local specifics


def test_dedup_put_refreshes_mtime(tmp_path: Path) -> None:
    s = BlobStore.from_url(str(tmp_path / "store"))
    digest = s.put_bytes(b"old blob")
    old = time.time() - 86_400
    os.utime(blob_path(s, digest), (old, old))
    before = s.modified_time(digest)
    assert before is not None and before < datetime.now(timezone.utc) - timedelta(hours=23)
    s.put_bytes(b"old blob")
    after = s.modified_time(digest)
    assert after is not None and after > datetime.now(timezone.utc) - timedelta(minutes=5)
    assert s.stats.objects_written == 1


def test_storage_errors_are_wrapped(tmp_path: Path) -> None:
    root = tmp_path / "store"
    root.mkdir()
    (root / "objects").write_bytes(b"not a directory")
    s = BlobStore.from_url(str(root))
    with pytest.raises(StorageError, match="objects"):
        s.put_bytes(b"cannot land")

    other = BlobStore.from_url(str(tmp_path / "other"))
    digest = digest_of(b"x")
    Path(blob_path(other, digest)).mkdir(parents=True)  # a directory where a blob belongs
    with pytest.raises(StorageError, match=digest[2:]):
        other.get_bytes(digest)


def test_fsync_mode_and_temp_cleanup(tmp_path: Path) -> None:
    s = BlobStore.from_url(str(tmp_path / "store"), fsync=True, chunk_size=MiB)
    data = rand_bytes(2 * MiB + 1, seed=8)
    chunks = s.put_chunked(memoryview(data))
    assert s.put_manifest("56" * 16, b"durable")
    out = bytearray(len(data))
    s.read_into(chunks, memoryview(out))
    assert bytes(out) == data

    stale = Path(blob_path(s, chunks[0][0])).parent / f".{'0' * 30}.deadbeef.tmp"
    fresh = stale.with_name(f".{'1' * 30}.cafe.tmp")
    stale.write_bytes(b"partial")
    fresh.write_bytes(b"in flight")
    old = time.time() - 7200
    os.utime(stale, (old, old))
    assert s.clean_temp_files(older_than=3600) == 1
    assert not stale.exists() and fresh.exists()
    assert s.get_bytes(chunks[0][0]) == data[:MiB]


def test_put_chunked_with_known_digests(small_store: BlobStore) -> None:
    data = rand_bytes(2 * MiB + 5, seed=9)
    expected = small_store.put_chunked(memoryview(data))
    other = BlobStore.from_url(small_store.url + "-named", chunk_size=MiB)
    assert other.put_chunked(memoryview(data), [d for d, _ in expected]) == expected
    out = bytearray(len(data))
    other.read_into(expected, memoryview(out))
    assert bytes(out) == data
    with pytest.raises(CasmlError, match="2 digests for 3 pieces"):
        other.put_chunked(memoryview(data), [d for d, _ in expected][:2])
    with pytest.raises(CasmlError):
        other.put_chunked(memoryview(data), ["not-a-digest", *[d for d, _ in expected][1:]])
