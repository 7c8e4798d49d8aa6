"""Store.put/get end to end on real files and a real SQLite database."""

from __future__ import annotations

import datetime as dt
import multiprocessing
import os
import subprocess
import sys
import textwrap
import uuid
from decimal import Decimal
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest

import casml
from casml.errors import (
    AmbiguousHashError,
    IntegrityError,
    InvalidHashError,
    NotFoundError,
    PickleNotAllowedError,
    UnregisteredClassError,
)
from casml.store import Store
from tests.processes import collect


def stored_files(root: Path) -> set[Path]:
    return {
        p
        for p in root.rglob("*")
        if p.is_file() and p.name != "index.sqlite" and not p.name.startswith("index.sqlite")
    }


VALUES: list[Any] = [
    None,
    42,
    2**80,
    3.5,
    "text ✓",
    b"\x00bytes",
    [1, (2, 3), {4}],
    {"lr": 0.1, (1, 2): "tuple key", None: frozenset({1})},
    dt.datetime(2024, 5, 1, 12, tzinfo=dt.timezone.utc),
    Decimal("1.10"),
    uuid.UUID(int=7),
    Path("data/x.csv"),
]


@pytest.mark.parametrize("value", VALUES, ids=lambda v: type(v).__name__)
def test_round_trip_plain_values(any_store: Store, value: Any) -> None:
    h = any_store.put(value)
    assert h == casml.hash_value(value)
    back = any_store.get(h)
    assert back == value
    assert type(back) is type(value)
    assert h in any_store


def test_round_trip_arrays_and_frames(any_store: Store) -> None:
    array = np.arange(1_000_000, dtype=np.float64).reshape(1000, 1000)
    fortran = np.asfortranarray(np.arange(12, dtype=np.int32).reshape(3, 4))
    frame = pd.DataFrame(
        {
            "x": np.arange(100_000, dtype=np.float32),
            "n": pd.Series(range(100_000), dtype="Int64"),
            "c": pd.Categorical(["a", "b"] * 50_000),
            "t": pd.date_range("2024-01-01", periods=100_000, freq="s", tz="Europe/Paris"),
        }
    )
    for value in (array, fortran):
        back = any_store.get(any_store.put(value))
        np.testing.assert_array_equal(back, value)
        assert back.dtype == value.dtype
        assert back.flags.f_contiguous == value.flags.f_contiguous
    pd.testing.assert_frame_equal(any_store.get(any_store.put(frame)), frame)


def test_second_put_writes_nothing_new(store: Store) -> None:
    value = {"weights": np.ones(2_000_000), "meta": {"epochs": 3}}
    h1 = store.put(value)
    before = {p: p.stat().st_mtime_ns for p in stored_files(Path(store.root))}
    h2 = store.put(value)
    h3 = store.put({"meta": {"epochs": 3}, "weights": np.ones(2_000_000)})
    assert h1 == h2 == h3
    after = {p: p.stat().st_mtime_ns for p in stored_files(Path(store.root))}
    assert after == before
    assert len(store.find()) == 1


def test_two_artifacts_sharing_an_array_store_it_once(store: Store) -> None:
    shared = np.random.default_rng(0).random(1024 * 1024)  # 8 MiB
    store.put({"model": "a", "weights": shared})
    size_after_first = sum(p.stat().st_size for p in stored_files(Path(store.root)))
    store.put({"model": "b", "weights": shared})
    size_after_second = sum(p.stat().st_size for p in stored_files(Path(store.root)))
    assert size_after_first > shared.nbytes
    assert size_after_second - size_after_first < 64 * 1024  # a manifest, not 8 MiB


def _count_chunk_hashing(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Count the pieces the blob store hashes itself (rather than being handed digests)."""
    from casml.blobs import BlobStore

    hashed: list[int] = []
    original = BlobStore._put_one

    def counting(self: BlobStore, view: memoryview) -> Any:
        hashed.append(len(view))
        return original(self, view)

    monkeypatch.setattr(BlobStore, "_put_one", counting)
    return hashed


def test_a_large_array_is_hashed_once_per_put(
    store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    hashed = _count_chunk_hashing(monkeypatch)
    frame = pd.DataFrame({"x": np.random.default_rng(2).random(700_000)})  # 5.6 MB column
    value = {"w": np.random.default_rng(3).random((1_500, 1_000)), "frame": frame}  # 12 MB
    h = store.put(value)
    # The 4 MiB chunk digests the address needed name the blobs: no piece hashed again.
    assert hashed == []
    assert store.verify().ok
    loaded = store.get(h)
    np.testing.assert_array_equal(loaded["w"], value["w"])
    pd.testing.assert_frame_equal(loaded["frame"], frame)


@pytest.mark.parametrize(
    "make",
    [
        lambda a: np.asfortranarray(a),  # stored as the transpose's bytes: not the hashed ones
        lambda a: a.astype(">f8"),  # hashed through a little-endian temporary
    ],
    ids=["fortran", "big-endian"],
)
def test_arrays_whose_stored_bytes_differ_from_hashed_ones_are_hashed_again(
    store: Store, monkeypatch: pytest.MonkeyPatch, make: Any
) -> None:
    hashed = _count_chunk_hashing(monkeypatch)
    array = make(np.random.default_rng(4).random((1_500, 1_000)))
    h = store.put(array)
    assert sum(hashed) == array.nbytes
    assert store.verify().ok
    loaded = store.get(h)
    np.testing.assert_array_equal(loaded, array)
    assert loaded.dtype == array.dtype


def test_an_array_changed_while_being_put_is_caught_on_read_not_loaded(
    store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    from casml.blobs import BlobStore

    array = np.random.default_rng(5).random(1_500_000)  # 12 MB: three chunks
    original = BlobStore._put_named

    def change_then_write(self: BlobStore, job: Any) -> Any:
        array[0] += 1.0  # another thread's update, landing after the hash, before the write
        return original(self, job)

    monkeypatch.setattr(BlobStore, "_put_named", change_then_write)
    h = store.put(array)
    monkeypatch.undo()
    with pytest.raises(IntegrityError):
        store.get(h)
    assert not store.verify().ok


@pytest.mark.slow
def test_changing_one_percent_of_rows_writes_under_five_percent(store: Store) -> None:
    rows = 64 * 1024
    array = np.random.default_rng(1).random((rows, 1024))  # 512 MiB
    store.put(array)
    before = sum(p.stat().st_size for p in stored_files(Path(store.root)))
    start = rows // 3
    array[start : start + rows // 100] += 1.0
    store.put(array)
    written = sum(p.stat().st_size for p in stored_files(Path(store.root))) - before
    assert written <= 0.05 * array.nbytes, written / array.nbytes


def test_flipped_byte_in_a_blob_raises_integrity_error(store: Store) -> None:
    h = store.put(np.arange(200_000, dtype=np.int64))
    blobs = sorted((Path(store.root) / "objects").rglob("*"), key=lambda p: p.stat().st_size)
    target = [p for p in blobs if p.is_file()][-1]
    data = bytearray(target.read_bytes())
    data[len(data) // 2] ^= 0x01
    target.chmod(0o644)
    target.write_bytes(bytes(data))
    with pytest.raises(IntegrityError, match="verify"):
        store.get(h)


def _manifest_path(store: Store, h: str) -> Path:
    return Path(store.root) / "manifests" / h[:2] / h[2:]


def test_truncated_manifest_raises_integrity_error(store: Store) -> None:
    h = store.put({"a": 1})
    path = _manifest_path(store, h)
    data = path.read_bytes()
    path.chmod(0o644)
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(IntegrityError, match="corrupt or truncated"):
        store.get(h)


def test_edited_manifest_fails_its_checksum(store: Store) -> None:
    h = store.put({"a": 1})
    path = _manifest_path(store, h)
    text = path.read_text().replace('"kind":"value"', '"kind":"persistable"')
    assert '"kind":"persistable"' in text
    path.chmod(0o644)
    path.write_text(text)
    with pytest.raises(IntegrityError, match="checksum"):
        store.get(h)


@pytest.mark.parametrize("key", ["", "abc", "xyz12345", "../../etc/passwd", "a" * 33, "0" * 7])
def test_malformed_keys_fail_before_touching_storage(store: Store, key: str) -> None:
    with pytest.raises(InvalidHashError):
        store.get(key)
    assert key not in store


def test_not_found_is_a_key_error(store: Store) -> None:
    with pytest.raises(KeyError):
        store.get("0" * 32)
    with pytest.raises(NotFoundError, match="no artifact"):
        store.get("0" * 32)
    assert not store.exists("0" * 32)


def test_prefix_lookup_and_ambiguity(store: Store) -> None:
    h = store.put(0)
    assert store.get(h[:8]) == 0
    assert store.get(h[:12].upper()) == 0
    # Two ints whose hashes share 8 hex digits exist among ~2**16 (birthday bound).
    seen: dict[str, int] = {}
    for i in range(1, 1_000_000):
        prefix = casml.hash_value(i)[:8]
        if prefix in seen:
            twins = (seen[prefix], i)
            break
        seen[prefix] = i
    for value in twins:
        store.put(value)
    with pytest.raises(AmbiguousHashError, match="give more characters"):
        store.get(prefix)
    assert store.get(casml.hash_value(twins[1])[:32]) == twins[1]
    assert prefix not in store


def test_names_versions_tags_and_find(store: Store) -> None:
    h1 = store.put({"acc": 0.7}, name="metrics", tags={"run": "a"})
    h1_again = store.put({"acc": 0.7}, name="metrics")
    h2 = store.put({"acc": 0.8}, name="metrics", tags={"run": "b"})
    assert h1 == h1_again
    versions = store.find(name="metrics")
    assert [(i.hash, i.version) for i in versions] == [(h2, 2), (h1, 1)]
    assert store.latest("metrics") == {"acc": 0.8}
    assert [i.hash for i in store.find(tags={"run": "a"})] == [h1]
    info = store.info(h2)
    assert info.name == "metrics" and info.version == 2 and info.tags == {"run": "b"}
    assert info.class_name == "builtins.dict"
    assert info.size > 0
    assert info.created_at.tzinfo is not None
    with pytest.raises(NotFoundError):
        store.latest("nothing-here")


def test_names_and_tags_are_stored_literally(store: Store) -> None:
    name = "x'; DROP TABLE artifacts; --"
    tags = {'k"%_': "v' OR '1'='1", "ünï": "çødé"}
    h = store.put([1], name=name, tags=tags)
    info = store.info(h)
    assert info.name == name and info.tags == tags
    assert [i.hash for i in store.find(name=name, tags=tags)] == [h]
    assert store.find(name="x") == []


class _NotEncodable:
    """Hashable through __casml_hash__, but the codec has no encoding for it: needs pickle."""

    def __init__(self, n: int) -> None:
        self.n = n

    def __casml_hash__(self) -> int:
        return self.n


def test_pickle_refused_unless_allowed(tmp_path: Path) -> None:
    with Store(tmp_path / "s") as strict, pytest.raises(PickleNotAllowedError) as info:
        strict.put({"payload": [_NotEncodable(3)]})
    assert "allow_pickle=True" in str(info.value)
    assert "_NotEncodable" in str(info.value)
    with Store(tmp_path / "s", allow_pickle=True) as lenient:
        h = lenient.put(_NotEncodable(3))
        assert lenient.get(h).n == 3
    with Store(tmp_path / "s") as strict, pytest.raises(PickleNotAllowedError):
        strict.get(h)


def test_delete_and_reindex(store: Store) -> None:
    h = store.put({"a": 1}, name="x")
    keep = store.put({"b": 2})
    store.delete(h)
    assert h not in store
    with pytest.raises(NotFoundError):
        store.get(h)
    with pytest.raises(NotFoundError):
        store.delete(h)
    fresh_index = f"sqlite:///{Path(store.root).parent / 'rebuilt.sqlite'}"
    with Store(store.root, index=fresh_index) as rebuilt:
        assert rebuilt.reindex() == 1
        assert rebuilt.get(keep) == {"b": 2}
        assert [i.hash for i in rebuilt.find()] == [keep]


def test_default_root_follows_casml_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CASML_HOME", str(tmp_path / "home"))
    with Store() as s:
        h = s.put("hello")
        assert Path(s.root) == tmp_path / "home"
    with Store(tmp_path / "home") as again:
        assert again.get(h) == "hello"


# -- concurrency ------------------------------------------------------------------------


def _put_same(root: str, barrier: Any, out: Any) -> None:
    with Store(root) as s:
        barrier.wait()
        out.put(s.put({"shared": np.arange(500_000), "tag": "same"}, name="same"))


def test_four_processes_putting_the_same_object(tmp_path: Path) -> None:
    root = str(tmp_path / "shared")
    Store(root).close()  # create the folder and schema once, as a deployment would
    ctx = multiprocessing.get_context("spawn")
    barrier = ctx.Barrier(4)
    out = ctx.Queue()
    procs = [ctx.Process(target=_put_same, args=(root, barrier, out)) for _ in range(4)]
    results = collect(procs, out)
    assert len(set(results)) == 1
    with Store(root) as s:
        assert len(s.find()) == 1
        assert [i.version for i in s.find(name="same")] == [1]
        np.testing.assert_array_equal(s.get(results[0])["shared"], np.arange(500_000))
    leftovers = [p for p in Path(root).rglob("*") if ".tmp" in p.name]
    assert leftovers == []


# -- persistables across processes --------------------------------------------------------


MODULE_SOURCE = textwrap.dedent(
    """
    import casml

    class Normalizer(casml.Persistable, name="tests.Normalizer"):
        hash_attributes = ("scale", "source")

        def __init__(self, scale, source):
            self.scale = scale
            self.source = source

        def build(self):
            self.fitted_ = [x * self.scale for x in self.source.values]

    class Source(casml.Persistable):
        hash_attributes = ("values",)

        def __init__(self, values):
            self.values = values
    """
)


def test_class_loaded_in_a_fresh_process_that_never_imported_it(tmp_path: Path) -> None:
    (tmp_path / "mods").mkdir()
    (tmp_path / "mods" / "userpipeline.py").write_text(MODULE_SOURCE)
    root = tmp_path / "store"
    writer = textwrap.dedent(
        f"""
        import casml.store, userpipeline
        n = userpipeline.Normalizer(2, userpipeline.Source([1, 2, 3]))
        n.build()
        with casml.store.Store({str(root)!r}) as s:
            print(s.put(n, name="norm"))
        """
    )
    reader = textwrap.dedent(
        """
        import sys, casml.store
        with casml.store.Store(sys.argv[1]) as s:
            n = s.get(sys.argv[2])
            assert "userpipeline" in sys.modules  # imported on demand by the registry
            assert type(n).__name__ == "Normalizer"
            print(n.fitted_, n.source.values, n.hash_ == sys.argv[2])
        """
    )
    env = {
        **os.environ,
        "PYTHONPATH": f"{tmp_path / 'mods'}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
    }
    h = subprocess.run(
        [sys.executable, "-c", writer], env=env, capture_output=True, text=True, check=True
    ).stdout.strip()
    out = subprocess.run(
        [sys.executable, "-c", reader, str(root), h], env=env, capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[2, 4, 6] [1, 2, 3] True"

    # Without the module on the path, the error names the class and the module to import.
    bare = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    failed = subprocess.run(
        [sys.executable, "-c", reader, str(root), h], env=bare, capture_output=True, text=True
    )
    assert failed.returncode != 0
    assert "UnregisteredClassError" in failed.stderr
    assert "tests.Normalizer" in failed.stderr and "userpipeline" in failed.stderr


def test_unknown_class_gives_unregistered_class_error(store: Store) -> None:
    class Temp(casml.Persistable, name="tests.TempUnknown"):
        hash_attributes = ("x",)

        def __init__(self, x: int) -> None:
            self.x = x

    h = store.put(Temp(1))
    from casml import registry

    registry._classes.pop("tests.TempUnknown")
    try:
        with pytest.raises(UnregisteredClassError, match=r"tests\.TempUnknown"):
            store.get(h)
    finally:
        registry._classes["tests.TempUnknown"] = Temp
