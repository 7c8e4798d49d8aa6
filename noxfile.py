"""Developer sessions: `nox -s lint typecheck tests` before every commit."""

from __future__ import annotations

import nox

nox.options.sessions = ["lint", "typecheck", "tests"]
nox.options.reuse_existing_virtualenvs = True

PYTHON = "3.11"


@nox.session(python=PYTHON)
def tests(session: nox.Session) -> None:
    """Unit tests (no server needed)."""
    session.install("-e", ".[dev,ml,s3,postgres,mysql]")
    session.run("pytest", "-m", "not integration", *session.posargs)


@nox.session(python=PYTHON)
def integration(session: nox.Session) -> None:
    """Tests against real servers the fixtures start (PostgreSQL, MariaDB, S3)."""
    session.install("-e", ".[dev,ml,s3,postgres,mysql]")
    session.run("pytest", "-m", "integration", *session.posargs)


@nox.session(python=PYTHON)
def lint(session: nox.Session) -> None:
    """ruff check and ruff format --check."""
    session.install("ruff")
    session.run("ruff", "check", ".")
    session.run("ruff", "format", "--check", ".")


@nox.session(python=PYTHON)
def typecheck(session: nox.Session) -> None:
    """mypy --strict on the package."""
    session.install("-e", ".[dev]")
    session.run("mypy", "casml")


@nox.session(python=PYTHON)
@nox.parametrize(
    "stack",
    [
        nox.param(("numpy==1.26.4", "pandas==2.2.3"), id="numpy1-pandas2"),
        nox.param(("numpy>=2,<3", "pandas>=3,<4"), id="numpy2-pandas3"),
    ],
)
def golden(session: nox.Session, stack: tuple[str, str]) -> None:
    """Check the golden hash vectors under an older and the current numpy/pandas stack."""
    session.install("-e", ".", "pytest", "hypothesis", *stack)
    session.run(
        "python", "-c", "import numpy, pandas; print(numpy.__version__, pandas.__version__)"
    )
    session.run("pytest", "tests/test_golden.py", "-p", "no:cacheprovider", *session.posargs)


@nox.session(python=PYTHON)
def bench(session: nox.Session) -> None:
    """Side-by-side benchmarks; prints ratios against the tools users would pick instead."""
    session.install("-e", ".[dev,ml,s3]")
    for script in ("bench_hashing.py", "bench_store.py", "bench_cache.py", "bench_remote.py"):
        session.run("python", f"benchmarks/{script}", *session.posargs)
