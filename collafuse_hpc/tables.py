"""Aligned text tables: the one printer behind ``compare``, ``evaluate`` and the benchmarks."""

from __future__ import annotations

import math


def cell(value) -> str:
    """A value as a table cell: 4 significant digits, '-' for missing, 'n/a' for NaN."""
    if value is None:
        return "-"
    if isinstance(value, float) and math.isnan(value):
        return "n/a"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def with_interval(figures: dict, key: str, digits: int = 3) -> str:
    """``figures[key]`` as ``0.250``, with its 95% interval ``[0.100, 0.400]`` (``<key>_low``,
    ``<key>_high``) where ``figures`` has one: a metric's line in evaluate's printout.
    ``digits`` after the point (2 for a PSNR in dB)."""
    low, high = figures.get(f"{key}_low"), figures.get(f"{key}_high")
    return f"{figures[key]:.{digits}f}" + ("" if low is None else f" [{low:.{digits}f}, {high:.{digits}f}]")


def format_table(header: list[str], rows: list[list], indent: str = "") -> str:
    """Rows under a header, columns right-aligned except the first."""
    cells = [[str(h) for h in header]] + [[cell(v) for v in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    return "\n".join(
        indent + "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths)))
        for row in cells
    )
