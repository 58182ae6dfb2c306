"""The matrix as a page (HTML) or a document (Markdown), from Jinja2 templates.

Jinja2 is the `report` extra (`pip install 'kvmtdx[report]'`): only these two
formats need it, and without it they fail in one line naming the extra.  The
templates live in report/templates/ as package data; autoescaping is on for
HTML.  The page is self-contained: inline CSS and SVG, no script, nothing
fetched, so it reads the same opened from a CI artifact, a mail or paper.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from kvmtdx import __version__
from kvmtdx.errors import MissingExtra
from kvmtdx.report.matrix import BitmapRow, CheckRow, Matrix, bit_anchor, cell_anchor
from kvmtdx.report.runs import BIT_CLASSES, BitCell

if TYPE_CHECKING:
    import jinja2

INSTALL_HINT = "pip install 'kvmtdx[report]'"

# Bit map geometry: bit 31 on the left as registers are drawn, a gap between nibbles.
CELL, STEP, NIBBLE_GAP, CELL_HEIGHT, MARK = 10, 12, 4, 14, 6
MAP_WIDTH = 32 * STEP + 7 * NIBBLE_GAP
MAP_HEIGHT = CELL_HEIGHT + MARK + 1

STATUS_TEXT = {"pass": "\u2713 pass", "fail": "\u2717 FAIL", "skip": "\u2013 skip",
               "info": "\u2139 info"}
COLOURS = {cls: colour for cls, _, colour in BIT_CLASSES}
MEANING = {cls: meaning for cls, meaning, _ in BIT_CLASSES}
# The CSS class of a bit map cell of each class (short: a page has thousands of cells).
CSS = {"REPORTED_ACCEPTED": "ra", "REPORTED_REJECTED": "rr", "HIDDEN_KVM_REJECTED": "hk",
       "HIDDEN_MODULE_REJECTED": "hm", "HIDDEN_ACCEPTED": "ha", "FIELD_ACCEPTED": "fa",
       "FIELD_REJECTED": "fr", "UNPROBED_REPORTED": "ur", "UNPROBED_HIDDEN": "uh"}


def _jinja() -> Any:
    try:
        import jinja2
    except ImportError:
        raise MissingExtra(f"this report format needs Jinja2: {INSTALL_HINT}") from None
    return jinja2


def environment() -> jinja2.Environment:
    j = _jinja()
    env: jinja2.Environment = j.Environment(
        loader=j.PackageLoader("kvmtdx.report", "templates"),
        autoescape=j.select_autoescape(enabled_extensions=("html",), default=False),
        undefined=j.StrictUndefined, trim_blocks=True, lstrip_blocks=True,
        keep_trailing_newline=True)
    env.globals.update(STATUS_TEXT=STATUS_TEXT, BIT_CLASSES=BIT_CLASSES, COLOURS=COLOURS,
                       MEANING=MEANING, CSS=CSS, MAP_WIDTH=MAP_WIDTH, MAP_HEIGHT=MAP_HEIGHT,
                       CELL=CELL, CELL_HEIGHT=CELL_HEIGHT, version=__version__,
                       bit_x=bit_x, cell_anchor=cell_anchor, bit_anchor=bit_anchor,
                       CODES=CODES)
    return env


def bit_x(bit: int) -> int:
    """The x of `bit`'s cell in a map (bit 31 at 0)."""
    pos = 31 - bit
    return pos * STEP + (pos // 4) * NIBBLE_GAP


@dataclass(frozen=True)
class Group:
    name: str
    rows: tuple[CheckRow, ...]


def groups(rows: tuple[CheckRow, ...]) -> Iterator[Group]:
    """Consecutive check rows of one group (the suite's order)."""
    start = 0
    for i in range(1, len(rows) + 1):
        if i == len(rows) or rows[i].group != rows[start].group:
            yield Group(rows[start].group, rows[start:i])
            start = i


def bit_title(row: BitmapRow, bit: int, cell: BitCell) -> str:
    """What hovering a cell says: which bit, its class and what decided it."""
    name = f" {cell.name}" if cell.name else ""
    why = "" if cell.cls.startswith("UNPROBED") else f" ({cell.why})"
    return f"{row.label}[{bit}]{name}: {MEANING[cell.cls]}{why}"


def _context(matrix: Matrix, single: bool) -> dict[str, Any]:
    runs = matrix.columns
    failing = sum(c.run.verdict == "fail" for c in runs)
    title = (f"kvmtdx {runs[0].run.kind.value}: {runs[0].run.label}" if single
             else f"kvmtdx: {len(runs)} run{'' if len(runs) == 1 else 's'}")
    return {"m": matrix, "title": title, "single": single, "failing": failing,
            "groups": list(groups(matrix.checks)), "bit_title": bit_title,
            "differing_checks": sum(r.differs for r in matrix.checks),
            "differing_bits": sum(len(r.differs) for r in matrix.bitmaps)}


def render_html(matrix: Matrix, single: bool = False) -> str:
    return environment().get_template("report.html").render(_context(matrix, single))


def render_markdown(matrix: Matrix, single: bool = False) -> str:
    return environment().get_template("report.md").render(_context(matrix, single))


def bit_code(cell: BitCell) -> str:
    """One character per class for the Markdown maps (the legend spells them out)."""
    return CODES[cell.cls]


CODES = {"REPORTED_ACCEPTED": "A", "REPORTED_REJECTED": "R", "HIDDEN_KVM_REJECTED": "k",
         "HIDDEN_MODULE_REJECTED": "m", "HIDDEN_ACCEPTED": "L", "FIELD_ACCEPTED": "f",
         "FIELD_REJECTED": "F", "UNPROBED_REPORTED": "+", "UNPROBED_HIDDEN": "."}
