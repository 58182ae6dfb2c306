"""`kvmtdx report merge` and `report html`: many runs as one matrix, one run as a page.

The HTML is parsed by html5lib in strict mode (any parse error fails the test),
then read the way a reviewer reads it: which column fails which check, where a
failing cell leads, which bits two kernels disagree on.  tests/test_report_browser.py
renders the same page in a real browser.
"""

from __future__ import annotations

import json
import re
import sys
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

import pytest
from helpers import (
    BYPASS_CHECKS,
    GRID_FAILURES,
    LEAK_CHECK,
    MODULES,
    POLICIES,
    UPSTREAM,
    WARN_CHECK,
    by_id,
    classes,
    find_all,
    grid_column,
    grid_failures,
    grid_reports,
    parse_page,
    run_cli,
    simulated_report,
    tag,
    text_of,
)

from kvmtdx.checks import CHECKS
from kvmtdx.report.runs import BIT_CLASSES


@pytest.fixture(scope="module")
def grid(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    return grid_reports(tmp_path_factory.mktemp("grid"))


@pytest.fixture(scope="module")
def probes(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("probes")
    return {p: simulated_report(d, "probe", f"2.0:{p}")
            for p in ("upstream", "rfc-v2", "rfc-v2:allowlist_skips_row_7_1")}


def _merge(capsys: pytest.CaptureFixture[str], *args: str | Path) -> str:
    r = run_cli(capsys, "report", "merge", *map(str, args))
    assert r.rc == 0, r.err
    assert r.err == ""
    return r.out


def _column_kernels(root: Any, table_class: str) -> dict[str, str]:
    """Column number -> the kernel its header names."""
    table = find_all(root, "table", table_class)[0]
    return {text_of(th).split()[0].lstrip("#"): text_of(find_all(th, "span", None)[2])
            for th in find_all(table, "th", "col")}


# ---------------------------------------------------------------------------
# Three modules by three policies


def _failing_columns(check: str, columns: Any) -> set[str]:
    return {str(n) for n in columns if check in grid_failures(*grid_column(n))}


def test_the_bypass_fails_in_exactly_the_upstream_columns(
        capsys: pytest.CaptureFixture[str], grid: list[Path]) -> None:
    """...and the WARN on a malformed leaf 0x1F in every column of a module that has one."""
    root = parse_page(_merge(capsys, *grid))
    kernels = _column_kernels(root, "matrix")
    assert list(kernels.values()) == [p for _ in MODULES for p in POLICIES]
    upstream = {n for n, k in kernels.items() if k in UPSTREAM}
    assert len(upstream) == 6
    assert _failing_columns(WARN_CHECK, kernels) == {"4", "5", "6", "7", "8", "9"}
    ids = by_id(root)
    rows = {e.get("id"): e for e in find_all(root, "tr")
            if str(e.get("id", "")).startswith("check-")}
    assert len(rows) == len(CHECKS)
    for rid, row in rows.items():
        failing = {c.get("data-column") for c in find_all(row, "td", "s-fail")}
        assert failing == _failing_columns(rid.removeprefix("check-"), kernels), rid
        for cell in find_all(row, "td", "s-fail"):
            (link,) = find_all(cell, "a")
            target = ids[link.get("href").removeprefix("#")]
            assert tag(target) == "article" and "failure" in classes(target)
            assert f"#{cell.get('data-column')} {rid.removeprefix('check-')}" in \
                text_of(find_all(target, "h3")[0])
            detail = dict(zip(map(text_of, find_all(target, "dt")),
                              map(text_of, find_all(target, "dd")), strict=True))
            if rid == f"check-{WARN_CHECK}":
                assert (detail["expected"], detail["actual"]) == (
                    "refused, no WARN", "ERROR -EIO, kernel WARN")
                continue
            if rid == f"check-{LEAK_CHECK}":
                assert detail["expected"] == "no hidden bit in the TD's CPUID"
                assert detail["actual"].endswith("in the TD's CPUID")
                continue
            assert detail["expected"] == "KVM_REJECTED"
            assert detail["actual"] in ("ACCEPTED", "MODULE_REJECTED -EINVAL hw_error "
                                        "0xc000010000000045 (TDX_OPERAND_INVALID, CPUID_CONFIG)")
            back = find_all(target, "a")[-1].get("href")
            assert back == f"#{rid}"


def test_the_page_is_self_contained_and_prints(capsys: pytest.CaptureFixture[str],
                                               grid: list[Path]) -> None:
    html = _merge(capsys, *grid)
    assert "<script" not in html and "<link" not in html and " src=" not in html
    assert not re.search(r"""(href|url)\s*[=(]\s*["']?(https?:|//)""", html)
    assert "@media print" in html and "print-color-adjust: exact" in html


def test_json_matrix_has_every_run_check_and_failure(capsys: pytest.CaptureFixture[str],
                                                     grid: list[Path]) -> None:
    doc = json.loads(_merge(capsys, *grid, "--format", "json"))
    assert (doc["schema"], doc["kind"]) == (1, "matrix")
    assert [r["kernel"] for r in doc["runs"]] == [p for _ in MODULES for p in POLICIES]
    assert all(r["host_identity"]["simulated"]["host"] == "max" for r in doc["runs"])
    columns = [r["column"] for r in doc["runs"]]
    for row in doc["checks"]:
        failing = {n for n, s in row["runs"].items() if s == "fail"}
        assert failing == _failing_columns(row["id"], columns), row["id"]
    # Six upstream columns with four bypass failures each, six with the WARN.
    assert len(doc["failures"]) == GRID_FAILURES == 30
    assert {f["what"] for f in doc["failures"]} == {*BYPASS_CHECKS, WARN_CHECK}


def test_junit_has_a_suite_per_run(capsys: pytest.CaptureFixture[str], grid: list[Path]) -> None:
    root = ET.fromstring(_merge(capsys, *grid, "--format", "junit"))
    suites = root.findall("testsuite")
    assert len(suites) == 9 and root.get("failures") == str(GRID_FAILURES)
    for n, s in enumerate(suites, 1):
        fails = {c.get("name") for c in s.findall("testcase") if c.find("failure") is not None}
        kernel = dict((p.get("name"), p.get("value")) for p in s.iter("property"))["kernel"]
        assert kernel == grid_column(n)[1]
        assert fails == grid_failures(*grid_column(n)), s.get("name")


def test_markdown_links_every_failure_to_its_anchor(capsys: pytest.CaptureFixture[str],
                                                    grid: list[Path]) -> None:
    md = _merge(capsys, *grid, "--format", "markdown")
    links = re.findall(r"\]\(#([a-z0-9_-]+)\)", md)
    anchors = set(re.findall(r'<a id="([a-z0-9_-]+)"></a>', md))
    assert len(links) == GRID_FAILURES and set(links) == anchors
    row = next(line for line in md.splitlines() if "`adversarial_denylist_bypass_waitpkg`" in line)
    cells = [c.strip() for c in row.strip("|").split("|")][1:]
    assert ["FAIL" in c for c in cells] == [p in UPSTREAM for _ in MODULES for p in POLICIES]


# ---------------------------------------------------------------------------
# Probe bit maps


def test_rfc_v2_and_upstream_maps_side_by_side_mark_what_differs(
        capsys: pytest.CaptureFixture[str], probes: dict[str, Path]) -> None:
    root = parse_page(_merge(capsys, probes["upstream"], probes["rfc-v2"]))
    assert list(_column_kernels(root, "bitmaps").values()) == ["upstream", "rfc-v2"]
    row = by_id(root)["reg-1-0-ecx"]
    assert "differs" in classes(row)
    maps = find_all(row, "svg", "bits")
    assert [m.get("data-column") for m in maps] == ["1", "2"]

    def cell(svg: Any, bit: int) -> Any:
        rects = find_all(svg, "rect")
        assert len(rects) == 32
        return rects[31 - bit]

    mwait = 3  # CPUID.1:ECX[3]: upstream reports it, the allowlist hides it
    assert "MWAIT" in text_of(cell(maps[0], mwait))
    assert classes(cell(maps[0], mwait)) == {"ra", "differs"}
    assert classes(cell(maps[1], mwait)) == {"hk", "differs"}
    assert "MWAIT" in text_of(find_all(row, "td", "names")[0])
    # HLE is hidden by both (the denylist, the allowlist): no mark.
    hle = find_all(by_id(root)["reg-7-0-ebx"], "svg", "bits")
    assert [classes(cell(m, 4)) for m in hle] == [{"hk"}, {"hk"}]
    for tr in find_all(root, "tr"):
        marks = len(find_all(tr, "path", "mark"))
        differing = sum("differs" in classes(r) for r in find_all(tr, "rect"))
        # Each map of a differing row marks the same bits under its cells.
        assert marks == differing if "differs" in classes(tr) else marks == differing == 0


def test_a_leaking_kernel_links_each_leaked_bit_to_its_detail(
        capsys: pytest.CaptureFixture[str], probes: dict[str, Path]) -> None:
    root = parse_page(_merge(capsys, probes["rfc-v2:allowlist_skips_row_7_1"]))
    ids = by_id(root)
    failed = find_all(root, "rect", "failed")
    assert len(failed) == 3
    for rect in failed:
        assert "hidden, yet accepted" in text_of(rect) and "ha" in classes(rect)
    links = [a for a in find_all(root, "a") if any(r in failed for r in a.iter())]
    assert len(links) == 3
    for a in links:
        href = a.get("href") or a.get("{http://www.w3.org/1999/xlink}href")
        article = ids[href.removeprefix("#")]
        assert "HIDDEN_ACCEPTED" in text_of(article) and "0x7.1" in text_of(article)


def test_the_legend_names_every_class_with_its_colour(capsys: pytest.CaptureFixture[str],
                                                      probes: dict[str, Path]) -> None:
    html = _merge(capsys, probes["rfc-v2"])
    root = parse_page(html)
    legend = {e.get("data-class"): e for e in root.iter() if e.get("data-class")}
    for cls, meaning, colour in BIT_CLASSES:
        assert meaning in text_of(legend[cls])
        assert find_all(legend[cls], "rect")[0].get("fill") == colour
    # The single-run page has no "bits that differ" column.
    assert "bits that differ" not in html


# ---------------------------------------------------------------------------
# One report as a page; reports from before host_identity


def test_report_html_is_the_same_page_with_one_column(capsys: pytest.CaptureFixture[str],
                                                      grid: list[Path],
                                                      tmp_path: Path) -> None:
    out = tmp_path / "one.html"
    r = run_cli(capsys, "report", "html", str(grid[1]), "--output", str(out))
    assert (r.rc, r.out) == (0, "")
    assert r.err == f"kvmtdx report: one run as a page -> {out}\n"
    root = parse_page(out.read_text())
    assert list(_column_kernels(root, "matrix").values()) == ["upstream"]
    assert len(find_all(root, "td", "s-fail")) == 4 and len(find_all(root, "article")) == 4
    assert text_of(find_all(root, "title")[0]) == \
        "kvmtdx verify: simulated host max / upstream / module 1.5.01"


def test_a_report_without_host_identity_is_labelled_from_what_it_has(
        capsys: pytest.CaptureFixture[str], grid: list[Path], tmp_path: Path) -> None:
    old_sim = json.loads(grid[1].read_text())
    del old_sim["host_identity"]
    old_real = dict(old_sim, backend="real /dev/kvm", module="2.0")
    paths = []
    for name, doc in (("sim.json", old_sim), ("real.json", old_real)):
        (tmp_path / name).write_text(json.dumps(doc))
        paths.append(tmp_path / name)
    doc = json.loads(_merge(capsys, *paths, "--format", "json"))
    labels = [(r["host"], r["kernel"], r["module"], r["host_identity"]) for r in doc["runs"]]
    assert labels == [("simulated host max", "upstream", "module 1.5.01", None),
                      ("real /dev/kvm", "policy upstream", "module 2.0", None)]
    html = _merge(capsys, *paths)
    assert html.count("written by an older kvmtdx") == 2


# ---------------------------------------------------------------------------
# Errors a user can make: one line, exit 2


def _refused(capsys: pytest.CaptureFixture[str], *argv: str) -> str:
    r = run_cli(capsys, "report", *argv)
    assert r.rc == 2 and r.out == ""
    assert r.err.count("\n") == 1, r.err
    return r.err


def test_reports_of_other_kinds_and_broken_files_are_refused(
        capsys: pytest.CaptureFixture[str], grid: list[Path], tmp_path: Path) -> None:
    caps = tmp_path / "caps.json"
    assert run_cli(capsys, "caps", "--simulate", "2.0", "--format", "json",
                   "--output", str(caps)).rc == 0
    err = _refused(capsys, "merge", str(grid[0]), str(caps))
    assert str(caps) in err and "caps report" in err and "verify or probe" in err
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    assert str(bad) in _refused(capsys, "html", str(bad))
    assert "missing.json" in _refused(capsys, "merge", str(tmp_path / "missing.json"))
    doc = json.loads(grid[0].read_text())
    doc["checks"][3]["status"] = "maybe"
    broken = tmp_path / "broken.json"
    broken.write_text(json.dumps(doc))
    assert "checks[3].status" in _refused(capsys, "merge", str(broken))


def test_without_jinja2_html_names_the_extra_and_json_still_works(
        capsys: pytest.CaptureFixture[str], grid: list[Path],
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "jinja2", None)  # import jinja2 now raises ImportError
    for fmt in ("html", "markdown"):
        err = _refused(capsys, "merge", str(grid[0]), "--format", fmt)
        assert "pip install 'kvmtdx[report]'" in err and "Jinja2" in err
    assert "pip install 'kvmtdx[report]'" in _refused(capsys, "html", str(grid[0]))
    assert json.loads(_merge(capsys, grid[0], "--format", "json"))["kind"] == "matrix"
    assert _merge(capsys, grid[0], "--format", "junit").startswith("<?xml")


def test_only_differences_keeps_rows_that_differ_or_fail(capsys: pytest.CaptureFixture[str],
                                                         grid: list[Path],
                                                         probes: dict[str, Path]) -> None:
    full = json.loads(_merge(capsys, *grid, "--format", "json"))
    doc = json.loads(_merge(capsys, *grid, "--only-differences", "--format", "json"))
    kept = [r["id"] for r in doc["checks"]]
    assert kept == [r["id"] for r in full["checks"] if r["differs"]]
    assert set(BYPASS_CHECKS) <= set(kept) and doc["failures"] == full["failures"]
    assert doc["rows_left_out"] == len(full["checks"]) - len(kept) > 0
    # Two kernels failing alike differ in nothing, yet their failures stay: upstream on
    # 1.5-late and 2.0, both with leaf 0x1F, so failing the WARN check as well.
    upstream = [p for p in grid if "-upstream.json" in p.name][1:]
    same = json.loads(_merge(capsys, *upstream, "--only-differences", "--format", "json"))
    assert {r["id"] for r in same["checks"]} == {*BYPASS_CHECKS, WARN_CHECK}
    maps = json.loads(_merge(capsys, probes["upstream"], probes["rfc-v2"], "--only-differences",
                             "--format", "json"))
    assert maps["bitmaps"] and all(r["differs"] for r in maps["bitmaps"])
    assert sum(len(r["differs"]) for r in maps["bitmaps"]) == 32
    assert "left out (--only-differences)" in _merge(capsys, *upstream, "--only-differences")


def test_text_from_a_report_is_escaped_not_markup(capsys: pytest.CaptureFixture[str],
                                                 grid: list[Path], tmp_path: Path) -> None:
    doc = json.loads(grid[1].read_text())
    hostile = '<script>alert("x")</script> & <b>bold</b>'
    failing = next(c for c in doc["checks"] if c["status"] == "fail")
    failing["detail"] = failing["actual"] = hostile
    doc["host_identity"]["simulated"]["host"] = "<i>max</i>"
    path = tmp_path / "hostile.json"
    path.write_text(json.dumps(doc))
    html = _merge(capsys, path)
    assert "<script" not in html and "<b>bold" not in html and "<i>max" not in html
    root = parse_page(html)
    article = find_all(root, "article", "failure")[0]
    assert hostile in text_of(article)
    assert "simulated host <i>max</i>" in text_of(find_all(root, "th", "col")[0])
