"""The writers every report shares: one table renderer (aligned text or Markdown) and CSV.

``report``, ``compare`` and the sweep report (and finetune's report) render their tables and
CSV files here, so a number is written the same way everywhere: CSV at full precision (``repr``
of the float), missing cells empty. Markdown tables are GitHub pipe tables (``| a | b |`` and a
``|---|`` rule), unpadded so a diff shows only what changed.
"""

from __future__ import annotations

import csv
import io
import numbers
from collections.abc import Iterable, Sequence
from pathlib import Path


def render_table(
    header: Sequence[str],
    rows: Sequence[Sequence[str]],
    groups: Sequence[tuple[str, int]] | None = None,
    left: int = 0,
    markdown: bool = False,
) -> str:
    """An aligned plain-text table, or a GitHub Markdown pipe table with ``markdown=True``.

    Text: ``groups`` = (title, n_columns) spans printed above the header and separated by
    " | "; the first ``left`` columns are left-aligned (labels), the rest right-aligned.
    Markdown ignores ``groups`` and escapes "|" in cells so it cannot break the columns.
    """
    if markdown:

        def esc(cell: str) -> str:
            return cell.replace("|", "\\|")

        lines = ["| " + " | ".join(map(esc, header)) + " |", "|" + "---|" * len(header)]
        return "\n".join(lines + ["| " + " | ".join(map(esc, r)) + " |" for r in rows])
    widths = [max([len(h)] + [len(r[i]) for r in rows]) for i, h in enumerate(header)]
    spans = list(groups or [])
    start = 0
    for title, n in spans:  # widen a group's last column if its title does not fit
        span = sum(widths[start : start + n]) + 2 * (n - 1)
        widths[start + n - 1] += max(0, len(title) - span)
        start += n

    def line(cells: Sequence[str]) -> str:
        out = [c.ljust(w) if i < left else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths))]
        return _join_groups(out, spans).rstrip()

    lines = []
    if spans:
        titles, start = [], 0
        for title, n in spans:
            titles.append(title.ljust(sum(widths[start : start + n]) + 2 * (n - 1)))
            start += n
        lines.append(" | ".join(titles).rstrip())
    lines.append(line(header))
    lines.append(_join_groups(["-" * w for w in widths], spans))
    lines.extend(line(r) for r in rows)
    return "\n".join(lines)


def _join_groups(cells: Sequence[str], spans: Sequence[tuple[str, int]]) -> str:
    """Join cells with two spaces inside a group and " | " between groups."""
    if not spans:
        return "  ".join(cells)
    parts, start = [], 0
    for _, n in spans:
        parts.append("  ".join(cells[start : start + n]))
        start += n
    return " | ".join(parts)


def csv_cell(value):
    """A CSV cell: floats at full precision (``repr``), None empty, anything else as it is."""
    if value is None:
        return ""
    if isinstance(value, numbers.Real) and not isinstance(value, numbers.Integral):
        return repr(float(value))
    return value


def csv_text(header: Sequence[str], rows: Iterable[Sequence]) -> str:
    """CSV text (``\\n`` line ends): ``header``, then one line per row, each cell by :func:`csv_cell`."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(header)
    writer.writerows([csv_cell(cell) for cell in row] for row in rows)
    return buffer.getvalue()


def write_text(path: str | Path, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path``, creating its folder; the path."""
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text, encoding="utf-8")
    return out
