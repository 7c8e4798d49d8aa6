"""The SQL metadata index on real SQLite files: records, names/versions, tags, edges, errors."""

from __future__ import annotations

import multiprocessing
import random
import sqlite3
import threading
import traceback
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest

from casml.errors import InvalidHashError, NotFoundError, StorageError
from casml.index import SCHEMA_VERSION, ArtifactRecord, Index

T0 = datetime(2024, 5, 1, 12, 0, 0, 123456, tzinfo=timezone.utc)


def h(n: int) -> str:
    """A valid 32-hex-digit hash, distinct for every n."""
    return f"{n:032x}"


def d(n: int) -> str:
    """A blob digest that cannot collide with h(n) for small n."""
    return f"{n + 0xD000_0000:032x}"


def rec(
    n: int,
    *,
    minutes: int = 0,
    cls: str = "builtins:dict",
    kind: str = "value",
    blobs: tuple[tuple[str, int], ...] | None = None,
    deps: tuple[str, ...] = (),
) -> ArtifactRecord:
    payload = blobs if blobs is not None else ((d(n), 10 + n),)
    return ArtifactRecord(
        hash=h(n),
        class_name=cls,
        kind=kind,
        size=sum(s for _, s in payload),
        created_at=T0 + timedelta(minutes=minutes),
        blobs=payload,
        dependencies=deps,
    )


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    return tmp_path / "nested" / "folder" / "index.db"


@pytest.fixture
def index(index_url: str, db_path: Path) -> Any:
    """An empty index on each backend (conftest's ``index_url``); on SQLite, at ``db_path``."""
    ix = Index(f"sqlite:///{db_path}" if index_url.startswith("sqlite") else index_url)
    yield ix
    ix.close()


def test_add_then_info_returns_what_was_recorded(index: Index, db_path: Path) -> None:
    if index.url.startswith("sqlite"):
        assert db_path.exists()  # the missing parent folders were created
    r = rec(1, cls="mymod:Scaler", kind="persistable", blobs=((d(1), 5), (d(2), 7), (d(1), 5)))
    added = index.add(r)
    got = index.info(h(1))
    assert added == got
    assert got.hash == h(1)
    assert got.class_name == "mymod:Scaler"
    assert got.size == 17
    assert got.name is None and got.version is None
    assert got.tags == {} and got.dependencies == ()
    assert got.created_at == T0
    assert index.contains(h(1)) and not index.contains(h(2))
    assert index.count() == 1
    # Payload order kept, repeated digests included.
    assert index.blobs_of(h(1)) == [(d(1), 5), (d(2), 7), (d(1), 5)]
    assert index.blobs_of(h(99)) == []


def test_datetimes_come_back_aware_utc(index: Index) -> None:
    paris = timezone(timedelta(hours=2))
    local = datetime(2024, 5, 1, 14, 0, 0, 654321, tzinfo=paris)
    index.add(ArtifactRecord(h(1), "c", "value", 1, local))
    index.add(ArtifactRecord(h(2), "c", "value", 1, datetime(2024, 5, 1, 9, 30)))  # naive
    first = index.info(h(1)).created_at
    assert first.tzinfo is not None and first.utcoffset() == timedelta(0)
    assert first == local and first.hour == 12 and first.microsecond == 654321
    second = index.info(h(2)).created_at
    assert second == datetime(2024, 5, 1, 9, 30, tzinfo=timezone.utc)
    for info in index.find():
        assert info.created_at.utcoffset() == timedelta(0)


def test_add_is_idempotent(index: Index) -> None:
    r = rec(1, deps=(h(7), h(8)), blobs=((d(1), 3), (d(2), 4)))
    first = index.add(r, name="m", tags={"k": "v"})
    again = index.add(r, name="m", tags={"k": "v"})
    assert first == again
    assert index.count() == 1
    assert index.blobs_of(h(1)) == [(d(1), 3), (d(2), 4)]
    assert index.dependencies(h(1)) == [h(7), h(8)]
    assert [i.version for i in index.versions("m")] == [1]
    # A re-add reports the stored record, not the new one's created_at.
    later = index.add(rec(1, minutes=60, deps=(h(7), h(8)), blobs=((d(1), 3), (d(2), 4))))
    assert later.created_at == T0
    assert later.name == "m" and later.version == 1 and later.tags == {"k": "v"}


def test_versions_per_name(index: Index) -> None:
    a = index.add(rec(1), name="model")
    b = index.add(rec(2, minutes=1), name="model")
    other = index.add(rec(3, minutes=2), name="other")
    assert (a.name, a.version) == ("model", 1)
    assert (b.name, b.version) == ("model", 2)
    assert (other.name, other.version) == ("other", 1)
    # The same hash under the same name again: no new version, the old one reported.
    again = index.add(rec(1), name="model")
    assert (again.name, again.version) == ("model", 1)
    assert index.latest("model") == h(2)
    assert index.latest("other") == h(3)
    assert [(i.hash, i.version) for i in index.versions("model")] == [(h(1), 1), (h(2), 2)]
    assert [(i.hash, i.version) for i in index.find(name="model")] == [(h(2), 2), (h(1), 1)]
    assert index.versions("nobody") == []
    # An artifact may carry several names; info reports the most recent naming.
    both = index.add(rec(1), name="alias")
    assert (both.name, both.version) == ("alias", 1)
    assert (index.info(h(1)).name, index.info(h(1)).version) == ("alias", 1)
    # find by name still reports the naming it matched.
    assert [(i.name, i.version) for i in index.find(name="model")] == [("model", 2), ("model", 1)]


def test_latest_and_info_of_unknown_raise_not_found(index: Index) -> None:
    index.add(rec(1), name="present")
    with pytest.raises(NotFoundError, match="'absent'") as caught:
        index.latest("absent")
    assert isinstance(caught.value, KeyError)
    with pytest.raises(NotFoundError, match=h(5)):
        index.info(h(5))


def test_tags_upsert_and_filter(index: Index) -> None:
    index.add(rec(1), tags={"stage": "dev", "team": "a"})
    index.add(rec(2, minutes=1, cls="pkg:Model"), tags={"stage": "prod", "team": "a"})
    index.add(rec(3, minutes=2, cls="pkg:Model"), tags={"stage": "prod", "team": "b"})
    # A new value replaces the old one; other keys stay.
    updated = index.add(rec(1), tags={"stage": "prod", "extra": "x"})
    assert updated.tags == {"stage": "prod", "team": "a", "extra": "x"}
    assert index.info(h(1)).tags == {"stage": "prod", "team": "a", "extra": "x"}

    def hashes(**kw: Any) -> list[str]:
        return [i.hash for i in index.find(**kw)]

    assert hashes(tags={"stage": "prod"}) == [h(3), h(2), h(1)]
    assert hashes(tags={"stage": "prod", "team": "a"}) == [h(2), h(1)]
    assert hashes(tags={"stage": "dev"}) == []
    assert hashes(class_name="pkg:Model") == [h(3), h(2)]
    assert hashes(class_name="pkg:Model", tags={"team": "a"}) == [h(2)]
    assert hashes(class_name="nope") == []
    assert index.find(tags={"team": "b"})[0].tags == {"stage": "prod", "team": "b"}


def test_find_is_newest_first_with_deterministic_ties(index: Index) -> None:
    for n, minutes in [(5, 3), (1, 0), (9, 7), (2, 3), (7, 3)]:
        index.add(rec(n, minutes=minutes))
    order = [i.hash for i in index.find()]
    # 9 newest; 5, 7 and 2 share a timestamp (ties by hash, descending); 1 oldest.
    assert order == [h(9), h(7), h(5), h(2), h(1)]
    created = [i.created_at for i in index.find()]
    assert created == sorted(created, reverse=True)


def test_find_without_name_reports_latest_naming(index: Index) -> None:
    index.add(rec(1), name="a")
    index.add(rec(2, minutes=1))
    by_hash = {i.hash: i for i in index.find()}
    assert (by_hash[h(1)].name, by_hash[h(1)].version) == ("a", 1)
    assert (by_hash[h(2)].name, by_hash[h(2)].version) == (None, None)


def test_dependencies_and_dependents(index: Index) -> None:
    index.add(rec(1))
    index.add(rec(2))
    # Recorded order kept, a repeated dependency recorded once.
    top = index.add(rec(3, deps=(h(2), h(1), h(2))))
    assert top.dependencies == (h(2), h(1))
    index.add(rec(4, deps=(h(1),)))
    assert index.dependencies(h(3)) == [h(2), h(1)]
    assert index.info(h(3)).dependencies == (h(2), h(1))
    assert index.dependents(h(1)) == [h(3), h(4)]
    assert index.dependents(h(2)) == [h(3)]
    assert index.dependents(h(3)) == [] and index.dependencies(h(1)) == []
    assert {i.hash: i.dependencies for i in index.find()}[h(3)] == (h(2), h(1))


def test_delete_removes_rows_links_names_tags_and_outgoing_edges(index: Index) -> None:
    shared = (d(100), 50)
    index.add(rec(1, blobs=(shared,)))
    index.add(rec(2, blobs=(shared, (d(2), 3)), deps=(h(1),)), name="m", tags={"k": "v"})
    index.add(rec(3, deps=(h(2),)))
    assert index.referenced_digests() == {d(100), d(2), d(3)}

    assert index.delete(h(2)) is True
    assert index.delete(h(2)) is False
    assert not index.contains(h(2))
    assert index.count() == 2
    with pytest.raises(NotFoundError):
        index.info(h(2))
    with pytest.raises(NotFoundError):
        index.latest("m")
    assert index.blobs_of(h(2)) == [] and index.dependencies(h(2)) == []
    assert index.dependents(h(1)) == []  # its outgoing edge went with it
    assert index.dependents(h(2)) == [h(3)]  # the edge into it stays with its dependent
    assert index.find(tags={"k": "v"}) == []
    # The shared blob is still linked from artifact 1; d(2) is not linked any more.
    assert index.referenced_digests() == {d(100), d(3)}
    # The same artifact can be indexed again afterwards.
    index.add(rec(2, blobs=(shared,)), name="m")
    assert index.latest("m") == h(2)


def test_missing_and_match_prefix(index: Index) -> None:
    for hx in ("ab" + "0" * 30, "ab" + "1" * 30, "abf" + "0" * 29, "ac" + "0" * 30):
        index.add(ArtifactRecord(hx, "c", "value", 0, T0))
    assert index.missing(["ab" + "0" * 30, h(1), h(2), h(1)]) == {h(1), h(2)}
    assert index.missing([]) == set()
    assert index.match_prefix("ab", limit=10) == [
        "ab" + "0" * 30,
        "ab" + "1" * 30,
        "abf" + "0" * 29,
    ]
    assert index.match_prefix("ab") == ["ab" + "0" * 30, "ab" + "1" * 30]
    assert index.match_prefix("abf") == ["abf" + "0" * 29]
    assert index.match_prefix("ac" + "0" * 30) == ["ac" + "0" * 30]
    assert index.match_prefix("ff") == []
    # Not hex: matches nothing rather than acting as a pattern.
    assert index.match_prefix("a%") == [] and index.match_prefix("A") == []


def test_many_records_batch_through_find(index: Index) -> None:
    # More artifacts than one IN (...) batch holds, each with a tag and a dependency.
    for n in range(1, 1201):
        index.add(rec(n, minutes=n, deps=(h(n - 1),)), tags={"i": str(n)})
    found = index.find()
    assert len(found) == 1200 and found[0].hash == h(1200)
    assert all(i.tags == {"i": str(int(i.hash, 16))} for i in found)
    assert all(i.dependencies == (h(int(i.hash, 16) - 1),) for i in found)
    assert len(index.missing(h(n) for n in range(0, 1300))) == 100


def test_schema_version_recorded_and_newer_refused(db_path: Path) -> None:
    url = f"sqlite:///{db_path}"
    Index(url).close()
    with sqlite3.connect(db_path) as conn:
        (stored,) = conn.execute(
            "SELECT value FROM schema_info WHERE key = 'schema_version'"
        ).fetchone()
        mode = conn.execute("PRAGMA journal_mode").fetchone()[0]
    assert int(stored) == SCHEMA_VERSION == 1
    assert mode == "wal"
    Index(url).close()  # reopening an index of the current version works
    with sqlite3.connect(db_path) as conn:
        conn.execute(
            "UPDATE schema_info SET value = ? WHERE key = 'schema_version'",
            (str(SCHEMA_VERSION + 1),),
        )
    with pytest.raises(StorageError, match="upgrade casml") as caught:
        Index(url)
    assert str(db_path) in str(caught.value)


def test_names_and_tags_with_sql_metacharacters_stored_literally(index: Index) -> None:
    evil = "x'; DROP TABLE artifacts; --"
    pattern = "100%_sure\\"
    uni = "modèle/ветка/模型 🚀"
    index.add(rec(1), name=evil, tags={"q'uote": 'd"ouble', "%": "_", "ключ": uni})
    index.add(rec(2, minutes=1), name=pattern, tags={"%": "anything"})
    index.add(rec(3, minutes=2), name=uni, tags={"%x": "_"})
    index.add(rec(4, minutes=3), name="100Xsure\\")
    assert index.count() == 4  # the tables are still there
    assert index.latest(evil) == h(1)
    assert index.latest(pattern) == h(2)
    assert index.latest(uni) == h(3)
    info = index.info(h(1))
    assert info.name == evil
    assert info.tags == {"q'uote": 'd"ouble', "%": "_", "ключ": uni}
    # Wildcard characters match only themselves.
    assert [i.hash for i in index.find(tags={"%": "_"})] == [h(1)]
    assert [i.hash for i in index.find(name=pattern)] == [h(2)]
    assert index.find(name="100%") == []
    assert [i.hash for i in index.find(tags={"ключ": uni})] == [h(1)]
    # Names are case-sensitive.
    with pytest.raises(NotFoundError):
        index.latest(evil.upper())


def test_bad_input_is_refused_with_casml_errors(index: Index) -> None:
    with pytest.raises(InvalidHashError):
        index.add(ArtifactRecord("XYZ", "c", "value", 0, T0))
    with pytest.raises(InvalidHashError):
        index.add(rec(1, blobs=(("nothex", 1),)))
    with pytest.raises(StorageError, match="at most 255"):
        index.add(rec(1), name="n" * 256)
    with pytest.raises(StorageError, match="at most 1024"):
        index.add(rec(1), tags={"k": "v" * 1025})
    with pytest.raises(StorageError, match="NUL"):
        index.add(rec(1), tags={"k": "a\x00b"})
    with pytest.raises(StorageError, match="kind"):
        index.add(rec(1, kind="other"))
    assert index.count() == 0  # nothing half-written
    ok = index.add(rec(1), name="n" * 255, tags={"k": "v" * 1024})
    assert ok.version == 1 and index.info(h(1)).tags["k"] == "v" * 1024


def test_database_failures_become_storage_errors_naming_the_url(tmp_path: Path) -> None:
    folder = tmp_path / "a_folder.db"
    folder.mkdir()  # a directory where the database file should be
    with pytest.raises(StorageError, match=r"a_folder\.db"):
        Index(f"sqlite:///{folder}")
    with pytest.raises(StorageError, match="not a SQLAlchemy database URL"):
        Index("no-scheme-here")
    # A server URL: the password never appears in the message, whatever fails.
    with pytest.raises(StorageError) as caught:
        Index("postgresql+psycopg://user:s3cret@127.0.0.1:1/db")
    assert "s3cret" not in str(caught.value) and "127.0.0.1" in str(caught.value)


def test_closed_index_and_reopen_keep_data(db_path: Path) -> None:
    url = f"sqlite:///{db_path}"
    with Index(url) as ix:
        ix.add(rec(1), name="m", tags={"a": "b"})
        assert "index.db" in ix.url and "index.db" in repr(ix)
    with Index(url) as again:
        assert again.info(h(1)).tags == {"a": "b"}
        assert again.latest("m") == h(1)


def test_threads_share_one_index(index: Index) -> None:
    # More threads than a default connection pool holds (5 + 10 overflow).
    errors: list[BaseException] = []
    start = threading.Barrier(20)

    def work(offset: int) -> None:
        try:
            start.wait(timeout=30)
            for n in range(offset, offset + 8):
                index.add(rec(n), name="threaded")
                assert index.info(h(n)).hash == h(n)
                assert index.find(name="threaded")  # the Core path, concurrently
        except BaseException as exc:  # collected for the assertion below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(k * 8,)) for k in range(20)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert errors == []
    assert index.count() == 160
    assert sorted(i.version or 0 for i in index.versions("threaded")) == list(range(1, 161))


N_SHARED = 25


def _add_shared(url: str, seed: int, barrier: Any, out: Any) -> None:
    """Worker process: add the same records in its own order under one name."""
    try:
        ix = Index(url)
        order = list(range(N_SHARED))
        random.Random(seed).shuffle(order)
        barrier.wait(timeout=60)
        got = [(h(n), ix.add(rec(n), name="shared").version) for n in order]
        ix.close()
        out.put(("ok", got))
    except BaseException:
        out.put(("error", traceback.format_exc()))


def test_concurrent_processes_get_unique_gap_free_versions(index_url: str) -> None:
    url = index_url
    ctx = multiprocessing.get_context("spawn")
    barrier = ctx.Barrier(4)
    out = ctx.Queue()
    procs = [ctx.Process(target=_add_shared, args=(url, s, barrier, out)) for s in range(4)]
    for p in procs:
        p.start()
    results = [out.get(timeout=120) for _ in procs]
    for p in procs:
        p.join(timeout=60)
    assert [status for status, _ in results] == ["ok"] * 4, results
    with Index(url) as ix:
        final = {i.hash: i.version for i in ix.versions("shared")}
        assert sorted(v or 0 for v in final.values()) == list(range(1, N_SHARED + 1))
        assert set(final) == {h(n) for n in range(N_SHARED)}
        assert ix.count() == N_SHARED
    # Every process saw, for every hash, the version that was finally recorded.
    for _, got in results:
        assert dict(got) == final


def _use_after_fork(index: Index, out: Any) -> None:
    try:
        index.add(rec(2), name="forked")
        out.put(("ok", index.info(h(1)).name, index.latest("forked")))
    except BaseException:
        out.put(("error", traceback.format_exc(), None))


@pytest.mark.skipif(
    "fork" not in multiprocessing.get_all_start_methods(), reason="no fork on this platform"
)
def test_index_keeps_working_across_fork(index: Index) -> None:
    index.add(rec(1), name="before")  # the parent's connection is open and used
    ctx = multiprocessing.get_context("fork")
    out = ctx.Queue()
    child = ctx.Process(target=_use_after_fork, args=(index, out))
    child.start()
    result = out.get(timeout=60)
    child.join(timeout=60)
    assert result == ("ok", "before", h(2)), result
    # The parent's own connection still works and sees the child's write.
    assert index.latest("forked") == h(2)
    index.add(rec(3), name="forked")
    assert [i.version for i in index.versions("forked")] == [1, 2]


def test_in_memory_index_serves_several_threads() -> None:
    with Index("sqlite://") as ix:

        def work(offset: int) -> None:
            for n in range(offset, offset + 20):
                ix.add(rec(n), name="mem")

        threads = [threading.Thread(target=work, args=(k * 20,)) for k in range(3)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=60)
        assert ix.count() == 60
        assert [i.version for i in ix.versions("mem")] == list(range(1, 61))
        assert ix.find(name="mem")[0].version == 60
    with pytest.raises(StorageError, match="closed"):
        ix.count()
