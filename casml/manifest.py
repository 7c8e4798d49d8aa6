"""Manifests: the immutable, self-checking description of one artifact in storage.

A manifest is enough to load the artifact and to rebuild its index rows: class, identity,
dependencies, the payload and buffer blobs with their sizes, the codec and the versions
that wrote it. It is JSON (readable with ``cat`` in an incident) carrying an xxh3-128
checksum of its own canonical body, so a truncated or bit-flipped manifest is detected
rather than misread.
"""

from __future__ import annotations

import base64
import json
import platform
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import xxhash

from casml._version import __version__
from casml.errors import IntegrityError

__all__ = ["MANIFEST_FORMAT", "Manifest", "dump_manifest", "load_manifest"]

MANIFEST_FORMAT = 1
KINDS = ("value", "persistable")


@dataclass(frozen=True)
class Manifest:
    """Everything stored about one artifact except its bytes."""

    address: str
    kind: str  # "value" or "persistable"
    class_name: str  # registered name for persistables, "module.QualName" for values
    module: str | None  # where a persistable's class is defined, for the registry
    created_at: datetime
    codec: str
    codec_version: int
    payload_digest: str
    payload_size: int
    inline_payload: bytes | None = None  # small payloads live in the manifest itself
    buffers: tuple[tuple[tuple[str, int], ...], ...] = ()  # per buffer: its chunks
    dependencies: tuple[str, ...] = ()  # every referenced artifact, in first-use order
    lazy_refs: dict[str, str] = field(default_factory=dict)  # attribute -> address
    hash_attributes: tuple[str, ...] = ()
    versions: dict[str, str] = field(default_factory=dict)

    @property
    def size(self) -> int:
        """Logical bytes: the payload plus every out-of-band buffer."""
        return self.payload_size + sum(size for chunks in self.buffers for _, size in chunks)

    def blob_list(self) -> list[tuple[str, int]]:
        """Every blob this artifact needs, in order (the payload first unless inline)."""
        blobs = (
            [] if self.inline_payload is not None else [(self.payload_digest, self.payload_size)]
        )
        for chunks in self.buffers:
            blobs.extend(chunks)
        return blobs


def writer_versions() -> dict[str, str]:
    """The versions recorded in new manifests (for support, never for loading decisions)."""
    return {"casml": __version__, "python": platform.python_version()}


def _checksum(body: dict[str, Any]) -> str:
    canonical = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return str(xxhash.xxh3_128_hexdigest(canonical.encode("ascii")))


def dump_manifest(manifest: Manifest) -> bytes:
    """Serialize a manifest to its stored bytes (JSON with a checksum of its body)."""
    body: dict[str, Any] = {
        "format": MANIFEST_FORMAT,
        "address": manifest.address,
        "kind": manifest.kind,
        "class_name": manifest.class_name,
        "module": manifest.module,
        "created_at": manifest.created_at.isoformat(),
        "codec": {"name": manifest.codec, "version": manifest.codec_version},
        "payload": {
            "digest": manifest.payload_digest,
            "size": manifest.payload_size,
            "inline": None
            if manifest.inline_payload is None
            else base64.b64encode(manifest.inline_payload).decode("ascii"),
        },
        "buffers": [[[d, s] for d, s in chunks] for chunks in manifest.buffers],
        "dependencies": list(manifest.dependencies),
        "lazy_refs": dict(manifest.lazy_refs),
        "hash_attributes": list(manifest.hash_attributes),
        "versions": dict(manifest.versions),
    }
    document = {"casml_manifest": body, "checksum": _checksum(body)}
    # Compact separators keep json on its C encoder (indent would force the slow Python one).
    return json.dumps(document, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode(
        "ascii"
    )


def load_manifest(data: bytes, address: str) -> Manifest:
    """Parse and check stored manifest bytes; IntegrityError says what is wrong and what to do."""

    def corrupt(reason: str) -> IntegrityError:
        return IntegrityError(
            f"manifest of artifact {address} is corrupt or truncated ({reason}); run "
            "`casml verify` to list damaged artifacts, then restore this one from a remote "
            "(store.pull) or put it again"
        )

    try:
        document = json.loads(data)
    except (ValueError, UnicodeDecodeError) as exc:
        raise corrupt(f"not valid JSON: {exc}") from None
    if not isinstance(document, dict) or not isinstance(document.get("casml_manifest"), dict):
        raise corrupt("not a casml manifest")
    body = document["casml_manifest"]
    if document.get("checksum") != _checksum(body):
        raise corrupt("checksum mismatch")
    if body.get("format") != MANIFEST_FORMAT:
        raise IntegrityError(
            f"manifest of artifact {address} has format {body.get('format')!r}, which this "
            f"casml {__version__} cannot read; upgrade casml"
        )
    if body.get("address") != address:
        raise corrupt(f"it describes artifact {body.get('address')!r}")
    try:
        payload = body["payload"]
        inline = payload.get("inline")
        manifest = Manifest(
            address=body["address"],
            kind=body["kind"],
            class_name=body["class_name"],
            module=body.get("module"),
            created_at=datetime.fromisoformat(body["created_at"]),
            codec=body["codec"]["name"],
            codec_version=int(body["codec"]["version"]),
            payload_digest=payload["digest"],
            payload_size=int(payload["size"]),
            inline_payload=None if inline is None else base64.b64decode(inline, validate=True),
            buffers=tuple(
                tuple((str(d), int(s)) for d, s in chunks) for chunks in body.get("buffers", [])
            ),
            dependencies=tuple(str(d) for d in body.get("dependencies", [])),
            lazy_refs={str(k): str(v) for k, v in body.get("lazy_refs", {}).items()},
            hash_attributes=tuple(str(a) for a in body.get("hash_attributes", [])),
            versions={str(k): str(v) for k, v in body.get("versions", {}).items()},
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise corrupt(f"missing or malformed field: {exc}") from None
    if manifest.kind not in KINDS:
        raise corrupt(f"unknown kind {manifest.kind!r}")
    return manifest
