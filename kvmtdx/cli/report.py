"""`kvmtdx report`: many verify and probe reports as one matrix (merge), or one as a page (html)."""

from __future__ import annotations

import argparse
from collections.abc import Callable

from kvmtdx.cli.common import Command, Parser, output_file, output_options, write
from kvmtdx.errors import ExitCode

FORMATS = ("html", "markdown", "junit", "json")
DESCRIPTION = (
    "Turn kvmtdx JSON reports into one view.  merge: one matrix of runs (columns: "
    "host / kernel / module, from each report's host identity) by checks (rows), each "
    "failing cell linked to its detail, and for probe reports a 32-cell bit map per "
    "register and run with the bits where runs differ marked.  html: one report as the "
    "same page, with one column.")
EPILOG = (
    "The HTML page is self-contained (inline CSS and SVG, no script, nothing fetched) and "
    "prints.  html and markdown need Jinja2: pip install 'kvmtdx[report]'.  "
    "exit codes: 0 written, 2 usage or input error (a file that is not a verify or probe "
    "report, or a missing extra)")


def arguments(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="report_command", metavar="SUBCOMMAND", parser_class=Parser,
                           help="merge: many reports as one matrix; html: one report as a page")
    sub.required = True
    merge = sub.add_parser("merge", help="many reports as one matrix",
                           description="One matrix of runs by checks, and bit maps of probe "
                                       "runs side by side, from verify and probe JSON reports.")
    merge.add_argument("reports", nargs="+", metavar="REPORT.json",
                       help="verify or probe JSON reports, one column each, in this order")
    merge.add_argument("--only-differences", action="store_true",
                       help="leave out the rows (checks, registers) on which every run agrees "
                            "and nothing failed")
    output_options(merge, FORMATS)
    page = sub.add_parser("html", help="one report as a page",
                          description="One verify or probe JSON report as an HTML page.")
    page.add_argument("report", metavar="REPORT.json", help="a verify or probe JSON report")
    page.add_argument("--output", metavar="FILE", type=output_file("--output"),
                      help="write the page to FILE instead of standard output (as every "
                           "command's --output writes)")


def run(args: argparse.Namespace) -> int:
    from kvmtdx.report import formats, matrix, pages
    from kvmtdx.report.runs import read_run

    if args.report_command == "html":
        write(args, pages.render_html(matrix.build([read_run(args.report)]), single=True),
              "one run as a page")
        return ExitCode.PASS
    m = matrix.build([read_run(path) for path in args.reports], args.only_differences)
    renderers: dict[str, Callable[[matrix.Matrix], str]] = {
        "html": pages.render_html, "markdown": pages.render_markdown,
                 "junit": formats.render_junit, "json": formats.render_json}
    write(args, renderers[args.format](m),
          f"{len(m.columns)} runs by {len(m.checks)} checks, {len(m.failures)} failures")
    return ExitCode.PASS


COMMAND = Command("report", "many reports as one matrix (merge), or one as a page (html)",
                  arguments, run, description=DESCRIPTION, epilog=EPILOG)
