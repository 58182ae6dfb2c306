"""The report page as a person sees it: rendered by a real headless browser (Debian's chromium).

The pages are the README's (scripts/report_screenshot.py makes them, and drives
the browser here too): the 3x3 verify merge and the 2.0 upstream/rfc-v2 probe
merge.  A copy of each page gets a test-only script that reads back from the
rendered DOM what the browser computed (colours, sizes, link targets) into a
<pre>; chromium --dump-dom hands that back.  The page itself has no script.
Screenshots and the printed PDF are kept in $KVMTDX_ARTIFACTS (default
.artifacts/) for CI.  Without chromium the tests skip and say why, except in CI
(CI=true), where scripts/test installs it and its absence fails.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import struct
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
from helpers import (
    GRID_FAILURES,
    LEAK_CHECK,
    MODULES,
    POLICIES,
    WARN_CHECK,
    find_all,
    grid_column,
    grid_failures,
    parse_page,
)

from kvmtdx.checks import CHECKS
from kvmtdx.report.pages import CSS
from kvmtdx.report.runs import BIT_CLASSES

ROOT = Path(__file__).resolve().parent.parent
ARTIFACTS = Path(os.environ.get("KVMTDX_ARTIFACTS") or ROOT / ".artifacts")

# Runs in the rendered page and leaves what the browser computed in <pre id=...>.
DOM_PROBE = """
(() => {
  const box = e => { const r = e.getBoundingClientRect(); return [r.width, r.height]; };
  const css = (e, p) => getComputedStyle(e).getPropertyValue(p);
  const out = {
    resources: performance.getEntriesByType('resource').map(e => e.name),
    printRules: [...document.styleSheets].flatMap(s => [...s.cssRules])
      .filter(r => r.media && r.media.mediaText === 'print').length,
    columns: [...document.querySelectorAll('th.col')].map(th => ({
      id: th.id, table: th.closest('table').className,
      kernel: th.querySelector('.kernel').textContent, box: box(th)})),
    cells: [...document.querySelectorAll('table.matrix td.cell')].map(td => ({
      row: td.parentElement.id, column: td.dataset.column, status: td.dataset.status,
      background: css(td, 'background-color'), text: td.textContent.trim(),
      href: td.querySelector('a') ? td.querySelector('a').getAttribute('href') : null,
      box: box(td)})),
    failures: Object.fromEntries([...document.querySelectorAll('article.failure')].map(a => [
      a.id, {text: a.innerText, box: box(a)}])),
    bits: [...document.querySelectorAll('svg.bits rect')].map(r => ({
      row: r.closest('tr').id, column: r.closest('svg').dataset.column,
      cls: r.getAttribute('class'), fill: css(r, 'fill'),
      title: r.querySelector('title').textContent, box: box(r)})),
    marks: [...document.querySelectorAll('svg.bits path.mark')].map(p => ({
      row: p.closest('tr').id, box: box(p)})),
  };
  const pre = document.createElement('pre');
  pre.id = 'kvmtdx-dom-probe';
  pre.textContent = JSON.stringify(out);
  document.body.appendChild(pre);
})();
"""


def _script() -> ModuleType:
    spec = importlib.util.spec_from_file_location("report_screenshot",
                                                  ROOT / "scripts" / "report_screenshot.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


shot = _script()


@pytest.fixture(scope="module")
def browser() -> str:
    found: str | None = shot.find_chromium()
    if found is None:
        reason = ("no chromium here: `apt-get install chromium` (scripts/test installs it in "
                  "CI), or set KVMTDX_CHROMIUM")
        if os.environ.get("CI"):
            pytest.fail(reason)
        pytest.skip(reason)
    return found


@pytest.fixture(scope="module")
def pages(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    matrix, bitmaps = shot.simulated_pages(tmp_path_factory.mktemp("pages"))
    return matrix, bitmaps


def _rendered(browser: str, page: Path) -> dict[str, Any]:
    """What the browser computed for `page` (a copy with DOM_PROBE appended)."""
    probed = page.with_name(page.stem + "-probed.html")
    html = page.read_text()
    assert html.count("</body>") == 1
    probed.write_text(html.replace("</body>", f"<script>{DOM_PROBE}</script>\n</body>"))
    dom = parse_page_loose(shot.dump_dom(browser, probed))
    (pre,) = [e for e in dom.iter() if e.get("id") == "kvmtdx-dom-probe"]
    found: dict[str, Any] = json.loads("".join(pre.itertext()))
    return found


def parse_page_loose(html: str) -> Any:
    import html5lib

    return html5lib.parse(html, namespaceHTMLElements=False)


def _rgb(colour: str) -> str:
    """#rrggbb as getComputedStyle writes it."""
    r, g, b = (int(colour[i:i + 2], 16) for i in (1, 3, 5))
    return f"rgb({r}, {g}, {b})"


@pytest.fixture(scope="module")
def matrix_dom(browser: str, pages: tuple[Path, Path]) -> dict[str, Any]:
    return _rendered(browser, pages[0])


@pytest.fixture(scope="module")
def bitmaps_dom(browser: str, pages: tuple[Path, Path]) -> dict[str, Any]:
    return _rendered(browser, pages[1])


def test_the_page_fetches_nothing_and_has_print_rules(matrix_dom: dict[str, Any]) -> None:
    assert matrix_dom["resources"] == []
    assert matrix_dom["printRules"] >= 1


def test_the_matrix_shows_nine_columns_and_the_bypass_in_red_in_upstream_columns(
        matrix_dom: dict[str, Any]) -> None:
    columns = [c for c in matrix_dom["columns"] if c["table"] == "matrix"]
    assert [c["kernel"] for c in columns] == [p for _ in MODULES for p in POLICIES]
    assert all(w > 40 and h > 40 for w, h in (c["box"] for c in columns))
    cells = matrix_dom["cells"]
    assert len(cells) == len(CHECKS) * 9
    colours = {"fail": _rgb("#c62828"), "pass": _rgb("#e7f4e8"), "skip": _rgb("#eceff1"),
               "info": _rgb("#e3f2fd")}
    for cell in cells:
        check = cell["row"].removeprefix("check-")
        # The bypass in the upstream columns, the WARN in those of modules with leaf 0x1F.
        should_fail = check in grid_failures(*grid_column(cell["column"]))
        assert (cell["status"] == "fail") == should_fail, cell
        assert cell["background"] == colours[cell["status"]], cell
        assert cell["box"][0] > 20 and cell["box"][1] > 10
        assert ("FAIL" in cell["text"]) == should_fail


def test_every_failing_cell_links_to_its_visible_detail(matrix_dom: dict[str, Any]) -> None:
    failing = [c for c in matrix_dom["cells"] if c["status"] == "fail"]
    assert len(failing) == GRID_FAILURES
    for cell in failing:
        detail = matrix_dom["failures"][cell["href"].removeprefix("#")]
        assert detail["box"][1] > 40
        text = detail["text"]
        assert cell["row"].removeprefix("check-") in text and f"#{cell['column']}" in text
        expected = "refused, no WARN" if WARN_CHECK in cell["row"] else (
            "no hidden bit" if LEAK_CHECK in cell["row"] else "KVM_REJECTED")
        assert re.search(rf"expected\s+{expected}", text)
    assert len(matrix_dom["failures"]) == GRID_FAILURES


def test_bit_maps_are_coloured_by_class_and_mark_where_rfc_v2_and_upstream_differ(
        bitmaps_dom: dict[str, Any]) -> None:
    kernels = [c["kernel"] for c in bitmaps_dom["columns"] if c["table"] == "bitmaps"]
    assert kernels == ["upstream", "rfc-v2"]
    fills = {CSS[cls]: _rgb(colour) for cls, _, colour in BIT_CLASSES}
    bits = bitmaps_dom["bits"]
    assert bits and len(bits) % 64 == 0  # two maps of 32 cells a row
    for b in bits:
        code = b["cls"].split()[0]
        assert b["fill"] == fills[code], b
        assert b["box"] == [10, 14]
    by_cell = {(b["row"], b["column"], b["title"].split(":")[0]): b for b in bits}
    upstream_mwait = by_cell[("reg-1-0-ecx", "1", "0x1 ECX[3] MWAIT")]
    rfc_mwait = by_cell[("reg-1-0-ecx", "2", "0x1 ECX[3] MWAIT")]
    assert upstream_mwait["fill"] == _rgb("#2e7d32") and "differs" in upstream_mwait["cls"]
    assert rfc_mwait["fill"] == _rgb("#1565c0") and "differs" in rfc_mwait["cls"]
    assert "reported, accepted" in upstream_mwait["title"]
    assert "hidden: KVM refuses it" in rfc_mwait["title"]
    differing = [b for b in bits if "differs" in b["cls"]]
    assert len(differing) == len(bitmaps_dom["marks"]) == 2 * 32  # 32 bits, both maps
    assert all(m["box"][1] > 3 for m in bitmaps_dom["marks"])


@pytest.fixture(scope="module")
def artifacts() -> Iterator[Path]:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    yield ARTIFACTS


def _png_size(png: Path) -> tuple[int, int]:
    data = png.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR"
    width, height = struct.unpack(">II", data[16:24])
    return width, height


def test_screenshots_are_kept_as_artifacts(browser: str, pages: tuple[Path, Path],
                                           artifacts: Path) -> None:
    for page, size in zip(pages, (shot.MATRIX_SIZE, shot.BITMAPS_SIZE), strict=True):
        png = shot.screenshot(browser, page, artifacts / page.with_suffix(".png").name, size)
        assert _png_size(png) == size
        assert png.stat().st_size > 20_000  # a rendered page, not a blank one


def test_the_page_prints_landscape(browser: str, pages: tuple[Path, Path],
                                   artifacts: Path) -> None:
    pdf = shot.print_pdf(browser, pages[0], artifacts / "report-matrix.pdf")
    data = pdf.read_bytes()
    assert data.startswith(b"%PDF")
    boxes = [tuple(map(float, m)) for m in re.findall(
        rb"/MediaBox\s*\[\s*([\d.]+)\s+([\d.]+)\s+([\d.]+)\s+([\d.]+)\s*\]", data)]
    assert boxes and all(x1 - x0 > y1 - y0 for x0, y0, x1, y1 in boxes)  # @page landscape


def test_the_html_parses_strictly(pages: tuple[Path, Path]) -> None:
    for page in pages:
        root = parse_page(page.read_text())
        assert find_all(root, "table")
