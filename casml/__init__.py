"""casml: a content-addressed artifact store with a SQL metadata index for ML work.

``h = store.put(obj)`` stores anything casml can encode under a canonical hash;
``store.get(h)`` brings it back on any machine that reaches the same storage. See
README.md for the quickstart and docs/ for the hashing spec and the storage layout.
"""

from casml._version import __version__
from casml.errors import (
    AmbiguousHashError,
    CasmlError,
    IntegrityError,
    InvalidHashError,
    NotFoundError,
    PickleNotAllowedError,
    StorageError,
    UnhashableError,
    UnregisteredClassError,
)
from casml.hashing import hash_value, register_hasher

__all__ = [
    "AmbiguousHashError",
    "CasmlError",
    "IntegrityError",
    "InvalidHashError",
    "NotFoundError",
    "PickleNotAllowedError",
    "StorageError",
    "UnhashableError",
    "UnregisteredClassError",
    "__version__",
    "hash_value",
    "register_hasher",
]
