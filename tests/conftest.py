"""Shared fixtures: stores on real local folders and on fsspec's memory filesystem."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from casml.store import Store


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    """An embedded store (local folder + SQLite file) in a fresh temp folder."""
    with Store(tmp_path / "store") as s:
        yield s


@pytest.fixture(params=["local", "memory"])
def any_store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Store]:
    """The same tests on a local folder and on memory:// (SQLite index either way)."""
    if request.param == "local":
        root = str(tmp_path / "store")
        index = None
    else:
        root = f"memory://casml-test-{uuid.uuid4().hex}"
        index = f"sqlite:///{tmp_path / 'index.sqlite'}"
    with Store(root, index=index) as s:
        yield s
