"""Aligned text tables for a terminal: the demo's summary, `snapscale status`, the e2e bench.

One printer, so every table snapscale prints lines up the same way and a fix to the alignment
lands everywhere at once. Pure: cells in, text out.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence


def table(
    headers: Sequence[str],
    rows: Iterable[Sequence[str]],
    *,
    indent: str = "",
    rule: bool = False,
    empty: str | None = None,
) -> str:
    """Every column but the last padded to its widest cell, two spaces between columns, no line
    ending in spaces. The last column is left ragged: it holds free text (phase timings, a reason)
    whose width should not push a line of short cells across the screen.

    `indent` starts every line; `rule` puts a line of dashes under the headers (each as wide as
    its column; the last as wide as its header); `empty`, when there are no rows, is printed
    (indented) instead of a table with headers alone.
    """
    body = [list(r) for r in rows]
    if not body and empty is not None:
        return indent + empty
    head = list(headers)
    for r in body:
        if len(r) != len(head):
            raise ValueError(f"a row of {len(r)} cells under {len(head)} headers: {r!r}")
    widths = [max(len(c) for c in col) for col in zip(head, *body, strict=True)]
    widths[-1] = len(head[-1])

    def line(cells: Sequence[str]) -> str:
        padded = [c.ljust(w) for c, w in zip(cells[:-1], widths, strict=False)]
        return (indent + "  ".join([*padded, cells[-1]])).rstrip()

    lines = [line(head)]
    if rule:
        lines.append(line(["-" * w for w in widths]))
    lines += [line(r) for r in body]
    return "\n".join(lines)
