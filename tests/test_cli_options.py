"""Options: refused when they would be silently ignored or mean nothing, a plug-in backend
that fails in one line, and help text for every option of every command.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest
from helpers import run_cli

from kvmtdx import cli
from kvmtdx.cli.options import RULES


def _usage_error(capsys: pytest.CaptureFixture[str], argv: list[str], *words: str) -> str:
    rc, out, err = run_cli(capsys, *argv)
    assert (rc, out) == (2, ""), (argv, err)
    assert err.startswith("kvmtdx: error: ") and err.count("\n") == 1, err
    for w in words:
        assert w in err, (w, err)
    return err


# ---------------------------------------------------------------------------
# --simulate and --backend.


@pytest.mark.parametrize("command", ["info", "caps", "verify", "probe"])
@pytest.mark.parametrize("option", ["--simulate", "--backend"])
def test_an_empty_backend_option_is_refused_not_read_as_the_real_device(
        capsys: pytest.CaptureFixture[str], command: str, option: str) -> None:
    _usage_error(capsys, [command, option, ""], option, "empty")


def test_a_backend_factory_that_needs_arguments_is_one_line(
        capsys: pytest.CaptureFixture[str]) -> None:
    _usage_error(capsys, ["info", "--backend", "json:loads"], "--backend 'json:loads'",
                 "loads() failed", "TypeError")


def test_a_backend_factory_that_raises_is_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    _usage_error(capsys, ["info", "--backend", "helpers:must_not_run"],
                 "--backend 'helpers:must_not_run'", "AssertionError", "the run went ahead")


def test_a_backend_factory_returning_something_else_is_one_line(
        capsys: pytest.CaptureFixture[str]) -> None:
    _usage_error(capsys, ["info", "--backend", "os:getcwd"], "--backend 'os:getcwd'",
                 "open(path, flags)")


def test_a_backend_module_that_fails_to_import_is_one_line(
        capsys: pytest.CaptureFixture[str], tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "broken_seam.py").write_text("raise RuntimeError('half-written plug-in')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    _usage_error(capsys, ["info", "--backend", "broken_seam:make"], "cannot import broken_seam",
                 "RuntimeError: half-written plug-in")


# ---------------------------------------------------------------------------
# Combinations: an option that would have no effect is refused, each rule of the table.

# (argv, the option refused); each is a command line on which the option does nothing.
IGNORED: list[tuple[list[str], str]] = [
    (["info", "--host", "max"], "--host"),
    (["info", "--backend", "helpers:no_tdx", "--host", "max"], "--host"),
    (["caps", "--host", "max"], "--host"),
    (["init-vm", "--host", "max", "--request", "r.json"], "--host"),
    (["diff", "a.json", "b.json", "--host", "max"], "--host"),
    (["diff", "a.json", "b.json", "--allowlist", "al.json"], "--allowlist"),
    (["diff", "--module", "2.0", "--policy", "upstream", "--policy", "upstream-6.16",
      "--allowlist", "al.json"], "--allowlist"),
    (["predict", "--module", "2.0", "--policy", "upstream", "--allowlist", "al.json"],
     "--allowlist"),
    (["init-vm", "--allowlist", "al.json", "--request", "r.json"], "--allowlist"),
    (["init-vm", "--simulate", "2.0:upstream", "--allowlist", "al.json", "--request", "r.json"],
     "--allowlist"),
    (["caps", "--simulate", "2.0", "--allowlist", "al.json"], "--allowlist"),
    (["verify", "--simulate", "2.0:upstream", "--policy", "upstream", "--allowlist", "al.json"],
     "--allowlist"),
    (["probe", "--policy", "upstream-6.16", "--allowlist", "al.json"], "--allowlist"),
    (["fuzz", "--simulate", "2.0:upstream", "--policy", "upstream", "--allowlist", "al.json"],
     "--allowlist"),
    (["caps", "--simulate", "2.0", "--module", "2.0"], "--module"),
    (["caps", "--simulate", "2.0", "--policy", "upstream"], "--policy"),
]

# The same options where they do act: these must not be refused.
USED: list[list[str]] = [
    ["info", "--simulate", "2.0", "--host", "max"],
    ["caps", "--simulate", "2.0", "--host", "max"],
    ["init-vm", "--simulate", "2.0", "--host", "max", "--request", "r.json"],
    ["diff", "--module", "2.0", "--policy", "upstream", "--policy", "rfc-v2", "--host", "max",
     "--allowlist", "al.json"],
    ["predict", "--module", "2.0", "--policy", "rfc-v2", "--allowlist", "al.json"],
    ["init-vm", "--simulate", "2.0:rfc-v2", "--allowlist", "al.json", "--request", "r.json"],
    ["caps", "--simulate", "2.0:rfc-v2", "--allowlist", "al.json"],
    ["caps", "--simulate", "2.0", "--policy", "rfc-v2", "--allowlist", "al.json",
     "--save-module", "m.json"],
    ["caps", "--simulate", "2.0", "--module", "2.0", "--policy", "upstream", "--save-module",
     "m.json"],
    ["verify", "--simulate", "2.0:upstream", "--allowlist", "al.json"],  # --policy auto
    ["verify", "--simulate", "2.0:rfc-v2", "--policy", "upstream", "--allowlist", "al.json"],
    ["verify", "--backend", "helpers:no_tdx", "--host", "max"],
    ["fuzz", "--simulate", "2.0:rfc-v2", "--allowlist", "al.json", "--max-tds", "20", "--no-db"],
]


@pytest.fixture
def files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The files the command lines above name, in the working directory."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "r.json").write_text(json.dumps({"attributes": 0, "xfam": 3, "cpuid": []}))
    (tmp_path / "al.json").write_text(json.dumps({"name": "mine", "allowed": []}))
    caps = {"schema": 1, "kind": "caps", "tool_version": "0.1.0", "cpuid": []}
    for name in ("a.json", "b.json"):
        (tmp_path / name).write_text(json.dumps(caps))
    return tmp_path


@pytest.mark.parametrize(("argv", "option"), IGNORED)
def test_an_option_that_would_do_nothing_is_refused(
        capsys: pytest.CaptureFixture[str], files: Path, argv: list[str], option: str) -> None:
    err = _usage_error(capsys, argv, f"{option} has no effect")
    assert err.count("--") >= 2  # and it says what the option needs


@pytest.mark.parametrize("argv", USED)
def test_an_option_that_acts_is_not_refused(capsys: pytest.CaptureFixture[str], files: Path,
                                            argv: list[str]) -> None:
    rc, _, err = run_cli(capsys, *argv)
    assert "has no effect" not in err and rc in (0, 1, 4), err


def test_every_rule_of_the_table_is_exercised() -> None:
    hit = {(argv[0], option) for argv, option in IGNORED}
    for rule in RULES:
        assert any((c, rule.option) in hit for c in rule.commands), rule


# ---------------------------------------------------------------------------
# Help.


def _subparsers() -> dict[str, argparse.ArgumentParser]:
    parser = cli.build_parser()
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


@pytest.mark.parametrize("command", [c.name for c in cli.COMMANDS])
def test_every_option_of_every_command_is_explained(command: str) -> None:
    parsers = [_subparsers()[command]]
    while parsers:  # a command's own subcommands too (report merge, report html)
        p = parsers.pop()
        for action in p._actions:
            assert action.help and action.help != argparse.SUPPRESS, (command,
                                                                      action.option_strings)
            assert "None" not in action.help, (command, action.help)
            if isinstance(action, argparse._SubParsersAction):
                parsers += list(action.choices.values())
        assert "None" not in p.format_help(), p.format_help()


def test_host_spells_out_its_three_forms() -> None:
    for name, p in _subparsers().items():
        for action in p._actions:
            if "--host" in action.option_strings:
                assert action.metavar == "FILE|native|max", name
                assert "native" in str(action.help) and "max" in str(action.help), name


def test_every_command_has_help_of_its_own(capsys: pytest.CaptureFixture[str]) -> None:
    for name in _subparsers():
        rc, out, _ = run_cli(capsys, name, "--help")
        assert rc == 0 and out.startswith(f"usage: kvmtdx {name}"), name
