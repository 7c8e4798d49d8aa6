"""Regenerate tests/golden/hash_vectors.json: only together with a format version bump."""

from __future__ import annotations

import json
import sys

from casml.hashing import HASH_FORMAT_VERSION, hash_value
from tests.golden import VECTORS_JSON, load_vectors_module

if __name__ == "__main__":
    if "--write" not in sys.argv:
        sys.exit("refusing to overwrite golden digests without --write (bump the format first)")
    values = load_vectors_module().all_vectors()
    digests = {name: hash_value(value) for name, value in sorted(values.items())}
    document = {"format_version": HASH_FORMAT_VERSION, "digests": digests}
    VECTORS_JSON.write_text(json.dumps(document, indent=1, sort_keys=True) + "\n")
    print(f"wrote {len(digests)} digests to {VECTORS_JSON}")
