"""Train only if new, memoized functions, lineage and graphs."""

from __future__ import annotations

from collections import Counter
from typing import Any

import numpy as np
import pytest

import casml
from casml.store import Store

BUILDS: Counter[str] = Counter()


class Source(casml.Persistable, name="tests.workflow.Source"):
    hash_attributes = ("n", "seed")

    def __init__(self, n: int, seed: int = 0) -> None:
        self.n, self.seed = n, seed

    def build(self) -> None:
        BUILDS["source"] += 1
        self.values_ = np.random.default_rng(self.seed).random(self.n)


class Fit(casml.Persistable, name="tests.workflow.Fit"):
    hash_attributes = ("source", "power")

    def __init__(self, source: Source, power: int = 1) -> None:
        self.source, self.power = source, power

    def build(self) -> None:
        BUILDS["fit"] += 1
        self.mean_ = float(np.mean(self.source.values_**self.power))


class Score(casml.Persistable, name="tests.workflow.Score"):
    hash_attributes = ("fits",)

    def __init__(self, fits: list[Fit]) -> None:
        self.fits = fits

    def build(self) -> None:
        BUILDS["score"] += 1
        self.total_ = sum(f.mean_ for f in self.fits)


@pytest.fixture(autouse=True)
def _reset_counter() -> None:
    BUILDS.clear()


def test_second_get_or_build_of_an_equal_config_builds_nothing(store: Store) -> None:
    fit = store.get_or_build(Fit(Source(1000), power=2), name="fit")
    assert BUILDS == {"source": 1, "fit": 1}
    again = store.get_or_build(Fit(Source(1000), power=2), name="fit")
    assert BUILDS == {"source": 1, "fit": 1}
    assert again.mean_ == fit.mean_
    assert again.hash_ == fit.hash_
    assert [i.version for i in store.find(name="fit")] == [1]


def test_changing_a_parameter_rebuilds_only_downstream(store: Store) -> None:
    store.get_or_build(Fit(Source(100), power=1))
    store.get_or_build(Fit(Source(100), power=3))  # new model parameter: the fit only
    assert BUILDS == {"source": 1, "fit": 2}
    store.get_or_build(Fit(Source(100, seed=1), power=3))  # new data: everything
    assert BUILDS == {"source": 2, "fit": 3}


def test_dependencies_in_lists_are_built_first(store: Store) -> None:
    src = Source(50)
    score = store.get_or_build(Score([Fit(src, 1), Fit(src, 2)]))
    assert BUILDS == {"source": 1, "fit": 2, "score": 1}
    assert score.total_ > 0
    store.get_or_build(Score([Fit(Source(50), 1), Fit(Source(50), 2)]))
    assert BUILDS == {"source": 1, "fit": 2, "score": 1}


def test_hashing_never_builds() -> None:
    _ = Score([Fit(Source(10))]).hash_
    assert BUILDS == {}


def test_lineage_dependents_and_graph(store: Store) -> None:
    src = Source(20)
    score = store.get_or_build(Score([Fit(src, 1), Fit(src, 2)]), name="score")
    fits = score.fits
    lineage = [i.hash for i in store.lineage(score.hash_)]
    assert set(lineage[:2]) == {f.hash_ for f in fits}  # nearest first
    assert lineage[2:] == [src.hash_]
    dependents = [i.hash for i in store.dependents(src.hash_)]
    assert set(dependents[:2]) == {f.hash_ for f in fits}
    assert dependents[2:] == [score.hash_]
    assert store.lineage(src.hash_) == []

    mermaid = store.graph(score.hash_)
    assert mermaid.startswith("graph LR")
    assert mermaid.count("-->") == 4
    assert "score v1" in mermaid
    dot = store.graph(src.hash_, format="dot")
    assert dot.startswith("digraph") and dot.count("->") == 4
    with pytest.raises(ValueError):
        store.graph(src.hash_, format="png")


# -- memoization ---------------------------------------------------------------------------


def test_cache_hits_misses_and_argument_binding(store: Store) -> None:
    calls: list[tuple[Any, ...]] = []

    @store.cache
    def scale(x: np.ndarray, factor: float = 2.0, *, offset: int = 0) -> np.ndarray:
        calls.append((factor, offset))
        return x * factor + offset

    x = np.arange(5.0)
    first = scale(x)
    np.testing.assert_array_equal(first, x * 2)
    np.testing.assert_array_equal(scale(x, 2.0), first)  # default given explicitly
    np.testing.assert_array_equal(scale(x, factor=2.0, offset=0), first)
    np.testing.assert_array_equal(scale(offset=0, x=x), first)  # keyword order
    assert len(calls) == 1
    scale(x, 3.0)
    assert len(calls) == 2
    assert scale.is_cached(x) and scale.is_cached(x, 3.0)
    assert not scale.is_cached(x, 4.0)
    assert scale.call_hash(x) == scale.call_hash(x, factor=2.0)
    assert scale.call_hash(x) != scale.call_hash(x + 1)
    infos = store.find(name=scale.name)
    assert len(infos) == 2 and scale.name.endswith("scale")


def test_cache_ignore_and_custom_name(store: Store) -> None:
    calls = []

    @store.cache(ignore=["verbose"], name="features")
    def features(n: int, verbose: bool = False) -> list[int]:
        calls.append(n)
        return list(range(n))

    assert features(3) == [0, 1, 2]
    assert features(3, verbose=True) == [0, 1, 2]
    assert calls == [3]
    assert [i.name for i in store.find(name="features")] == ["features"]
    with pytest.raises(ValueError, match="does not have"):
        store.cache(ignore=["nope"])(lambda a: a)


def test_editing_the_function_is_a_cache_miss(store: Store) -> None:
    namespace: dict[str, Any] = {}
    exec("def f(n):\n    return n + 1\n", namespace)
    first = store.cache(namespace["f"])
    assert first(1) == 2
    exec("def f(n):\n    return n + 100\n", namespace)
    edited = store.cache(namespace["f"])
    assert not edited.is_cached(1)
    assert edited(1) == 101


def test_cached_result_records_persistable_arguments(store: Store) -> None:
    src = store.get_or_build(Source(10))

    @store.cache
    def total(source: Source) -> float:
        return float(source.values_.sum())

    value = total(src)
    address = total.call_hash(src)
    assert store.get(address) == value
    assert [i.hash for i in store.lineage(address)] == [src.hash_]
    assert address in [i.hash for i in store.dependents(src.hash_)]


SQUARE_CALLS: list[int] = []


def square(n: int) -> int:
    SQUARE_CALLS.append(n)  # a global: not part of the hash (a closure variable would be)
    return n * n


def test_cache_is_shared_by_stores_on_the_same_storage(tmp_path: Any) -> None:
    SQUARE_CALLS.clear()
    with Store(tmp_path / "s") as a:
        assert a.cache(square)(7) == 49
    with Store(tmp_path / "s") as b:
        assert b.cache(square)(7) == 49
    assert SQUARE_CALLS == [7]
