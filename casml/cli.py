"""The ``casml`` command: list, inspect, remove, collect, verify, measure and share artifacts.

Every command opens one store: ``--root`` (a folder or fsspec URL) and ``--index`` (a
SQLAlchemy URL), or the environment variables ``CASML_ROOT`` / ``CASML_INDEX``, else the
embedded store in ``$CASML_HOME`` or ``~/.casml``. The options work before the command
(``casml --root R ls``) and after it (``casml ls --root R``). ``--json`` prints JSON whose
artifact objects use :class:`casml.ArtifactInfo`'s field names. A casml error prints
``error: <message>`` on stderr and exits with status 1 (2 for a usage error); ``verify`` exits
with 1 when it finds anything wrong. Progress bars go to stderr, only when it is a terminal.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, is_dataclass
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any, TypeVar

import click

from casml import maintenance
from casml._version import __version__
from casml.errors import CasmlError, IntegrityError, InvalidHashError, NotFoundError
from casml.info import ArtifactInfo
from casml.manifest import load_manifest

if TYPE_CHECKING:
    import pandas as pd

    from casml.store import Store

__all__ = ["cli", "main", "parse_duration"]

_T = TypeVar("_T")
_F = TypeVar("_F", bound=Callable[..., Any])

_DURATION = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*([smhdw]?)\s*$")
_UNITS = {"": 1.0, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, "w": 604800.0}


def parse_duration(text: str) -> float:
    """Turn ``"30s"``, ``"10m"``, ``"2h"``, ``"7d"``, ``"1w"`` or ``"0"`` into seconds."""
    match = _DURATION.match(text.lower())
    if match is None:
        raise ValueError(
            f"{text!r} is not a duration: write a number with an optional unit s, m, h, d or w "
            "(30s, 10m, 2h, 7d, 0)"
        )
    return float(match.group(1)) * _UNITS[match.group(2)]


if TYPE_CHECKING:
    _FloatParam = click.ParamType[float]
else:  # click before 8.2 has no generic ParamType to subscript at run time
    _FloatParam = click.ParamType


class _Duration(_FloatParam):
    name = "DURATION"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        if isinstance(value, (int, float)):
            return float(value)
        try:
            return parse_duration(str(value))
        except ValueError as exc:
            self.fail(str(exc), param, ctx)


def _format_duration(seconds: float) -> str:
    for unit, size in (("d", 86400.0), ("h", 3600.0), ("m", 60.0)):
        if seconds >= size and seconds % size == 0:
            return f"{seconds / size:g}{unit}"
    return f"{seconds:g}s"


def _human(size: int) -> str:
    value = float(size)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{int(value)} B" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


def _when(moment: datetime) -> str:
    return moment.astimezone(timezone.utc).strftime("%Y-%m-%d %H:%M:%S")


# ---------------------------------------------------------------------------- errors


class _CliError(click.ClickException):
    """A failure reported as ``error: <message>`` on stderr, without a traceback."""

    def __init__(self, message: str, exit_code: int = 1) -> None:
        super().__init__(message)
        self.exit_code = exit_code

    def show(self, file: Any = None) -> None:
        click.echo(f"error: {self.format_message()}", err=True)


class _Group(click.Group):
    """A click group that turns casml errors into ``error: ...`` and an exit status."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except InvalidHashError as exc:
            raise _CliError(str(exc), exit_code=2) from exc
        except CasmlError as exc:
            raise _CliError(str(exc)) from exc


def _warn(message: str) -> None:
    click.echo(f"warning: {message}", err=True)


# ---------------------------------------------------------------------------- store selection


@dataclass
class _Selection:
    root: str | None = None
    index: str | None = None


def _store_options(fn: _F) -> _F:
    # No click envvar: an environment value must not beat --root given before the command.
    fn = click.option(
        "--index",
        metavar="URL",
        help="SQLAlchemy URL of the index [env CASML_INDEX; default: a SQLite file by the root]",
    )(fn)
    fn = click.option(
        "--root",
        metavar="PATH|URL",
        help="store folder or fsspec URL [env CASML_ROOT; default: $CASML_HOME or ~/.casml]",
    )(fn)
    return fn


def _open_store(ctx: click.Context, root: str | None, index: str | None) -> Store:
    """Open the store the options (command, then group, then environment) select."""
    from casml.store import Store

    selection = ctx.find_object(_Selection) or _Selection()
    store = Store(
        root or selection.root or os.environ.get("CASML_ROOT") or None,
        index=index or selection.index or os.environ.get("CASML_INDEX") or None,
    )
    ctx.call_on_close(store.close)
    return store


def _progress(iterable: Iterable[_T], *, desc: str, total: int | None) -> Iterable[_T]:
    """A tqdm bar on stderr when it is a terminal; the bare iterable otherwise."""
    if not sys.stderr.isatty():
        return iterable
    from tqdm import tqdm

    return tqdm(iterable, desc=desc, total=total, file=sys.stderr, leave=False, unit="")


def _echo_json(value: Any) -> None:
    click.echo(json.dumps(value, indent=2, sort_keys=False))


def _to_json(value: Any) -> Any:
    if hasattr(value, "to_dict"):
        return value.to_dict()
    if is_dataclass(value) and not isinstance(value, type):
        return asdict(value)
    return value


# ---------------------------------------------------------------------------- the group


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="casml")
@_store_options
@click.pass_context
def cli(ctx: click.Context, root: str | None, index: str | None) -> None:
    """casml: a content-addressed artifact store for ML work.

    Select the store with --root/--index (before or after the command), or CASML_ROOT /
    CASML_INDEX, else the embedded store in $CASML_HOME or ~/.casml.
    """
    ctx.obj = _Selection(root, index)


# ---------------------------------------------------------------------------- ls / show / rm


def _parse_tags(
    ctx: click.Context, param: click.Parameter, values: Sequence[str]
) -> dict[str, str]:
    tags: dict[str, str] = {}
    for value in values:
        key, sep, val = value.partition("=")
        if not sep or not key:
            raise click.BadParameter(f"{value!r} is not KEY=VALUE", ctx=ctx, param=param)
        tags[key] = val
    return tags


def _label(info: ArtifactInfo) -> str:
    return "" if info.name is None else f"{info.name} v{info.version}"


def _table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(headers)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True)).rstrip()]
    for row in rows:
        lines.append("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())
    return "\n".join(lines)


@cli.command("ls")
@click.option("--name", help="only versions of this name (highest version first)")
@click.option("--class", "class_name", metavar="CLASS", help="only this class name")
@click.option(
    "--tag", "tags", multiple=True, callback=_parse_tags, metavar="KEY=VALUE", help="repeatable"
)
@click.option("--json", "as_json", is_flag=True, help="print a JSON list of artifacts")
@_store_options
@click.pass_context
def ls_command(
    ctx: click.Context,
    name: str | None,
    class_name: str | None,
    tags: dict[str, str],
    as_json: bool,
    root: str | None,
    index: str | None,
) -> None:
    """List artifacts, newest first."""
    store = _open_store(ctx, root, index)
    infos = store.find(name=name, class_name=class_name, tags=tags or None)
    if as_json:
        _echo_json([info.to_dict() for info in infos])
        return
    if not infos:
        click.echo("no artifacts match", err=True)
        return
    rows = [
        [
            info.hash[:12],
            _label(info),
            info.class_name,
            _human(info.size),
            _when(info.created_at),
            " ".join(f"{k}={v}" for k, v in sorted(info.tags.items())),
        ]
        for info in infos
    ]
    click.echo(_table(["HASH", "NAME", "CLASS", "SIZE", "CREATED (UTC)", "TAGS"], rows))


def _blobs_of(store: Store, address: str) -> list[tuple[str, int]]:
    """The artifact's blobs from its manifest (the truth), else from the index."""
    with contextlib.suppress(NotFoundError, IntegrityError):
        return load_manifest(store._blobs.get_manifest(address), address).blob_list()
    return store._index.blobs_of(address)


def _brief(store: Store, address: str) -> dict[str, Any]:
    try:
        info = store.info(address)
    except (NotFoundError, IntegrityError):
        return {"hash": address, "class_name": None, "name": None, "version": None}
    return {
        "hash": info.hash,
        "class_name": info.class_name,
        "name": info.name,
        "version": info.version,
    }


@cli.command("show")
@click.argument("hash")
@click.option("--json", "as_json", is_flag=True, help="print a JSON object")
@_store_options
@click.pass_context
def show_command(
    ctx: click.Context, hash: str, as_json: bool, root: str | None, index: str | None
) -> None:
    """Describe one artifact: info, dependencies, dependents, blobs and sizes."""
    store = _open_store(ctx, root, index)
    info = store.info(hash)
    dependents = store._index.dependents(info.hash)
    blob_list = _blobs_of(store, info.hash)
    present = store._blobs.missing(d for d, _ in blob_list)
    if as_json:
        document = info.to_dict()
        document["dependents"] = dependents
        document["blobs"] = [
            {"digest": d, "size": s, "stored": d not in present} for d, s in blob_list
        ]
        document["stored_size"] = sum(dict(blob_list).values())
        _echo_json(document)
        return
    fields = [
        ("hash", info.hash),
        ("class", info.class_name),
        ("name", _label(info) or "-"),
        ("size", f"{_human(info.size)} ({info.size} bytes)"),
        ("created", f"{_when(info.created_at)} UTC"),
        ("tags", " ".join(f"{k}={v}" for k, v in sorted(info.tags.items())) or "-"),
    ]
    for key, value in fields:
        click.echo(f"{key:<9} {value}")
    for title, hashes in (("dependencies", info.dependencies), ("dependents", dependents)):
        click.echo(f"{title} ({len(hashes)}):")
        for address in hashes:
            brief = _brief(store, address)
            label = "" if brief["name"] is None else f"  {brief['name']} v{brief['version']}"
            click.echo(f"  {address}  {brief['class_name'] or '(missing)'}{label}")
    unique = dict(blob_list)
    click.echo(f"blobs ({len(blob_list)}, {_human(sum(unique.values()))} once deduplicated):")
    for digest, size in blob_list:
        missing = "  MISSING" if digest in present else ""
        click.echo(f"  {digest}  {_human(size):>10}{missing}")
    if sum(s for _, s in blob_list) < info.size:
        click.echo("  (plus a payload small enough to live inside the manifest)")


@cli.command("rm")
@click.argument("hashes", nargs=-1, required=True, metavar="HASH...")
@_store_options
@click.pass_context
def rm_command(
    ctx: click.Context, hashes: tuple[str, ...], root: str | None, index: str | None
) -> None:
    """Remove artifacts' records and manifests; their blobs go at the next gc."""
    store = _open_store(ctx, root, index)
    for key in hashes:
        label = key
        try:
            info = store.info(key)
        except IntegrityError:
            info = None  # a damaged manifest can still be removed
        if info is not None:
            key = label = info.hash
            users = store._index.dependents(info.hash)
            if users:
                _warn(
                    f"{len(users)} artifact(s) depend on {info.hash} (e.g. {users[0]}); "
                    "they will no longer load fully"
                )
        store.delete(key)
        click.echo(f"removed {label}")
    click.echo("run `casml gc` to free the blobs no other artifact uses", err=True)


# ---------------------------------------------------------------------------- gc / verify / du


@cli.command("gc")
@click.option("--dry-run", is_flag=True, help="report what would be deleted, delete nothing")
@click.option(
    "--grace",
    type=_Duration(),
    default="1h",
    show_default=True,
    help="only delete blobs unused for this long (30s, 10m, 2h, 7d, 0)",
)
@click.option("--json", "as_json", is_flag=True, help="print the report as JSON")
@_store_options
@click.pass_context
def gc_command(
    ctx: click.Context,
    dry_run: bool,
    grace: float,
    as_json: bool,
    root: str | None,
    index: str | None,
) -> None:
    """Delete blobs no artifact references (safe while other processes put artifacts)."""
    store = _open_store(ctx, root, index)
    report = maintenance.gc(store, grace=grace, dry_run=dry_run, progress=_progress)
    if as_json:
        _echo_json(report.to_dict())
        return
    verb = "would delete" if dry_run else "deleted"
    click.echo(
        f"{verb} {report.blobs_deleted} blob(s), {_human(report.bytes_freed)}; "
        f"{report.manifests_deleted} damaged manifest(s), {report.records_deleted} record(s), "
        f"{report.temp_files_deleted} temporary file(s)"
    )
    click.echo(
        f"kept {report.blobs_live} referenced blob(s) and {report.blobs_recent} unreferenced "
        f"blob(s) used within the grace period ({_format_duration(report.grace_seconds)})"
    )


@cli.command("verify")
@click.option("--repair", is_flag=True, help="fix what storage allows (see docs/operations.md)")
@click.option(
    "--from",
    "source_url",
    metavar="PATH|URL",
    help="with --repair: copy missing or damaged blobs back from this store",
)
@click.option("--from-index", "source_index", metavar="URL", help="index URL of that store")
@click.option("--json", "as_json", is_flag=True, help="print the report as JSON")
@_store_options
@click.pass_context
def verify_command(
    ctx: click.Context,
    repair: bool,
    source_url: str | None,
    source_index: str | None,
    as_json: bool,
    root: str | None,
    index: str | None,
) -> None:
    """Re-hash every blob and cross-check manifests and the index; exit 1 if anything is wrong."""
    from casml.store import Store

    if source_url is not None and not repair:
        raise click.UsageError("--from only makes sense with --repair")
    store = _open_store(ctx, root, index)
    source = None
    if source_url is not None:
        source = Store(source_url, index=source_index)
        ctx.call_on_close(source.close)
    report = maintenance.verify(store, repair=repair, source=source, progress=_progress)
    if as_json:
        _echo_json(report.to_dict())
    else:
        for problem in report.problems:
            if problem.kind == "orphan_blob":
                continue
            state = "fixed" if problem.fixed else "ERROR"
            click.echo(f"{state:<6} {problem.kind:<19} {problem.message}")
            if problem.action:
                click.echo(f"       repair: {problem.action}")
        orphans = len(report.orphans)
        click.echo(
            f"checked {report.blobs_checked} blob(s) ({_human(report.bytes_checked)}), "
            f"{report.manifests_checked} manifest(s), {report.index_rows_checked} index row(s), "
            f"{report.records_checked} record(s)"
        )
        if orphans:
            click.echo(f"{orphans} orphan blob(s): not an error, `casml gc` frees them")
        if report.ok:
            click.echo("ok")
        else:
            click.echo(
                f"{len(report.errors)} problem(s)"
                + ("" if repair else "; `casml verify --repair` fixes what it can"),
                err=True,
            )
    if not report.ok:
        ctx.exit(1)


@cli.command("du")
@click.option("--json", "as_json", is_flag=True, help="print the figures as JSON")
@_store_options
@click.pass_context
def du_command(ctx: click.Context, as_json: bool, root: str | None, index: str | None) -> None:
    """Show logical bytes (what artifacts hold) against stored bytes, and the dedup ratio."""
    store = _open_store(ctx, root, index)
    usage = maintenance.disk_usage(store, progress=_progress)
    if as_json:
        _echo_json(usage.to_dict())
        return
    _print_usage(usage)


def _print_usage(usage: maintenance.DiskUsage) -> None:
    click.echo(f"artifacts      {usage.artifacts} ({usage.indexed_artifacts} indexed)")
    click.echo(f"blobs          {usage.blobs}")
    click.echo(f"logical bytes  {_human(usage.logical_bytes):>10}  what the artifacts hold")
    click.echo(
        f"stored bytes   {_human(usage.stored_bytes):>10}  blobs {_human(usage.blob_bytes)}, "
        f"manifests {_human(usage.manifest_bytes)}, records {_human(usage.record_bytes)}"
    )
    click.echo(f"dedup ratio    {usage.dedup_ratio:>9.2f}x")


# ---------------------------------------------------------------------------- graph / reindex


@cli.command("graph")
@click.argument("hash")
@click.option(
    "--format",
    "fmt",
    type=click.Choice(["mermaid", "dot"]),
    default="mermaid",
    show_default=True,
    help="Mermaid (Markdown, notebooks) or Graphviz DOT",
)
@_store_options
@click.pass_context
def graph_command(
    ctx: click.Context, hash: str, fmt: str, root: str | None, index: str | None
) -> None:
    """Print the dependency graph around an artifact (ancestors and descendants)."""
    store = _open_store(ctx, root, index)
    click.echo(store.graph(hash, format=fmt).rstrip("\n"))


@cli.command("reindex")
@click.option("--json", "as_json", is_flag=True, help="print the result as JSON")
@_store_options
@click.pass_context
def reindex_command(ctx: click.Context, as_json: bool, root: str | None, index: str | None) -> None:
    """Rebuild the index from storage: add missing artifacts, restore names and tags."""
    store = _open_store(ctx, root, index)
    added, problems = maintenance.reindex(store, progress=_progress)
    if as_json:
        _echo_json({"added": added, "warnings": problems})
        return
    for message in problems:
        _warn(message)
    click.echo(f"indexed {added} artifact(s) from {store.root}")


# ---------------------------------------------------------------------------- push / pull


def _transfer(
    ctx: click.Context,
    action: str,
    url: str,
    other_index: str | None,
    hashes: tuple[str, ...],
    as_json: bool,
    root: str | None,
    index: str | None,
) -> None:
    from casml.store import Store

    store = _open_store(ctx, root, index)
    method = getattr(store, action, None)
    if method is None:
        raise CasmlError(
            f"this casml ({__version__}) cannot {action} yet: Store.{action} is missing; "
            "upgrade casml"
        )
    other = Store(url, index=other_index)
    ctx.call_on_close(other.close)
    report = method(other, hashes=list(hashes) or None)
    if as_json:
        _echo_json(_to_json(report))
        return
    past = "pushed" if action == "push" else "pulled"
    where = f"to {other.root}" if action == "push" else f"from {other.root}"
    figures = _to_json(report)
    if isinstance(figures, dict) and "artifacts" in figures:
        click.echo(
            f"{past} {figures['artifacts']} artifact(s) {where}: {figures.get('blobs', 0)} "
            f"blob(s), {_human(int(figures.get('bytes', 0)))}, {figures.get('records', 0)} "
            "record(s)"
        )
    else:
        click.echo(f"{past} {where}: {figures}")


@cli.command("push")
@click.argument("hashes", nargs=-1, metavar="[HASH...]")
@click.option("--to", "url", required=True, metavar="PATH|URL", help="the store to copy to")
@click.option("--to-index", "other_index", metavar="URL", help="index URL of that store")
@click.option("--json", "as_json", is_flag=True, help="print what moved as JSON")
@_store_options
@click.pass_context
def push_command(
    ctx: click.Context,
    hashes: tuple[str, ...],
    url: str,
    other_index: str | None,
    as_json: bool,
    root: str | None,
    index: str | None,
) -> None:
    """Copy artifacts (default: all) and their dependencies to another store."""
    _transfer(ctx, "push", url, other_index, hashes, as_json, root, index)


@cli.command("pull")
@click.argument("hashes", nargs=-1, metavar="[HASH...]")
@click.option("--from", "url", required=True, metavar="PATH|URL", help="the store to copy from")
@click.option("--from-index", "other_index", metavar="URL", help="index URL of that store")
@click.option("--json", "as_json", is_flag=True, help="print what moved as JSON")
@_store_options
@click.pass_context
def pull_command(
    ctx: click.Context,
    hashes: tuple[str, ...],
    url: str,
    other_index: str | None,
    as_json: bool,
    root: str | None,
    index: str | None,
) -> None:
    """Copy artifacts (default: all) and their dependencies from another store."""
    _transfer(ctx, "pull", url, other_index, hashes, as_json, root, index)


# ---------------------------------------------------------------------------- demo


def demo_iris() -> pd.DataFrame:
    """The iris flowers (150 rows, 4 features, 3 classes), the demo's dataset."""
    from sklearn.datasets import load_iris

    frame: pd.DataFrame = load_iris(as_frame=True).frame
    return frame


@contextlib.contextmanager
def _counting_builds(classes: Sequence[type]) -> Iterator[Counter[str]]:
    """Count the ``build()`` calls of ``classes`` while the block runs (the proof of caching)."""
    counts: Counter[str] = Counter()
    saved: list[tuple[type, Any]] = []
    for cls in classes:
        original = cls.__dict__.get("build")
        inherited = cls.build  # type: ignore[attr-defined]

        def counting(self: Any, _build: Any = inherited, _name: str = cls.__name__) -> Any:
            counts[_name] += 1
            return _build(self)

        saved.append((cls, original))
        setattr(cls, "build", counting)  # noqa: B010 (a class attribute patched on purpose)
    try:
        yield counts
    finally:
        for cls, original in saved:
            if original is None:
                delattr(cls, "build")
            else:
                setattr(cls, "build", original)  # noqa: B010


def _demo_run(store: Store) -> tuple[list[Any], Counter[str], float]:
    from sklearn.ensemble import RandomForestClassifier
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    from casml.ml import Dataset, Metric, Model, Pipeline

    started = time.perf_counter()
    with _counting_builds([Dataset, Pipeline, Model, Metric]) as counts:
        data = Dataset(demo_iris, target="target", test_size=0.3, random_state=0)
        scaled = Pipeline(data, [("scale", StandardScaler())])
        models = [
            Model(scaled, LogisticRegression(C=1.0, max_iter=500)),
            Model(scaled, RandomForestClassifier(n_estimators=30, random_state=0)),
        ]
        metrics = [
            store.get_or_build(Metric(model, data, scorers=("accuracy", "f1_macro")), name=name)
            for model, name in zip(models, ("iris-logistic", "iris-forest"), strict=True)
        ]
    return metrics, counts, time.perf_counter() - started


@cli.command("demo")
@_store_options
@click.pass_context
def demo_command(ctx: click.Context, root: str | None, index: str | None) -> None:
    """Train a small scikit-learn workflow twice: the second run trains nothing."""
    try:
        import sklearn  # noqa: F401

        import casml.ml  # noqa: F401
    except ImportError as exc:
        raise CasmlError(
            f"casml demo needs the ml extra ({exc}); install it with pip install 'casml[ml]'"
        ) from exc
    store = _open_store(ctx, root, index)
    click.echo(f"store: {store.root}")
    click.echo(f"index: {store.index_url}")
    click.echo("workflow: iris -> StandardScaler -> {LogisticRegression, RandomForest} -> scores")
    click.echo()
    metrics: list[Any] = []
    builds: list[int] = []
    for run in (1, 2):
        metrics, counts, elapsed = _demo_run(store)
        builds.append(sum(counts.values()))
        built = ", ".join(f"{n} {cls}" for cls, n in counts.items()) or "nothing"
        took = f"{elapsed:.2f} s" if elapsed >= 1 else f"{elapsed * 1000:.0f} ms"
        click.echo(f"run {run}: {builds[-1]} build(s) in {took}  (built: {built})")
    if builds[-1] == 0:
        click.echo("the second run loaded every step from the store and trained nothing")
    else:
        _warn(f"the second run built {builds[-1]} step(s): their hashes are not stable")
    click.echo()
    click.echo("artifacts:")
    seen: set[str] = set()
    for metric in metrics:
        model = metric.model
        pipeline = model.pipeline
        for obj in (pipeline.dataset, pipeline, model, metric):
            if obj.hash_ in seen:
                continue
            seen.add(obj.hash_)
            detail = ""
            if type(obj).__name__ == "Model":
                detail = type(obj.estimator).__name__
            elif type(obj).__name__ == "Metric":
                detail = ", ".join(f"{k}={v:.3f}" for k, v in obj.values.items())
            click.echo(f"  {type(obj).__name__:<9} {obj.hash_}  {detail}".rstrip())
    last = metrics[-1]
    click.echo()
    click.echo(
        f"lineage of metric {last.hash_[:12]} {_label(store.info(last.hash_))} (nearest first):"
    )
    for info in store.lineage(last.hash_):
        click.echo(f"  {info.hash[:12]}  {info.class_name:<18} {_label(info)}".rstrip())
    click.echo()
    click.echo("disk usage:")
    _print_usage(maintenance.disk_usage(store))
    click.echo()
    selection = ctx.find_object(_Selection) or _Selection()
    chosen = root or selection.root or os.environ.get("CASML_ROOT")
    option = f" --root {store.root}" if chosen else ""
    click.echo("try:")
    click.echo(f"  casml ls{option}")
    click.echo(f"  casml show {last.hash_[:12]}{option}")
    click.echo(f"  casml graph {last.hash_[:12]}{option}")


# ---------------------------------------------------------------------------- entry point


def main(argv: Sequence[str] | None = None) -> None:
    """Run the ``casml`` command (the console-script entry point); exits with its status."""
    # Standalone mode: click prints usage errors, handles `casml ls | head` (broken pipe)
    # and Ctrl-C, and exits with the command's status.
    cli.main(args=list(argv) if argv is not None else None, prog_name="casml")
