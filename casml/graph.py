"""Draw a dependency graph of artifacts as Mermaid or Graphviz DOT text."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from casml.info import ArtifactInfo

__all__ = ["FORMATS", "render_graph"]

FORMATS = ("mermaid", "dot")


def _label(info: ArtifactInfo) -> list[str]:
    short_class = info.class_name.replace(":", ".").rsplit(".", 1)[-1]
    lines = [short_class]
    if info.name is not None:
        lines.append(f"{info.name} v{info.version}")
    lines.append(info.hash[:8])
    return lines


def _escape(text: str, quote: str) -> str:
    return text.replace("\\", "\\\\").replace(quote, "\\" + quote)


def render_graph(
    nodes: Sequence[ArtifactInfo],
    edges: Iterable[tuple[str, str]],
    focus: str,
    format: str = "mermaid",
) -> str:
    """Render ``nodes`` and ``(dependency, dependent)`` edges; ``focus`` is highlighted.

    Arrows point from a dependency to what was built from it, the way data flows.
    """
    if format not in FORMATS:
        raise ValueError(f"graph format must be one of {FORMATS}, got {format!r}")
    ids = {info.hash: f"a{info.hash[:12]}" for info in nodes}
    edge_list = sorted({(a, b) for a, b in edges if a in ids and b in ids})
    out: list[str] = []
    if format == "mermaid":
        out.append("graph LR")
        for info in nodes:
            text = "<br/>".join(_escape(line, '"').replace('"', "#quot;") for line in _label(info))
            out.append(f'    {ids[info.hash]}["{text}"]')
        out.extend(f"    {ids[a]} --> {ids[b]}" for a, b in edge_list)
        if focus in ids:
            out.append(f"    style {ids[focus]} stroke-width:3px")
    else:
        out.append("digraph casml {")
        out.append("    rankdir=LR;")
        out.append("    node [shape=box];")
        for info in nodes:
            text = "\\n".join(_escape(line, '"') for line in _label(info))
            extra = ", penwidth=3" if info.hash == focus else ""
            out.append(f'    {ids[info.hash]} [label="{text}"{extra}];')
        out.extend(f"    {ids[a]} -> {ids[b]};" for a, b in edge_list)
        out.append("}")
    return "\n".join(out) + "\n"
