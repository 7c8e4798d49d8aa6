"""Shared harness of the reliability tests: crash children, faulty filesystems, a killable S3.

- **Crash children.** A *zygote* process imports casml once and forks one child per trial;
  each child opens its stores, writes ``ready`` to its log and then loops one operation
  (put, push, pull, gc, reindex) on fresh data, logging ``start <step> ...`` before every
  step and ``done ...`` once a step has returned. The test kills the child with SIGKILL a
  random few milliseconds after ``ready`` and reads the log: ``done`` lines are what was
  committed before the kill, the last ``start`` without its ``done`` is what was interrupted.
  Forking a warm process instead of starting Python costs milliseconds instead of half a
  second, so hundreds of trials fit in a test run.
- **Values.** Every value is a pure function of a seed (:func:`make_object`), so the test
  can check a loaded artifact against the seed the child logged (:func:`matches`).
- **Invariants.** :func:`index_rows_sound`, :func:`verify_kinds`, :func:`temp_files` and
  :func:`age_temp_files` state what must hold after a crash.
- **Faulty filesystems.** :class:`FaultyFileSystem` (fsspec protocol ``casmlfault://``) wraps a
  local folder and injects failures: transient errors for the first N calls, permanent
  errors, or ENOSPC once a byte budget is spent.
- **A killable S3.** :class:`RestartableSeaweed` runs SeaweedFS on fixed ports and folder, so
  a test can SIGKILL it by pid mid-transfer and start it again where it was.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import random
import select
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import fsspec
from fsspec.implementations.local import LocalFileSystem
from fsspec.spec import AbstractFileSystem

import casml
from casml.blobs import TEMP_SUFFIX
from casml.store import Store

REPO = Path(__file__).resolve().parent.parent

#: The chunk size the crash children cut buffers into: small, so that one artifact spans
#: several blobs and a kill can land between two of its chunks.
CRASH_CHUNK = 64 * 1024


# ---------------------------------------------------------------------------- values


class CrashStep(casml.Persistable, name="casml_tests.reliability.CrashStep"):
    """A Persistable with a Persistable dependency, for the crash trials."""

    hash_attributes = ("seed", "parent")

    def __init__(self, seed: int, parent: CrashStep | None = None) -> None:
        self.seed = seed
        self.parent = parent

    def build(self) -> None:
        # 280 KB: above the codec's inline limit, so an out-of-band buffer of 5 chunks.
        self.result_ = _array(self.seed, 35_000)


def _array(seed: int, n: int) -> Any:
    import numpy as np

    return np.random.default_rng(abs(seed) + (1 << 40 if seed < 0 else 0)).random(n)


def make_object(seed: int) -> Any:
    """The object a crash child stores for ``seed``: four shapes of artifact in turn.

    0: a small dict (its payload lives inside the manifest); 1: 20-120 KB of bytes (a
    payload blob); 2: a 320-480 KB numpy array (an out-of-band buffer cut into 5-8 chunks);
    3: a built Persistable whose dependency is another Persistable.
    """
    rng = random.Random(seed)
    kind = seed % 4
    if kind == 0:
        return {"seed": seed, "words": [rng.random() for _ in range(50)]}
    if kind == 1:
        return {"seed": seed, "data": rng.randbytes(rng.randint(20_000, 120_000))}
    if kind == 2:
        return {"seed": seed, "array": _array(seed, rng.randint(40_000, 60_000))}
    parent = CrashStep(-seed)
    parent.build()
    step = CrashStep(seed, parent)
    step.build()
    return step


def garbage_object(seed: int, shared_seed: int) -> dict[str, Any]:
    """An artifact meant to be deleted: chunks of its own, and chunks ``shared_seed`` shares."""
    return {"garbage": seed, "own": _array(seed, 40_000), "shared": make_object(shared_seed)}


def naming(seed: int) -> tuple[str | None, dict[str, str] | None]:
    """The name and tags a crash child gives ``seed``'s artifact (some get none)."""
    name = f"crash-{seed % 3}" if seed % 2 == 0 else None
    tags = {"seed": str(seed), "parity": str(seed % 2)} if seed % 5 != 0 else None
    return name, tags


def matches(obj: Any, seed: int) -> bool:
    """True when ``obj`` (as loaded) equals what :func:`make_object` built for ``seed``."""
    import numpy as np

    expected = make_object(seed)
    if isinstance(expected, CrashStep):
        if not isinstance(obj, CrashStep):
            return False
        parent = obj.parent
        return (
            obj.seed == seed
            and bool(np.array_equal(obj.result_, expected.result_))
            and isinstance(parent, CrashStep)
            and parent.seed == -seed
            and expected.parent is not None
            and bool(np.array_equal(parent.result_, expected.parent.result_))
        )
    if not isinstance(obj, dict) or obj.keys() != expected.keys():
        return False
    for key, value in expected.items():
        if isinstance(value, np.ndarray):
            if not np.array_equal(obj[key], value):
                return False
        elif obj[key] != value:
            return False
    return True


# ---------------------------------------------------------------------------- stores


@dataclass(frozen=True)
class StoreSpec:
    """How to open one store again in another process: root, index URL, storage options."""

    root: str
    index: str
    options: dict[str, Any] | None = None

    def open(self, *, allow_pickle: bool = False) -> Store:
        """Open the store; the chunk size is the crash trials' small one."""
        store = Store(
            self.root, index=self.index, storage_options=self.options, allow_pickle=allow_pickle
        )
        store._blobs.chunk_size = CRASH_CHUNK
        return store

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready form for the zygote."""
        return {"root": self.root, "index": self.index, "options": self.options}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> StoreSpec:
        """The inverse of :meth:`to_json`."""
        return cls(data["root"], data["index"], data.get("options"))


def put_seed(store: Store, seed: int) -> str:
    """Put ``seed``'s object with its name and tags, as the crash children do."""
    name, tags = naming(seed)
    return store.put(make_object(seed), name=name, tags=tags)


# ---------------------------------------------------------------------------- crash children


class _Log:
    """A child's log: one line per event, each written with a single write(2) call."""

    def __init__(self, path: str) -> None:
        self.fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)

    def __call__(self, *words: object) -> None:
        os.write(self.fd, (" ".join(str(w) for w in words) + "\n").encode())


def _child_put(args: dict[str, Any], log: _Log) -> None:
    store = StoreSpec.from_json(args["store"]).open()
    log("ready")
    seed = int(args["seed"])
    while True:
        log("start", "put", seed)
        h = put_seed(store, seed)
        log("done", "put", seed, h)
        seed += 1


def _child_transfer(args: dict[str, Any], log: _Log) -> None:
    # push: the child's own store is the source; pull: the child's store is the target.
    source = StoreSpec.from_json(args["source"]).open()
    target = StoreSpec.from_json(args["target"]).open()
    # The test stored a first batch in the source: the child transfers straight away.
    batch: list[tuple[int, str]] = [(int(s), str(h)) for s, h in args["pending"]]
    seed = int(args["seed"])
    log("ready")
    while True:
        log("start", args["op"])
        if args["op"] == "push":
            source.push(target)
        else:
            target.pull(source)
        for s, h in batch:
            log("done", args["op"], s, h)
        batch = []
        for _ in range(3):
            log("start", "put", seed)
            h = put_seed(source, seed)
            log("done", "put", seed, h)
            batch.append((seed, h))
            seed += 1


def make_garbage(store: Store, seed: int, shared: list[int], count: int) -> list[str]:
    """Put ``count`` garbage artifacts (named, so they have records); return their hashes."""
    return [
        store.put(garbage_object(seed + i, shared[i % len(shared)]), name="garbage")
        for i in range(count)
    ]


def _child_gc(args: dict[str, Any], log: _Log) -> None:
    import casml.maintenance

    # gc waits a second for puts of *other* processes still in flight; this child is the
    # only writer, so the wait would only make the kills land in a sleep.
    casml.maintenance._SETTLE_SECONDS = 0.0
    store = StoreSpec.from_json(args["store"]).open()
    doomed: list[str] = list(args["doomed"])
    log("ready")  # the test deleted the first garbage already: the first gc has work
    while True:
        log("start", "gc")
        store.gc(grace=0)
        log("done", "gc")
        if doomed:
            h = doomed.pop(0)
            log("start", "delete", h)
            store.delete(h)
            log("done", "delete", h)


def _child_reindex(args: dict[str, Any], log: _Log) -> None:
    # Every round rebuilds a lost index from storage alone, into a fresh database file.
    spec = StoreSpec.from_json(args["store"])
    folder = Path(args["folder"])
    log("ready")
    for round_ in range(1_000_000):
        index = f"sqlite:///{folder / f'index-{round_}.sqlite'}"
        store = StoreSpec(spec.root, index, spec.options).open()
        log("start", "reindex", round_, index)
        store.reindex()
        log("done", "reindex", round_, index)
        store.close()


_CHILDREN: dict[str, Callable[[dict[str, Any], _Log], None]] = {
    "put": _child_put,
    "push": _child_transfer,
    "pull": _child_transfer,
    "gc": _child_gc,
    "reindex": _child_reindex,
}


def _run_child(request: dict[str, Any]) -> None:
    """In the forked child: run one operation loop until killed; never return."""
    status = 0
    try:
        devnull = os.open(os.devnull, os.O_RDONLY)
        os.dup2(devnull, 0)
        err = os.open(request["err"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.dup2(err, 1)
        os.dup2(err, 2)
        sys.stdout = open(1, "w", closefd=False)  # noqa: SIM115 - the process ends here
        sys.stderr = open(2, "w", closefd=False)  # noqa: SIM115
        _CHILDREN[request["op"]](request["args"], _Log(request["log"]))
    except BaseException:
        traceback.print_exc()
        sys.stderr.flush()
        status = 1
    os._exit(status)


def _zygote_main() -> None:
    """Serve fork requests on stdin (one JSON object a line); answer on stdout."""
    # Everything a child needs is imported here, once, before any fork; nothing here starts
    # a thread (s3fs's event loop starts with its first filesystem, in a child).
    import numpy  # noqa: F401
    import s3fs  # noqa: F401

    import casml.maintenance  # noqa: F401

    out = sys.stdout
    out.write("zygote ready\n")
    out.flush()
    for line in sys.stdin:
        request = json.loads(line)
        if request["cmd"] == "spawn":
            pid = os.fork()
            if pid == 0:
                _run_child(request)
            out.write(f"{pid}\n")
        elif request["cmd"] == "reap":
            _, status = os.waitpid(int(request["pid"]), 0)
            out.write(f"{status}\n")
        else:
            break
        out.flush()


class Zygote:
    """A warm Python process that forks the crash children (see the module docstring)."""

    def __init__(self) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-c", "from tests.reliability_tools import _zygote_main as m; m()"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            cwd=REPO,
            text=True,
            start_new_session=True,
        )
        self._lock = threading.Lock()
        self._answer(timeout=60.0)

    def _answer(self, timeout: float = 30.0) -> str:
        assert self.proc.stdout is not None
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
        if not ready:
            raise RuntimeError("the zygote did not answer in time")
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"the zygote exited with {self.proc.wait(timeout=10)}")
        return line.strip()

    def _send(self, request: dict[str, Any]) -> str:
        assert self.proc.stdin is not None
        with self._lock:  # one request and its answer at a time, whatever the thread
            self.proc.stdin.write(json.dumps(request) + "\n")
            self.proc.stdin.flush()
            return self._answer()

    def spawn(self, op: str, args: dict[str, Any], log: Path, err: Path) -> int:
        """Fork a child running ``op``; return its pid."""
        answer = self._send(
            {"cmd": "spawn", "op": op, "args": args, "log": str(log), "err": str(err)}
        )
        return int(answer)

    def reap(self, pid: int) -> int:
        """Wait for the child ``pid`` to exit; return its raw wait status."""
        return int(self._send({"cmd": "reap", "pid": pid}))

    def close(self) -> None:
        """Stop the zygote (by its own pid) and wait for it."""
        with contextlib.suppress(BrokenPipeError, OSError):
            assert self.proc.stdin is not None
            self.proc.stdin.write(json.dumps({"cmd": "exit"}) + "\n")
            self.proc.stdin.close()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=10)
        if self.proc.stdout is not None:
            self.proc.stdout.close()


@dataclass
class Trial:
    """What one killed child left behind, parsed from its log."""

    op: str
    delay_ms: float
    lines: list[list[str]]
    status: int
    stderr: str

    @property
    def killed(self) -> bool:
        """True when the child died of our SIGKILL (not of an error of its own)."""
        return os.WIFSIGNALED(self.status) and os.WTERMSIG(self.status) == signal.SIGKILL

    def done(self, step: str) -> list[tuple[int, str]]:
        """``(seed, hash)`` of every ``done <step> <seed> <hash>`` line."""
        return [(int(w[2]), w[3]) for w in self.lines if w[:2] == ["done", step] and len(w) == 4]

    @property
    def interrupted(self) -> list[str] | None:
        """The words of the last ``start`` line without a matching ``done``, if any."""
        last: list[str] | None = None
        for words in self.lines:
            if words[0] == "start":
                last = words[1:]
            elif words[0] == "done" and last is not None and words[1] == last[0]:
                last = None
        return last


def run_trial(
    zygote: Zygote, op: str, args: dict[str, Any], folder: Path, rng: random.Random
) -> Trial:
    """Fork a child for ``op``, SIGKILL it 5-300 ms after it is ready, return its log."""
    folder.mkdir(parents=True, exist_ok=True)
    log, err = folder / "child.log", folder / "child.err"
    pid = zygote.spawn(op, args, log, err)
    deadline = time.monotonic() + 30.0
    try:
        while True:
            with contextlib.suppress(FileNotFoundError):
                if b"\nready\n" in b"\n" + log.read_bytes():
                    break
            if time.monotonic() > deadline:
                raise AssertionError(f"{op} child never got ready: {_read(err)}")
            if _exited(pid):
                break  # it failed during set-up: the status and stderr tell why
            time.sleep(0.001)
        delay = rng.uniform(0.005, 0.300)
        time.sleep(delay)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        status = zygote.reap(pid)
    lines = [line.split() for line in _read(log).splitlines() if line.strip()]
    return Trial(op, delay * 1000, lines, status, _read(err))


def _exited(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ")[-1].startswith("Z")
    except FileNotFoundError:
        return True


def _read(path: Path) -> str:
    try:
        return path.read_text(errors="replace")
    except FileNotFoundError:
        return ""


# ---------------------------------------------------------------------------- invariants


def index_rows_sound(store: Store) -> int:
    """Assert that no index row points at missing data; return how many rows were checked.

    For every indexed artifact: its manifest exists and parses, every blob it lists (and
    every blob its index row lists) is stored, and every dependency has a manifest.
    """
    from casml.manifest import load_manifest

    infos = store._index.find()
    for info in infos:
        manifest = load_manifest(store._blobs.get_manifest(info.hash), info.hash)
        listed = {d for d, _ in manifest.blob_list()}
        listed.update(d for d, _ in store._index.blobs_of(info.hash))
        lacking = store._blobs.missing(listed)
        assert not lacking, f"index row {info.hash} lists missing blobs {sorted(lacking)}"
        for dependency in manifest.dependencies:
            assert store._blobs.has_manifest(dependency), (
                f"index row {info.hash} depends on {dependency}, which has no manifest"
            )
    return len(infos)


def verify_kinds(store: Store) -> Counter[str]:
    """Run verify and count its findings by kind."""
    report = store.verify()
    return Counter(p.kind for p in report.problems)


def temp_files(root: str | Path) -> list[str]:
    """Every temporary file casml's writers or gc left under a local store root."""
    found = []
    for directory, _, files in os.walk(root):
        for name in files:
            if name.startswith(".") and name.endswith(TEMP_SUFFIX):
                found.append(os.path.join(directory, name))
    return sorted(found)


def age_temp_files(root: str | Path, seconds: float = 3600.0) -> int:
    """Make the temporary files under ``root`` look ``seconds`` old; return how many.

    gc never removes a temporary file younger than ten minutes (a writer may still be busy
    with it): the tests stand in for the passing time.
    """
    paths = temp_files(root)
    when = time.time() - seconds
    for path in paths:
        with contextlib.suppress(FileNotFoundError):
            os.utime(path, (when, when))
    return len(paths)


# ---------------------------------------------------------------------------- faulty fsspec


@dataclass
class FaultPlan:
    """What :class:`FaultyFileSystem` does wrong, shared by every instance of one test.

    ``fail`` maps a method name (``pipe_file``, ``cat_file``, ``info``, ``ls``...) to how
    many of its next calls fail; each failure raises ``error()``. ``space`` is the number of
    bytes that may still be written (None: unlimited); a write that does not fit raises
    OSError(ENOSPC), after writing what fitted when ``atomic`` is False (a plain disk) or
    nothing when True (an object store). ``calls`` counts every call by method.
    """

    fail: dict[str, int] = field(default_factory=dict)
    error: Callable[[], BaseException] = lambda: ConnectionResetError(
        errno.ECONNRESET, "connection reset by peer"
    )
    space: int | None = None
    atomic: bool = False
    calls: Counter[str] = field(default_factory=Counter)

    def enter(self, method: str) -> None:
        """Count a call to ``method`` and fail it if the plan says so."""
        self.calls[method] += 1
        left = self.fail.get(method, 0)
        if left > 0:
            self.fail[method] = left - 1
            raise self.error()


PLANS: dict[str, FaultPlan] = {}


class FaultyFileSystem(AbstractFileSystem):  # type: ignore[misc]
    """A local folder behind fsspec's generic interface, failing as its FaultPlan says.

    Open it as ``casmlfault:///abs/path`` with ``storage_options={"plan": key}``, where
    ``PLANS[key]`` is the plan. It is deliberately not a LocalFileSystem, so casml uses its
    generic (remote-style) code path on it.
    """

    protocol = "casmlfault"
    root_marker = "/"
    cachable = False

    def __init__(self, plan: str = "", **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.plan = PLANS[plan] if plan else FaultPlan()
        self.local = LocalFileSystem()

    @classmethod
    def _strip_protocol(cls, path: Any) -> Any:
        text = str(path)
        if text.startswith("casmlfault://"):
            text = text[len("casmlfault://") :]
        return text.rstrip("/") or "/"

    def unstrip_protocol(self, name: str) -> str:
        return f"casmlfault://{name}"

    def ls(self, path: str, detail: bool = True, **kwargs: Any) -> Any:
        self.plan.enter("ls")
        return self.local.ls(self._strip_protocol(path), detail=detail)

    def info(self, path: str, **kwargs: Any) -> Any:
        self.plan.enter("info")
        return self.local.info(self._strip_protocol(path))

    def cat_file(
        self, path: str, start: int | None = None, end: int | None = None, **kwargs: Any
    ) -> bytes:
        self.plan.enter("cat_file")
        data: bytes = self.local.cat_file(self._strip_protocol(path), start=start, end=end)
        return data

    def pipe_file(self, path: str, value: bytes, mode: str = "overwrite", **kwargs: Any) -> None:
        self.plan.enter("pipe_file")
        target = self._strip_protocol(path)
        if mode == "create" and os.path.exists(target):
            raise FileExistsError(errno.EEXIST, "exists", target)
        os.makedirs(os.path.dirname(target), exist_ok=True)
        plan = self.plan
        if plan.space is not None and len(value) > plan.space:
            fitted = plan.space
            plan.space = 0
            if not plan.atomic:
                with open(target, "wb") as f:
                    f.write(value[:fitted])
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), target)
        if plan.space is not None:
            plan.space -= len(value)
        with open(target, "wb") as f:
            f.write(value)

    def rm_file(self, path: str) -> None:
        self.plan.enter("rm_file")
        os.unlink(self._strip_protocol(path))

    def _rm(self, path: str) -> None:
        self.rm_file(path)

    def modified(self, path: str) -> Any:
        self.plan.enter("modified")
        return self.local.modified(self._strip_protocol(path))

    def mkdir(self, path: str, create_parents: bool = True, **kwargs: Any) -> None:
        os.makedirs(self._strip_protocol(path), exist_ok=True)

    def makedirs(self, path: str, exist_ok: bool = False) -> None:
        os.makedirs(self._strip_protocol(path), exist_ok=exist_ok)


fsspec.register_implementation("casmlfault", FaultyFileSystem, clobber=True)


@contextlib.contextmanager
def fault_plan(plan: FaultPlan) -> Iterator[dict[str, Any]]:
    """Register ``plan`` and yield the storage options that select it."""
    key = f"plan-{id(plan)}-{random.random()}"
    PLANS[key] = plan
    try:
        yield {"plan": key}
    finally:
        PLANS.pop(key, None)


# ---------------------------------------------------------------------------- killable S3


def _port_open(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.settimeout(0.2)
        return s.connect_ex(("127.0.0.1", port)) == 0


class RestartableSeaweed:
    """SeaweedFS (``weed mini``) on fixed ports and folder: kill it by pid, start it again.

    The session's shared S3 server (tests/conftest.py) must not be killed under other
    tests, so the fault tests run this one of their own.
    """

    def __init__(self) -> None:
        from tests import services

        self._services = services
        self.binary = services._weed_binary()
        self.folder = Path(tempfile.mkdtemp(prefix="casml-reliability-weed-"))
        ports = services.free_ports(10)
        self.s3_port = ports[3]
        names = [
            "master.port",
            "volume.port",
            "filer.port",
            "s3.port",
            "master.port.grpc",
            "volume.port.grpc",
            "filer.port.grpc",
            "s3.port.grpc",
            "admin.port",
            "admin.port.grpc",
        ]
        self.argv = [
            self.binary,
            "mini",
            f"-dir={self.folder}",
            "-ip=127.0.0.1",
            "-ip.bind=127.0.0.1",
            *(f"-{name}={port}" for name, port in zip(names, ports, strict=True)),
            f"-filer.localSocket={self.folder}/filer.sock",
            "-s3.port.iceberg=0",
            "-s3.port.lance=0",
            "-webdav=false",
            "-admin.ui=false",
            "-master.telemetry=false",
        ]
        self.server = services.S3Server(
            f"http://127.0.0.1:{self.s3_port}",
            services.ACCESS_KEY,
            services.SECRET_KEY,
            "casml-reliability",
        )
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts: list[float] = []

    def start(self, timeout: float = 60.0) -> float:
        """Start the server (again) and wait until its bucket answers; return the seconds."""
        began = time.monotonic()
        env = dict(
            os.environ,
            AWS_ACCESS_KEY_ID=self.server.access_key,
            AWS_SECRET_ACCESS_KEY=self.server.secret_key,
        )
        log = open(self.folder / "weed.log", "ab")  # noqa: SIM115 - owned by the process
        die_with_parent = getattr(self._services, "_die_with_parent", None)
        self.proc = subprocess.Popen(
            self.argv,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,
            preexec_fn=die_with_parent,
        )
        log.close()
        deadline = began + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"weed exited: {self.log_tail()}")
            if _port_open(self.s3_port):
                try:
                    self.server.create_bucket(self.server.bucket)
                    self.starts.append(time.monotonic() - began)
                    return self.starts[-1]
                except Exception:
                    pass
            time.sleep(0.05)
        raise RuntimeError(f"weed did not start in {timeout} s: {self.log_tail()}")

    def kill(self) -> None:
        """SIGKILL the server process by its pid and wait for it."""
        assert self.proc is not None
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=20)
        # Its ports must be free before a restart binds them again.
        deadline = time.monotonic() + 10
        while _port_open(self.s3_port) and time.monotonic() < deadline:
            time.sleep(0.05)

    def stop(self) -> None:
        """Stop the server (SIGTERM, then SIGKILL) and delete its folder."""
        if self.proc is not None and self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.kill()
        import shutil

        shutil.rmtree(self.folder, ignore_errors=True)

    def log_tail(self) -> str:
        """The end of the server's log, for failure messages."""
        return _read(self.folder / "weed.log")[-2000:]


def in_thread(fn: Callable[[], Any]) -> tuple[threading.Thread, dict[str, Any]]:
    """Run ``fn`` in a thread; the dict gets ``result`` or ``error`` when it ends."""
    outcome: dict[str, Any] = {}

    def run() -> None:
        try:
            outcome["result"] = fn()
        except BaseException as exc:
            outcome["error"] = exc

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, outcome


def write_report(section: str, figures: dict[str, Any]) -> None:
    """Add ``figures`` under ``section`` to $CASML_RELIABILITY_REPORT (a JSON file), if set.

    The numbers in docs/reliability.md come from runs with this set.
    """
    path = os.environ.get("CASML_RELIABILITY_REPORT")
    if not path:
        return
    try:
        current = json.loads(Path(path).read_text())
    except (FileNotFoundError, ValueError):
        current = {}
    current[section] = figures
    Path(path).write_text(json.dumps(current, indent=2, sort_keys=True, default=str))


# ---------------------------------------------------------------------------- canaries


def write_canary(path: str) -> str:
    """Write the canary file: reached only if a store's payload ran code on load."""
    Path(path).write_text("code from the store ran\n")
    return path


class PickleBomb:
    """Unpickling this object calls :func:`write_canary` (its ``__reduce__`` says so)."""

    def __init__(self, canary: str) -> None:
        self.canary = canary

    def __reduce__(self) -> tuple[Any, ...]:
        return (write_canary, (self.canary,))


#: The environment variable naming the canary file :class:`CanaryEstimator` writes on load.
CANARY_ENV = "CASML_TEST_SKOPS_CANARY"

try:
    from sklearn.base import BaseEstimator as _Estimator
except ImportError:  # pragma: no cover - the ml extra is not installed
    _Estimator = object  # type: ignore[assignment,misc,unused-ignore]


class CanaryEstimator(_Estimator):  # type: ignore[misc,unused-ignore]
    """A scikit-learn estimator whose ``__setstate__`` (run by skops on load) writes a canary."""

    def fit(self, X: Any, y: Any = None) -> CanaryEstimator:
        self.fitted_ = True
        return self

    def predict(self, X: Any) -> list[int]:
        return [0] * len(X)

    def __setstate__(self, state: dict[str, Any]) -> None:
        path = os.environ.get(CANARY_ENV)
        if path:
            write_canary(path)
        self.__dict__.update(state)


def demo_frame() -> Any:
    """A small labelled table for the skops test's Dataset."""
    import pandas as pd

    return pd.DataFrame({"a": [0.0, 1.0, 2.0, 3.0] * 5, "label": [0, 1] * 10})


def make_bomb(path: str) -> PickleBomb:
    """A function whose cached result is a pickle bomb (for the memoization path)."""
    return PickleBomb(path)
