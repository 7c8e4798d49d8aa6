"""The SQL metadata index: artifacts, blobs, dependency edges, names/versions and tags.

Open it with ``Index(url)`` on any SQLAlchemy URL (SQLite by default); record artifacts
with :meth:`Index.add` and an :class:`ArtifactRecord`; query with ``info``, ``find``,
``latest``, ``versions``, ``dependencies`` and ``dependents``. It knows nothing of the blob
storage: the Store tells it what was written.
"""

from casml.index.index import SCHEMA_VERSION, ArtifactRecord, Index, insert_ignore
from casml.index.tables import INDEX_METADATA, INDEX_TABLES

__all__ = [
    "INDEX_METADATA",
    "INDEX_TABLES",
    "SCHEMA_VERSION",
    "ArtifactRecord",
    "Index",
    "insert_ignore",
]
