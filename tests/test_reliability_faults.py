"""Faults: a dead S3 server, dropped database connections, a full disk, blobs deleted behind
casml's back, and transient network errors.

Every fault must surface as a CasmlError that names what failed, must never lose an artifact
committed before it, and must leave a store that re-running the failed operation completes.
"""

from __future__ import annotations

import contextlib
import errno
import os
import random
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from casml import blobs, maintenance
from casml.errors import CasmlError, IntegrityError, NotFoundError, StorageError
from casml.store import Store
from tests import services
from tests.reliability_tools import (
    CRASH_CHUNK,
    FaultPlan,
    RestartableSeaweed,
    fault_plan,
    in_thread,
    index_rows_sound,
    make_object,
    matches,
    put_seed,
    temp_files,
    verify_kinds,
    write_report,
)

AFTER_FAULT = {"orphan_blob", "unindexed_manifest"}


@pytest.fixture(autouse=True)
def no_settle(monkeypatch: pytest.MonkeyPatch) -> None:
    # gc's wait for other processes' puts in flight: there are none in these tests.
    monkeypatch.setattr(maintenance, "_SETTLE_SECONDS", 0.0)


def assert_sound(store: Store, committed: dict[str, int], allowed: set[str] = AFTER_FAULT) -> None:
    """No index row points at missing data, every committed artifact loads, verify agrees."""
    index_rows_sound(store)
    for h, seed in committed.items():
        assert matches(store.get(h), seed), f"committed artifact {h} (seed {seed}) changed"
    kinds = verify_kinds(store)
    assert set(kinds) <= allowed, f"verify: {dict(kinds)}"


def assert_clean_after_gc(store: Store) -> None:
    store.gc(grace=0)
    report = store.verify()
    assert report.ok and not report.problems, [p.message for p in report.problems]


# ---------------------------------------------------------------------------- S3 server killed


@pytest.fixture(scope="module")
def killable_s3() -> Iterator[RestartableSeaweed]:
    try:
        server = RestartableSeaweed()
        server.start()
    except (services.ServiceUnavailable, RuntimeError) as exc:
        services.skip_or_fail(f"SeaweedFS could not be started: {exc}")
    try:
        yield server
    finally:
        server.stop()


def _wait_for(condition: Callable[[], bool], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.005)
    return False


@pytest.mark.integration
@pytest.mark.parametrize("direction", ["push", "pull"])
def test_s3_server_killed_mid_transfer_then_restarted(
    direction: str, killable_s3: RestartableSeaweed, tmp_path: Path
) -> None:
    """SIGKILL the S3 server mid-transfer: a StorageError naming the object; a rerun completes."""
    server = killable_s3.server
    s3 = Store(
        server.url(),
        index=f"sqlite:///{tmp_path / 's3.sqlite'}",
        storage_options=server.storage_options,
    )
    local = Store(tmp_path / "local")
    # Committed before the fault: on S3 (and on the local side) already.
    committed = {put_seed(local, s): s for s in range(4)}
    local.push(s3)
    # The transfer under test: 40 artifacts of 320-480 KB (about 16 MB, 240 blobs).
    source, target = (local, s3) if direction == "push" else (s3, local)
    moving = {put_seed(source, s): s for s in range(100, 200) if s % 4 == 2}
    progress = target._blobs.stats

    thread, outcome = in_thread(lambda: source.push(target))
    # Kill once the transfer is well under way: some blobs have reached the target.
    started = _wait_for(
        lambda: target._blobs.stats.objects_written > progress.objects_written + 5, timeout=30
    )
    killed_at = time.monotonic()
    killable_s3.kill()
    thread.join(timeout=120)
    failed_after = time.monotonic() - killed_at
    assert started, "the transfer never got going"
    assert not thread.is_alive(), "the transfer hung after the server died"
    error = outcome.get("error")
    assert isinstance(error, StorageError), f"expected a StorageError, got {outcome!r}"
    message = str(error)
    assert "s3://" in message or server.endpoint_url in message or "127.0.0.1" in message, message
    assert "reachable" in message  # says what to check

    restart = killable_s3.start()
    with Store(
        server.url(s3.root.split("/", 3)[3]),
        index=f"sqlite:///{tmp_path / 's3.sqlite'}",
        storage_options=server.storage_options,
    ) as s3_again:
        reopened = {"push": (local, s3_again), "pull": (s3_again, local)}[direction]
        src, dst = reopened
        assert_sound(dst, committed)
        report = src.push(dst)  # the rerun
        for h, seed in {**committed, **moving}.items():
            assert matches(dst.get(h), seed)
        assert_sound(dst, {}, {"orphan_blob"})
        assert_clean_after_gc(dst)
    write_report(
        f"faults/s3_killed_mid_{direction}",
        {
            "artifacts": len(moving),
            "error_after_seconds": round(failed_after, 2),
            "restart_seconds": round(restart, 2),
            "error": message[:300],
            "rerun_artifacts": report.artifacts,
        },
    )
    s3.close()
    local.close()


# ---------------------------------------------------------------------------- database drops


@pytest.fixture(params=["postgresql", "mysql"])
def database(request: pytest.FixtureRequest) -> Iterator[tuple[services.DatabaseServer, str]]:
    fixture = "postgres_server" if request.param == "postgresql" else "mariadb_server"
    server: services.DatabaseServer = request.getfixturevalue(fixture)
    with server.new_database() as url:
        yield server, url


def _admin_run(server: services.DatabaseServer, sql: str, *params: Any) -> list[Any]:
    conn = server._admin()
    try:
        if server.kind == "postgresql":
            cursor = conn.execute(sql, params)
            return list(cursor.fetchall()) if cursor.description else []
        with conn.cursor() as cur:
            cur.execute(sql, params or None)
            return list(cur.fetchall())
    finally:
        conn.close()


def _kill_session(server: services.DatabaseServer, session: int) -> None:
    if server.kind == "postgresql":
        _admin_run(server, "SELECT pg_terminate_backend(%s)", session)
    else:
        with contextlib.suppress(Exception):  # it may be gone already
            _admin_run(server, f"KILL {int(session)}")


def _kill_all_sessions(server: services.DatabaseServer, database: str) -> int:
    if server.kind == "postgresql":
        rows = _admin_run(
            server,
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
            "WHERE datname = %s AND pid <> pg_backend_pid()",
            database,
        )
        return len(rows)
    rows = _admin_run(
        server, "SELECT id FROM information_schema.processlist WHERE db = %s", database
    )
    for (session,) in rows:
        _kill_session(server, int(session))
    return len(rows)


def _session_of(cursor: Any) -> int:
    connection = cursor.connection
    if hasattr(connection, "info") and hasattr(connection.info, "backend_pid"):
        return int(connection.info.backend_pid)  # psycopg
    return int(connection.thread_id())  # PyMySQL


@pytest.mark.integration
def test_database_connection_killed_mid_transaction(
    database: tuple[services.DatabaseServer, str], tmp_path: Path
) -> None:
    """The server drops the connection between the index statements and the commit."""
    server, url = database
    store = Store(tmp_path / "store", index=url)
    committed = {put_seed(store, s): s for s in range(3)}
    real_add_in = store._index._add_in

    def dropped(tx: Any, *args: Any) -> Any:
        result = real_add_in(tx, *args)
        _kill_session(server, _session_of(tx.cursor))  # every statement ran; no commit yet
        return result

    store._index._add_in = dropped  # type: ignore[method-assign,assignment]
    with pytest.raises(StorageError) as caught:
        put_seed(store, 10)
    message = str(caught.value)
    assert "index database" in message and server.password not in message
    store._index._add_in = real_add_in  # type: ignore[method-assign]

    h = make_object(10)
    address = store._address_of(h)
    assert address is not None
    assert not store._index.contains(address), "the rolled-back row is visible"
    assert_sound(store, committed)
    assert put_seed(store, 10) == address  # the rerun, on a fresh connection
    assert matches(store.get(address), 10)
    assert_sound(store, {}, {"orphan_blob"})
    store.close()


@pytest.mark.integration
def test_database_connections_killed_at_random_during_puts(
    database: tuple[services.DatabaseServer, str], tmp_path: Path
) -> None:
    """Every session of the database is killed again and again while puts run."""
    server, url = database
    name = url.rsplit("/", 1)[1]
    store = Store(tmp_path / "store", index=url)
    committed = {put_seed(store, s): s for s in range(2)}
    failures: list[tuple[int, BaseException]] = []
    stop = threading.Event()

    def writer() -> None:
        for seed in range(100, 160):
            try:
                committed[put_seed(store, seed)] = seed
            except BaseException as exc:
                failures.append((seed, exc))
        stop.set()

    thread = threading.Thread(target=writer)
    thread.start()
    rng = random.Random(7)
    kills = 0
    while not stop.is_set():
        time.sleep(rng.uniform(0.005, 0.05))
        kills += _kill_all_sessions(server, name)
    thread.join()
    assert kills > 0
    bad = [exc for _, exc in failures if not isinstance(exc, StorageError)]
    assert not bad, f"not StorageErrors: {bad!r}"
    with Store(tmp_path / "store", index=url) as fresh:
        assert_sound(fresh, committed)
        for seed, _ in failures:  # the reruns
            committed[put_seed(fresh, seed)] = seed
        assert len(committed) == 62
        assert_sound(fresh, committed, {"orphan_blob"})
    write_report(
        f"faults/db_sessions_killed/{server.kind}",
        {"puts": 60, "sessions_killed": kills, "puts_failed_then_rerun": len(failures)},
    )
    store.close()


@pytest.mark.integration
def test_database_down_then_back(
    database: tuple[services.DatabaseServer, str], tmp_path: Path
) -> None:
    """The database refuses connections for a while: clear errors, then business as usual."""
    server, url = database
    name = url.rsplit("/", 1)[1]
    store = Store(tmp_path / "store", index=url)
    committed = {put_seed(store, s): s for s in range(3)}
    if server.kind == "postgresql":
        down = f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS false'
        up = f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS true'
    else:
        down = f"ALTER USER '{server.user}'@'%' ACCOUNT LOCK"
        up = f"ALTER USER '{server.user}'@'%' ACCOUNT UNLOCK"
    _admin_run(server, down)
    try:
        _kill_all_sessions(server, name)
        for action in (
            lambda: put_seed(store, 20),
            lambda: store.find(),
            lambda: store.info(next(iter(committed))),
        ):
            with pytest.raises(StorageError, match="index database"):
                action()
    finally:
        _admin_run(server, up)
    assert_sound(store, committed)
    committed[put_seed(store, 20)] = 20
    assert_sound(store, committed, {"orphan_blob"})
    store.close()


# ---------------------------------------------------------------------------- disk full


@contextlib.contextmanager
def disk_full_after(root: Path, budget: int) -> Iterator[dict[str, int]]:
    """Make os.write fail with ENOSPC once ``budget`` bytes went to files under ``root``."""
    real_write = os.write
    state = {"left": budget, "refused": 0}
    prefix = str(root)

    def write(fd: int, data: Any) -> int:
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            target = ""
        if not target.startswith(prefix):
            return real_write(fd, data)
        size = len(memoryview(data))
        if size <= state["left"]:
            state["left"] -= size
            return real_write(fd, data)
        fitted = state["left"]
        state["left"] = 0
        state["refused"] += 1
        if fitted:
            real_write(fd, memoryview(data)[:fitted])  # a short write, as a full disk does
            return fitted
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    os.write = write
    try:
        yield state
    finally:
        os.write = real_write


def _put_under_budget(store: Store, seed: int, budget: int, root: Path) -> tuple[str, bool]:
    """Put ``seed`` with ``budget`` bytes of disk left; return (address, whether it failed)."""
    obj = make_object(seed)
    address = store._address_of(obj)
    assert address is not None
    with disk_full_after(root, budget):
        try:
            put_seed(store, seed)
        except StorageError as exc:
            assert "No space left on device" in str(exc) or "ENOSPC" in str(exc), str(exc)
            return address, True
    return address, False


def test_local_disk_full_part_way_through_puts(tmp_path: Path) -> None:
    """ENOSPC at every point of a put (blobs, manifest, records): no half artifact, rerun ok."""
    root = tmp_path / "store"
    store = Store(root)
    committed = {put_seed(store, s): s for s in range(3)}
    failed = 0
    budgets = [0, 1, 4096, 65_536, 150_000, 300_000, 400_000, 450_000, 500_000, 10**8]
    for i, budget in enumerate(budgets):
        for kind in range(4):
            seed = 1000 + 4 * i + kind
            address, failure = _put_under_budget(store, seed, budget, root)
            if failure:
                failed += 1
                # Nothing half-written is visible: either no artifact, or a whole one.
                if address in store:
                    assert matches(store.get(address), seed)
                assert temp_files(root) == [], "a failed write left its temporary file"
                assert_sound(store, committed)
            assert put_seed(store, seed) == address  # space again: the rerun completes
            committed[address] = seed
    assert failed >= 20
    assert_sound(store, committed, {"orphan_blob"})
    assert_clean_after_gc(store)
    write_report("faults/disk_full_local", {"puts_under_budget": 40, "failed_with_enospc": failed})
    store.close()


@pytest.mark.parametrize(
    "atomic",
    [
        pytest.param(True, id="object-store"),
        pytest.param(False, id="plain-disk"),
    ],
)
def test_fsspec_disk_full_part_way_through_puts(tmp_path: Path, atomic: bool) -> None:
    """An fsspec backend runs out of space mid-write (whole-object or partial-file semantics)."""
    plan = FaultPlan(atomic=atomic)
    root = tmp_path / "store"
    failed = 0
    with fault_plan(plan) as options:
        store = Store(
            f"casmlfault://{root}",
            index=f"sqlite:///{tmp_path / 'i.sqlite'}",
            storage_options=options,
        )
        committed = {put_seed(store, s): s for s in range(3)}
        for i, budget in enumerate([0, 1000, 60_000, 130_000, 200_000, 350_000, 420_000]):
            for kind in range(4):
                seed = 2000 + 4 * i + kind
                obj = make_object(seed)
                address = store._address_of(obj)
                assert address is not None
                plan.space = budget
                try:
                    put_seed(store, seed)
                except StorageError as exc:
                    assert "No space left on device" in str(exc), str(exc)
                    failed += 1
                    if address in store:
                        assert matches(store.get(address), seed), "a half artifact is visible"
                    index_rows_sound(store)
                plan.space = None
                assert put_seed(store, seed) == address
                assert matches(store.get(address), seed), "the rerun left a damaged artifact"
                committed[address] = seed
        assert failed >= 10
        assert_sound(store, committed, {"orphan_blob"})
        store.close()


def test_sqlite_index_full(tmp_path: Path) -> None:
    """SQLite reports 'database or disk is full': a StorageError; nothing committed is lost."""
    store = Store(tmp_path / "store")
    committed = {put_seed(store, s): s for s in range(3)}
    pages = store._index._sqlite_slot().raw.execute("PRAGMA page_count").fetchone()[0]
    store._index._sqlite_slot().raw.execute(f"PRAGMA max_page_count = {pages + 1}")
    errors = []
    for seed in range(100, 140):
        try:
            committed[put_seed(store, seed)] = seed
        except StorageError as exc:
            errors.append(seed)
            assert "full" in str(exc), str(exc)
    assert errors, "the index never filled up"
    assert_sound(store, committed)
    store._index._sqlite_slot().raw.execute("PRAGMA max_page_count = 1073741823")
    for seed in errors:
        committed[put_seed(store, seed)] = seed
    assert_sound(store, committed, {"orphan_blob"})
    store.close()


# ---------------------------------------------------------------------------- damage behind casml


def _remove(store: Store, area: str, key: str) -> None:
    path = f"{store._blobs.root.rstrip('/')}/{area}/{key[:2]}/{key[2:]}"
    store._blobs.fs.rm_file(path)


def _replace(store: Store, area: str, key: str, data: bytes) -> None:
    path = f"{store._blobs.root.rstrip('/')}/{area}/{key[:2]}/{key[2:]}"
    store._blobs.fs.rm_file(path)
    store._blobs.fs.pipe_file(path, data)


@pytest.mark.parametrize("damage", ["deleted", "truncated", "bit-flipped"])
def test_blob_damaged_behind_casmls_back(any_store: Store, tmp_path: Path, damage: str) -> None:
    """get names the blob; verify reports it with the artifact; repair from a copy fixes it."""
    store = any_store
    store._blobs.chunk_size = CRASH_CHUNK
    h = put_seed(store, 2)  # an array in several chunks
    other = put_seed(store, 6)
    backup = Store(tmp_path / "backup")
    store.push(backup)
    victim = store._index.blobs_of(h)[1][0]
    data = store._blobs.get_bytes(victim)
    if damage == "deleted":
        _remove(store, "objects", victim)
        expected: type[CasmlError] = NotFoundError
    elif damage == "truncated":
        _replace(store, "objects", victim, data[: len(data) // 2])
        expected = IntegrityError
    else:
        flipped = bytearray(data)
        flipped[len(flipped) // 3] ^= 0x10
        _replace(store, "objects", victim, bytes(flipped))
        expected = IntegrityError
    with pytest.raises(expected) as caught:
        store.get(h)
    assert victim in str(caught.value)
    assert matches(store.get(other), 6)  # its neighbours are untouched
    report = store.verify()
    kind = "missing_blob" if damage == "deleted" else "corrupt_blob"
    found = report.of_kind(kind)
    assert [p.key for p in found] == [victim] and found[0].artifacts == (h,)
    assert not report.ok
    repaired = store.verify(repair=True, source=backup)
    assert repaired.ok, [p.message for p in repaired.errors]
    assert matches(store.get(h), 2)
    backup.close()


def test_manifest_deleted_behind_casmls_back(tmp_path: Path) -> None:
    store = Store(tmp_path / "store")
    h = put_seed(store, 1)
    _remove(store, "manifests", h)
    with pytest.raises(NotFoundError, match=h):
        store.get(h)
    report = store.verify()
    assert [p.kind for p in report.problems if p.is_error] == ["dangling_index_row"]
    store.close()


# ---------------------------------------------------------------------------- transient errors


@pytest.mark.parametrize(
    ("error", "transient"),
    [
        (lambda: ConnectionResetError(errno.ECONNRESET, "reset by peer"), True),
        (lambda: TimeoutError("timed out"), True),
        (lambda: OSError(errno.EIO, "I/O error"), True),
        (lambda: PermissionError(errno.EACCES, "denied"), False),
        (lambda: OSError(errno.ENOSPC, "No space left on device"), False),
    ],
    ids=["reset", "timeout", "eio", "permission", "enospc"],
)
@pytest.mark.parametrize("method", ["cat_file", "pipe_file"])
def test_transient_errors_retried_with_bounded_backoff(
    tmp_path: Path, error: Callable[[], BaseException], transient: bool, method: str
) -> None:
    """Transient failures: retried (a bounded number of tries and seconds); permanent: once."""
    plan = FaultPlan(error=error)
    figures: dict[int, Any] = {}
    with fault_plan(plan) as options:
        store = Store(
            f"casmlfault://{tmp_path / 'store'}",
            index=f"sqlite:///{tmp_path / 'i.sqlite'}",
            storage_options=options,
        )
        seed = 1  # a payload blob: one cat_file to read it, one pipe_file to write it
        h = put_seed(store, seed) if method == "cat_file" else None
        baseline = 0
        tries = blobs._RETRY_ATTEMPTS
        # The longest the backoff may wait in all, plus a second for the work itself.
        bound = 1.0 + sum(
            min(blobs._RETRY_MAX_WAIT, blobs._RETRY_FIRST_WAIT * 2**k) for k in range(tries - 1)
        )
        for failures in (0, 1, tries - 1, tries):
            plan.fail = {method: failures}
            plan.calls.clear()
            started = time.monotonic()
            try:
                if method == "cat_file":
                    assert h is not None
                    result: Any = store.get(h)
                else:
                    seed += 4  # a fresh payload blob and manifest: two writes, no records
                    result = store.put(make_object(seed))
                outcome: BaseException | None = None
            except BaseException as exc:
                outcome = exc
            elapsed = time.monotonic() - started
            attempts = plan.calls[method]
            figures[failures] = {"attempts": attempts, "seconds": round(elapsed, 3)}
            assert elapsed < bound, f"{failures} failures took {elapsed:.2f} s"
            if failures == 0:
                assert outcome is None
                baseline = attempts  # the calls one get or put makes when nothing fails
            elif transient and failures < tries:
                assert outcome is None, f"{failures} transient failures were not retried"
                assert attempts == baseline + failures
                if method == "cat_file":
                    assert matches(result, 1)
            else:
                assert isinstance(outcome, StorageError), repr(outcome)
                # A permanent error is tried once; a transient one at most ``tries`` times.
                assert attempts == (baseline + tries - 1 if transient else 1) or (
                    attempts == tries and transient
                ), (attempts, baseline, tries)
        plan.fail = {}
        store.close()
    write_report(
        f"faults/retries/{method}/{error()!r}"[:80],
        {str(k): v for k, v in figures.items()},
    )
