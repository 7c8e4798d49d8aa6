"""Shared fixtures: stores on real local folders, memory:// and S3, over SQLite and servers.

The server fixtures start real servers on loopback on first use (see tests/services.py).
Fixtures parametrized over servers mark those params ``integration``, so ``-m "not
integration"`` runs the tests that need no server.
"""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TypeVar

import pytest

from casml.store import Store
from tests import services


@pytest.fixture
def store(tmp_path: Path, index_url: str) -> Iterator[Store]:
    """A store on a local folder in a fresh temp folder, its index on each database backend.

    On SQLite the index is the embedded default (``index.sqlite`` inside the store folder).
    """
    index = None if index_url.startswith("sqlite") else index_url
    with Store(tmp_path / "store", index=index) as s:
        yield s


STORAGE_BACKENDS = ["local", "memory", pytest.param("s3", marks=pytest.mark.integration)]


@pytest.fixture(params=STORAGE_BACKENDS)
def any_store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Store]:
    """The same tests on a local folder, memory:// and S3 (SeaweedFS); SQLite index."""
    options = None
    if request.param == "local":
        root = str(tmp_path / "store")
        index = None
    else:
        index = f"sqlite:///{tmp_path / 'index.sqlite'}"
        if request.param == "memory":
            root = f"memory://casml-test-{uuid.uuid4().hex}"
        else:
            server: services.S3Server = request.getfixturevalue("s3_server")
            root = server.url()
            options = server.storage_options
    with Store(root, index=index, storage_options=options) as s:
        yield s


# -- real servers (integration tests) ---------------------------------------------------------
#
# Session-scoped: each server starts on first use, on free loopback ports in a temp folder, and
# is stopped by its pid when the session ends. A server that cannot start skips the tests that
# need it, unless CASML_REQUIRE_SERVICES=1 (CI): then they fail, so a missing server shows.


_S = TypeVar("_S")


@contextlib.contextmanager
def _started(
    factory: Callable[[], contextlib.AbstractContextManager[_S]], what: str
) -> Iterator[_S]:
    with contextlib.ExitStack() as stack:
        problem: str | None = None
        try:
            server = stack.enter_context(factory())
        except services.ServiceUnavailable as exc:
            problem = f"{what} could not be started: {exc}"
        # Outside the except block, so that the report shows the reason, not a traceback.
        if problem is not None:
            services.skip_or_fail(problem)
        yield server


@pytest.fixture(scope="session")
def s3_server() -> Iterator[services.S3Server]:
    """SeaweedFS's S3 gateway: ``.endpoint_url``, credentials, ``.bucket``, ``.storage_options``."""
    with _started(services.seaweedfs, "SeaweedFS (S3)") as server:
        yield server


@pytest.fixture(scope="session")
def moto_server() -> Iterator[services.S3Server]:
    """moto's S3 server: a second, fast S3 implementation."""
    with _started(services.moto_s3, "moto's S3 server") as server:
        yield server


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[services.DatabaseServer]:
    """A throwaway PostgreSQL server; ``.new_database()`` gives a fresh database."""
    with _started(services.postgres, "PostgreSQL") as server:
        yield server


@pytest.fixture(scope="session")
def mariadb_server() -> Iterator[services.DatabaseServer]:
    """A throwaway MariaDB server; ``.new_database()`` gives a fresh database."""
    with _started(services.mariadb, "MariaDB") as server:
        yield server


@pytest.fixture(scope="session")
def postgres_url(postgres_server: services.DatabaseServer) -> str:
    """``postgresql+psycopg://...`` of a database shared by the whole session."""
    return postgres_server.url


@pytest.fixture(scope="session")
def mysql_url(mariadb_server: services.DatabaseServer) -> str:
    """``mysql+pymysql://...`` of a database shared by the whole session."""
    return mariadb_server.url


INDEX_BACKENDS = [
    "sqlite",
    pytest.param("postgresql", marks=pytest.mark.integration),
    pytest.param("mysql", marks=pytest.mark.integration),
]


@pytest.fixture(params=INDEX_BACKENDS)
def index_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """The URL of a fresh, empty index database: SQLite, PostgreSQL or MariaDB."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'index-db' / 'index.sqlite'}"
        return
    fixture = "postgres_server" if request.param == "postgresql" else "mariadb_server"
    server: services.DatabaseServer = request.getfixturevalue(fixture)
    with server.new_database() as url:
        yield url
