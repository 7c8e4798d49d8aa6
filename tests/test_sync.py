"""Sharing: push/pull, remotes, reindex from storage alone, and build leases across processes."""

from __future__ import annotations

import multiprocessing
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import casml
from casml.errors import CasmlError, NotFoundError
from casml.store import Store
from tests.processes import collect


def objects_in(root: Path) -> tuple[int, int]:
    files = [p for p in (root / "objects").rglob("*") if p.is_file()]
    return len(files), sum(p.stat().st_size for p in files)


class Stage(casml.Persistable, name="tests.sync.Stage"):
    hash_attributes = ("upstream", "k")

    def __init__(self, k: int, upstream: Any = None) -> None:
        self.k, self.upstream = k, upstream

    def build(self) -> None:
        self.weights_ = np.full(300_000, float(self.k))


def test_push_then_get_on_another_machine_and_second_push_is_empty(tmp_path: Path) -> None:
    bucket = tmp_path / "bucket"
    with Store(tmp_path / "a") as a, Store(bucket) as shared:
        first = a.get_or_build(Stage(1), name="stage")
        second = a.get_or_build(Stage(2, upstream=first), name="stage")
        report = a.push(shared)
        assert report.artifacts == 2 and report.blobs >= 2 and report.bytes >= 4_800_000
        count, size = objects_in(bucket)
        again = a.push(shared)
        assert (again.artifacts, again.blobs, again.bytes) == (0, 0, 0)
        assert objects_in(bucket) == (count, size)

    # Machine B: an empty store whose remote is the shared bucket.
    with Store(bucket) as shared, Store(tmp_path / "b", remote=shared) as b:
        loaded = b.get(second.hash_)
        assert loaded.upstream.k == 1
        np.testing.assert_array_equal(loaded.weights_, second.weights_)
        # Kept locally: works without the remote now.
    with Store(tmp_path / "b") as b_alone:
        assert b_alone.get(second.hash_).k == 2
        assert b_alone.get(first.hash_).k == 1
        assert [i.version for i in b_alone.find(name="stage")] == [2, 1]


def test_pull_selected_hashes_brings_dependencies(tmp_path: Path) -> None:
    with Store(tmp_path / "a") as a, Store(tmp_path / "b") as b:
        up = a.get_or_build(Stage(5))
        down = a.get_or_build(Stage(6, upstream=up))
        other = a.put({"unrelated": 1})
        report = b.pull(a, [down.hash_[:10]])
        assert report.artifacts == 2
        assert up.hash_ in b and down.hash_ in b
        assert other not in b
        assert b.pull(a, [down.hash_]).artifacts == 0


def test_push_without_a_remote_is_a_clear_error(store: Store) -> None:
    with pytest.raises(CasmlError, match="remote="):
        store.push()


def test_interrupted_transfer_leaves_nothing_visible_and_rerun_completes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with Store(tmp_path / "a") as a, Store(tmp_path / "b") as b:
        h = a.put({"w": np.arange(2_000_000)})
        calls = {"n": 0}
        original = b._blobs.put_bytes

        def failing_put(data: Any) -> str:
            calls["n"] += 1
            if calls["n"] == 2:
                raise OSError("connection reset")
            return original(data)

        monkeypatch.setattr(b._blobs, "put_bytes", failing_put)
        with pytest.raises(OSError):
            a.push(b)
        assert h not in b  # no manifest without its blobs
        with pytest.raises(NotFoundError):
            b.get(h)
        monkeypatch.setattr(b._blobs, "put_bytes", original)
        assert a.push(b).artifacts == 1
        np.testing.assert_array_equal(b.get(h)["w"], np.arange(2_000_000))


def test_reindex_from_storage_alone_restores_names_versions_and_tags(tmp_path: Path) -> None:
    root = tmp_path / "bucket"
    with Store(root) as s:
        h1 = s.put({"v": 1}, name="cfg", tags={"stage": "dev"})
        h2 = s.put({"v": 2}, name="cfg")
        s.put({"v": 2}, name="other")
        s.put({"v": 1}, tags={"stage": "prod"})  # a later tag value wins
    fresh = f"sqlite:///{tmp_path / 'fresh.sqlite'}"
    with Store(root, index=fresh) as rebuilt:
        assert rebuilt.find() == []
        assert rebuilt.reindex() == 2
        assert [(i.hash, i.version) for i in rebuilt.find(name="cfg")] == [(h2, 2), (h1, 1)]
        assert rebuilt.latest("cfg") == {"v": 2}
        assert rebuilt.latest("other") == {"v": 2}
        assert rebuilt.info(h1).tags == {"stage": "prod"}
        assert rebuilt.get(h1[:8]) == {"v": 1}
        assert rebuilt.reindex() == 0  # incremental: nothing new


def test_memory_root_with_cache_index(tmp_path: Path) -> None:
    with Store("memory://casml-sync-test", index=f"sqlite:///{tmp_path / 'i.sqlite'}") as a:
        h = a.put([1, 2, 3], name="l")
    with Store("memory://casml-sync-test", index=f"sqlite:///{tmp_path / 'j.sqlite'}") as b:
        assert b.get(h) == [1, 2, 3]
        b.reindex()
        assert b.latest("l") == [1, 2, 3]


# -- leases ------------------------------------------------------------------------------

BUILDER = textwrap.dedent(
    """
    import sys, time, casml

    class Slow(casml.Persistable, name="tests.sync.Slow"):
        hash_attributes = ("n",)
        def __init__(self, n):
            self.n = n
        def build(self):
            with open(sys.argv[3], "a") as log:
                log.write("build\\n")
            time.sleep(float(sys.argv[4]))
            self.out_ = self.n * 2

    with casml.Store(sys.argv[1], index=sys.argv[6], lease_seconds=float(sys.argv[5])) as s:
        print(s.get_or_build(Slow(int(sys.argv[2]))).out_, flush=True)
    """
)


def _spawn(
    root: Path, index: str, log: Path, sleep: float, lease: float, n: int = 21
) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-c", BUILDER, str(root), str(n), str(log), str(sleep), str(lease), index],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def test_four_processes_build_one_hash_once(tmp_path: Path, index_url: str) -> None:
    root, log = tmp_path / "s", tmp_path / "builds.log"
    Store(root, index=index_url).close()
    procs = [_spawn(root, index_url, log, sleep=1.0, lease=5) for _ in range(4)]
    outs = [p.communicate(timeout=60) for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0, 0], [e for _, e in outs]
    assert [o.strip() for o, _ in outs] == ["42"] * 4
    assert log.read_text().count("build") == 1


def test_a_killed_builders_lease_expires_and_another_takes_over(
    tmp_path: Path, index_url: str
) -> None:
    root, log = tmp_path / "s", tmp_path / "builds.log"
    Store(root, index=index_url).close()
    doomed = _spawn(root, index_url, log, sleep=30, lease=1.0)
    deadline = time.monotonic() + 20
    while not (log.exists() and "build" in log.read_text()):
        assert time.monotonic() < deadline
        time.sleep(0.05)
    os.kill(doomed.pid, signal.SIGKILL)
    doomed.wait(timeout=10)
    started = time.monotonic()
    survivor = _spawn(root, index_url, log, sleep=0.1, lease=1.0)
    out, err = survivor.communicate(timeout=60)
    assert survivor.returncode == 0, err
    assert out.strip() == "42"
    assert log.read_text().count("build") == 2
    assert time.monotonic() - started < 15


def _put_versions(root: str, index: str, worker: int, out: Any) -> None:
    with Store(root, index=index) as s:
        out.put([s.put({"worker": worker, "i": i}, name="runs") for i in range(10)])


def test_concurrent_writers_get_unique_gap_free_versions(tmp_path: Path, index_url: str) -> None:
    root = str(tmp_path / "s")
    Store(root, index=index_url).close()
    ctx = multiprocessing.get_context("spawn")
    out = ctx.Queue()
    procs = [ctx.Process(target=_put_versions, args=(root, index_url, w, out)) for w in range(4)]
    results = collect(procs, out)
    with Store(root, index=index_url) as s:
        versions = sorted(i.version or 0 for i in s.find(name="runs"))
    assert versions == list(range(1, 41))
    assert len({h for r in results for h in r}) == 40


def test_push_to_an_object_store_packs_small_manifests(tmp_path: Path) -> None:
    bucket = f"memory://casml-pack-{os.getpid()}-{time.monotonic_ns()}"
    with Store(tmp_path / "a") as a, Store(bucket, index=f"sqlite:///{tmp_path / 'b.sqlite'}") as b:
        hashes = [a.put({"i": i}) for i in range(40)]
        named = a.put({"i": 0, "named": True}, name="cfg")
        report = a.push(b)
        assert report.artifacts == 41
        assert len(list(b._blobs.iter_packs())) == 1
        assert [m for m in b._blobs._iter_keys("manifests")] == []  # all packed
        assert a.push(b).artifacts == 0

    # Another machine sees packed manifests as ordinary ones.
    with Store(bucket, index=f"sqlite:///{tmp_path / 'c.sqlite'}") as c:
        assert c.reindex() == 41
        assert c.get(hashes[7]) == {"i": 7}
        assert c.get(hashes[7][:9]) == {"i": 7}
        assert c.latest("cfg") == {"i": 0, "named": True}
        c.delete(hashes[7])  # packs are immutable: a tombstone hides it
        assert hashes[7] not in c
        with pytest.raises(NotFoundError):
            c.get(hashes[7])
        assert c.get(named)["named"] is True
    with Store(bucket, index=f"sqlite:///{tmp_path / 'd.sqlite'}") as d:
        assert d.reindex() == 40
        assert hashes[7] not in d
        d.put({"i": 7})  # storing it again brings it back
        assert d.get(hashes[7]) == {"i": 7}


def test_verify_reports_a_damaged_pack(tmp_path: Path) -> None:
    bucket = f"memory://casml-badpack-{os.getpid()}-{time.monotonic_ns()}"
    with Store(tmp_path / "a") as a, Store(bucket, index=f"sqlite:///{tmp_path / 'b.sqlite'}") as b:
        for i in range(20):
            a.put({"i": i})
        a.push(b)
        key = next(b._blobs.iter_packs())
        path = b._blobs._pack_path(key)
        data = bytearray(b._blobs.fs.cat_file(path))
        data[10] ^= 1
        b._blobs.fs.pipe_file(path, bytes(data))
    with Store(bucket, index=f"sqlite:///{tmp_path / 'c.sqlite'}") as c:
        report = c.verify()
        assert not report.ok
        assert [p.kind for p in report.problems] == ["corrupt_pack"]
