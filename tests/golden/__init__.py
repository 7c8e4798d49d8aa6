"""Golden hash vectors shared by the tests and by `python -m tests.golden --write`."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

HERE = Path(__file__).parent
VECTORS_JSON = HERE / "hash_vectors.json"


def load_vectors_module() -> ModuleType:
    """Import vectors.py under the fixed name ``golden_vectors`` (qualnames enter hashes)."""
    if "golden_vectors" in sys.modules:
        return sys.modules["golden_vectors"]
    spec = importlib.util.spec_from_file_location("golden_vectors", HERE / "vectors.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["golden_vectors"] = module
    spec.loader.exec_module(module)
    return module


def load_expected() -> dict[str, Any]:
    return json.loads(VECTORS_JSON.read_text())
