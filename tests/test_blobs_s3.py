"""BlobStore on real S3 servers: SeaweedFS (started by the fixtures) and moto's server.

What is checked: round trips, create-only writes through conditional PUTs (SeaweedFS's 412
arrives as OSError(EINVAL), moto's as FileExistsError), racing writers, concurrent chunk
transfers, batched existence checks, request counts, retries of transient failures, and a
whole Store on S3. Request counts come from botocore's ``before-send`` event, so they are
the HTTP requests really sent. The retry tests at the end need no server: they use a
memory filesystem that fails on purpose.
"""

from __future__ import annotations

import contextlib
import errno
import os
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from fsspec.implementations.memory import MemoryFileSystem

from casml.blobs import BlobStore, digest_of
from casml.errors import IntegrityError, NotFoundError, StorageError
from casml.store import Store
from tests import services

integration = pytest.mark.integration


@pytest.fixture(params=[pytest.param(name, marks=integration) for name in ("seaweedfs", "moto")])
def s3(request: pytest.FixtureRequest) -> services.S3Server:
    """Each test runs against SeaweedFS and against moto's S3 server."""
    fixture = "s3_server" if request.param == "seaweedfs" else "moto_server"
    server: services.S3Server = request.getfixturevalue(fixture)
    return server


@pytest.fixture
def blobs(s3: services.S3Server) -> BlobStore:
    """A BlobStore under a fresh prefix of the test bucket."""
    return BlobStore.from_url(s3.url(), s3.storage_options)


class Requests:
    """Count the HTTP requests a store's s3fs client sends, by S3 operation name."""

    def __init__(self, store: BlobStore) -> None:
        store.exists("0" * 32)  # make sure s3fs has created its client
        self._events = store.fs.s3.meta.events
        self.counts: Counter[str] = Counter()
        self._lock = threading.Lock()

    def _record(self, event_name: str, **_: Any) -> None:
        with self._lock:
            self.counts[event_name.rsplit(".", 1)[-1]] += 1

    def __enter__(self) -> Requests:
        self._events.register("before-send.s3", self._record)
        return self

    def __exit__(self, *exc: object) -> None:
        self._events.unregister("before-send.s3", self._record)

    @property
    def total(self) -> int:
        return sum(self.counts.values())


def blobs_in_prefix(prefix: str, n: int) -> list[bytes]:
    """Return ``n`` distinct small payloads whose digests all start with ``prefix``."""
    out: list[bytes] = []
    i = 0
    while len(out) < n:
        data = f"payload {i}".encode()
        if digest_of(data).startswith(prefix):
            out.append(data)
        i += 1
    return out


# ---------------------------------------------------------------------------- basics


def test_round_trip_and_not_found(blobs: BlobStore) -> None:
    assert not blobs.is_local and blobs.url.startswith("s3://")
    d = blobs.put_bytes(b"hello s3")
    assert blobs.exists(d) and blobs.get_bytes(d) == b"hello s3"
    assert blobs.size(d) == 8
    modified = blobs.modified_time(d)
    assert modified is not None and modified.tzinfo is not None
    assert list(blobs.iter_digests()) == [d]
    missing = digest_of(b"never stored")
    assert not blobs.exists(missing)
    with pytest.raises(NotFoundError, match=missing):
        blobs.get_bytes(missing)
    with pytest.raises(NotFoundError):
        blobs.size(missing)
    blobs.delete(d)
    blobs.delete(d)  # deleting what is gone is not an error
    assert not blobs.exists(d)


def test_second_put_writes_nothing(blobs: BlobStore) -> None:
    small, large = b"s" * 1000, os.urandom(600_000)  # either side of the HEAD-first limit
    for data in (small, large):
        before = blobs.stats
        d = blobs.put_bytes(data)
        assert blobs.stats.objects_written == before.objects_written + 1
        again = blobs.stats
        with Requests(blobs) as sent:
            assert blobs.put_bytes(data) == d
        assert blobs.stats == again  # nothing counted as written
        # Small: one conditional PUT answered 412. Large: one HEAD, no PUT.
        expected = {"PutObject": 1} if data is small else {"HeadObject": 1}
        assert dict(sent.counts) == expected
        assert blobs.get_bytes(d) == data


def test_new_small_blob_costs_one_request(blobs: BlobStore) -> None:
    with Requests(blobs) as sent:
        blobs.put_bytes(b"fresh and small")
    assert dict(sent.counts) == {"PutObject": 1}
    with Requests(blobs) as sent:
        assert blobs.get_bytes(digest_of(b"fresh and small")) == b"fresh and small"
    assert dict(sent.counts) == {"GetObject": 1}  # no HEAD before the GET


def test_corrupted_object_raises_integrity_error(blobs: BlobStore, s3: services.S3Server) -> None:
    d = blobs.put_bytes(b"original bytes")
    bucket, key, _ = blobs.fs.split_path(blobs._object_path(d))
    s3.client().put_object(Bucket=bucket, Key=key, Body=b"tampered bytes")
    with pytest.raises(IntegrityError, match="corrupt"):
        blobs.get_bytes(d)


# ---------------------------------------------------------------------------- create-only


def test_manifest_is_create_only(blobs: BlobStore) -> None:
    address = "ab" * 16
    assert blobs.put_manifest(address, b"first") is True
    assert blobs.put_manifest(address, b"second") is False
    assert blobs.get_manifest(address) == b"first"
    assert blobs.has_manifest(address) and not blobs.has_manifest("cd" * 16)
    assert blobs.manifests_with_prefix("abab") == [address]
    assert blobs.stats.manifests_written == 1


def test_racing_manifest_writers_one_wins(blobs: BlobStore) -> None:
    address = "5e" * 16
    n = 4  # SeaweedFS makes racing writers of one key wait about a second each
    barrier = threading.Barrier(n)
    results: dict[int, bool] = {}

    def write(i: int) -> None:
        barrier.wait(timeout=30)
        results[i] = blobs.put_manifest(address, f"writer {i}".encode())

    threads = [threading.Thread(target=write, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    winners = [i for i, created in results.items() if created]
    assert len(results) == n and len(winners) == 1
    assert blobs.get_manifest(address) == f"writer {winners[0]}".encode()


@integration
def test_seaweedfs_412_arrives_as_einval_and_is_mapped(s3_server: services.S3Server) -> None:
    # The raw behaviour this module works around: if SeaweedFS ever reports a FileExistsError
    # instead, the mapping is merely unused, and this test says so.
    store = BlobStore.from_url(s3_server.url(), s3_server.storage_options)
    path = store._manifest_path("12" * 16)
    store.fs.pipe_file(path, b"one", mode="create")
    with pytest.raises(OSError) as caught:
        store.fs.pipe_file(path, b"two", mode="create")
    assert caught.value.errno == errno.EINVAL and not isinstance(caught.value, FileExistsError)
    assert store.put_manifest("12" * 16, b"two") is False
    assert store.get_manifest("12" * 16) == b"one"


# ---------------------------------------------------------------------------- concurrency


def _track_in_flight(store: BlobStore, method: str, monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Wrap ``store.fs.<method>`` to record the peak number of calls in flight."""
    original: Callable[..., Any] = getattr(store.fs, method)
    lock = threading.Lock()
    state = [0, 0]  # in flight now, peak

    def wrapper(*args: Any, **kwargs: Any) -> Any:
        with lock:
            state[0] += 1
            state[1] = max(state[1], state[0])
        try:
            time.sleep(0.01)  # make overlap observable even on a fast loopback server
            return original(*args, **kwargs)
        finally:
            with lock:
                state[0] -= 1

    monkeypatch.setattr(store.fs, method, wrapper)
    return state


def test_chunks_upload_and_download_concurrently(
    s3: services.S3Server, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = BlobStore.from_url(s3.url(), s3.storage_options, chunk_size=256 * 1024)
    assert store.workers >= 4
    data = os.urandom(16 * 256 * 1024 + 123)  # 17 chunks, the last one short
    puts = _track_in_flight(store, "pipe_file", monkeypatch)
    chunks = store.put_chunked(data)
    assert len(chunks) == 17 and sum(size for _, size in chunks) == len(data)
    assert puts[1] > 1, "chunk uploads never overlapped"
    assert store.stats.objects_written == 17 and store.stats.bytes_written == len(data)
    gets = _track_in_flight(store, "cat_file", monkeypatch)
    out = bytearray(len(data))
    store.read_into(chunks, memoryview(out))
    assert out == data
    assert gets[1] > 1, "chunk downloads never overlapped"
    # All chunks present: a second put only checks (HEADs) and writes nothing.
    before = store.stats
    assert store.put_chunked(data) == chunks
    assert store.stats == before


def test_missing_lists_each_prefix_once(blobs: BlobStore) -> None:
    grouped = blobs_in_prefix("00", 10)
    stored = [blobs.put_bytes(b) for b in grouped[:6]]
    absent = [digest_of(b) for b in grouped[6:]]
    lone_present = blobs.put_bytes(blobs_in_prefix("ff", 1)[0])
    lone_absent = digest_of(blobs_in_prefix("7a", 1)[0])
    with Requests(blobs) as sent:
        found = blobs.missing([*stored, *absent, lone_present, lone_absent])
    assert found == {*absent, lone_absent}
    # One listing for the ten digests under 00/, one HEAD for each lone digest.
    assert sent.counts["ListObjectsV2"] == 1
    assert sent.counts["HeadObject"] == 2
    assert sent.total == 3
    assert blobs.missing([]) == set()


def test_copy_from_transfers_only_what_is_missing(s3: services.S3Server, tmp_path: Path) -> None:
    local = BlobStore.from_url(str(tmp_path / "local"))
    remote = BlobStore.from_url(s3.url(), s3.storage_options)
    payloads = [os.urandom(1000 + i) for i in range(20)]
    digests = [local.put_bytes(p) for p in payloads]
    remote.put_bytes(payloads[0])
    copied = remote.copy_from(local, digests)
    assert copied == sum(len(p) for p in payloads[1:])
    assert remote.missing(digests) == set()
    assert remote.copy_from(local, digests) == 0  # a rerun sends nothing
    back = BlobStore.from_url(str(tmp_path / "back"))
    assert back.copy_from(remote, digests[:5]) == sum(len(p) for p in payloads[:5])
    assert [back.get_bytes(d) for d in digests[:5]] == payloads[:5]


# ---------------------------------------------------------------------------- failures


def test_unreachable_endpoint_fails_fast_with_storage_error() -> None:
    (port,) = services.free_ports(1)
    options = {
        "key": "k",
        "secret": "s",
        "client_kwargs": {"endpoint_url": f"http://127.0.0.1:{port}"},
    }
    store = BlobStore.from_url("s3://nowhere/prefix", options)
    start = time.monotonic()
    with pytest.raises(StorageError, match="could not write") as caught:
        store.put_bytes(b"data")
    assert time.monotonic() - start < 15  # retried, but bounded
    assert f"127.0.0.1:{port}" in str(caught.value)
    with pytest.raises(StorageError, match="could not check"):
        store.exists(digest_of(b"data"))


def test_s3_defaults_keep_the_callers_options(s3: services.S3Server) -> None:
    options = dict(s3.storage_options, config_kwargs={"max_pool_connections": 3})
    store = BlobStore.from_url(s3.url(), options, workers=2)
    assert store.workers == 2
    assert store.fs.config_kwargs["max_pool_connections"] == 3
    assert store.fs.config_kwargs["retries"]["total_max_attempts"] == 2
    assert store.fs.dircache.use_listings_cache is False


# ---------------------------------------------------------------------------- a whole store


@pytest.fixture
def s3_store(s3_server: services.S3Server, tmp_path: Path) -> Iterator[Store]:
    with Store(
        s3_server.url(),
        index=f"sqlite:///{tmp_path / 'index.sqlite'}",
        storage_options=s3_server.storage_options,
    ) as store:
        yield store


@integration
def test_store_on_s3_round_trips_a_large_array(s3_store: Store, tmp_path: Path) -> None:
    np = pytest.importorskip("numpy")
    array = np.arange(3_000_000, dtype=np.float64)  # 24 MB: six 4 MiB chunks
    h = s3_store.put({"weights": array, "epoch": 3}, name="model", tags={"stage": "dev"})
    back = s3_store.get(h)
    np.testing.assert_array_equal(back["weights"], array)
    assert back["epoch"] == 3
    assert s3_store.latest("model")["epoch"] == 3
    assert [i.hash for i in s3_store.find(tags={"stage": "dev"})] == [h]
    # A second machine with its own empty index sees the artifact through the bucket alone.
    with Store(
        s3_store.root,
        index=f"sqlite:///{tmp_path / 'other.sqlite'}",
        storage_options=s3_store._blobs.fs.storage_options,
    ) as other:
        other.reindex()
        np.testing.assert_array_equal(other.get(h)["weights"], array)


# ---------------------------------------------------------------------------- retries


class _ClientError(Exception):
    """Shaped like botocore's ClientError: an HTTP response dict."""

    def __init__(self, status: int, code: str) -> None:
        super().__init__(f"{status} {code}")
        self.response = {"Error": {"Code": code}, "ResponseMetadata": {"HTTPStatusCode": status}}


class EndpointConnectionError(Exception):
    """Named like botocore's: recognised as transient by its class name alone."""


class FlakyMemoryFS(MemoryFileSystem):
    """A memory filesystem whose writes and reads fail with given errors first."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.put_failures: list[BaseException] = []
        self.get_failures: list[BaseException] = []
        self.put_calls = 0
        self.get_calls = 0

    def pipe_file(self, path: str, value: Any, mode: str = "overwrite", **kw: Any) -> None:
        self.put_calls += 1
        if self.put_failures:
            raise self.put_failures.pop(0)
        super().pipe_file(path, value, mode=mode, **kw)

    def cat_file(self, path: str, start: Any = None, end: Any = None, **kw: Any) -> bytes:
        self.get_calls += 1
        if self.get_failures:
            raise self.get_failures.pop(0)
        data: bytes = super().cat_file(path, start=start, end=end, **kw)
        return data


@pytest.fixture
def flaky(tmp_path: Path) -> Iterator[tuple[FlakyMemoryFS, BlobStore]]:
    fs = FlakyMemoryFS(skip_instance_cache=True)
    root = f"/flaky-{tmp_path.name}-{time.monotonic_ns()}"
    yield fs, BlobStore(fs, root)
    with contextlib.suppress(FileNotFoundError):
        fs.rm(root, recursive=True)


def _precondition_failed() -> OSError:
    # What s3fs raises for SeaweedFS's 412: OSError(EINVAL) caused by the ClientError.
    exc = OSError(errno.EINVAL, "At least one of the pre-conditions you specified did not hold")
    exc.__cause__ = _ClientError(412, "PreconditionFailed")
    return exc


@pytest.mark.parametrize(
    "transient",
    [
        OSError(errno.EIO, "503 Slow Down"),
        ConnectionResetError(errno.ECONNRESET, "reset"),
        TimeoutError("read timed out"),
        EndpointConnectionError("could not connect"),
        _ClientError(503, "SlowDown"),
        _ClientError(500, "InternalError"),
    ],
    ids=lambda e: type(e).__name__,
)
def test_transient_errors_are_retried(
    flaky: tuple[FlakyMemoryFS, BlobStore], transient: BaseException
) -> None:
    fs, store = flaky
    fs.put_failures = [transient, transient]
    d = store.put_bytes(b"eventually written")
    assert fs.put_calls == 3 and store.stats.objects_written == 1
    fs.get_failures = [transient]
    assert store.get_bytes(d) == b"eventually written"
    assert fs.get_calls == 2


def test_retries_are_bounded(flaky: tuple[FlakyMemoryFS, BlobStore]) -> None:
    fs, store = flaky
    fs.put_failures = [OSError(errno.EIO, "503 Slow Down")] * 10
    start = time.monotonic()
    with pytest.raises(StorageError, match="Slow Down"):
        store.put_bytes(b"never written")
    assert fs.put_calls == 3
    assert time.monotonic() - start < 5


@pytest.mark.parametrize(
    "permanent",
    [
        PermissionError(errno.EACCES, "Access Denied"),
        OSError(errno.EINVAL, "bad request"),
        _ClientError(403, "AccessDenied"),
    ],
    ids=lambda e: type(e).__name__,
)
def test_permanent_errors_fail_at_once(
    flaky: tuple[FlakyMemoryFS, BlobStore], permanent: BaseException
) -> None:
    fs, store = flaky
    fs.put_failures = [permanent]
    with pytest.raises(StorageError, match="could not write"):
        store.put_bytes(b"refused")
    assert fs.put_calls == 1


def test_precondition_failure_means_already_exists(
    flaky: tuple[FlakyMemoryFS, BlobStore],
) -> None:
    fs, store = flaky
    fs.put_failures = [_precondition_failed()]
    assert store.put_manifest("ee" * 16, b"someone else won") is False
    assert fs.put_calls == 1 and store.stats.manifests_written == 0
