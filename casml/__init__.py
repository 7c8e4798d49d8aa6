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
    RegistrationError,
    StorageError,
    UnhashableError,
    UnregisteredClassError,
)
from casml.hashing import hash_value, register_hasher
from casml.info import ArtifactInfo
from casml.memo import CachedFunction
from casml.persistable import Persistable
from casml.store import Store

__all__ = [
    "AmbiguousHashError",
    "ArtifactInfo",
    "CachedFunction",
    "CasmlError",
    "IntegrityError",
    "InvalidHashError",
    "NotFoundError",
    "Persistable",
    "PickleNotAllowedError",
    "RegistrationError",
    "StorageError",
    "Store",
    "UnhashableError",
    "UnregisteredClassError",
    "__version__",
    "hash_value",
    "register_hasher",
]
