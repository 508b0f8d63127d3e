"""Terminal output for the command line: ANSI colours per role and plain-text tables (no dependencies)."""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import TextIO

__all__ = ["Painter", "format_table", "use_color"]

RESET = "\x1b[0m"
# The base model is left uncoloured: in most recipes it writes most of the text, and the interesting
# part is where another role took over.
ROLE_COLORS: dict[str, str] = {
    "base": "",
    "expert": "",
    "aligner": "32",  # green
    "aligned": "32",
    "amateur": "35",  # magenta
    "reference": "35",
    "reward": "33",  # yellow
    "draft": "34",  # blue
}
PALETTE = ("36", "33", "35", "34", "31", "32")  # cyan, yellow, magenta, blue, red, green


def use_color(flag: bool | None, stream: TextIO) -> bool:
    """Whether to colour ``stream``: ``flag`` when given, else a tty without ``NO_COLOR`` or ``TERM=dumb``."""
    if flag is not None:
        return flag
    if os.environ.get("NO_COLOR") or os.environ.get("TERM") == "dumb":
        return False
    isatty = getattr(stream, "isatty", None)
    return bool(isatty and isatty())


class Painter:
    """Colours text by the role that wrote it; does nothing when disabled."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self._assigned: dict[str, str] = {}

    def role_code(self, role: str) -> str:
        """The SGR colour code of ``role`` ("" for uncoloured); unknown roles take palette colours in turn."""
        if role in ROLE_COLORS:
            return ROLE_COLORS[role]
        if role not in self._assigned:
            self._assigned[role] = PALETTE[len(self._assigned) % len(PALETTE)]
        return self._assigned[role]

    def paint(self, text: str, code: str) -> str:
        """``text`` wrapped in the SGR ``code`` (unchanged when disabled, empty or code is "")."""
        if not self.enabled or not code or not text:
            return text
        return f"\x1b[{code}m{text}{RESET}"

    def role(self, text: str, role: str | None) -> str:
        """``text`` in the colour of ``role`` (unchanged for ``None``)."""
        return self.paint(text, self.role_code(role)) if role is not None else text

    def bold(self, text: str) -> str:
        """``text`` in bold."""
        return self.paint(text, "1")

    def dim(self, text: str) -> str:
        """``text`` dimmed."""
        return self.paint(text, "2")


def format_table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """Left-aligned columns separated by two spaces, headers first; no trailing spaces."""
    widths = [len(h) for h in headers]
    for row in rows:
        for i, cell in enumerate(row):
            widths[i] = max(widths[i], len(cell))
    lines = []
    for row in [list(headers), *rows]:
        cells = [cell.ljust(widths[i]) for i, cell in enumerate(row)]
        lines.append("  ".join(cells).rstrip())
    return "\n".join(lines)
