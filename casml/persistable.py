"""Persistable: the base class of stored ML objects whose hash is known before training.

A subclass names the init-time attributes that define its identity in ``hash_attributes``.
``obj.hash_`` is computed from the registered class name and those attributes alone, so
``store.get_or_build(obj)`` can tell whether this configuration was trained before without
training it. Everything else on the instance (fitted weights, metrics) is state: stored,
but never part of the identity.
"""

from __future__ import annotations

import keyword
from collections.abc import Callable
from typing import Any, ClassVar

from casml import registry
from casml.errors import RegistrationError
from casml.hashing import hash_value

__all__ = ["LazyReference", "Persistable"]

# Instance-dict key holding references not yet loaded; never part of the stored state.
LAZY_KEY = "_casml_lazy"


class LazyReference:
    """A stored dependency not loaded yet: its hash, and how to load it on first access."""

    __slots__ = ("hash", "loader")
    # Hashes exactly like the Persistable it stands for (see Persistable.__casml_hash__).
    __casml_type_name__ = "casml.Persistable"

    def __init__(self, hash: str, loader: Callable[[str], Any]) -> None:
        self.hash = hash
        self.loader = loader

    def __casml_hash__(self) -> str:
        return self.hash

    def load(self) -> Any:
        """Load the referenced object from its store."""
        return self.loader(self.hash)

    def __repr__(self) -> str:
        return f"LazyReference({self.hash!r})"


class Persistable:
    """Base class of every stored ML object; subclass it and list ``hash_attributes``.

    ``hash_attributes`` names the init-time attributes that define the object's identity;
    they may hold any value ``casml.hash_value`` accepts, including other Persistables (which
    enter by their hash and are stored as references). ``build()`` does the expensive work
    and runs only for configurations not stored yet. Register under a stable name with
    ``class Scaler(Persistable, name="myproject.Scaler")``; the default is
    ``"module:QualName"``.
    """

    hash_attributes: ClassVar[tuple[str, ...]] = ()
    __casml_name__: ClassVar[str] = "casml.persistable:Persistable"
    __casml_type_name__: ClassVar[str] = "casml.Persistable"

    def __init_subclass__(cls, *, name: str | None = None, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        attributes = cls.__dict__.get("hash_attributes", cls.hash_attributes)
        if isinstance(attributes, str) or not all(isinstance(a, str) for a in attributes):
            raise RegistrationError(
                f"{cls.__qualname__}.hash_attributes must be a tuple of attribute names, "
                f"got {attributes!r}"
            )
        for attribute in attributes:
            if not attribute.isidentifier() or keyword.iskeyword(attribute):
                raise RegistrationError(
                    f"{cls.__qualname__}.hash_attributes has {attribute!r}, not an attribute name"
                )
            if attribute.startswith("_casml"):
                raise RegistrationError(f"{attribute!r}: names starting _casml are reserved")
        cls.hash_attributes = tuple(attributes)
        cls.__casml_name__ = registry.register(cls, name)

    @property
    def hash_(self) -> str:
        """The artifact address: a hash of the class's registered name and hash_attributes."""
        return hash_value(("casml.Persistable", type(self).__casml_name__, self._casml_identity()))

    def _casml_identity(self) -> dict[str, Any]:
        """The values that define this object: each of ``hash_attributes`` by name."""
        values: dict[str, Any] = {}
        lazy: dict[str, LazyReference] = self.__dict__.get(LAZY_KEY) or {}
        for attribute in type(self).hash_attributes:
            if attribute in self.__dict__:
                values[attribute] = self.__dict__[attribute]
            elif attribute in lazy:
                values[attribute] = lazy[attribute]
            else:
                try:
                    values[attribute] = getattr(self, attribute)
                except AttributeError:
                    raise RegistrationError(
                        f"{type(self).__qualname__}.hash_attributes names {attribute!r}, but "
                        "the instance has no such attribute: set it in __init__"
                    ) from None
        return values

    def __casml_hash__(self) -> str:
        # Nested in another value, a Persistable enters by its hash, which already names
        # its class; LazyReference hashes the same way.
        return self.hash_

    def build(self) -> None:
        """Do the expensive work (fit, compute); ``get_or_build`` calls it only when new."""

    def __getattr__(self, name: str) -> Any:
        # Only reached when normal lookup fails: load a lazily referenced dependency.
        lazy = self.__dict__.get(LAZY_KEY)
        if lazy and name in lazy:
            value = lazy[name].load()
            self.__dict__[name] = value
            del lazy[name]
            return value
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    def __casml_state__(self) -> dict[str, Any]:
        """The instance state to store: every attribute, with lazy references unresolved."""
        state = {k: v for k, v in self.__dict__.items() if not k.startswith("_casml")}
        for attribute, reference in (self.__dict__.get(LAZY_KEY) or {}).items():
            state[attribute] = reference
        return state

    @classmethod
    def __casml_restore__(
        cls, state: dict[str, Any], lazy: dict[str, LazyReference]
    ) -> Persistable:
        """Rebuild an instance from stored state without calling ``__init__``."""
        obj = cls.__new__(cls)
        obj.__dict__.update(state)
        if lazy:
            obj.__dict__[LAZY_KEY] = dict(lazy)
        return obj
