"""Bad input files: one line naming the file and the field, exit 2, never a traceback.

Every file kvmtdx reads (requests, module profiles, hosts, allowlists, reports) goes
through kvmtdx.jsonfile: a bounded read of a regular file (or '-', standard input),
UTF-8, strict JSON (no duplicate keys, bounded nesting), strict integers, and no
unknown fields.  Each loader is driven here through the command line that reads it.
"""

from __future__ import annotations

import io
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from helpers import bypass_request, run_cli, small_host_json

MAX_BYTES = 16 * 1024 * 1024  # the documented limits (README, "Input files")
MAX_DEPTH = 32
# A valid document of each file kind, and the command line that reads a file of that kind.
VALID: dict[str, dict[str, Any]] = {
    "request": {"attributes": 0, "xfam": 3, "cpuid": []},
    "module": {"name": "m", "base": "2.0",
               "rows": [{"leaf": 1, "subleaf": None, "config_direct": [0, 0, 0, 0],
                         "allow_direct": [0, 0, 0, 0]}]},
    # A host the module initialises on (predict refuses any other, in one line).
    "host": small_host_json(),
    "allowlist": {"name": "a", "allowed": [{"leaf": 7, "subleaf": 0, "register": "ecx",
                                            "bits": [5]}]},
    "report": {"schema": 1, "kind": "caps", "tool_version": "0.1.0", "cpuid": []},
}
ARGV: dict[str, Callable[[str], list[str]]] = {
    "request": lambda f: ["predict", "--module", "2.0", "--request", f],
    "module": lambda f: ["predict", "--module", f],
    "host": lambda f: ["predict", "--module", "2.0", "--host", f],
    "allowlist": lambda f: ["predict", "--module", "2.0", "--policy", "rfc-v2", "--allowlist", f],
    "report": lambda f: ["diff", f, f],
}
KINDS = tuple(VALID)


def _refused(capsys: pytest.CaptureFixture[str], kind: str, path: str, *words: str) -> str:
    """Run the loader of `kind` on `path`: exit 2, one line naming the file and `words`."""
    rc, out, err = run_cli(capsys, *ARGV[kind](path))
    assert rc == 2, (kind, out, err)
    assert err.startswith("kvmtdx: error: ") and err.count("\n") == 1, err
    assert path in err, err
    for w in words:
        assert w in err, (w, err)
    return err


def _file(tmp_path: Path, content: str | bytes, name: str = "in.json") -> str:
    p = tmp_path / name
    if isinstance(content, bytes):
        p.write_bytes(content)
    else:
        p.write_text(content)
    return str(p)


@pytest.mark.parametrize("kind", KINDS)
def test_the_valid_documents_are_read(capsys: pytest.CaptureFixture[str], tmp_path: Path,
                                      kind: str) -> None:
    rc, _, err = run_cli(capsys, *ARGV[kind](_file(tmp_path, json.dumps(VALID[kind]))))
    assert rc == 0, err


# ---------------------------------------------------------------------------
# The file itself: encoding, size, nesting, what kind of file.


@pytest.mark.parametrize("kind", KINDS)
def test_a_file_that_is_not_utf8_is_refused(capsys: pytest.CaptureFixture[str], tmp_path: Path,
                                            kind: str) -> None:
    text = json.dumps({**VALID[kind], "comment": "\u00e9"}, ensure_ascii=False).encode()
    latin1 = text.replace("\u00e9".encode(), b"\xe9")
    _refused(capsys, kind, _file(tmp_path, latin1), "not UTF-8", "offset")


@pytest.mark.parametrize("kind", KINDS)
def test_json_nested_100000_deep_is_refused(capsys: pytest.CaptureFixture[str], tmp_path: Path,
                                            kind: str) -> None:
    _refused(capsys, kind, _file(tmp_path, "[" * 100_000 + "]" * 100_000),
             f"nested deeper than {MAX_DEPTH}")


def test_nesting_just_past_the_limit_is_refused_and_at_it_is_not(
        capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    def nested(depth: int) -> dict[str, Any]:
        note: Any = 0
        for _ in range(depth - 1):  # the request object itself is one level
            note = [note]
        return {**VALID["request"], "comment": note}

    rc, _, err = run_cli(capsys, *ARGV["request"](_file(tmp_path, json.dumps(nested(MAX_DEPTH)))))
    assert rc == 0, err
    _refused(capsys, "request", _file(tmp_path, json.dumps(nested(MAX_DEPTH + 1)), "deep.json"),
             f"nested deeper than {MAX_DEPTH}")


@pytest.mark.parametrize("kind", KINDS)
def test_dev_zero_is_refused_without_reading_it(capsys: pytest.CaptureFixture[str],
                                                kind: str) -> None:
    _refused(capsys, kind, "/dev/zero", "not a regular file")


@pytest.mark.parametrize("kind", KINDS)
def test_a_fifo_is_refused_without_waiting_for_a_writer(
        capsys: pytest.CaptureFixture[str], tmp_path: Path, kind: str) -> None:
    fifo = tmp_path / "fifo.json"
    os.mkfifo(fifo)
    _refused(capsys, kind, str(fifo), "not a regular file")


def test_a_directory_is_refused(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    _refused(capsys, "request", str(tmp_path), "directory")


def test_a_file_over_the_size_limit_is_refused(capsys: pytest.CaptureFixture[str],
                                               tmp_path: Path) -> None:
    head = json.dumps(VALID["request"])[:-1] + ', "_pad": "'
    doc = head + "a" * (MAX_BYTES - len(head) - 1) + '"}'
    assert len(doc) == MAX_BYTES + 1
    _refused(capsys, "request", _file(tmp_path, doc), "larger than 16 MiB")
    rc, _, err = run_cli(capsys, *ARGV["request"](_file(tmp_path, doc[:-3] + '"}', "at.json")))
    assert rc == 0, err  # exactly the limit is read


def _stdin(monkeypatch: pytest.MonkeyPatch, data: bytes) -> None:
    monkeypatch.setattr("sys.stdin", io.TextIOWrapper(io.BytesIO(data)))


def test_request_dash_reads_standard_input(capsys: pytest.CaptureFixture[str], tmp_path: Path,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    text = json.dumps(bypass_request())
    from_file = run_cli(capsys, *ARGV["request"](_file(tmp_path, text)), "--format", "json")
    _stdin(monkeypatch, text.encode())
    from_stdin = run_cli(capsys, *ARGV["request"]("-"), "--format", "json")
    assert from_stdin.rc == 0, from_stdin.err
    assert from_stdin.json()["init_vm"]["outcome"] == "ACCEPTED"  # the bypass, on upstream
    assert from_stdin.out == from_file.out


def test_standard_input_is_read_bounded_too(capsys: pytest.CaptureFixture[str],
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    _stdin(monkeypatch, b" " * (MAX_BYTES + 1))
    rc, _, err = run_cli(capsys, "predict", "--module", "2.0", "--request", "-")
    assert rc == 2 and err == "kvmtdx: error: -: standard input larger than 16 MiB\n"


# ---------------------------------------------------------------------------
# The JSON: duplicate keys, numbers that are not plain integers.


@pytest.mark.parametrize("kind", KINDS)
def test_a_duplicate_key_is_refused_naming_it(capsys: pytest.CaptureFixture[str], tmp_path: Path,
                                              kind: str) -> None:
    text = json.dumps(VALID[kind])
    first = next(iter(VALID[kind]))
    dup = "{" + json.dumps(first) + ": " + json.dumps(VALID[kind][first]) + ", " + text[1:]
    _refused(capsys, kind, _file(tmp_path, dup), f"duplicate key '{first}'")


@pytest.mark.parametrize("value", ["\u0663", "\uff13", "0o3", "0b11", "1_0", " 3", "3 ", "+3",
                                   "0x", "0x-1", "1e0"])
def test_only_ascii_decimal_or_0x_hex_strings_are_integers(
        capsys: pytest.CaptureFixture[str], tmp_path: Path, value: str) -> None:
    req = {**VALID["request"], "xfam": value}
    _refused(capsys, "request", _file(tmp_path, json.dumps(req)), "xfam", "not an integer")


@pytest.mark.parametrize("value", ["3", "0x3", "0X3", "0x03", "03"])
def test_ascii_decimal_and_hex_integers_are_read(capsys: pytest.CaptureFixture[str],
                                                 tmp_path: Path, value: str) -> None:
    def predicted(flags: Any) -> str:
        req = {**bypass_request(), "flags": flags}
        r = run_cli(capsys, *ARGV["request"](_file(tmp_path, json.dumps(req))), "--format", "json")
        assert r.rc == 0, r.err
        return r.out

    assert predicted(value) == predicted(3)
    assert predicted(value) != predicted(0)  # non-zero kvm_tdx_cmd.flags are refused


@pytest.mark.parametrize("literal", ["NaN", "Infinity", "-Infinity"])
def test_non_json_constants_are_refused(capsys: pytest.CaptureFixture[str], tmp_path: Path,
                                        literal: str) -> None:
    text = json.dumps({**VALID["request"], "comment": 0}).replace("0}", literal + "}")
    _refused(capsys, "request", _file(tmp_path, text), literal)


# ---------------------------------------------------------------------------
# Fields: wrong types anywhere, unknown fields, the kind of a kvmtdx document.

WRONG_TYPES: list[tuple[str, dict[str, Any], str]] = [
    ("module", {"base": 5}, "base"),
    ("module", {"name": 5}, "name"),
    ("module", {"source": ["a"]}, "source"),
    ("module", {"rows": {"leaf": 1}}, "rows"),
    ("host", {"name": 5}, "name"),
    ("host", {"cpuid": {"leaf": 1}}, "cpuid"),
    ("host", {"cpuid": [{"leaf": 1, "eax": {}}]}, "cpuid[0].eax"),
    ("host", {"ept_5level": "yes"}, "ept_5level"),
    ("allowlist", {"name": 5}, "name"),
    ("allowlist", {"provenance": 5}, "provenance"),
    ("allowlist", {"allowed": [{"leaf": 7, "subleaf": 0, "register": "ecx",
                                "bits": {"5": 5}}]}, "allowed[0].bits.5"),
    ("allowlist", {"passthrough": 5}, "passthrough"),
    ("allowlist", {"passthrough": [5]}, "passthrough[0]"),
    ("request", {"cpuid": [{"function": 1, "padding": "x"}]}, "cpuid[0].padding"),
    ("request", {"cpuid": 5}, "cpuid"),
]


@pytest.mark.parametrize(("kind", "change", "field"), WRONG_TYPES)
def test_a_wrong_type_anywhere_is_refused_naming_the_field(
        capsys: pytest.CaptureFixture[str], tmp_path: Path, kind: str, change: dict[str, Any],
        field: str) -> None:
    _refused(capsys, kind, _file(tmp_path, json.dumps({**VALID[kind], **change})), field)


UNKNOWN_FIELDS: list[tuple[str, dict[str, Any], str]] = [
    ("module", {"xfam_fixed": "0x3"}, "xfam_fixed"),
    # The old profile's fixed bits and XFAM gates: the base module's tables have them now.
    ("module", {"xfam_gates": []}, "xfam_gates"),
    ("module", {"rows": [{**VALID["module"]["rows"][0], "leafs": 1}]}, "rows[0].leafs"),
    ("host", {"ept_5levle": True}, "ept_5levle"),
    ("host", {"cpuid": [{"leaf": 1, "eaxx": 1}]}, "cpuid[0].eaxx"),
    ("allowlist", {"passthru": []}, "passthru"),
    ("allowlist", {"allowed": [{"leaf": 7, "subleaf": 0, "register": "ecx", "bitz": [5]}]},
     "allowed[0].bitz"),
    ("allowlist", {"passthrough": [{"leaf": 1, "subleaf": 0, "registr": "eax"}]},
     "passthrough[0].registr"),
]


@pytest.mark.parametrize(("kind", "change", "field"), UNKNOWN_FIELDS)
def test_an_unknown_field_is_refused_naming_it(capsys: pytest.CaptureFixture[str], tmp_path: Path,
                                               kind: str, change: dict[str, Any],
                                               field: str) -> None:
    _refused(capsys, kind, _file(tmp_path, json.dumps({**VALID[kind], **change})), field,
             "unknown field")


ENVELOPES = {"module": "module-profile", "allowlist": "allowlist", "report": "caps"}


@pytest.mark.parametrize("kind", KINDS)
def test_note_keys_and_the_envelope_are_allowed(capsys: pytest.CaptureFixture[str],
                                                tmp_path: Path, kind: str) -> None:
    doc: dict[str, Any] = {"about": "why this file", "comment": "x", "_mine": [1, {"a": 2}],
                           **VALID[kind]}
    if kind in ENVELOPES:
        doc = {"schema": 1, "kind": ENVELOPES[kind], "tool_version": "0.0.1", **doc}
    rc, _, err = run_cli(capsys, *ARGV[kind](_file(tmp_path, json.dumps(doc))))
    assert rc == 0, err


@pytest.mark.parametrize("kind", ["module", "allowlist", "host", "request"])
def test_a_kvmtdx_report_of_another_kind_is_refused_naming_its_kind(
        capsys: pytest.CaptureFixture[str], tmp_path: Path, kind: str) -> None:
    doc = {"schema": 1, "kind": "verify", "tool_version": "0.1.0", **VALID[kind]}
    _refused(capsys, kind, _file(tmp_path, json.dumps(doc)), "a kvmtdx verify report")


def test_a_module_profile_over_256_rows_is_refused_when_loaded(
        capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    row = VALID["module"]["rows"][0]
    rows = [{**row, "leaf": 0x40000000 + i} for i in range(257)]
    path = _file(tmp_path, json.dumps({"name": "big", "base": "2.0", "rows": rows}))
    for argv in (ARGV["module"](path), ["verify", "--simulate", path],
                 ["info", "--simulate", path]):
        rc, _, err = run_cli(capsys, *argv)
        assert rc == 2, (argv, err)
        assert err == (f"kvmtdx: error: {path}: rows: 257 rows; KVM takes at most 256 CPUID "
                       "entries (KVM_MAX_CPUID_ENTRIES)\n")
    rc, _, err = run_cli(capsys, *ARGV["module"](
        _file(tmp_path, json.dumps({"name": "full", "base": "2.0", "rows": rows[:256]}),
              "full.json")))
    assert rc == 0, err


# Every field of a fuller document of each kind, replaced by a value of every JSON type: the
# loader accepts it or refuses it in one line, never a traceback.
FULL: dict[str, dict[str, Any]] = {
    "request": {**bypass_request(), "flags": 0, "hw_error": "0x0", "nent": 4,
                "reserved": [0] * 12, "mrconfigid": [0] * 6, "padding": 0},
    "module": {"name": "m", "source": "s", "base": "2.0",
               "rows": [{"leaf": 7, "subleaf": 0, "config_direct": [0, 0, 0, 0],
                         "allow_direct": [0, 1, 2, 3], "unknown": [0, 0, 0, 0]}]},
    "host": {**small_host_json(), "xfam_supported": "0x2e7", "tdx_io": False},
    "allowlist": {"name": "a", "provenance": "p",
                  "allowed": [{"leaf": 7, "subleaf": 0, "register": "ecx",
                               "bits": {"5": "WAITPKG"}},
                              {"leaf": 7, "subleaf": 1, "register": "eax", "mask": 16}],
                  "passthrough": [{"leaf": 1, "subleaf": None, "register": "eax"}]},
    "report": {"schema": 1, "kind": "caps", "tool_version": "0.1.0",
               "supported_attrs": "0x0000000010000000", "supported_xfam": 3,
               "cpuid": [{"function": 7, "index": 0, "flags": 1, "eax": 0, "ebx": 1, "ecx": 2,
                          "edx": 3}]},
}
ODD_VALUES: tuple[Any, ...] = (None, True, 1.5, -1, 2**64, "x", "", [], [1], {}, {"a": 1})


def _paths(node: Any, path: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    out = [path] if path else []
    if isinstance(node, dict):
        out += [p for k, v in node.items() for p in _paths(v, (*path, k))]
    elif isinstance(node, list):
        out += [p for i, v in enumerate(node) for p in _paths(v, (*path, i))]
    return out


def _replaced(doc: Any, path: tuple[Any, ...], value: Any) -> Any:
    if not path:
        return value
    copy = dict(doc) if isinstance(doc, dict) else list(doc)
    copy[path[0]] = _replaced(doc[path[0]], path[1:], value)
    return copy


@pytest.mark.parametrize("kind", KINDS)
def test_any_field_of_any_type_is_read_or_refused_in_one_line(
        capsys: pytest.CaptureFixture[str], tmp_path: Path, kind: str) -> None:
    assert run_cli(capsys, *ARGV[kind](_file(tmp_path, json.dumps(FULL[kind])))).rc == 0
    for path in _paths(FULL[kind]):
        for value in ODD_VALUES:
            f = _file(tmp_path, json.dumps(_replaced(FULL[kind], path, value)))
            rc, _, err = run_cli(capsys, *ARGV[kind](f))
            assert rc == 0 or (rc == 2 and err.count("\n") == 1 and f in err), (path, value, err)
