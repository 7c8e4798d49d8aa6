"""Golden vectors: every digest is fixed for the current format version, on every stack."""

from __future__ import annotations

import pytest

from casml.hashing import HASH_FORMAT_VERSION, hash_value
from tests.golden import load_expected, load_vectors_module

EXPECTED = load_expected()
VALUES = load_vectors_module().all_vectors()


def test_format_version_matches_the_vectors() -> None:
    # A digest change requires a format bump; regenerate with `python -m tests.golden --write`.
    assert EXPECTED["format_version"] == HASH_FORMAT_VERSION


def test_there_are_at_least_100_vectors_and_all_are_checked() -> None:
    assert len(EXPECTED["digests"]) >= 100
    assert set(VALUES) == set(EXPECTED["digests"])


@pytest.mark.parametrize("name", sorted(VALUES))
def test_golden_digest(name: str) -> None:
    assert hash_value(VALUES[name]) == EXPECTED["digests"][name], name
