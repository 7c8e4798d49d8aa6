"""The casml command: every subcommand through click's CliRunner and through real processes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from click.testing import CliRunner, Result

import casml
from casml import maintenance
from casml.cli import cli, parse_duration
from casml.store import Store

REPO = Path(__file__).resolve().parents[1]


class Step(casml.Persistable, name="tests.cli.Step"):
    hash_attributes = ("label", "parent")

    def __init__(self, label: str, parent: Step | None = None) -> None:
        self.label = label
        self.parent = parent

    def build(self) -> None:
        self.out_ = np.full(40_000, len(self.label), dtype=np.float64)


def array(seed: int) -> Any:
    # 320 KB: above the codec's inline limit, so the array is a blob of its own.
    return np.random.default_rng(seed).random(40_000)


@pytest.fixture
def env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """An environment where the default store is inside tmp_path, never ~/.casml."""
    for name in ("CASML_ROOT", "CASML_INDEX"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("CASML_HOME", str(tmp_path / "home"))
    monkeypatch.setattr(maintenance, "_SETTLE_SECONDS", 0.0)
    return {**os.environ, "CASML_HOME": str(tmp_path / "home")}


@pytest.fixture
def root(tmp_path: Path, env: dict[str, str]) -> Path:
    return tmp_path / "store"


@pytest.fixture
def filled(root: Path) -> Iterator[dict[str, str]]:
    """A store holding a named lineage (a -> b), a tagged array and a plain value."""
    with Store(root) as s:
        a = s.get_or_build(Step("a"), name="steps")
        b = s.get_or_build(Step("bb", a), name="steps")
        w = s.put(array(1), name="weights", tags={"stage": "prod"})
        v = s.put({"lr": 0.1})
    yield {"a": a.hash_, "b": b.hash_, "w": w, "v": v}


def run(*args: str, root: Path | None = None) -> Result:
    argv = [*args, "--root", str(root)] if root is not None else list(args)
    return CliRunner().invoke(cli, argv, catch_exceptions=False)


def run_json(*args: str, root: Path, code: int = 0) -> Any:
    result = run(*args, "--json", root=root)
    assert result.exit_code == code, result.output + result.stderr
    return json.loads(result.stdout)


def blob_file(root: Path, digest: str) -> Path:
    return root / "objects" / digest[:2] / digest[2:]


def digests(root: Path, address: str) -> set[str]:
    with Store(root) as s:
        return {d for d, _ in s._index.blobs_of(address)}


def casml_process(
    *args: str, env: dict[str, str], timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "casml", *args],
        capture_output=True,
        text=True,
        env=env,
        cwd=REPO,
        timeout=timeout,
    )


# -- ls / show / rm / graph ------------------------------------------------------------------


def test_ls_table_is_newest_first(root: Path, filled: dict[str, str]) -> None:
    result = run("ls", root=root)
    assert result.exit_code == 0
    lines = result.stdout.splitlines()
    assert lines[0].split()[:3] == ["HASH", "NAME", "CLASS"]
    assert lines[1].startswith(filled["v"][:12])  # the last put
    assert any(filled["w"][:12] in line and "weights v1" in line for line in lines)
    assert "stage=prod" in result.stdout


def test_ls_json_and_filters(root: Path, filled: dict[str, str]) -> None:
    everything = run_json("ls", root=root)
    assert everything[0]["hash"] == filled["v"]
    assert {d["hash"] for d in everything} == set(filled.values())
    assert set(everything[0]) == {
        "hash",
        "class_name",
        "name",
        "version",
        "size",
        "created_at",
        "tags",
        "dependencies",
    }
    steps = run_json("ls", "--name", "steps", root=root)
    assert [(d["hash"], d["version"]) for d in steps] == [(filled["b"], 2), (filled["a"], 1)]
    assert [d["hash"] for d in run_json("ls", "--class", "tests.cli.Step", root=root)] == [
        filled["b"],
        filled["a"],
    ]
    tagged = run_json("ls", "--tag", "stage=prod", root=root)
    assert [d["hash"] for d in tagged] == [filled["w"]]
    assert run_json("ls", "--tag", "stage=dev", root=root) == []


def test_ls_bad_tag_is_a_usage_error(root: Path, filled: dict[str, str]) -> None:
    result = run("ls", "--tag", "novalue", root=root)
    assert result.exit_code == 2 and "KEY=VALUE" in result.stderr


def test_show(root: Path, filled: dict[str, str]) -> None:
    doc = run_json("show", filled["a"][:10], root=root)
    assert doc["hash"] == filled["a"] and doc["class_name"] == "tests.cli.Step"
    assert doc["name"] == "steps" and doc["version"] == 1
    assert doc["dependents"] == [filled["b"]] and doc["dependencies"] == []
    [blob] = doc["blobs"]
    assert blob["size"] == 320_000 and blob["stored"] is True
    child = run_json("show", filled["b"], root=root)
    assert child["dependencies"] == [filled["a"]]
    text = run("show", filled["b"], root=root)
    assert text.exit_code == 0
    assert f"dependencies (1):\n  {filled['a']}  tests.cli.Step  steps v1" in text.stdout
    assert "blobs (1, 312.5 KiB" in text.stdout


def test_show_errors(root: Path, filled: dict[str, str]) -> None:
    unknown = run("show", "0123456789abcdef", root=root)
    assert unknown.exit_code == 1
    assert unknown.stderr.startswith("error: no artifact hash starts with")
    assert "Traceback" not in unknown.output
    malformed = run("show", "not-a-hash", root=root)
    assert malformed.exit_code == 2 and malformed.stderr.startswith("error: ")


def test_rm_then_show_fails(root: Path, filled: dict[str, str]) -> None:
    result = run("rm", filled["w"][:12], root=root)
    assert result.exit_code == 0
    assert f"removed {filled['w']}" in result.stdout and "casml gc" in result.stderr
    assert run("show", filled["w"], root=root).exit_code == 1
    assert run("rm", filled["w"], root=root).exit_code == 1
    warned = run("rm", filled["a"], root=root)
    assert warned.exit_code == 0 and "depend on" in warned.stderr


@pytest.mark.parametrize(("fmt", "marker"), [("mermaid", "graph LR"), ("dot", "digraph casml")])
def test_graph(root: Path, filled: dict[str, str], fmt: str, marker: str) -> None:
    result = run("graph", filled["a"], "--format", fmt, root=root)
    assert result.exit_code == 0
    assert marker in result.stdout
    assert filled["a"][:8] in result.stdout and filled["b"][:8] in result.stdout
    assert run("graph", filled["a"], "--format", "png", root=root).exit_code == 2


# -- gc / verify / du / reindex --------------------------------------------------------------


def test_gc_frees_what_rm_released_and_nothing_else(root: Path, filled: dict[str, str]) -> None:
    released = digests(root, filled["w"])
    assert run("rm", filled["w"], root=root).exit_code == 0
    dry = run_json("gc", "--dry-run", "--grace", "0", root=root)
    assert dry["dry_run"] is True and set(dry["deleted"]) == released
    report = run_json("gc", "--grace", "0", root=root)
    assert set(report["deleted"]) == released and report["bytes_freed"] == 320_000
    assert report["blobs_deleted"] == 1 and report["grace_seconds"] == 0
    assert run_json("gc", "--grace", "0", root=root)["blobs_deleted"] == 0
    with Store(root) as s:
        assert s.get(filled["b"]).parent.label == "a"
        assert s.get(filled["v"]) == {"lr": 0.1}
    assert run_json("verify", root=root)["ok"] is True


def test_gc_default_grace_keeps_fresh_orphans(root: Path, filled: dict[str, str]) -> None:
    run("rm", filled["w"], root=root)
    report = run_json("gc", root=root)
    assert report["blobs_deleted"] == 0 and report["blobs_recent"] == 1
    assert report["grace_seconds"] == 3600
    text = run("gc", "--grace", "10m", root=root)
    assert text.exit_code == 0 and "deleted 0 blob(s)" in text.stdout and "(10m)" in text.stdout


@pytest.mark.parametrize("bad", ["soon", "-1h", "5x", ""])
def test_gc_bad_grace_is_a_usage_error(root: Path, bad: str) -> None:
    result = run("gc", "--grace", bad, root=root)
    assert result.exit_code == 2 and "duration" in result.stderr


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("0", 0.0), ("30s", 30.0), ("10m", 600.0), ("2h", 7200.0), ("7d", 604800.0), ("1.5h", 5400.0)],
)
def test_parse_duration(text: str, seconds: float) -> None:
    assert parse_duration(text) == seconds


def test_verify_ok(root: Path, filled: dict[str, str]) -> None:
    doc = run_json("verify", root=root)
    assert doc["ok"] is True and doc["problems"] == [] and doc["manifests_checked"] == 4
    text = run("verify", root=root)
    assert text.exit_code == 0 and text.stdout.rstrip().endswith("ok")


def test_verify_catches_a_flipped_byte_and_a_deleted_blob(
    root: Path, filled: dict[str, str]
) -> None:
    [flipped] = digests(root, filled["w"])
    [deleted] = digests(root, filled["a"])
    path = blob_file(root, flipped)
    data = bytearray(path.read_bytes())
    data[12345] ^= 0x40
    path.write_bytes(bytes(data))
    blob_file(root, deleted).unlink()
    doc = run_json("verify", root=root, code=1)
    assert doc["ok"] is False and doc["errors"] == 2
    found = {(p["kind"], p["key"]): p for p in doc["problems"]}
    assert found[("corrupt_blob", flipped)]["artifacts"] == [filled["w"]]
    assert found[("missing_blob", deleted)]["artifacts"] == [filled["a"]]
    text = run("verify", root=root)
    assert text.exit_code == 1
    assert "corrupt_blob" in text.stdout and "missing_blob" in text.stdout
    assert "--repair" in text.stderr


def test_verify_repair_relinks_from_storage(
    root: Path, tmp_path: Path, filled: dict[str, str]
) -> None:
    other_index = f"sqlite:///{tmp_path / 'other.sqlite'}"
    broken = run("verify", "--index", other_index, root=root)
    assert broken.exit_code == 1 and "unindexed_manifest" in broken.stdout
    repaired = run("verify", "--repair", "--json", "--index", other_index, root=root)
    assert repaired.exit_code == 0
    doc = json.loads(repaired.stdout)
    assert doc["ok"] is True and doc["repair"] is True
    assert all(p["fixed"] for p in doc["problems"])
    names = run("ls", "--name", "steps", "--json", "--index", other_index, root=root)
    assert [d["version"] for d in json.loads(names.stdout)] == [2, 1]


def test_verify_repair_from_another_store(
    root: Path, tmp_path: Path, filled: dict[str, str]
) -> None:
    backup = tmp_path / "backup"
    assert run("push", "--to", str(backup), root=root).exit_code == 0
    [digest] = digests(root, filled["w"])
    blob_file(root, digest).unlink()
    assert run("verify", "--from", str(backup), root=root).exit_code == 2  # needs --repair
    doc = run_json("verify", "--repair", "--from", str(backup), root=root)
    [problem] = doc["problems"]
    assert problem["kind"] == "missing_blob" and problem["fixed"] is True
    assert blob_file(root, digest).exists()
    assert run_json("verify", root=root)["ok"] is True


def test_du(root: Path, filled: dict[str, str]) -> None:
    doc = run_json("du", root=root)
    assert doc["artifacts"] == 4 and doc["blobs"] == 3
    assert doc["blob_bytes"] == 3 * 320_000
    assert doc["stored_bytes"] == doc["blob_bytes"] + doc["manifest_bytes"] + doc["record_bytes"]
    assert doc["dedup_ratio"] == pytest.approx(doc["logical_bytes"] / doc["stored_bytes"], 1e-3)
    text = run("du", root=root)
    assert "dedup ratio" in text.stdout and "logical bytes" in text.stdout


def test_reindex(root: Path, tmp_path: Path, filled: dict[str, str]) -> None:
    fresh = f"sqlite:///{tmp_path / 'fresh.sqlite'}"
    doc = run_json("reindex", "--index", fresh, root=root)
    assert doc == {"added": 4, "warnings": []}
    tagged = run_json("ls", "--tag", "stage=prod", "--index", fresh, root=root)
    assert [d["hash"] for d in tagged] == [filled["w"]]
    assert run_json("reindex", "--index", fresh, root=root)["added"] == 0


# -- push / pull -----------------------------------------------------------------------------


def test_push_and_pull(root: Path, tmp_path: Path, filled: dict[str, str]) -> None:
    target = tmp_path / "target"
    pushed = run_json("push", "--to", str(target), filled["b"], root=root)
    assert pushed["artifacts"] == 2  # b and its dependency a
    assert run_json("push", "--to", str(target), filled["b"], root=root)["artifacts"] == 0
    with Store(target) as t:
        assert t.get(filled["b"]).parent.label == "a"
    back = tmp_path / "back"
    pulled = run_json("pull", "--from", str(root), root=back)
    assert pulled["artifacts"] == 4
    text = run("pull", "--from", str(root), root=back)
    assert text.exit_code == 0 and text.stdout.startswith("pulled 0 artifact(s)")
    assert run("push", root=root).exit_code == 2  # --to is required


# -- store selection -------------------------------------------------------------------------


def test_store_selection_by_option_position_and_environment(
    root: Path, tmp_path: Path, filled: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    before = CliRunner().invoke(cli, ["--root", str(root), "ls", "--json"])
    assert {d["hash"] for d in json.loads(before.stdout)} == set(filled.values())
    monkeypatch.setenv("CASML_ROOT", str(root))
    by_env = CliRunner().invoke(cli, ["ls", "--json"])
    assert {d["hash"] for d in json.loads(by_env.stdout)} == set(filled.values())
    monkeypatch.setenv("CASML_INDEX", f"sqlite:///{tmp_path / 'empty.sqlite'}")
    assert json.loads(CliRunner().invoke(cli, ["ls", "--json"]).stdout) == []
    # An option, before or after the command, beats the environment.
    explicit = ["--index", f"sqlite:///{root / 'index.sqlite'}"]
    for argv in (["ls", "--json", *explicit], [*explicit, "ls", "--json"]):
        assert len(json.loads(CliRunner().invoke(cli, argv).stdout)) == len(filled)
    monkeypatch.delenv("CASML_INDEX")
    monkeypatch.setenv("CASML_ROOT", str(tmp_path / "elsewhere"))
    given = CliRunner().invoke(cli, ["--root", str(root), "ls", "--json"])
    assert len(json.loads(given.stdout)) == len(filled)
    monkeypatch.delenv("CASML_ROOT")
    with Store() as default:  # CASML_HOME
        h = default.put("in the embedded store")
    assert [d["hash"] for d in json.loads(CliRunner().invoke(cli, ["ls", "--json"]).stdout)] == [h]
    assert (tmp_path / "home" / "index.sqlite").exists()


# -- real processes --------------------------------------------------------------------------


@pytest.mark.slow  # about a dozen interpreter start-ups
def test_every_command_in_a_real_process(
    root: Path, tmp_path: Path, filled: dict[str, str], env: dict[str, str]
) -> None:
    env = {**env, "CASML_ROOT": str(root)}
    listed = casml_process("ls", "--json", env=env)
    assert listed.returncode == 0, listed.stderr
    assert {d["hash"] for d in json.loads(listed.stdout)} == set(filled.values())
    shown = casml_process("show", filled["b"], "--json", env=env)
    assert json.loads(shown.stdout)["dependencies"] == [filled["a"]]
    assert casml_process("graph", filled["b"], env=env).stdout.startswith("graph LR")
    assert json.loads(casml_process("du", "--json", env=env).stdout)["artifacts"] == 4
    assert json.loads(casml_process("verify", "--json", env=env).stdout)["ok"] is True
    assert json.loads(casml_process("reindex", "--json", env=env).stdout)["added"] == 0
    removed = casml_process("rm", filled["v"], env=env)
    assert removed.returncode == 0 and filled["v"] in removed.stdout
    gc = casml_process("gc", "--grace", "0", "--json", env=env)
    assert json.loads(gc.stdout)["blobs_deleted"] == 0  # {"lr": 0.1} lived in its manifest
    target = tmp_path / "copy"
    pushed = casml_process("push", "--to", str(target), "--json", env=env)
    assert json.loads(pushed.stdout)["artifacts"] == 3
    pulled = casml_process("pull", "--from", str(target), "--json", env=env)
    assert json.loads(pulled.stdout)["artifacts"] == 0
    missing = casml_process("show", "ffffffffffff", env=env)
    assert missing.returncode == 1 and missing.stderr.startswith("error: ")
    assert "Traceback" not in missing.stderr and missing.stdout == ""
    usage = casml_process("frobnicate", env=env)
    assert usage.returncode == 2 and "No such command" in usage.stderr
    version = casml_process("--version", env=env)
    assert version.returncode == 0 and casml.__version__ in version.stdout


def test_the_casml_script_and_verify_exit_status(
    root: Path, filled: dict[str, str], env: dict[str, str]
) -> None:
    script = Path(sys.executable).with_name("casml")
    command = [str(script)] if script.exists() else [sys.executable, "-m", "casml"]
    [digest] = digests(root, filled["w"])
    blob_file(root, digest).unlink()
    result = subprocess.run(
        [*command, "verify", "--json", "--root", str(root)],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )
    assert result.returncode == 1
    [problem] = json.loads(result.stdout)["problems"]
    assert problem["kind"] == "missing_blob" and problem["key"] == digest


WRITER = textwrap.dedent(
    """
    import json, os, sys, time
    import numpy as np
    from casml.store import Store

    root, stop_file = sys.argv[1], sys.argv[2]
    committed = []
    with Store(root) as store:
        print("ready", flush=True)
        deadline = time.monotonic() + 60  # a safety net; the test says when to stop
        i = 0
        while not os.path.exists(stop_file) and time.monotonic() < deadline:
            value = np.arange(40_000, dtype=np.float64) + 1000.0 * i  # new bytes every time
            committed.append((store.put(value), time.time()))
            i += 1
            time.sleep(0.01)  # steady puts without filling the disk
    print(json.dumps(committed), flush=True)
    """
)


def test_gc_while_another_process_puts(
    root: Path,
    tmp_path: Path,
    filled: dict[str, str],
    env: dict[str, str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The real in-flight-put wait, as users get it (other tests shorten it).
    monkeypatch.setattr(maintenance, "_SETTLE_SECONDS", 1.0)
    released = digests(root, filled["w"])
    assert run("rm", filled["w"], root=root).exit_code == 0
    stop = tmp_path / "stop"
    writer = subprocess.Popen(
        [sys.executable, "-c", WRITER, str(root), str(stop)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        assert writer.stdout is not None
        assert writer.stdout.readline().strip() == "ready"
        # One gc in a process of its own, then two in this one, all while the writer puts.
        gc_started = time.time()
        first = casml_process("gc", "--grace", "0", "--json", "--root", str(root), env=env)
        gc_ended = time.time()
        assert first.returncode == 0, first.stderr
        deleted = set(json.loads(first.stdout)["deleted"])
        for _ in range(2):
            deleted.update(run_json("gc", "--grace", "0", root=root)["deleted"])
        stop.touch()
        out, err = writer.communicate(timeout=60)
    finally:
        if writer.poll() is None:
            writer.kill()
    assert writer.returncode == 0, err
    committed = json.loads(out.strip().splitlines()[-1])
    assert any(gc_started < when < gc_ended for _, when in committed), "no put overlapped gc"
    assert deleted == released  # what rm released, and nothing the writer stored
    with Store(root) as s:
        for i, (h, _) in enumerate(committed):
            expected = np.arange(40_000, dtype=np.float64) + 1000.0 * i
            assert np.array_equal(s.get(h), expected)
        assert s.get(filled["b"]).parent.label == "a"
    assert run_json("verify", root=root)["ok"] is True


# -- demo ------------------------------------------------------------------------------------


@pytest.mark.slow  # imports scikit-learn and trains
def test_demo_trains_once_then_nothing(root: Path) -> None:
    pytest.importorskip("sklearn")
    started = time.monotonic()
    result = run("demo", root=root)
    assert result.exit_code == 0, result.output
    assert time.monotonic() - started < 60
    lines = result.stdout.splitlines()
    first = next(line for line in lines if line.startswith("run 1:"))
    second = next(line for line in lines if line.startswith("run 2:"))
    assert "6 build(s)" in first and "2 Model" in first
    assert "0 build(s)" in second and "built: nothing" in second
    assert "lineage of metric" in result.stdout and "dedup ratio" in result.stdout
    metrics = run_json("ls", "--class", "casml.ml.Metric", root=root)
    assert {d["name"] for d in metrics} == {"iris-logistic", "iris-forest"}
    again = run("demo", root=root)
    assert "run 1: 0 build(s)" in again.stdout
