"""scikit-learn glue: hash estimators by their parameters, store them through skops.

Estimators enter ``casml.hash_value`` by class and ``get_params(deep=False)`` (nested
estimators recursively, through the same hasher), never by fitted state, so a configuration's
hash is known before it is trained. In stored state every scikit-learn object becomes skops
bytes; loading them accepts only types from scikit-learn, numpy and scipy (plus module
prefixes the user trusted with :func:`trust_modules`), so reading a model runs no pickle and
no code from the store.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import skops.io
from sklearn.base import BaseEstimator

from casml.errors import CasmlError, IntegrityError, PickleNotAllowedError
from casml.hashing import register_hasher

__all__ = [
    "TRUSTED_MODULE_PREFIXES",
    "dump_sklearn",
    "estimator_standin",
    "load_sklearn",
    "restore_sklearn_state",
    "sklearn_state",
    "trust_modules",
    "untrusted",
]

#: Type-name prefixes whose types skops may rebuild: the libraries a fitted model is made of.
TRUSTED_MODULE_PREFIXES: tuple[str, ...] = ("sklearn.", "numpy.", "scipy.")

# Prefixes added by the user for their own estimator classes; process-wide, like the class
# registry, because a Persistable's restore has no Store to ask.
_user_prefixes: set[str] = set()


def trust_modules(*prefixes: str) -> None:
    """Let stored models hold types from these modules: ``trust_modules("myproject.")``.

    Only do this for code you control and have installed: skops will rebuild objects of
    those types (without pickle, but running their ``__setstate__``). A prefix should end
    with a dot to match a package and its submodules, not a package with a longer name.
    """
    for prefix in prefixes:
        if not isinstance(prefix, str) or not prefix.strip("."):
            raise CasmlError(
                f"trust_modules takes module prefixes such as 'myproject.': {prefix!r}"
            )
        _user_prefixes.add(prefix)


def _is_trusted(type_name: str) -> bool:
    if type_name == "numpy":
        return True
    return any(type_name.startswith(p) for p in (*TRUSTED_MODULE_PREFIXES, *_user_prefixes))


def untrusted(type_names: Iterable[str]) -> list[str]:
    """The names among ``type_names`` that belong to no trusted module, sorted."""
    return sorted({name for name in type_names if not _is_trusted(name)})


def _refusal(types: list[str], what: str, when: str) -> PickleNotAllowedError:
    return PickleNotAllowedError(
        f"{what} {when} objects of types outside scikit-learn, numpy and scipy: "
        f"{', '.join(types)}. casml loads models without pickle and trusts only those "
        "libraries; if these types come from your own installed code, call "
        "casml.ml.trust_modules('yourpackage.') before storing or loading"
    )


def dump_sklearn(value: Any, what: str) -> bytes:
    """Serialize a scikit-learn object (or a list/tuple/dict of them) to skops bytes.

    Refuses values that could not be loaded back under the trusted modules, so a store never
    holds an artifact whose every later ``get`` would fail.
    """
    try:
        data: bytes = skops.io.dumps(value)
        found = skops.io.get_untrusted_types(data=data)
    except (TypeError, ValueError, AttributeError, NotImplementedError) as exc:
        raise CasmlError(f"{what} cannot be stored through skops: {exc}") from exc
    refused = untrusted(found)
    if refused:
        raise _refusal(refused, what, "would hold")
    return data


def load_sklearn(data: bytes | bytearray | memoryview, what: str) -> Any:
    """Rebuild a value from skops bytes, trusting only types of trusted modules."""
    raw = bytes(data)
    try:
        found = skops.io.get_untrusted_types(data=raw)
    except Exception as exc:  # a damaged zip or schema surfaces as many exception types
        raise IntegrityError(
            f"{what}: the stored skops payload cannot be read ({type(exc).__name__}: {exc}); "
            "run `casml verify`"
        ) from None
    refused = untrusted(found)
    if refused:
        raise _refusal(refused, what, "holds")
    try:
        return skops.io.loads(raw, trusted=list(found))
    except Exception as exc:
        raise IntegrityError(
            f"{what}: the stored skops payload cannot be loaded ({type(exc).__name__}: {exc}); "
            "was it written by an incompatible scikit-learn or skops version?"
        ) from None


def sklearn_state(state: dict[str, Any], attributes: Iterable[str], owner: str) -> dict[str, Any]:
    """Replace the scikit-learn values among ``attributes`` in ``state`` by skops bytes."""
    for attribute in attributes:
        if attribute in state and state[attribute] is not None:
            state[attribute] = dump_sklearn(state[attribute], f"{owner}.{attribute}")
    return state


def restore_sklearn_state(
    state: dict[str, Any], attributes: Iterable[str], owner: str
) -> dict[str, Any]:
    """Undo :func:`sklearn_state`: rebuild each skops-encoded attribute in ``state``."""
    restored = dict(state)
    for attribute in attributes:
        value = restored.get(attribute)
        if isinstance(value, (bytes, bytearray, memoryview)):
            restored[attribute] = load_sklearn(value, f"{owner}.{attribute}")
    return restored


def _canonical_param(value: Any) -> Any:
    # numpy's callables (ufuncs such as np.log1p, dispatchers such as np.mean) are not
    # Python functions, so hash_value has no encoding for them; their name identifies them.
    cls = type(value)
    if cls.__module__.partition(".")[0] == "numpy" and callable(value):
        name = getattr(value, "__qualname__", None) or getattr(value, "__name__", None)
        if isinstance(name, str):
            return ("numpy.callable", getattr(value, "__module__", None) or "numpy", name)
    if isinstance(value, list):
        return [_canonical_param(item) for item in value]
    if isinstance(value, tuple) and not hasattr(value, "_fields"):
        return tuple(_canonical_param(item) for item in value)
    if isinstance(value, Mapping) and type(value) is dict:
        return {key: _canonical_param(item) for key, item in value.items()}
    return value


def estimator_standin(estimator: Any) -> Any:
    """What an estimator hashes as: its class and constructor parameters, never its fit."""
    cls = type(estimator)
    params = estimator.get_params(deep=False)
    return (
        f"{cls.__module__}.{cls.__qualname__}",
        {key: _canonical_param(value) for key, value in params.items()},
    )


def _register() -> None:
    register_hasher(BaseEstimator, estimator_standin)


_register()
