"""Nothing executes on load: pickles, skops payloads and class names from the store.

A store written with ``allow_pickle=True`` holds a pickle that writes a canary file when
unpickled. Opened without ``allow_pickle`` (the default), every path that reads the store
(get, latest, get_or_build, cache, pull, push, reindex, verify, gc, du, lineage and the
CLI) must load nothing and write no canary. The payload is live: the same store opened with
``allow_pickle=True`` does write the canary, which proves the test would notice.
"""

from __future__ import annotations

import base64
import copy
import json
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgpack
import pytest
import xxhash
from click.testing import CliRunner

import casml
from casml import codec
from casml.cli import cli
from casml.errors import CasmlError, PickleNotAllowedError, UnregisteredClassError
from casml.manifest import _checksum
from casml.store import Store
from tests.reliability_tools import PickleBomb, make_bomb


class Holder(casml.Persistable, name="casml_tests.reliability.Holder"):
    """A Persistable whose built state holds a pickle-only object."""

    hash_attributes = ("label",)

    def __init__(self, label: str) -> None:
        self.label = label

    def build(self) -> None:
        self.payload_: Any = None


@pytest.fixture
def armed(tmp_path: Path) -> Iterator[tuple[Path, Path, dict[str, str]]]:
    """A store holding pickle bombs in several shapes; yields (root, canary, {what: hash})."""
    root = tmp_path / "armed"
    canary = tmp_path / "canary.txt"
    with Store(root, allow_pickle=True) as writer:
        hashes = {
            "bare": writer.put(PickleBomb(str(canary)), name="bomb", tags={"kind": "bare"}),
            "nested": writer.put({"model": [1, PickleBomb(str(canary))]}, name="bomb"),
        }
        holder = Holder("x")
        holder.build()
        holder.payload_ = PickleBomb(str(canary))
        hashes["persistable"] = writer.put(holder, name="holder")
    assert not canary.exists(), "storing must not run the payload"
    yield root, canary, hashes


def test_the_payload_is_live(armed: tuple[Path, Path, dict[str, str]], tmp_path: Path) -> None:
    """Control: with allow_pickle=True the canary IS written, so its absence below means
    something."""
    root, canary, hashes = armed
    with Store(root, allow_pickle=True) as trusting:
        trusting.get(hashes["bare"])
    assert canary.exists()


def test_no_path_runs_the_pickle(armed: tuple[Path, Path, dict[str, str]], tmp_path: Path) -> None:
    root, canary, hashes = armed
    with Store(root) as store:
        for what, h in hashes.items():
            with pytest.raises(PickleNotAllowedError, match="allow_pickle=True"):
                store.get(h)
            assert store.info(h).hash == h  # metadata stays readable
            assert store.lineage(h) == [] or store.lineage(h)
            assert h in store, what
        with pytest.raises(PickleNotAllowedError):
            store.latest("bomb")
        with pytest.raises(PickleNotAllowedError):
            store.get_or_build(Holder("x"))
        report = store.verify()
        assert report.ok, [p.message for p in report.problems]
        store.du()
        store.gc(grace=0, dry_run=True)
        # A fresh index rebuilt from storage: reindex reads manifests and records only.
        with Store(root, index=f"sqlite:///{tmp_path / 'rebuilt.sqlite'}") as rebuilt:
            assert rebuilt.reindex() == len(hashes)
            assert {i.name for i in rebuilt.find()} >= {"bomb", "holder"}
        # pull and push copy bytes; they never decode them.
        with Store(tmp_path / "puller") as puller:
            report_pull = puller.pull(store)
            assert report_pull.artifacts == len(hashes)
            with pytest.raises(PickleNotAllowedError):
                puller.get(hashes["nested"])
        with Store(tmp_path / "pushed") as pushed:
            store.push(pushed)
            assert pushed.verify().ok
    assert not canary.exists(), "a path without allow_pickle ran the pickle"


def test_cache_never_unpickles(tmp_path: Path) -> None:
    canary = str(tmp_path / "canary.txt")
    with Store(tmp_path / "s", allow_pickle=True) as writer:
        writer.cache(make_bomb)(canary)
    with Store(tmp_path / "s") as reader:
        cached = reader.cache(make_bomb)
        assert cached.is_cached(canary)
        with pytest.raises(PickleNotAllowedError):
            cached(canary)
    assert not Path(canary).exists()


def test_cli_never_unpickles(armed: tuple[Path, Path, dict[str, str]], tmp_path: Path) -> None:
    root, canary, hashes = armed
    runner = CliRunner()
    base = ["--root", str(root)]
    for h in hashes.values():
        shown = runner.invoke(cli, [*base, "show", h, "--json"])
        assert shown.exit_code == 0, shown.output
        assert json.loads(shown.output)["hash"] == h
    for command in (
        ["verify"],
        ["ls", "--json"],
        ["du"],
        ["reindex"],
        ["gc", "--dry-run"],
        ["push", "--to", str(tmp_path / "cli-pushed")],
        ["pull", "--from", str(root), "--root", str(tmp_path / "cli-pulled")],
        ["graph", hashes["persistable"]],
    ):
        result = runner.invoke(cli, [*base, *command])
        assert result.exit_code == 0, (command, result.output)
    assert not canary.exists(), "the CLI ran the pickle"


# ---------------------------------------------------------------------------- skops


def test_skops_payload_with_an_untrusted_type(tmp_path: Path) -> None:
    """A Model whose estimator has a type outside scikit-learn/numpy/scipy: refused on load,
    its ``__setstate__`` never runs."""
    pytest.importorskip("sklearn")
    pytest.importorskip("skops")
    from casml.ml import Dataset, Model, Pipeline, _sklearn, trust_modules
    from tests.reliability_tools import CANARY_ENV, CanaryEstimator, demo_frame

    canary = tmp_path / "skops-canary.txt"
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv(CANARY_ENV, str(canary))
        patch.setattr(_sklearn, "_user_prefixes", set())
        with Store(tmp_path / "s") as store:
            trust_modules("tests.reliability_tools.")
            model = store.get_or_build(
                Model(Pipeline(Dataset(demo_frame, target="label"), []), CanaryEstimator())
            )
            h = model.hash_
            # Control: trusted, the payload's __setstate__ runs on load.
            store.get(h).fitted  # noqa: B018 - loading is the point
            assert canary.exists()
            canary.unlink()
            _sklearn._user_prefixes.clear()  # a reader who trusts only the default modules
            with pytest.raises(PickleNotAllowedError, match="CanaryEstimator"):
                store.get(h)
            assert store.verify().ok
        assert not canary.exists(), "an untrusted skops type was rebuilt"


# ---------------------------------------------------------------------------- class names


def _plant_value(store: Store, payload: bytes) -> str:
    """Store a manifest whose inline payload is ``payload`` (as a forger could); its address."""
    template = json.loads(store._blobs.get_manifest(store.put({"t": 1})))["casml_manifest"]
    body = copy.deepcopy(template)
    address = xxhash.xxh3_128_hexdigest(payload)
    body.update(
        address=address,
        payload={
            "digest": xxhash.xxh3_128_hexdigest(payload),
            "size": len(payload),
            "inline": base64.b64encode(payload).decode(),
        },
    )
    data = json.dumps({"casml_manifest": body, "checksum": _checksum(body)}).encode()
    path = Path(store.root) / "manifests" / address[:2] / address[2:]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return address


def _tagged(tag: int, *fields: Any) -> bytes:
    return b"\x01" + bytes(msgpack.packb([msgpack.ExtType(tag, b""), *fields]))


@pytest.mark.parametrize(
    ("tag", "fields"),
    [
        (codec.TAG_DATACLASS, ("no_such_module_casml:Thing", {})),
        (codec.TAG_DATACLASS, ("os:path", {})),
        (codec.TAG_DATACLASS, ("builtins:dict", {"a": 1})),
        (codec.TAG_DATACLASS, ("subprocess:Popen", {"args": ["touch", "CANARY"]})),
        (codec.TAG_DATACLASS, ("os:system", {})),
        (codec.TAG_ENUM, ("subprocess:Popen", "x")),
        (codec.TAG_ENUM, ("os:system", None, "echo")),
        (codec.TAG_NAMEDTUPLE, ("subprocess:Popen", ["touch", "CANARY"])),
        (codec.TAG_NAMEDTUPLE, ("shutil:rmtree", "/")),
        (codec.TAG_DATACLASS, ("../../etc:passwd", {})),
        (codec.TAG_DATACLASS, ("os.path:join", {})),
    ],
)
def test_class_names_in_payloads_fail_cleanly(tmp_path: Path, tag: int, fields: Any) -> None:
    """A payload naming a module and class: missing, not a class, or not the kind it claims
    to be (a dataclass, Enum, NamedTuple) fails with a CasmlError before anything is built."""
    canary = tmp_path / "ran"
    armed = json.loads(json.dumps(fields).replace("CANARY", str(canary)))
    with Store(tmp_path / "s") as store:
        address = _plant_value(store, _tagged(tag, *armed))
        with pytest.raises(CasmlError) as caught:
            store.get(address)
        assert isinstance(caught.value, UnregisteredClassError | casml.IntegrityError)
    assert not canary.exists(), "a class named by the payload was called"


def test_decode_imports_installed_modules_by_name(tmp_path: Path) -> None:
    """Documented behaviour: decoding a value of a dataclass imports the module it names, if
    installed, which runs that module's top-level code (never code from the store itself)."""
    site = tmp_path / "site"
    site.mkdir()
    canary = tmp_path / "import-canary.txt"
    (site / "casml_import_canary.py").write_text(
        "from dataclasses import dataclass\n"
        f"open({str(canary)!r}, 'w').write('imported')\n"
        "@dataclass\n"
        "class Point:\n"
        "    x: int = 0\n"
    )
    with Store(tmp_path / "s") as store:
        address = _plant_value(
            store, _tagged(codec.TAG_DATACLASS, "casml_import_canary:Point", {"x": 3})
        )
        # Not importable: a clean error, nothing runs.
        with pytest.raises(UnregisteredClassError, match="casml_import_canary"):
            store.get(address)
        assert not canary.exists()
        # Installed (on sys.path): imported, so its top-level code runs, and the value loads.
        sys.path.insert(0, str(site))
        try:
            assert store.get(address).x == 3
        finally:
            sys.path.remove(str(site))
            sys.modules.pop("casml_import_canary", None)
    assert canary.read_text() == "imported"


def test_persistable_class_from_an_unimportable_module(tmp_path: Path) -> None:
    """A manifest naming a Persistable class in a missing module: UnregisteredClassError."""
    with Store(tmp_path / "s") as store:
        holder = Holder("y")
        holder.build()
        h = store.put(holder)
        path = Path(store.root) / "manifests" / h[:2] / h[2:]
        document = json.loads(path.read_bytes())
        body = document["casml_manifest"]
        for module, name in (
            ("no_such_module_casml", "no_such_module_casml:Holder"),
            ("os", "os:system"),
            ("../../etc", "x"),
        ):
            body["module"], body["class_name"] = module, name
            path.write_bytes(
                json.dumps({"casml_manifest": body, "checksum": _checksum(body)}).encode()
            )
            with pytest.raises(CasmlError):
                store.get(h)
