"""Many runs as one matrix: checks by runs for verify, bit maps by runs for probe.

`build` takes the runs (report.runs) in the order given and lays them out:
every run is a numbered column named by its host, kernel and module; every
verify check is a row, each cell its status; every register a probe lists is
a row of 32-cell bit maps, one per probe run, with the bits where two runs
disagree marked; every failure gets an anchor with its detail.  The formats
(report.formats, report.html) only render what is here.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from kvmtdx.report.runs import BitCell, CheckCell, RegKey, Run
from kvmtdx.report.schema import ReportKind
from kvmtdx.structs import REGISTERS


@dataclass(frozen=True)
class Column:
    number: int  # 1-based, in the order the reports were given
    run: Run

    @property
    def key(self) -> str:
        """The column's part of every anchor on the page."""
        return f"c{self.number}"


@dataclass(frozen=True)
class CheckRow:
    id: str
    group: str
    cells: tuple[CheckCell | None, ...]  # one per verify column; None: the run lacks the check

    @property
    def anchor(self) -> str:
        return f"check-{self.id}"

    @property
    def differs(self) -> bool:
        return len({c.status if c is not None else None for c in self.cells}) > 1


@dataclass(frozen=True)
class BitmapRow:
    key: RegKey
    label: str  # "0x7.0 EBX"
    cells: tuple[tuple[BitCell, ...] | None, ...]  # one map per probe column; None: not listed
    differs: tuple[int, ...]  # bits on which the runs that list the row disagree

    @property
    def anchor(self) -> str:
        return f"reg-{self.key[0]:x}-{self.key[1]}-{self.key[2]}"

    @property
    def missing(self) -> bool:
        return any(c is None for c in self.cells)


@dataclass(frozen=True)
class Failure:
    """What a failing cell links to: the run, what failed, and the detail."""

    anchor: str
    column: Column
    title: str
    lines: tuple[tuple[str, str], ...]  # (what, text): detail, expected, actual, bits
    back: str  # the anchor of the row it came from


@dataclass(frozen=True)
class Matrix:
    columns: tuple[Column, ...]
    checks: tuple[CheckRow, ...]
    bitmaps: tuple[BitmapRow, ...]
    quiet: tuple[str, ...]  # registers no run reports or probes a bit of (left out of the maps)
    failures: tuple[Failure, ...]
    agreeing: int = 0  # rows left out because every run agrees on them (only_differences)

    @property
    def verify(self) -> tuple[Column, ...]:
        return tuple(c for c in self.columns if c.run.kind is ReportKind.VERIFY)

    @property
    def probe(self) -> tuple[Column, ...]:
        return tuple(c for c in self.columns if c.run.kind is ReportKind.PROBE)


def _check_rows(verify: Sequence[Column]) -> tuple[CheckRow, ...]:
    order: dict[str, str] = {}  # check id -> group, in the order the runs list them
    for col in verify:
        for cid, cell in col.run.checks.items():
            order.setdefault(cid, cell.group)
    return tuple(CheckRow(cid, group, tuple(col.run.checks.get(cid) for col in verify))
                 for cid, group in order.items())


def _side(cls: str) -> str:
    """Reported, hidden or a value field: what a bit is, whether or not it was probed."""
    if cls.startswith("FIELD"):
        return "field"
    return "reported" if "REPORTED" in cls else "hidden"


def _disagree(cells: Sequence[BitCell]) -> bool:
    """Two runs differ on a bit if one reports it and the other hides it, or if both
    probed it and it came out differently; a bit one run did not probe differs in nothing
    else."""
    if len({_side(c.cls) for c in cells}) > 1:
        return True
    return len({c.cls for c in cells if not c.cls.startswith("UNPROBED")}) > 1


def _row_label(key: RegKey, indexed: set[int]) -> str:
    leaf, index, reg = key
    return (f"0x{leaf:x}.{index}" if leaf in indexed else f"0x{leaf:x}") + f" {reg.upper()}"


def _bitmap_rows(probe: Sequence[Column]) -> tuple[tuple[BitmapRow, ...], tuple[str, ...]]:
    keys = {k for col in probe for k in col.run.bitmaps}
    indices: dict[int, set[int]] = {}
    for leaf, index, _ in keys:
        indices.setdefault(leaf, set()).add(index)
    indexed = {leaf for leaf, seen in indices.items() if seen != {0}}
    rows: list[BitmapRow] = []
    quiet: list[str] = []
    for key in sorted(keys, key=lambda k: (k[0], k[1], REGISTERS.index(k[2]))):
        cells = tuple(col.run.bitmaps.get(key) for col in probe)
        listed = [c for c in cells if c is not None]
        label = _row_label(key, indexed)
        if all(b.cls == "UNPROBED_HIDDEN" for m in listed for b in m):
            quiet.append(label)
            continue
        differs = tuple(bit for bit in range(32) if _disagree([m[bit] for m in listed]))
        rows.append(BitmapRow(key, label, cells, differs))
    return tuple(rows), tuple(quiet)


def _failures(verify: Sequence[Column], checks: Sequence[CheckRow], probe: Sequence[Column],
              bitmaps: Sequence[BitmapRow]) -> tuple[Failure, ...]:
    out: list[Failure] = []
    for i, col in enumerate(verify):
        for row in checks:
            c = row.cells[i]
            if c is None or c.status != "fail":
                continue
            lines = [("detail", c.detail), ("expected", c.expected), ("actual", c.actual)]
            if c.bits:
                lines.append(("bits", ", ".join(c.bits)))
            out.append(Failure(cell_anchor(col, row.id), col, row.id,
                               tuple((k, v) for k, v in lines if v), row.anchor))
    for i, col in enumerate(probe):
        for brow in bitmaps:
            m = brow.cells[i]
            for bit, b in enumerate(m or ()):
                if b.failed:
                    title = f"{brow.label}[{bit}] {b.name}".rstrip()
                    out.append(Failure(bit_anchor(col, brow, bit), col, title,
                                       (("class", b.cls), ("outcome", b.why)), brow.anchor))
    return tuple(out)


def cell_anchor(column: Column, check: str) -> str:
    return f"fail-{column.key}-{check}"


def bit_anchor(column: Column, row: BitmapRow, bit: int) -> str:
    return f"fail-{column.key}-{row.anchor}-{bit}"


def build(runs: Sequence[Run], only_differences: bool = False) -> Matrix:
    """The matrix of `runs`; with `only_differences`, only the rows where the runs differ or
    something failed (a failure every run shares is still a failure)."""
    columns = tuple(Column(i + 1, r) for i, r in enumerate(runs))
    verify = tuple(c for c in columns if c.run.kind is ReportKind.VERIFY)
    probe = tuple(c for c in columns if c.run.kind is ReportKind.PROBE)
    checks = _check_rows(verify)
    bitmaps, quiet = _bitmap_rows(probe)
    agreeing = 0
    if only_differences:
        kept = tuple(r for r in checks if r.differs
                     or any(c is not None and c.status == "fail" for c in r.cells))
        kept_maps = tuple(r for r in bitmaps if r.differs or r.missing
                          or any(b.failed for m in r.cells for b in m or ()))
        agreeing = len(checks) - len(kept) + len(bitmaps) - len(kept_maps)
        checks, bitmaps = kept, kept_maps
    return Matrix(columns, checks, bitmaps, quiet, _failures(verify, checks, probe, bitmaps),
                  agreeing)
