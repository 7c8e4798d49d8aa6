"""ArtifactInfo: what the index knows about one stored artifact."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

__all__ = ["ArtifactInfo"]


@dataclass(frozen=True)
class ArtifactInfo:
    """Describe one artifact: its address, class, name/version, size, tags and dependencies.

    ``name`` and ``version`` are those of the naming this record was found through (``find``
    by name), or the artifact's most recent naming; both are ``None`` for an unnamed artifact.
    ``size`` is the logical payload size in bytes (what ``get`` reads), before deduplication.
    ``dependencies`` are the hashes of the Persistables it references directly.
    """

    hash: str
    class_name: str
    name: str | None
    version: int | None
    size: int
    created_at: datetime
    tags: dict[str, str] = field(default_factory=dict)
    dependencies: tuple[str, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        """Return a JSON-ready dict with the same field names (``created_at`` as ISO 8601)."""
        return {
            "hash": self.hash,
            "class_name": self.class_name,
            "name": self.name,
            "version": self.version,
            "size": self.size,
            "created_at": self.created_at.isoformat(),
            "tags": dict(self.tags),
            "dependencies": list(self.dependencies),
        }
