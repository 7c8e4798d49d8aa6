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
import re
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


def _canonical_json(body: dict[str, Any]) -> bytes:
    # Compact separators keep json on its C encoder (indent would force the slow Python one).
    text = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return text.encode("ascii")


def _checksum(body: dict[str, Any]) -> str:
    return str(xxhash.xxh3_128_hexdigest(_canonical_json(body)))


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
    canonical = _canonical_json(body)
    checksum = xxhash.xxh3_128_hexdigest(canonical)
    # The document is {"casml_manifest": body, "checksum": ...} in canonical JSON; the body is
    # encoded once and spliced in ("casml_manifest" sorts before "checksum"), not twice.
    return b'{"casml_manifest":' + canonical + b',"checksum":"' + checksum.encode() + b'"}'


_HEX32 = re.compile(r"[0-9a-f]{32}")


def _key(value: object, what: str) -> str:
    # Every digest and address becomes a storage path later: only exact keys pass.
    if not isinstance(value, str) or not _HEX32.fullmatch(value):
        raise ValueError(f"{what} {value!r} is not 32 lowercase hex characters")
    return value


def _size(value: object, what: str) -> int:
    if type(value) is not int or value < 0:
        raise ValueError(f"{what} {value!r} is not a byte count")
    return value


def _text(value: object, what: str) -> str:
    if not isinstance(value, str):
        raise ValueError(f"{what} {value!r} is not a string")
    return value


def _parse(body: dict[str, Any]) -> Manifest:
    """Build a Manifest from a checked body, refusing fields of the wrong type or shape.

    A checksum proves the bytes are whole, not that their writer was casml: anyone who can
    write to the storage can forge one. So every field is checked as if hostile.
    """
    payload = body["payload"]
    if not isinstance(payload, dict):
        raise ValueError("the payload is not an object")
    inline = payload.get("inline")
    codec = body["codec"]
    if not isinstance(codec, dict) or type(codec.get("version")) is not int:
        raise ValueError(f"the codec {codec!r} is not a name and an int version")
    module = body.get("module")
    return Manifest(
        address=_key(body["address"], "address"),
        kind=_text(body["kind"], "kind"),
        class_name=_text(body["class_name"], "class name"),
        module=None if module is None else _text(module, "module"),
        created_at=datetime.fromisoformat(_text(body["created_at"], "created_at")),
        codec=_text(codec["name"], "codec name"),
        codec_version=codec["version"],
        payload_digest=_key(payload["digest"], "payload digest"),
        payload_size=_size(payload["size"], "payload size"),
        inline_payload=None
        if inline is None
        else base64.b64decode(_text(inline, "inline payload"), validate=True),
        buffers=tuple(
            tuple((_key(d, "chunk digest"), _size(s, "chunk size")) for d, s in chunks)
            for chunks in body.get("buffers", [])
        ),
        dependencies=tuple(_key(d, "dependency") for d in body.get("dependencies", [])),
        lazy_refs={
            _text(k, "attribute"): _key(v, "reference")
            for k, v in body.get("lazy_refs", {}).items()
        },
        hash_attributes=tuple(_text(a, "attribute") for a in body.get("hash_attributes", [])),
        versions={str(k): str(v) for k, v in body.get("versions", {}).items()},
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
        if not isinstance(document, dict) or not isinstance(document.get("casml_manifest"), dict):
            raise corrupt("not a casml manifest")
        body = document["casml_manifest"]
        checksum = _checksum(body)
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:
        # RecursionError: JSON nested thousands deep, which no manifest is.
        raise corrupt(f"not valid JSON: {type(exc).__name__}: {exc}") from None
    if document.get("checksum") != checksum:
        raise corrupt("checksum mismatch")
    if body.get("format") != MANIFEST_FORMAT:
        raise IntegrityError(
            f"manifest of artifact {address} has format {body.get('format')!r}, which this "
            f"casml {__version__} cannot read; upgrade casml"
        )
    if body.get("address") != address:
        raise corrupt(f"it describes artifact {body.get('address')!r}")
    try:
        manifest = _parse(body)
    except (KeyError, TypeError, ValueError, AttributeError, OverflowError) as exc:
        raise corrupt(f"missing or malformed field: {exc}") from None
    if manifest.kind not in KINDS:
        raise corrupt(f"unknown kind {manifest.kind!r}")
    return manifest
