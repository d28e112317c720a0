"""The one text-table writer: the ``flor`` command's tables and the version-replay report."""

from __future__ import annotations

from collections.abc import Sequence


def text_table(header: Sequence[str], rows: Sequence[Sequence[str]], *, right: Sequence[bool] = ()) -> list[str]:
    """Lines of an aligned table: columns two spaces apart, left-aligned unless ``right`` says so.

    Example:
        >>> text_table(["run", "epochs"], [["a", "3"], ["bb", "12"]], right=[False, True])
        ['run  epochs', 'a         3', 'bb       12']
    """
    widths = [max(len(str(h)), *(len(row[i]) for row in rows)) for i, h in enumerate(header)]
    aligned = list(right) + [False] * (len(header) - len(right))

    def line(cells: Sequence[str]) -> str:
        parts = [c.rjust(w) if r else c.ljust(w) for c, w, r in zip(cells, widths, aligned, strict=True)]
        return "  ".join(parts).rstrip()

    return [line([str(h) for h in header]), *(line(row) for row in rows)]
