"""Text formatting of the reference's metrics tables (MODES.md section 0, "Metrics table").

No model code. Layout: optional title line; a header of (row-name width + 2) spaces and
each column name right-justified to 20 characters; then one line per row, the name
left-justified to the longest row name, two spaces, each value right-justified to 20
characters. Longer values are not truncated (columns then run together, as in the reference).
"""

from __future__ import annotations

import math

__all__ = ["COL_WIDTH", "format_value", "format_table", "format_matrix"]

COL_WIDTH = 20


def _tolist(v):
    return v.tolist() if hasattr(v, "tolist") else list(v)


def format_value(v, fmt: str) -> str:
    """Format one table cell.

    fmt: "sci" -> "%.4e"; "float" -> "%.4f"; "str" -> str(v) verbatim;
    "f2list" -> "[1.00, -0.96, 0.00]" ("%.2f" per element). A missing value
    (None, or NaN for "sci"/"float") prints "N/A"; None prints "N/A" for every fmt.
    """
    if v is None:
        return "N/A"
    if fmt == "str":
        return str(v)
    if fmt in ("sci", "float"):
        x = float(v)
        if math.isnan(x):
            return "N/A"
        return ("%.4e" if fmt == "sci" else "%.4f") % x
    if fmt == "f2list":
        return "[" + ", ".join("%.2f" % float(x) for x in _tolist(v)) + "]"
    raise ValueError(f"unknown format {fmt!r} (expected sci, float, str or f2list)")


def format_table(columns: list[str], rows: list[tuple[str, list, str]], title: str | None = None) -> str:
    """Reference metrics table; rows are (name, values (one per column), fmt).

    Lines are joined with "\\n" with no trailing newline.
    """
    width = max((len(name) for name, _, _ in rows), default=0)
    lines = [] if title is None else [title]
    lines.append(" " * (width + 2) + "".join(str(c).rjust(COL_WIDTH) for c in columns))
    for name, values, fmt in rows:
        values = list(values)
        assert len(values) == len(columns), (
            f"row {name!r} has {len(values)} values for {len(columns)} columns")
        lines.append(name.ljust(width) + "  "
                     + "".join(format_value(v, fmt).rjust(COL_WIDTH) for v in values))
    return "\n".join(lines)


def format_matrix(names: list[str], M, fmt: str = "%10.3f") -> str:
    """Small labelled square matrix (e.g. a Gram matrix of cosines).

    Header: (max name width) spaces, then each name right-justified to 10; each row:
    the name left-justified to the max name width, then its entries formatted with ``fmt``.
    """
    rows = [_tolist(r) for r in _tolist(M)]
    k = len(names)
    assert len(rows) == k and all(len(r) == k for r in rows), (
        f"matrix must be {k}x{k} to match the names")
    width = max((len(n) for n in names), default=0)
    lines = [" " * width + "".join(n.rjust(10) for n in names)]
    for n, r in zip(names, rows):
        lines.append(n.ljust(width) + "".join(fmt % float(x) for x in r))
    return "\n".join(lines)
