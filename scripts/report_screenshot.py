#!/usr/bin/env python3
"""The kvmtdx report pages in headless Chromium: the README's screenshots, and the tests' view.

    scripts/report_screenshot.py [--out docs]

writes, from simulated runs made on the spot:
- report-matrix.png: `kvmtdx report merge` of `verify --simulate` for modules
  1.5.01, 1.5-late and 2.0 under policies upstream-6.16, upstream and rfc-v2;
- report-bitmaps.png: `kvmtdx report merge --only-differences` of `probe
  --simulate 2.0:upstream` and `2.0:rfc-v2`: the registers where the two
  kernels differ, their bit maps side by side.

It drives Debian's chromium (or $KVMTDX_CHROMIUM) with its own --screenshot,
--dump-dom and --print-to-pdf, headless, with every background connection off
and a fresh profile; nothing is downloaded.  tests/test_report_browser.py
drives the browser through these same functions, so the README's pictures
come from tested code.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from kvmtdx import cli  # noqa: E402  (the checkout's kvmtdx, not an installed one)

MODULES = ("1.5.01", "1.5-late", "2.0")
POLICIES = ("upstream-6.16", "upstream", "rfc-v2")
# Headless, as root in CI, on a machine with no network: no sandbox (root), no GPU, and
# none of the connections Chromium makes on its own.
FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--hide-scrollbars", "--mute-audio", "--no-default-browser-check")
MATRIX_SIZE = (1280, 1400)
BITMAPS_SIZE = (1280, 900)


def find_chromium() -> str | None:
    """$KVMTDX_CHROMIUM, else Debian's chromium (or a chromium-browser) on PATH."""
    given = os.environ.get("KVMTDX_CHROMIUM")
    if given:
        return given
    return shutil.which("chromium") or shutil.which("chromium-browser")


def chromium(browser: str, page: Path, *args: str, timeout: float = 120
             ) -> subprocess.CompletedProcess[str]:
    """One headless Chromium run on `page` with `args`, in a profile of its own."""
    with tempfile.TemporaryDirectory(prefix="kvmtdx-chromium-") as profile:
        return subprocess.run([browser, *FLAGS, f"--user-data-dir={profile}", *args,
                               page.resolve().as_uri()],
                              capture_output=True, text=True, timeout=timeout, check=False)


def _ran(result: subprocess.CompletedProcess[str], out: Path | None = None) -> None:
    if result.returncode != 0 or (out is not None and not out.is_file()):
        tail = "\n".join(result.stderr.splitlines()[-5:])
        raise RuntimeError(f"chromium exited {result.returncode}: {tail}")


def dump_dom(browser: str, page: Path) -> str:
    """The DOM after the page loaded (and ran whatever script it has), serialised."""
    result = chromium(browser, page, "--dump-dom")
    _ran(result)
    return result.stdout


def screenshot(browser: str, page: Path, png: Path, size: tuple[int, int]) -> Path:
    result = chromium(browser, page, f"--window-size={size[0]},{size[1]}",
                      f"--screenshot={png.resolve()}")
    _ran(result, png)
    return png


def print_pdf(browser: str, page: Path, pdf: Path) -> Path:
    result = chromium(browser, page, "--no-pdf-header-footer", f"--print-to-pdf={pdf.resolve()}")
    _ran(result, pdf)
    return pdf


def _kvmtdx(*argv: str) -> None:
    rc = cli.main(list(argv))
    if rc not in (0, 1):  # 1: the runs found what they were meant to find
        raise RuntimeError(f"kvmtdx {' '.join(argv)}: exit {rc}")


def simulated_pages(folder: Path) -> tuple[Path, Path]:
    """The 3x3 verify merge page and the two-probe page, from simulated runs in `folder`
    (run from inside it, so the pages name their reports by file name alone)."""
    verify = {f"verify-{m}-{p}.json": f"{m}:{p}" for m in MODULES for p in POLICIES}
    probes = {f"probe-2.0-{p}.json": f"2.0:{p}" for p in ("upstream", "rfc-v2")}
    here = Path.cwd()
    os.chdir(folder)
    try:
        for command, runs in (("verify", verify), ("probe", probes)):
            for name, spec in runs.items():
                _kvmtdx(command, "--simulate", spec, "--format", "json", "--output", name)
        _kvmtdx("report", "merge", *verify, "--output", "report-matrix.html")
        _kvmtdx("report", "merge", "--only-differences", *probes,
                "--output", "report-bitmaps.html")
    finally:
        os.chdir(here)
    return folder / "report-matrix.html", folder / "report-bitmaps.html"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=ROOT / "docs",
                        help="where the PNGs go (default: docs/)")
    args = parser.parse_args(argv)
    browser = find_chromium()
    if browser is None:
        sys.stderr.write("report_screenshot: no chromium here (apt-get install chromium, "
                         "or set KVMTDX_CHROMIUM)\n")
        return 4
    args.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="kvmtdx-pages-") as tmp:
        matrix, bitmaps = simulated_pages(Path(tmp))
        for page, size in ((matrix, MATRIX_SIZE), (bitmaps, BITMAPS_SIZE)):
            png = screenshot(browser, page, args.out / page.with_suffix(".png").name, size)
            print(f"{png}: {png.stat().st_size} bytes")
    return 0


if __name__ == "__main__":
    sys.exit(main())
