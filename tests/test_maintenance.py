"""gc, verify (with repair), disk usage and reindex, on real files and real SQLite indexes."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import casml
from casml import maintenance
from casml.errors import CasmlError
from casml.index import ArtifactRecord
from casml.store import Store


class Node(casml.Persistable, name="tests.maintenance.Node"):
    hash_attributes = ("label", "parent")

    def __init__(self, label: str, parent: Node | None = None) -> None:
        self.label = label
        self.parent = parent

    def build(self) -> None:
        self.weights_ = np.arange(40_000, dtype=np.float64) * len(self.label)


@pytest.fixture(autouse=True)
def short_settle(monkeypatch: pytest.MonkeyPatch) -> None:
    # The in-flight-put wait is a fixed second; unit tests have no concurrent puts.
    monkeypatch.setattr(maintenance, "_SETTLE_SECONDS", 0.0)


@pytest.fixture
def local(tmp_path: Path) -> Iterator[Store]:
    """A store on a local folder whose files the tests damage on purpose."""
    with Store(tmp_path / "store") as s:
        yield s


def array(seed: int, n: int = 40_000) -> Any:
    # 320 KB: above the codec's inline limit, so the array is a blob of its own.
    return np.random.default_rng(seed).random(n)


def blob_path(store: Store, digest: str) -> Path:
    return Path(store.root) / "objects" / digest[:2] / digest[2:]


def manifest_path(store: Store, address: str) -> Path:
    return Path(store.root) / "manifests" / address[:2] / address[2:]


def age(path: Path, seconds: float) -> None:
    then = time.time() - seconds
    os.utime(path, (then, then))


def digests_of(store: Store, address: str) -> set[str]:
    return {d for d, _ in store._index.blobs_of(address)}


# -- gc -----------------------------------------------------------------------------------


def test_gc_on_a_sound_store_deletes_nothing(any_store: Store) -> None:
    h = any_store.put(array(1))
    report = maintenance.gc(any_store, grace=0)
    assert report.blobs_deleted == 0 and report.bytes_freed == 0
    assert report.blobs_live == len(digests_of(any_store, h)) >= 1
    assert report.grace_seconds == 0.0 and not report.dry_run
    assert np.array_equal(any_store.get(h), array(1))


def test_gc_frees_only_what_a_delete_released(any_store: Store) -> None:
    shared = array(2)
    keep = any_store.put({"w": shared, "extra": array(3)})
    drop = any_store.put({"w": shared, "extra": array(4)})
    only_drop = digests_of(any_store, drop) - digests_of(any_store, keep)
    assert only_drop
    any_store.delete(drop)
    report = maintenance.gc(any_store, grace=0)
    assert set(report.deleted) == only_drop
    assert report.bytes_freed == array(4).nbytes
    for digest in only_drop:
        assert not any_store._blobs.exists(digest)
    back = any_store.get(keep)
    assert np.array_equal(back["w"], shared) and np.array_equal(back["extra"], array(3))
    assert maintenance.gc(any_store, grace=0).blobs_deleted == 0


def test_gc_grace_keeps_recently_used_blobs(local: Store) -> None:
    h = local.put(array(5))
    digests = digests_of(local, h)
    local.delete(h)
    report = maintenance.gc(local)  # default grace: one hour
    assert report.blobs_deleted == 0 and report.blobs_recent == len(digests)
    for digest in digests:
        age(blob_path(local, digest), 2 * 3600)
    report = maintenance.gc(local, grace=timedelta(hours=1))
    assert set(report.deleted) == digests


def test_gc_dry_run_reports_without_deleting(local: Store) -> None:
    h = local.put(array(6))
    digests = digests_of(local, h)
    local.delete(h)
    dry = maintenance.gc(local, grace=0, dry_run=True)
    assert dry.dry_run and set(dry.deleted) == digests
    assert all(local._blobs.exists(d) for d in digests)
    real = maintenance.gc(local, grace=0)
    assert real.deleted == dry.deleted and real.bytes_freed == dry.bytes_freed


def test_gc_keeps_blobs_of_manifests_this_index_never_saw(tmp_path: Path) -> None:
    root = tmp_path / "shared"
    with Store(root, index=f"sqlite:///{tmp_path / 'a.sqlite'}") as a:
        mine = a.put(array(7))
        with Store(root, index=f"sqlite:///{tmp_path / 'b.sqlite'}") as b:
            theirs = b.put(array(8))  # another machine: a's index knows nothing of it
        assert not a._index.contains(theirs)
        report = maintenance.gc(a, grace=0)
        assert report.blobs_deleted == 0
        assert np.array_equal(a.get(theirs), array(8))
        assert np.array_equal(a.get(mine), array(7))


def test_gc_removes_stale_temp_files_and_keeps_fresh_ones(local: Store) -> None:
    h = local.put(array(9))
    directory = blob_path(local, next(iter(digests_of(local, h)))).parent
    stale = directory / ".abc.123.tmp"
    fresh = directory / ".def.456.tmp"
    stale.write_bytes(b"half a blob")
    fresh.write_bytes(b"a write in progress")
    age(stale, 2 * 3600)
    assert maintenance.gc(local, grace=0, dry_run=True).temp_files_deleted == 1
    assert stale.exists()
    report = maintenance.gc(local, grace=0)
    assert report.temp_files_deleted == 1
    assert not stale.exists() and fresh.exists()


def test_gc_removes_records_of_deleted_artifacts(local: Store) -> None:
    keep = local.put(array(10), name="kept", tags={"stage": "prod"})
    drop = local.put(array(11), name="dropped")
    records_before = set(local._blobs.iter_records())
    local.delete(drop)
    report = maintenance.gc(local, grace=0)
    assert report.records_deleted == 1
    assert len(set(local._blobs.iter_records())) == len(records_before) - 1
    # The surviving records still rebuild names and tags into an empty index.
    with Store(local.root, index=f"sqlite:///{Path(local.root).parent / 'new.sqlite'}") as fresh:
        fresh.reindex()
        [info] = fresh.find(name="kept")
        assert info.hash == keep and info.tags == {"stage": "prod"}
        assert fresh.find(name="dropped") == []


def test_gc_deletes_old_unindexed_unreadable_manifests_only(local: Store) -> None:
    indexed = local.put(array(12))
    stray = local.put(array(13))
    local._index.delete(stray)
    for address in (indexed, stray):
        path = manifest_path(local, address)
        path.write_bytes(path.read_bytes()[:40])
        age(path, 3600)
    report = maintenance.gc(local, grace=0)
    assert report.manifests_deleted == 1
    assert manifest_path(local, indexed).exists()  # verify reports it; repair decides
    assert not manifest_path(local, stray).exists()


def test_gc_second_look_keeps_blobs_of_a_put_that_finished_meanwhile(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    # memory:// never refreshes a re-used blob's time, so only the second listing saves it.
    with Store(f"memory://gc-{tmp_path.name}", index=f"sqlite:///{tmp_path / 'i.db'}") as s:
        value = array(14)
        first = s.put(value)
        s.delete(first)
        original = maintenance._blob_mtime
        calls: list[str] = []

        def put_during_gc(blobs: Any, digest: str) -> float | None:
            if not calls:
                s.put({"again": value})  # re-uses the orphaned blob, writes a manifest
            calls.append(digest)
            return original(blobs, digest)

        monkeypatch.setattr(maintenance, "_blob_mtime", put_during_gc)
        report = maintenance.gc(s, grace=0)
        assert calls and report.blobs_deleted == 0
        assert np.array_equal(s.get(casml.hash_value({"again": value}))["again"], value)


def test_gc_puts_back_a_blob_touched_while_being_deleted(local: Store) -> None:
    h = local.put(array(15))
    [digest] = digests_of(local, h)
    local.delete(h)
    path = blob_path(local, digest)
    # Written (as a racing put would touch it) after the cutoff: the check after the
    # rename-aside must put it back, leaving no stray file.
    assert not maintenance._delete_blob_if_old(local._blobs, digest, cutoff=time.time() - 3600)
    assert path.exists() and not [p for p in path.parent.iterdir() if p.name.startswith(".")]
    assert local._blobs.get_bytes(digest) == array(15).tobytes()
    age(path, 7200)
    assert maintenance._delete_blob_if_old(local._blobs, digest, cutoff=time.time() - 3600)
    assert not path.exists() and not list(path.parent.iterdir())


@pytest.mark.parametrize("grace", [-1, float("nan"), "1h", True])
def test_gc_rejects_a_bad_grace(local: Store, grace: Any) -> None:
    with pytest.raises(CasmlError, match="grace"):
        maintenance.gc(local, grace=grace)


def test_gc_report_is_json_ready(local: Store) -> None:
    h = local.put(array(16))
    local.delete(h)
    document = json.loads(json.dumps(maintenance.gc(local, grace=0).to_dict()))
    assert document["blobs_deleted"] == 1 and len(document["deleted"]) == 1


# -- verify ---------------------------------------------------------------------------------


def test_verify_a_sound_store(any_store: Store) -> None:
    parent = any_store.get_or_build(Node("root"))
    any_store.get_or_build(Node("leaf", parent), name="leaf")
    any_store.put(array(17), tags={"k": "v"})
    report = maintenance.verify(any_store)
    assert report.ok and report.problems == ()
    assert report.manifests_checked == 3 and report.index_rows_checked == 3
    # "root" and "leaf" have equal weights: one blob for both.
    assert report.blobs_checked == 2 and report.bytes_checked == 2 * array(17).nbytes
    assert report.records_checked >= 1


def test_repair_copies_missing_and_damaged_blobs_back_from_another_store(
    local: Store, tmp_path: Path
) -> None:
    with Store(tmp_path / "backup") as backup:
        damaged = local.put(array(40))
        missing = local.put(array(41))
        backup.put({"same bytes": array(40)})  # another artifact holding the same array
        backup.put(array(41))
        [d1] = digests_of(local, damaged)
        [d2] = digests_of(local, missing)
        path = blob_path(local, d1)
        data = bytearray(path.read_bytes())
        data[0] ^= 0xFF
        path.write_bytes(bytes(data))
        blob_path(local, d2).unlink()
        found = maintenance.verify(local)
        assert sorted(p.kind for p in found.errors) == ["corrupt_blob", "missing_blob"]
        report = maintenance.verify(local, repair=True, source=backup)
        assert report.ok and all(p.fixed for p in report.problems)
        actions = {p.kind: p.action for p in report.problems}
        assert actions["corrupt_blob"] == (
            f"deleted the damaged copy; copied a good copy from {backup.root}"
        )
        assert actions["missing_blob"] == f"copied a good copy from {backup.root}"
    assert np.array_equal(local.get(damaged), array(40))
    assert np.array_equal(local.get(missing), array(41))
    assert maintenance.verify(local).ok


def test_verify_finds_a_flipped_byte_and_repair_lets_a_put_heal_it(local: Store) -> None:
    value = array(18)
    h = local.put(value)
    [digest] = digests_of(local, h)
    path = blob_path(local, digest)
    data = bytearray(path.read_bytes())
    data[100] ^= 0x01
    path.write_bytes(bytes(data))
    report = maintenance.verify(local)
    assert not report.ok
    [problem] = report.errors
    assert problem.kind == "corrupt_blob" and problem.key == digest and problem.artifacts == (h,)
    repaired = maintenance.verify(local, repair=True)
    [problem] = repaired.errors
    assert problem.action is not None and not problem.fixed  # the artifact still needs it
    assert not path.exists()
    # With the damaged copy gone, putting the value again writes a good one.
    local.delete(h)
    assert local.put(value) == h
    assert maintenance.verify(local).ok
    assert np.array_equal(local.get(h), value)


def test_verify_finds_a_missing_blob(local: Store) -> None:
    h = local.put(array(19))
    [digest] = digests_of(local, h)
    blob_path(local, digest).unlink()
    report = maintenance.verify(local)
    [problem] = report.errors
    assert problem.kind == "missing_blob" and problem.key == digest and problem.artifacts == (h,)
    assert not maintenance.verify(local, repair=True).ok  # nothing in storage can restore it


def test_verify_orphans_are_not_errors(local: Store) -> None:
    h = local.put(array(20))
    local.delete(h)
    report = maintenance.verify(local)
    assert report.ok
    assert report.orphans == tuple(sorted(digests_of_after_delete(local)))


def digests_of_after_delete(store: Store) -> set[str]:
    return set(store._blobs.iter_digests())


def test_verify_truncated_manifest_and_repair(local: Store) -> None:
    value = array(21)
    h = local.put(value)
    path = manifest_path(local, h)
    path.write_bytes(path.read_bytes()[:-30])
    report = maintenance.verify(local)
    assert [p.kind for p in report.errors] == ["corrupt_manifest"]
    assert report.errors[0].key == h
    repaired = maintenance.verify(local, repair=True)
    assert repaired.ok and repaired.problems[0].fixed
    assert not path.exists() and not local._index.contains(h)
    assert local.put(value) == h  # no longer blocked by the damaged manifest
    assert np.array_equal(local.get(h), value)


def test_verify_unindexed_manifest_and_repair_restores_names(tmp_path: Path) -> None:
    root = tmp_path / "shared"
    with Store(root, index=f"sqlite:///{tmp_path / 'other.sqlite'}") as other:
        h = other.put(array(22), name="weights", tags={"run": "7"})
    with Store(root, index=f"sqlite:///{tmp_path / 'mine.sqlite'}") as mine:
        report = maintenance.verify(mine)
        [problem] = report.errors
        assert problem.kind == "unindexed_manifest" and problem.key == h
        repaired = maintenance.verify(mine, repair=True)
        assert repaired.ok and repaired.problems[0].fixed
        [info] = mine.find(name="weights")
        assert info.hash == h and info.version == 1 and info.tags == {"run": "7"}


def test_verify_dangling_index_row_and_repair(local: Store) -> None:
    keep = local.put(array(23))
    gone = local.put(array(24), name="gone")
    manifest_path(local, gone).unlink()
    report = maintenance.verify(local)
    [problem] = report.errors
    assert problem.kind == "dangling_index_row" and problem.key == gone
    assert maintenance.verify(local, repair=True).ok
    assert not local._index.contains(gone) and local._index.contains(keep)
    assert maintenance.verify(local).ok


def test_repair_refuses_to_drop_every_row_when_storage_looks_wrong(tmp_path: Path) -> None:
    index = f"sqlite:///{tmp_path / 'index.sqlite'}"
    with Store(tmp_path / "right", index=index) as right:
        h = right.put(array(25))
    with Store(tmp_path / "wrong", index=index) as wrong:
        with pytest.raises(CasmlError, match="no manifest at all"):
            maintenance.verify(wrong, repair=True)
        assert wrong._index.contains(h)


def test_verify_index_mismatch_and_repair_rebuilds_the_row(local: Store) -> None:
    h = local.put(array(26), name="w", tags={"a": "b"})
    before = local.info(h)
    blobs_before = local._index.blobs_of(h)
    local._index.delete(h)
    wrong = ArtifactRecord(
        hash=h, class_name=before.class_name, kind="value", size=1, created_at=before.created_at
    )
    local._index.add(wrong)
    report = maintenance.verify(local)
    assert [p.kind for p in report.errors] == ["index_mismatch"]
    assert maintenance.verify(local, repair=True).ok
    after = local.info(h)
    assert after.size == before.size and after.tags == {"a": "b"}
    assert local._index.blobs_of(h) == blobs_before
    assert local.find(name="w")[0].hash == h
    assert maintenance.verify(local).ok


def test_verify_missing_dependency(local: Store) -> None:
    parent = local.get_or_build(Node("p"))
    child = local.get_or_build(Node("child", parent))
    local.delete(parent.hash_)
    report = maintenance.verify(local)
    [problem] = report.errors
    assert problem.kind == "missing_dependency"
    assert problem.key == parent.hash_ and problem.artifacts == (child.hash_,)


def test_verify_corrupt_record_and_repair(local: Store) -> None:
    local.put(array(27), name="named")
    [key] = list(local._blobs.iter_records())
    path = Path(local.root) / "records" / key[:2] / key[2:]
    path.write_bytes(path.read_bytes() + b" ")
    report = maintenance.verify(local)
    assert [p.kind for p in report.errors] == ["corrupt_record"]
    assert maintenance.verify(local, repair=True).ok
    assert not path.exists()


def test_verify_report_to_dict(local: Store) -> None:
    h = local.put(array(28))
    [digest] = digests_of(local, h)
    blob_path(local, digest).unlink()
    document = json.loads(json.dumps(maintenance.verify(local).to_dict()))
    assert document["ok"] is False and document["errors"] == 1
    [problem] = document["problems"]
    assert problem["kind"] == "missing_blob" and problem["artifacts"] == [h]
    assert problem["is_error"] is True
    with pytest.raises(CasmlError, match="unknown problem kind"):
        maintenance.verify(local).of_kind("nonsense")


# -- du and reindex ---------------------------------------------------------------------------


def test_disk_usage_counts_shared_bytes_once(any_store: Store) -> None:
    shared = array(29, 50_000)
    for i in range(3):
        any_store.put({"w": shared, "i": i})
    usage = maintenance.disk_usage(any_store)
    assert usage.artifacts == 3 and usage.indexed_artifacts == 3 and usage.blobs == 1
    assert usage.logical_bytes >= 3 * shared.nbytes
    assert usage.blob_bytes == shared.nbytes
    assert usage.stored_bytes == usage.blob_bytes + usage.manifest_bytes + usage.record_bytes
    assert 2.5 < usage.dedup_ratio < 3.0
    assert usage.to_dict()["dedup_ratio"] == round(usage.dedup_ratio, 4)


def test_disk_usage_of_an_empty_store(local: Store) -> None:
    usage = maintenance.disk_usage(local)
    assert (usage.artifacts, usage.blobs, usage.stored_bytes) == (0, 0, 0)
    assert usage.dedup_ratio == 1.0


def test_reindex_skips_damaged_manifests_and_restores_the_rest(tmp_path: Path) -> None:
    root = tmp_path / "store"
    with Store(root) as s:
        good = s.put(array(30), name="good")
        bad = s.put(array(31))
    path = root / "manifests" / bad[:2] / bad[2:]
    path.write_bytes(b"{not json")
    with Store(root, index=f"sqlite:///{tmp_path / 'rebuilt.sqlite'}") as fresh:
        added, warnings = maintenance.reindex(fresh)
        assert added == 1
        assert len(warnings) == 1 and bad in warnings[0]
        assert fresh.find(name="good")[0].hash == good


def test_gc_and_verify_on_every_index_backend(store: Store) -> None:
    parent = store.get_or_build(Node("base"), name="nodes")
    child = store.get_or_build(Node("child", parent), name="nodes")
    gone = store.put(array(50), tags={"tmp": "1"})
    released = digests_of(store, gone)
    store.delete(gone)
    assert set(maintenance.gc(store, grace=0).deleted) == released
    report = maintenance.verify(store)
    assert report.ok and report.problems == ()
    assert store.get(child.hash_).parent.label == "base"
    assert maintenance.disk_usage(store).artifacts == 2
