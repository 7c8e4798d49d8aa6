"""Store put/get throughput, side by side in one run, against what users would pick instead.

Large: a float64 array (default 512 MiB) through casml put/get, numpy.save/load, pickle
(protocol 5) and joblib.dump/load, all to the same disk, best of N rounds taken in turn,
with the peak extra memory each needs (tracemalloc; numpy reports its buffers to it). Nobody fsyncs:
casml's default, like the peers', leaves flushing to the OS (see docs/storage.md).
Small: 10,000 small dict puts and gets per second, against pickling each dict to its own
file. Run: python benchmarks/bench_store.py [--mb 512] [--small 10000] [--rounds 5]
"""

from __future__ import annotations

import argparse
import gc
import os
import pickle
import shutil
import statistics
import tempfile
import time
import tracemalloc
from collections.abc import Callable
from pathlib import Path
from typing import Any

import joblib
import numpy as np

from casml import Store


def measure(fn: Callable[[], Any], *, traced: bool) -> tuple[float, int, Any]:
    """Run fn once: (seconds, peak bytes allocated above the starting point, result).

    Timing and memory come from separate runs: tracemalloc slows every allocation (casml's
    thread pool more than numpy's single write), so a traced run's seconds are not used.
    """
    gc.collect()
    if traced:
        tracemalloc.start()
        tracemalloc.reset_peak()
        base = tracemalloc.get_traced_memory()[0]
    start = time.perf_counter()
    result = fn()
    seconds = time.perf_counter() - start
    peak = 0
    if traced:
        peak = tracemalloc.get_traced_memory()[1] - base
        tracemalloc.stop()
    return seconds, peak, result


def large(workdir: Path, mb: int, rounds: int) -> None:
    array = np.random.default_rng(0).random(mb * 1024 * 1024 // 8)
    nbytes = array.nbytes

    # Stores are opened before the clock starts, as a user's store already is; each round
    # writes to a fresh store, or deduplication would make every put after the first free.
    stores: dict[Path, Store] = {}

    def open_store(folder: Path) -> Store:
        if folder not in stores:
            stores[folder] = Store(folder, index=f"sqlite:///{folder}.sqlite")
        return stores[folder]

    def casml_put(folder: Path) -> Callable[[], Any]:
        store = open_store(folder)
        return lambda: store.put(array)

    def casml_get(folder: Path, h: str) -> Callable[[], Any]:
        store = open_store(folder)
        return lambda: store.get(h)

    def np_save(path: Path) -> Callable[[], Any]:
        return lambda: np.save(path, array)

    def pickle_dump(path: Path) -> Callable[[], Any]:
        def run() -> None:
            with open(path, "wb") as f:
                pickle.dump(array, f, protocol=5)

        return run

    def pickle_load(path: Path) -> Callable[[], Any]:
        def run() -> Any:
            with open(path, "rb") as f:
                return pickle.load(f)

        return run

    methods = {
        "casml": (casml_put, casml_get),
        "numpy.save/load": (np_save, lambda p, _: lambda: np.load(p)),
        "pickle p5": (pickle_dump, lambda p, _: pickle_load(p)),
        "joblib": (lambda p: lambda: joblib.dump(array, p), lambda p, _: lambda: joblib.load(p)),
    }
    seconds: dict[tuple[str, str], list[float]] = {}
    extra: dict[tuple[str, str], int] = {}
    # Round 0 measures memory (traced, its times are dropped); the timed rounds go method by
    # method in turn, so that every method meets the disk in the same moods (page-cache
    # writeback, discards after deletes) instead of one of them getting all the calm.
    for round_no in range(rounds + 1):
        traced = round_no == 0
        for label, (put_factory, get_factory) in methods.items():
            target = workdir / f"{label.split('.')[0].replace(' ', '_')}-{round_no}"
            if label == "numpy.save/load":
                target = target.with_suffix(".npy")
            put_s, put_peak, token = measure(put_factory(target), traced=traced)
            get_s, get_peak, loaded = measure(get_factory(target, token), traced=traced)
            assert loaded.shape == array.shape and loaded[12345] == array[12345]
            del loaded
            if traced:
                extra[label, "put"] = put_peak
                # The result itself is the array: report what a load needs beyond it.
                extra[label, "get"] = max(0, get_peak - nbytes)
            else:
                seconds.setdefault((label, "put"), []).append(put_s)
                seconds.setdefault((label, "get"), []).append(get_s)
            if target in stores:
                stores.pop(target).close()
            if target.is_dir():
                shutil.rmtree(target)
            else:
                target.unlink()

    print(
        f"\nLarge: float64 array of {nbytes / 2**20:.0f} MiB, best of {rounds} interleaved "
        "rounds (median in brackets), no fsync"
    )
    print(
        f"{'method':<17} {'put GB/s':>9} {'vs np':>13} {'extra MiB':>10}   "
        f"{'get GB/s':>9} {'vs np':>13} {'extra MiB':>10}"
    )
    ref = {op: seconds["numpy.save/load", op] for op in ("put", "get")}
    for label in methods:
        cells = []
        for op in ("put", "get"):
            runs = seconds[label, op]
            best_ratio = min(ref[op]) / min(runs)
            median_ratio = statistics.median(ref[op]) / statistics.median(runs)
            cells.append(
                f"{nbytes / min(runs) / 1e9:9.2f} {best_ratio:5.2f} ({median_ratio:4.2f}) "
                f"{extra[label, op] / 2**20:10.1f}"
            )
        print(f"{label:<17} {cells[0]}   {cells[1]}")
    put_extra = extra["casml", "put"] / nbytes
    print(f"casml peak extra memory during put: {put_extra:.3f} x the array")


def small(workdir: Path, count: int) -> None:
    def make(i: int) -> dict[str, Any]:
        return {"run": i, "lr": 0.001 * (i % 10), "layers": [64, 32, i % 7], "tag": f"exp-{i}"}

    values = [make(i) for i in range(count)]
    earlier = [make(-1 - i) for i in range(count)]
    # Both sides first write as many other files untimed, into the same directories: a store
    # in use has its directories, and on ext4 the first files created in a fresh directory
    # cost up to 10x more than later ones (measured 0.3-0.5 ms against 0.02-0.05 ms here).
    folder = workdir / "pickles"
    folder.mkdir()
    for i, v in enumerate(earlier):
        with open(folder / f"earlier-{i}.pkl", "wb") as f:
            pickle.dump(v, f, protocol=5)
    with Store(workdir / "small", index=f"sqlite:///{workdir / 'small.sqlite'}") as s:
        for v in earlier:
            s.put(v)
        start = time.perf_counter()
        hashes = [s.put(v) for v in values]
        put_rate = count / (time.perf_counter() - start)
        start = time.perf_counter()
        for h in hashes:
            s.get(h)
        get_rate = count / (time.perf_counter() - start)

    # The floor under any store that keeps a file per put: creating a file of a manifest's
    # size, right in the directories casml just wrote its manifests to.
    manifest_dirs = sorted(p for p in (workdir / "small" / "manifests").iterdir() if p.is_dir())
    start = time.perf_counter()
    for i in range(count):
        path = manifest_dirs[i % len(manifest_dirs)] / f"bare-{i}"
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        os.write(fd, b"x" * 600)
        os.close(fd)
    create_rate = count / (time.perf_counter() - start)

    start = time.perf_counter()
    for i, v in enumerate(values):
        with open(folder / f"{i}.pkl", "wb") as f:
            pickle.dump(v, f, protocol=5)
    pickle_put = count / (time.perf_counter() - start)
    start = time.perf_counter()
    for i in range(count):
        with open(folder / f"{i}.pkl", "rb") as f:
            pickle.load(f)
    pickle_get = count / (time.perf_counter() - start)

    print(
        f"\nSmall: {count:,} dicts, one at a time, after {count:,} untimed ones "
        "(SQLite index, WAL, synchronous=NORMAL)"
    )
    print(f"{'method':<26} {'puts/s':>9} {'gets/s':>9}")
    print(f"{'casml put/get':<26} {put_rate:9.0f} {get_rate:9.0f}")
    print(f"{'pickle, a file per dict':<26} {pickle_put:9.0f} {pickle_get:9.0f}")
    print(f"{'bare create, casml dirs':<26} {create_rate:9.0f}")
    print(f"ratio casml/pickle: puts {put_rate / pickle_put:.2f}, gets {get_rate / pickle_get:.2f}")
    print(
        f"casml per put: {1e6 / put_rate:.0f} us, of which creating its one file: "
        f"{1e6 / create_rate:.0f} us"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--mb", type=int, default=512)
    parser.add_argument("--small", type=int, default=10_000)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--dir", default=None, help="where to write (default: a temp dir)")
    args = parser.parse_args()
    workdir = Path(tempfile.mkdtemp(prefix="casml-bench-", dir=args.dir))
    try:
        # Small first: on ext4 without a journal (this machine), every file create skips the
        # inodes freed in the last 60-300 s, so the large rounds' deletes would slow it.
        small(workdir, args.small)
        large(workdir, args.mb, args.rounds)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
