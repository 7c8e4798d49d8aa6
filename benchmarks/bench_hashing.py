"""Hashing throughput, side by side in one run: casml.hash_value vs raw xxh3-128 and joblib.hash.

Run: python benchmarks/bench_hashing.py [--mb 256] [--rows 1000000] [--repeat 3]
Prints throughput and ratios; absolute figures drift on shared machines, ratios do not.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import pandas as pd
import xxhash

import casml


def best_of(repeat: int, fn: Callable[[], Any]) -> float:
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--mb", type=int, default=256)
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--no-joblib", action="store_true")
    args = parser.parse_args()

    array = np.random.default_rng(0).random(args.mb * 1024 * 1024 // 8)
    frame = pd.DataFrame(
        np.random.default_rng(1).random((args.rows, 10)), columns=[f"c{i}" for i in range(10)]
    )
    peers: dict[str, dict[str, Callable[[], Any]]] = {
        f"float64 array {array.nbytes / 2**20:.0f} MiB": {
            "raw xxh3_128": lambda: xxhash.xxh3_128_hexdigest(memoryview(array)),
            "casml.hash_value": lambda: casml.hash_value(array),
        },
        f"DataFrame {args.rows:,} x 10 ({frame.memory_usage().sum() / 2**20:.0f} MiB)": {
            "raw xxh3_128": lambda: [
                xxhash.xxh3_128_hexdigest(memoryview(np.ascontiguousarray(frame[c].to_numpy())))
                for c in frame.columns
            ],
            "casml.hash_value": lambda: casml.hash_value(frame),
        },
    }
    if not args.no_joblib:
        import joblib

        for name, data in zip(list(peers), (array, frame), strict=True):
            peers[name]["joblib.hash"] = lambda data=data: joblib.hash(data)

    print(f"{'data':<38} {'method':<18} {'seconds':>8} {'GB/s':>7} {'vs raw':>7}")
    for label, methods in peers.items():
        nbytes = array.nbytes if "array" in label else int(frame.memory_usage().sum())
        results = {method: best_of(args.repeat, fn) for method, fn in methods.items()}
        raw = results["raw xxh3_128"]
        for method, seconds in results.items():
            ratio = raw / seconds
            rate = nbytes / seconds / 1e9
            print(f"{label:<38} {method:<18} {seconds:8.4f} {rate:7.2f} {ratio:7.2f}")


if __name__ == "__main__":
    main()
