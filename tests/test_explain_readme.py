"""Every `kvmtdx explain` example of the README runs and prints what the README shows.

An example is a ```sh block starting `$ kvmtdx explain ...`; the lines after it are its
output, where a line `...` stands for lines left out and a line ending in ` ...` for the rest
of that line.  Files the examples read are the README's blocks whose info string names them
(```json td.json).  Errors print as the CLI prints them (`kvmtdx: error:`, `kvmtdx: skip:`).
"""

from __future__ import annotations

import contextlib
import io
import re
import shlex
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
from helpers import shown_in

from kvmtdx.cli import main
from kvmtdx.device import tdx_status
from kvmtdx.errors import ExitCode

README = Path(__file__).resolve().parent.parent / "README.md"
FENCE = re.compile(r"^```(\w+)(?: (\S+))?\n(.*?)^```$", re.M | re.S)


@dataclass(frozen=True)
class Example:
    command: str
    expected: tuple[str, ...]


def _section() -> str:
    text = README.read_text()
    start = text.index("### kvmtdx explain")
    end = text.index("\n### ", start + 1)
    return text[start:end]


def _files() -> dict[str, str]:
    return {m.group(2): m.group(3) for m in FENCE.finditer(_section()) if m.group(2)}


def _examples() -> list[Example]:
    out: list[Example] = []
    for m in FENCE.finditer(_section()):
        lines = m.group(3).splitlines()
        if m.group(1) == "sh" and lines and lines[0].startswith("$ kvmtdx explain"):
            out.append(Example(lines[0][2:], tuple(lines[1:])))
    return out


def run_example(cmd: str, cwd: Path) -> tuple[str, int]:
    """Run one example in `cwd` (the caller's working directory)."""
    words = shlex.split(cmd)
    assert words[:2] == ["kvmtdx", "explain"], cmd
    args, stdin = words[2:], None
    if "<" in args:
        at = args.index("<")
        stdin = io.StringIO((cwd / args[at + 1]).read_text())
        args = args[:at]
    out, err = io.StringIO(), io.StringIO()
    saved = sys.stdin
    sys.stdin = stdin if stdin is not None else io.StringIO("")
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = main(["explain", *args])
    finally:
        sys.stdin = saved
    # The README shows what a user sees: the report, or the one error line.
    return out.getvalue() or err.getvalue(), code


EXAMPLES = _examples()


def test_the_readme_has_the_examples_the_issue_asks_for() -> None:
    commands = [e.command for e in EXAMPLES]
    assert "kvmtdx explain 0xc000010000000045" in commands
    assert any("--request" in c for c in commands)
    assert any("--host-check" in c and "--simulate" in c for c in commands)
    assert any("< qemu.log" in c for c in commands)
    assert {"td.json", "qemu.log", "dmesg.txt"} <= set(_files())


@pytest.mark.parametrize("example", EXAMPLES, ids=[e.command for e in EXAMPLES])
def test_readme_example(example: Example, tmp_path: Path,
                        monkeypatch: pytest.MonkeyPatch) -> None:
    real_host_check = "--host-check" in example.command and "--simulate" not in example.command
    if real_host_check and tdx_status().available:
        pytest.skip("this example shows a host without TDX")
    for name, text in _files().items():
        (tmp_path / name).write_text(text)
    monkeypatch.chdir(tmp_path)
    text, code = run_example(example.command, tmp_path)
    assert code == (ExitCode.SKIP if real_host_check else ExitCode.PASS), text
    assert shown_in(example.expected, text.splitlines()), text


def test_the_matcher_fails_on_a_line_the_output_lacks() -> None:
    assert shown_in(("a", "...", "c"), ["a", "b", "c"])
    assert not shown_in(("a", "c"), ["a", "b", "c"])
    assert not shown_in(("a", "...", "d"), ["a", "b", "c"])
    assert shown_in(("x ...",), ["x and the rest"])
