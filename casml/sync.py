"""Move artifacts between stores: push and pull transfer only what the other side lacks.

A transfer takes the dependency closure of the requested artifacts, copies the blobs the
target does not have, then writes manifests dependencies-first, then index rows, then the
name and tag records. A manifest is written only once every blob it lists is in place, so
an interrupted transfer never leaves a visible half-artifact; running it again completes it.
"""

from __future__ import annotations

from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING

from casml.errors import IntegrityError, NotFoundError
from casml.manifest import Manifest, load_manifest

if TYPE_CHECKING:
    from casml.store import Store

__all__ = ["TransferReport", "transfer"]

# Object stores answer one request per round trip: keep several in flight.
_WORKERS = 16
# Above this many artifacts, one listing of the target beats one existence check each.
_LIST_THRESHOLD = 64
# From this many manifests at one dependency level, a push to an object store packs them.
_PACK_MIN = 16


@dataclass(frozen=True)
class TransferReport:
    """What a push or pull moved (zero everywhere when the target was up to date)."""

    artifacts: int
    blobs: int
    bytes: int
    records: int


def _closure(source: Store, roots: Iterable[str]) -> tuple[list[str], dict[str, bytes]]:
    """Every artifact the roots need, dependencies first, with their raw manifests."""
    raw: dict[str, bytes] = {}
    order: list[str] = []
    state: dict[str, int] = {}  # 1 = visiting, 2 = done
    for root in roots:
        stack: list[tuple[str, bool]] = [(root, False)]
        while stack:
            address, expanded = stack.pop()
            if expanded:
                state[address] = 2
                order.append(address)
                continue
            if state.get(address):
                continue
            state[address] = 1
            data = source._blobs.get_manifest(address)
            raw[address] = data
            manifest = load_manifest(data, address)
            stack.append((address, True))
            for dependency in reversed(manifest.dependencies):
                if not state.get(dependency):
                    stack.append((dependency, False))
    return order, raw


def _levels(addresses: list[str], manifests: dict[str, Manifest]) -> list[list[str]]:
    """Group ``addresses`` (in dependency order) so each group depends only on earlier ones."""
    depth: dict[str, int] = {}
    for address in addresses:  # dependencies come first in this order
        deps = [depth[d] for d in manifests[address].dependencies if d in depth]
        depth[address] = 1 + max(deps, default=-1)
    levels: list[list[str]] = [[] for _ in range(max(depth.values(), default=-1) + 1)]
    for address in addresses:
        levels[depth[address]].append(address)
    return levels


def _present(target: Store, addresses: list[str]) -> set[str]:
    if len(addresses) > _LIST_THRESHOLD:
        return set(target._blobs.iter_manifests()) & set(addresses)
    return {a for a in addresses if target._blobs.has_manifest(a)}


def transfer(source: Store, target: Store, hashes: Iterable[str] | None = None) -> TransferReport:
    """Copy the artifacts ``hashes`` (default: all) and their dependencies to ``target``."""
    if hashes is None:
        roots = sorted(source._blobs.iter_manifests())
    else:
        roots = [source._resolve(h) for h in hashes]
    order, raw = _closure(source, roots)
    manifests: dict[str, Manifest] = {a: load_manifest(raw[a], a) for a in order}
    present = _present(target, order)
    to_copy = [a for a in order if a not in present]

    needed: dict[str, int] = {}
    for address in to_copy:
        for digest, size in manifests[address].blob_list():
            needed[digest] = size
    lacking = sorted(target._blobs.missing(needed))

    def copy_blob(digest: str) -> int:
        data = source._blobs.get_bytes(digest)  # verified against its digest
        if target._blobs.put_bytes(data) != digest:
            raise IntegrityError(f"blob {digest} changed in transit; run the transfer again")
        return len(data)

    with ThreadPoolExecutor(max_workers=_WORKERS) as pool:
        copied_bytes = sum(pool.map(copy_blob, lacking))
        # Dependencies first: manifests go level by level (each level's dependencies are all
        # written), so none is ever visible before what it references.
        for level in _levels(to_copy, manifests):
            if len(level) >= _PACK_MIN and not target._blobs.is_local:
                # One object instead of one per manifest: object stores charge per request.
                target._blobs.put_pack({a: raw[a] for a in level})
            else:
                list(pool.map(lambda a: target._blobs.put_manifest(a, raw[a]), level))

    unindexed = target._index.missing(order)
    for address in order:
        if address in unindexed:
            target._index.add(target._record(manifests[address]))

    records = _copy_records(source, target, set(order))
    return TransferReport(len(to_copy), len(lacking), copied_bytes, records)


def _copy_records(source: Store, target: Store, addresses: set[str]) -> int:
    """Copy the name and tag records of ``addresses`` and apply them to the target index."""
    existing = set(target._blobs.iter_records())
    copied = 0
    for key, data, record in source._records():
        address = record.get("address")
        # Records come from storage: a forged one may hold any JSON here, even a list.
        if not isinstance(address, str) or address not in addresses:
            continue
        if key not in existing:
            target._blobs.put_record(data)
            copied += 1
        try:
            target._apply_record(record)
        except NotFoundError:
            continue
    return copied
