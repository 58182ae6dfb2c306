"""The matrix as JSON (kind "matrix") and as JUnit XML: the formats that need no template.

JSON keeps everything the page shows, by run number, for a dashboard of its
own; JUnit gives each run a suite (verify: a case per check; probe: a case
per register, failing where a bit of it fails), for CI systems that draw
JUnit.
"""

from __future__ import annotations

from typing import Any

from kvmtdx.report import junit
from kvmtdx.report.matrix import BitmapRow, Column, Matrix
from kvmtdx.report.schema import ReportKind, document
from kvmtdx.verdict import Status


def _run_json(col: Column) -> dict[str, Any]:
    r = col.run
    return {"column": col.number, "file": r.origin, "kind": r.kind.value, "host": r.host,
            "kernel": r.kernel, "module": r.module, "policy": r.policy,
            "policy_source": r.policy_source, "verdict": r.verdict, "result": r.counts,
            "host_identity": r.identity}


def _bitmap_json(row: BitmapRow, probe: tuple[Column, ...]) -> dict[str, Any]:
    leaf, index, reg = row.key
    return {"leaf": f"0x{leaf:x}", "subleaf": index, "register": reg, "label": row.label,
            "runs": {str(col.number): None if cells is None else [c.cls for c in cells]
                     for col, cells in zip(probe, row.cells, strict=True)},
            "differs": list(row.differs)}


def render_json(m: Matrix) -> str:
    verify, probe = m.verify, m.probe
    body = {
        "runs": [_run_json(c) for c in m.columns],
        "checks": [{"id": row.id, "group": row.group, "differs": row.differs,
                    "runs": {str(col.number): None if cell is None else cell.status
                             for col, cell in zip(verify, row.cells, strict=True)}}
                   for row in m.checks],
        "bitmaps": [_bitmap_json(row, probe) for row in m.bitmaps],
        "quiet_registers": list(m.quiet),
        "rows_left_out": m.agreeing,
        "failures": [{"run": f.column.number, "what": f.title, "anchor": f.anchor,
                      **dict(f.lines)} for f in m.failures],
    }
    return document(ReportKind.MATRIX, body)


def _suite_name(col: Column) -> str:
    return f"#{col.number} {col.run.label}"


def _verify_suite(m: Matrix, i: int, col: Column) -> junit.Suite:
    cases = []
    for row in m.checks:
        cell = row.cells[i]
        if cell is None:
            continue
        text = "\n".join([cell.detail, f"expected: {cell.expected}", f"actual: {cell.actual}",
                          *(f"bit: {b}" for b in cell.bits)]) if cell.status == "fail" else ""
        cases.append(junit.Case(row.id, f"kvmtdx.verify.{row.group}", Status(cell.status),
                                cell.detail, text))
    return junit.Suite(_suite_name(col), tuple(cases), _properties(col))


def _probe_suite(m: Matrix, i: int, col: Column) -> junit.Suite:
    cases = []
    for row in m.bitmaps:
        cells = row.cells[i]
        if cells is None:
            continue
        bad = [(bit, c) for bit, c in enumerate(cells) if c.failed]
        text = "\n".join(f"{row.label}[{bit}] {c.name}: {c.cls} ({c.why})" for bit, c in bad)
        cases.append(junit.Case(row.label, "kvmtdx.probe", Status.FAIL if bad else Status.PASS,
                                f"{len(bad)} bits break the rule" if bad else "", text))
    return junit.Suite(_suite_name(col), tuple(cases), _properties(col))


def _properties(col: Column) -> tuple[tuple[str, str], ...]:
    r = col.run
    return (("file", r.origin), ("host", r.host), ("kernel", r.kernel), ("module", r.module),
            ("policy", r.policy or "unknown"), ("result", r.counts))


def render_junit(m: Matrix) -> str:
    suites = [_verify_suite(m, i, c) for i, c in enumerate(m.verify)]
    suites += [_probe_suite(m, i, c) for i, c in enumerate(m.probe)]
    return junit.render("kvmtdx report", suites)
