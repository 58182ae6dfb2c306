"""The README's `kvmtdx fuzz` example runs and prints what the README shows: a discrepancy
found and shrunk, its replay file through `init-vm` on the buggy kernel, and `fuzz --replay`
passing on the fixed one; its JSON description names every field the report writes.

An example is a ```sh block of the fuzz section; each `$ kvmtdx ...` line is a command and
the lines up to the next are its output (`...` stands for lines left out, a line ending in
` ...` for the rest of that line).  The commands run in one directory, in order, with the
fuzz database in a directory of their own.
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
from helpers import run_cli, shown_in

from kvmtdx.fuzz.judgement import Call
from kvmtdx.fuzz.result import End

README = Path(__file__).resolve().parent.parent / "README.md"
SH = re.compile(r"^```sh\n(.*?)^```$", re.M | re.S)


def _section() -> str:
    text = README.read_text()
    start = text.index("### kvmtdx fuzz")
    return text[start:text.index("\n### ", start + 1)]


def _examples() -> list[tuple[str, tuple[str, ...]]]:
    """(command, the output shown) for every `$ kvmtdx` line of the section's sh blocks."""
    out: list[tuple[str, list[str]]] = []
    for block in SH.finditer(_section()):
        for line in block.group(1).splitlines():
            if line.startswith("$ kvmtdx "):
                out.append((line[2:], []))
            elif out:
                out[-1][1].append(line)
    return [(cmd, tuple(lines)) for cmd, lines in out]


def test_the_readme_shows_a_finding_and_its_replay() -> None:
    commands = [c for c, _ in _examples()]
    assert any(c.startswith("kvmtdx fuzz") and "--save" in c for c in commands)
    assert any(c.startswith("kvmtdx init-vm") and "found/finding-" in c for c in commands)
    assert any("--replay found/finding-" in c for c in commands)


def test_the_readme_examples_print_what_the_readme_shows(
        capsys: pytest.CaptureFixture[str], tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("KVMTDX_CACHE_DIR", str(tmp_path / "cache"))
    for command, shown in _examples():
        r = run_cli(capsys, *shlex.split(command)[1:])
        assert r.rc in (0, 1), (command, r.err)
        assert shown_in(shown, r.out.splitlines()), (command, r.out)


def test_the_readme_names_every_field_of_the_json_report(
        capsys: pytest.CaptureFixture[str]) -> None:
    """Every field a report and its findings carry, every call a finding can name and every
    way a run ends are in the README's JSON description."""
    section = _section()
    described = section[section.index("JSON (`--format json`)"):]
    r = run_cli(capsys, "fuzz", "--simulate", "2.0:rfc-v2:vcpu_without_split_irqchip",
                "--seed", "1", "--first", "--no-db", "--format", "json")
    doc = r.json()
    assert r.rc == 1 and doc["findings"]
    fields = {*doc, *doc["budget"], *doc["summary"], *doc["findings"][0]}
    names = fields | {c.value for c in Call} | {e.value for e in End}
    assert not [n for n in sorted(names) if f'"{n}"' not in described]
