"""Persistables and the registry: identity from hash_attributes, references, lazy loading."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

import casml
from casml import registry
from casml.errors import RegistrationError
from casml.persistable import LazyReference
from casml.store import Store


class Data(casml.Persistable, name="tests.persistable.Data"):
    hash_attributes = ("values",)

    def __init__(self, values: list[float]) -> None:
        self.values = values


class Scaler(casml.Persistable, name="tests.persistable.Scaler"):
    hash_attributes = ("with_mean", "data")
    builds = 0

    def __init__(self, with_mean: bool = True, data: Data | None = None) -> None:
        self.with_mean = with_mean
        self.data = data

    def build(self) -> None:
        type(self).builds += 1
        assert self.data is not None
        self.mean_ = float(np.mean(self.data.values)) if self.with_mean else 0.0


class Ensemble(casml.Persistable, name="tests.persistable.Ensemble"):
    hash_attributes = ("members",)

    def __init__(self, members: list[Scaler]) -> None:
        self.members = members


def test_hash_is_known_before_build_and_ignores_fitted_state() -> None:
    data = Data([1.0, 2.0, 3.0])
    scaler = Scaler(True, data)
    before = scaler.hash_
    scaler.build()
    assert scaler.hash_ == before
    assert Scaler.builds >= 1
    assert Scaler(True, Data([1.0, 2.0, 3.0])).hash_ == before
    assert Scaler(False, data).hash_ != before
    assert Scaler(True, Data([1.0, 2.0])).hash_ != before


def test_hash_depends_on_registered_name_not_just_attributes() -> None:
    class Other(casml.Persistable, name="tests.persistable.Other"):
        hash_attributes = ("values",)

        def __init__(self, values: list[float]) -> None:
            self.values = values

    assert Other([1.0]).hash_ != Data([1.0]).hash_


def test_default_registered_name_is_module_and_qualname() -> None:
    class Local(casml.Persistable):
        pass

    assert Local.__casml_name__ == f"{__name__}:{Local.__qualname__}"
    assert registry.lookup(Local.__casml_name__) is Local


def test_two_classes_claiming_one_name_is_an_error() -> None:
    with pytest.raises(RegistrationError, match="already taken"):

        class Impostor(casml.Persistable, name="tests.persistable.Data"):
            pass


def test_redefining_the_same_class_statement_replaces_it() -> None:
    def define() -> type:
        class Redefined(casml.Persistable, name="tests.persistable.Redefined"):
            pass

        return Redefined

    first, second = define(), define()
    assert registry.lookup("tests.persistable.Redefined") is second
    assert first is not second


@pytest.mark.parametrize("attributes", ["values", ("ok", 3), ("not an identifier",)])
def test_bad_hash_attributes_are_rejected(attributes: Any) -> None:
    with pytest.raises(RegistrationError):

        class Bad(casml.Persistable):
            hash_attributes = attributes


def test_missing_hash_attribute_names_it() -> None:
    class Forgetful(casml.Persistable):
        hash_attributes = ("alpha",)

    with pytest.raises(RegistrationError, match="'alpha'"):
        _ = Forgetful().hash_


def test_dependencies_are_references_loaded_lazily(store: Store) -> None:
    data = Data([1.0, 2.0, 3.0])
    scaler = Scaler(True, data)
    scaler.build()
    h = store.put(scaler, name="scaler")
    assert data.hash_ in store  # the dependency was stored first
    info = store.info(h)
    assert info.dependencies == (data.hash_,)
    assert info.class_name == "tests.persistable.Scaler"

    loaded = store.get(h)
    assert isinstance(loaded, Scaler)
    assert loaded.mean_ == 2.0
    assert "data" not in loaded.__dict__  # not loaded yet
    assert loaded.hash_ == h  # known without loading the dependency
    assert "data" not in loaded.__dict__
    assert loaded.data.values == [1.0, 2.0, 3.0]  # first access loads it
    assert isinstance(loaded.__dict__["data"], Data)


def test_putting_a_loaded_object_again_keeps_its_references(store: Store) -> None:
    scaler = Scaler(True, Data([4.0]))
    scaler.build()
    h = store.put(scaler)
    loaded = store.get(h)
    assert isinstance(loaded.__dict__["_casml_lazy"]["data"], LazyReference)
    assert store.put(loaded) == h


def test_nested_persistables_are_references_too(store: Store) -> None:
    members = [Scaler(True, Data([1.0])), Scaler(False, Data([2.0]))]
    for m in members:
        m.build()
    ensemble = Ensemble(members)
    h = store.put(ensemble)
    info = store.info(h)
    assert set(info.dependencies) == {m.hash_ for m in members}
    loaded = store.get(h)
    assert [m.hash_ for m in loaded.members] == [m.hash_ for m in members]
    assert loaded.members[0].data.values == [1.0]
    assert [i.hash for i in store.find(class_name="tests.persistable.Ensemble")] == [h]
    assert [i.hash for i in store.find(class_name=Ensemble)] == [h]


def test_same_config_put_twice_is_one_artifact(store: Store) -> None:
    a = Scaler(True, Data([1.0, 2.0]))
    a.build()
    b = Scaler(True, Data([1.0, 2.0]))
    b.build()
    assert store.put(a) == store.put(b)
    assert len(store.find(class_name="tests.persistable.Scaler")) == 1
