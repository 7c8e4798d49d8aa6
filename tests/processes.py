"""Run test worker processes to completion: one result each, every one exiting cleanly."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any


def collect(procs: Sequence[Any], results: Any, *, timeout: float = 120.0) -> list[Any]:
    """Start ``procs``, take one item per process from the ``results`` queue, join them all.

    Results are read before joining: a child blocks on exit until its queued item is read.
    Fails the test if a process does not exit with status 0.
    """
    for proc in procs:
        proc.start()
    items = [results.get(timeout=timeout) for _ in procs]
    for proc in procs:
        proc.join(timeout=60)
        assert proc.exitcode == 0, f"{proc.name} exited with {proc.exitcode}"
    return items
