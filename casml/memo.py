"""Memoized functions: ``@store.cache`` keys a call by the function's code and arguments.

A call's address is the canonical hash of the function (qualified name, source fingerprint,
closure and defaults) and of its bound arguments with defaults applied, so ``f(1)`` and
``f(1, b=2)`` with ``b=2`` the default are one call and keyword order does not matter.
Editing the function's body changes the address: a cache miss, never a stale hit.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any, Generic, ParamSpec, TypeVar

from casml.hashing import hash_value

if TYPE_CHECKING:
    from casml.store import Store

__all__ = ["CachedFunction"]

Params = ParamSpec("Params")
Result = TypeVar("Result")


class CachedFunction(Generic[Params, Result]):
    """A function whose results are stored in a Store and reused for equal calls.

    Call it like the function. ``call_hash(...)`` gives the address a call would use,
    ``is_cached(...)`` tells whether it is stored, without running anything.
    """

    def __init__(
        self,
        store: Store,
        fn: Callable[Params, Result],
        *,
        ignore: Iterable[str] = (),
        name: str | None = None,
    ) -> None:
        self._store = store
        self._fn = fn
        self._signature = inspect.signature(fn)
        self.ignore = frozenset(ignore)
        unknown = self.ignore - set(self._signature.parameters)
        if unknown:
            raise ValueError(
                f"ignore names parameters {sorted(unknown)} that {fn.__qualname__} does not have"
            )
        self.name = name or f"{fn.__module__}.{fn.__qualname__}"
        self._function_hash = hash_value(fn)
        functools.update_wrapper(self, fn)

    def _arguments(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> dict[str, Any]:
        bound = self._signature.bind(*args, **kwargs)
        bound.apply_defaults()
        return {k: v for k, v in bound.arguments.items() if k not in self.ignore}

    def call_hash(self, *args: Params.args, **kwargs: Params.kwargs) -> str:
        """The address this call's result is stored under."""
        arguments = self._arguments(args, kwargs)
        return hash_value(("casml.cache", self.name, self._function_hash, arguments))

    def is_cached(self, *args: Params.args, **kwargs: Params.kwargs) -> bool:
        """True if this call's result is already stored (nothing is run)."""
        return self._store.exists(self.call_hash(*args, **kwargs))

    def __call__(self, *args: Params.args, **kwargs: Params.kwargs) -> Result:
        address = self.call_hash(*args, **kwargs)
        found, value = self._store._lookup(address)
        if found:
            return value  # type: ignore[no-any-return]
        result = self._fn(*args, **kwargs)
        self._store._put_call_result(
            result, address, name=self.name, inputs=self._arguments(args, kwargs)
        )
        return result

    def __repr__(self) -> str:
        return f"<cached {self.name} in {self._store!r}>"
