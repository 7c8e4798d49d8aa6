"""Crash safety: SIGKILL put, push, pull, gc and reindex at random points, then check the store.

Each trial forks a child (see tests/reliability_tools.py) that loops one operation on fresh
data and kills it with SIGKILL 5-300 ms after it is ready. After every kill:

1. no index row points at missing data (its manifest, blobs and dependencies exist);
2. every artifact committed before the kill (logged by the child once ``put``/``push``/``pull``
   returned, or stored before the trial) loads and equals what was stored, tags included;
3. ``verify`` reports nothing worse than orphan blobs and manifests not yet indexed (the
   interrupted operation's own, which re-running it indexes);
4. re-running the interrupted step completes, after which ``verify`` reports only orphans;
5. the next ``gc(grace=0)`` frees those orphans and the temporary files the dead writer left
   (aged past gc's ten-minute floor for temporary files), leaving ``verify`` with nothing to
   report and every committed artifact still loadable.

``CASML_CRASH_TRIALS`` (default 100, about 75 s; docs/reliability.md reports a run of 1000)
sets the total number of trials: 80% on a local folder, 20% on S3 (SeaweedFS), spread evenly
over the five operations. Two trials run at a time.
"""

from __future__ import annotations

import contextlib
import os
import random
import shutil
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from casml import maintenance
from casml.errors import NotFoundError
from casml.store import Store
from tests import services
from tests.reliability_tools import (
    StoreSpec,
    Trial,
    Zygote,
    age_temp_files,
    index_rows_sound,
    make_garbage,
    make_object,
    matches,
    naming,
    put_seed,
    run_trial,
    temp_files,
    verify_kinds,
    write_report,
)

TOTAL_TRIALS = int(os.environ.get("CASML_CRASH_TRIALS", "100"))
OPERATIONS = ("put", "push", "pull", "gc", "reindex")
LOCAL_TRIALS = max(1, round(TOTAL_TRIALS * 0.8 / len(OPERATIONS)))
S3_TRIALS = max(1, round(TOTAL_TRIALS * 0.2 / len(OPERATIONS)))

#: Findings verify may report right after a kill: orphans, and manifests whose index rows
#: the dead process never wrote (re-running the operation writes them).
AFTER_KILL = {"orphan_blob", "unindexed_manifest"}
CONCURRENT_TRIALS = 2


@pytest.fixture(scope="module")
def zygote() -> Iterator[Zygote]:
    z = Zygote()
    try:
        yield z
    finally:
        z.close()


@pytest.fixture(autouse=True)
def no_settle(monkeypatch: pytest.MonkeyPatch) -> None:
    # gc's one-second wait protects puts of other processes in flight; the checks below run
    # after the only writer is dead.
    monkeypatch.setattr(maintenance, "_SETTLE_SECONDS", 0.0)


class Backend:
    """Where a trial's stores live: fresh local folders, or fresh prefixes on one S3 server."""

    def __init__(self, name: str, server: services.S3Server | None = None) -> None:
        self.name = name
        self.server = server

    def spec(self, folder: Path, label: str) -> StoreSpec:
        index = f"sqlite:///{folder / f'{label}-index.sqlite'}"
        if self.server is None:
            return StoreSpec(str(folder / label), index)
        return StoreSpec(self.server.url(), index, self.server.storage_options)

    def local_spec(self, folder: Path, label: str) -> StoreSpec:
        return StoreSpec(str(folder / label), f"sqlite:///{folder / f'{label}-index.sqlite'}")


# ---------------------------------------------------------------------------- checks


class Figures:
    """What the trials of one scenario saw, for docs/reliability.md."""

    def __init__(self, op: str, backend: str) -> None:
        self.op = op
        self.backend = backend
        self.trials = 0
        self.interrupted: Counter[str] = Counter()
        self.after_kill: Counter[str] = Counter()
        self.committed_checked = 0
        self.temp_files = 0
        self.reruns = 0

    def merge(self, other: Figures) -> None:
        self.trials += other.trials
        self.interrupted.update(other.interrupted)
        self.after_kill.update(other.after_kill)
        self.committed_checked += other.committed_checked
        self.temp_files += other.temp_files
        self.reruns += other.reruns

    def report(self) -> None:
        write_report(
            f"crash/{self.backend}/{self.op}",
            {
                "trials": self.trials,
                "interrupted_step": dict(self.interrupted),
                "verify_after_kill": dict(self.after_kill),
                "committed_artifacts_checked": self.committed_checked,
                "temp_files_left": self.temp_files,
                "reruns": self.reruns,
            },
        )


def check_committed(store: Store, committed: dict[str, int]) -> int:
    """Every committed artifact loads, equals its seed's object and carries its tags."""
    for h, seed in committed.items():
        assert matches(store.get(h), seed), f"artifact {h} (seed {seed}) came back different"
        _, tags = naming(seed)
        if tags:
            assert store.info(h).tags == tags, f"artifact {h} lost its tags"
    return len(committed)


def check_after_kill(store: Store, committed: dict[str, int], figures: Figures) -> None:
    index_rows_sound(store)
    figures.committed_checked += check_committed(store, committed)
    kinds = verify_kinds(store)
    figures.after_kill.update(kinds)
    assert set(kinds) <= AFTER_KILL, f"verify after the kill: {dict(kinds)}"


def check_after_rerun_and_gc(
    spec: StoreSpec, store: Store, committed: dict[str, int], figures: Figures
) -> None:
    if store._blobs.is_local:
        figures.temp_files += age_temp_files(spec.root)
    store.gc(grace=0)
    # gc frees orphans only: had the re-run left anything else, verify would still see it.
    report = store.verify()
    assert not report.problems, f"verify after re-run and gc: {[p.kind for p in report.problems]}"
    if store._blobs.is_local:
        assert temp_files(spec.root) == [], "gc left temporary files behind"
    # verify re-hashed every blob a manifest lists; the committed artifacts must still be
    # indexed, so none of their blobs was collected.
    index_rows_sound(store)
    lost = store._index.missing(list(committed))
    assert not lost, f"committed artifacts gone after gc: {sorted(lost)}"


def kill_one(zygote: Zygote, op: str, args: dict[str, Any], folder: Path, seed: int) -> Trial:
    trial = run_trial(zygote, op, args, folder, random.Random(seed))
    assert trial.killed, f"the {op} child died on its own: {trial.stderr}"
    return trial


# ---------------------------------------------------------------------------- scenarios


def put_trial(zygote: Zygote, backend: Backend, folder: Path, seed: int, f: Figures) -> None:
    spec = backend.spec(folder, "store")
    with spec.open() as store:
        committed = {put_seed(store, s): s for s in (seed, seed + 1)}
    trial = kill_one(zygote, "put", {"store": spec.to_json(), "seed": seed + 2}, folder, seed)
    committed.update({h: s for s, h in trial.done("put")})
    interrupted = trial.interrupted
    f.interrupted[interrupted[0] if interrupted else "between steps"] += 1
    with spec.open() as store:
        check_after_kill(store, committed, f)
        if interrupted:
            s = int(interrupted[1])
            h = put_seed(store, s)
            assert matches(store.get(h), s)
            committed[h] = s
            f.reruns += 1
        check_after_rerun_and_gc(spec, store, committed, f)


def transfer_trial(
    zygote: Zygote, backend: Backend, folder: Path, seed: int, f: Figures, op: str
) -> None:
    # push: local source -> backend target; pull: backend source -> local target.
    if op == "push":
        source, target = backend.local_spec(folder, "source"), backend.spec(folder, "target")
    else:
        source, target = backend.spec(folder, "source"), backend.local_spec(folder, "target")
    with source.open() as src, target.open() as dst:
        in_source = {put_seed(src, s): s for s in (seed, seed + 1, seed + 2)}
        src.push(dst)
        in_target = dict(in_source)
        # Stored in the source only: the child's first transfer takes them across.
        pending = [(s, put_seed(src, s)) for s in (seed + 3, seed + 4)]
        in_source.update({h: s for s, h in pending})
    args = {
        "op": op,
        "source": source.to_json(),
        "target": target.to_json(),
        "seed": seed + 5,
        "pending": pending,
    }
    trial = kill_one(zygote, op, args, folder, seed)
    in_source.update({h: s for s, h in trial.done("put")})
    in_target.update({h: s for s, h in trial.done(op)})
    interrupted = trial.interrupted
    f.interrupted[interrupted[0] if interrupted else "between steps"] += 1
    with source.open() as src, target.open() as dst:
        check_after_kill(src, in_source, f)
        check_after_kill(dst, in_target, f)
        if interrupted and interrupted[0] == "put":
            s = int(interrupted[1])
            in_source[put_seed(src, s)] = s
            f.reruns += 1
        elif interrupted:
            src.push(dst) if op == "push" else dst.pull(src)
            in_target.update(in_source)
            f.reruns += 1
        # The next transfer takes everything across: a dead one left nothing in the way.
        src.push(dst) if op == "push" else dst.pull(src)
        in_target.update(in_source)
        check_after_rerun_and_gc(source, src, in_source, f)
        check_after_rerun_and_gc(target, dst, in_target, f)


def gc_trial(zygote: Zygote, backend: Backend, folder: Path, seed: int, f: Figures) -> None:
    spec = backend.spec(folder, "store")
    # Seeds of kind 2 hold chunked arrays: the garbage shares those chunks.
    shared = [seed - seed % 4 + 2, seed - seed % 4 + 6]
    with spec.open() as store:
        committed = {put_seed(store, s): s for s in (*shared, seed)}
        garbage = make_garbage(store, seed + 8, shared, 8)
        for h in garbage[:3]:
            store.delete(h)
    # The child runs gc, deletes one more garbage artifact, runs gc again, and so on.
    args = {"store": spec.to_json(), "doomed": garbage[3:]}
    trial = kill_one(zygote, "gc", args, folder, seed)
    interrupted = trial.interrupted
    f.interrupted[interrupted[0] if interrupted else "between steps"] += 1
    # Garbage the child did not get to delete is alive, and must have survived too.
    deleted = {w[2] for w in trial.lines if len(w) == 3 and w[1] == "delete"}
    alive = [h for h in garbage[3:] if h not in deleted]
    with spec.open() as store:
        check_after_kill(store, committed, f)
        for h in alive:
            assert store.get(h)["garbage"] >= seed + 8
        if interrupted and interrupted[0] == "gc":
            store.gc(grace=0)
        elif interrupted:
            with contextlib.suppress(NotFoundError):  # the kill came after its work
                store.delete(interrupted[1])
        f.reruns += bool(interrupted)
        check_after_rerun_and_gc(spec, store, committed, f)


@pytest.fixture(scope="module")
def reindex_sources(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Storage shared by the reindex trials (reindex writes only the index), per backend."""
    return {"folder": tmp_path_factory.mktemp("reindex-sources")}


def reindex_source(backend: Backend, cache: dict[str, Any]) -> StoreSpec:
    if backend.name in cache:
        return cache[backend.name]  # type: ignore[no-any-return]
    count = 60 if backend.server is None else 30
    folder: Path = cache["folder"] / backend.name
    folder.mkdir()
    spec = backend.spec(folder, "store")
    with spec.open() as store:
        for s in range(count):
            # Mostly small artifacts, all named and tagged: reindex spends its time on the
            # index and on replaying the name/tag records, where a kill hurts most.
            value = make_object(s * 4) if s % 8 else make_object(s)
            store.put(value, name=f"series-{s % 5}", tags={"n": str(s), "k": f"'; --{s}"})
    cache[backend.name] = spec
    return spec


def reference_index(store: Store) -> dict[str, Any]:
    names = sorted({i.name for i in store._index.find() if i.name})
    return {
        "names": {n: [(i.hash, i.version) for i in store.find(name=n)] for n in names},
        "tags": {i.hash: i.tags for i in store._index.find()},
    }


def reindex_trial(
    zygote: Zygote, backend: Backend, folder: Path, seed: int, f: Figures, cache: dict[str, Any]
) -> None:
    spec = reindex_source(backend, cache)
    with spec.open() as store:
        expected = reference_index(store)
        committed = {i.hash for i in store._index.find()}
    folder.mkdir(parents=True)
    args = {"store": spec.to_json(), "folder": str(folder)}
    trial = kill_one(zygote, "reindex", args, folder, seed)
    starts = [w for w in trial.lines if w[:2] == ["start", "reindex"]]
    interrupted = trial.interrupted
    f.interrupted[interrupted[0] if interrupted else "between steps"] += 1
    index = starts[-1][3] if starts else f"sqlite:///{folder / 'index-0.sqlite'}"
    with StoreSpec(spec.root, index, spec.options).open() as store:
        index_rows_sound(store)
        for h in committed:
            store.get(h)  # loads from its manifest even before the index knows it
        f.committed_checked += len(committed)
        kinds = verify_kinds(store)
        f.after_kill.update(kinds)
        assert set(kinds) <= AFTER_KILL, f"verify after the kill: {dict(kinds)}"
        store.reindex()
        f.reruns += 1
        assert reference_index(store) == expected, "reindex after the kill lost names or tags"
        kinds = verify_kinds(store)
        assert not kinds, f"verify after re-running reindex: {dict(kinds)}"


def one_trial(
    op: str, backend: Backend, n: int, zygote: Zygote, tmp_path: Path, cache: dict[str, Any]
) -> Figures:
    figures = Figures(op, backend.name)
    seed = 1000 * (n + 1) + OPERATIONS.index(op) * 100_000_000
    folder = tmp_path / f"trial-{n}"
    if op == "put":
        put_trial(zygote, backend, folder, seed, figures)
    elif op in ("push", "pull"):
        transfer_trial(zygote, backend, folder, seed, figures, op)
    elif op == "gc":
        gc_trial(zygote, backend, folder, seed, figures)
    else:
        reindex_trial(zygote, backend, folder, seed, figures, cache)
    figures.trials += 1
    shutil.rmtree(folder, ignore_errors=True)
    return figures


def run_scenario(
    op: str,
    backend: Backend,
    trials: int,
    zygote: Zygote,
    tmp_path: Path,
    cache: dict[str, Any],
) -> None:
    if op == "reindex":
        reindex_source(backend, cache)
    figures = Figures(op, backend.name)
    # Two trials at a time: one child's random wait overlaps the other trial's checks.
    with ThreadPoolExecutor(max_workers=CONCURRENT_TRIALS) as pool:
        jobs = [
            pool.submit(one_trial, op, backend, n, zygote, tmp_path, cache) for n in range(trials)
        ]
        for job in jobs:
            figures.merge(job.result())
    figures.report()
    # The kills must have landed inside the operation under test, not only around it.
    assert figures.interrupted[op] > 0 or trials < 5, (
        f"no kill interrupted a {op}: {dict(figures.interrupted)}"
    )


@pytest.mark.parametrize("op", OPERATIONS)
def test_crash_local(
    op: str, zygote: Zygote, tmp_path: Path, reindex_sources: dict[str, Any]
) -> None:
    run_scenario(op, Backend("local"), LOCAL_TRIALS, zygote, tmp_path, reindex_sources)


@pytest.mark.integration
@pytest.mark.parametrize("op", OPERATIONS)
def test_crash_s3(
    op: str,
    zygote: Zygote,
    tmp_path: Path,
    reindex_sources: dict[str, Any],
    s3_server: services.S3Server,
) -> None:
    run_scenario(op, Backend("s3", s3_server), S3_TRIALS, zygote, tmp_path, reindex_sources)
