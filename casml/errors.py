"""The exception hierarchy: every error casml raises on purpose derives from CasmlError.

Catch ``casml.CasmlError`` to handle anything casml refuses; catch a subclass to react to one
situation. Several also derive from the builtin a caller would already expect
(``NotFoundError`` is a ``KeyError``, ``UnhashableError`` a ``TypeError``,
``InvalidHashError`` a ``ValueError``), so existing ``except`` clauses keep working.
"""

from __future__ import annotations

__all__ = [
    "AmbiguousHashError",
    "CasmlError",
    "IntegrityError",
    "InvalidHashError",
    "NotFoundError",
    "PickleNotAllowedError",
    "RegistrationError",
    "StorageError",
    "UnhashableError",
    "UnregisteredClassError",
]


class CasmlError(Exception):
    """Base class of every error casml raises deliberately."""


class NotFoundError(CasmlError, KeyError):
    """No artifact is stored under the given hash, prefix or name."""

    def __str__(self) -> str:
        # KeyError quotes its argument; a sentence reads better unquoted.
        return str(self.args[0]) if self.args else "not found"


class AmbiguousHashError(CasmlError, KeyError):
    """A hash prefix matches more than one artifact; give more characters."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else "ambiguous hash prefix"


class InvalidHashError(CasmlError, ValueError):
    """A key is not a hash: it must be 8 to 32 lowercase hex characters."""


class UnhashableError(CasmlError, TypeError):
    """A value cannot be hashed deterministically (the message names its type and path)."""


class UnregisteredClassError(CasmlError):
    """A stored class name maps to no registered class, and importing its module did not help."""


class RegistrationError(CasmlError, TypeError):
    """Two different classes claim one registered name, or a name or declaration is invalid."""


class IntegrityError(CasmlError):
    """Stored bytes do not match their digest, or a manifest is truncated or corrupt."""


class PickleNotAllowedError(CasmlError):
    """The object needs pickle, and the Store was not opened with ``allow_pickle=True``."""


class StorageError(CasmlError):
    """The storage backend or the index database failed; the message says which and why."""
