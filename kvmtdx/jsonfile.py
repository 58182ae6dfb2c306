"""The one home of reading JSON files: every loader (profiles, hosts, allowlists, requests,
reports) goes through here, so every file gets the same limits and the same errors.

A file is read bounded (at most MAX_BYTES; `-` is standard input, bounded too) and only
if it is a regular file: /dev/zero or a FIFO would otherwise be read until memory runs
out, or waited on for a writer forever.  It must be UTF-8 and strict JSON: no duplicate
keys (the last would silently win), no NaN or Infinity, nesting at most MAX_DEPTH deep.
Integers are JSON numbers or strings of ASCII decimal or 0x hex digits (Python's int()
would take '٣' or '1_0').  Objects name their fields: an unknown one is refused, but for
notes ("about", "comment", "description", "_anything") and, on a file's top object, the
kvmtdx envelope.  Every error is a DataError naming the file and the field, one line.

Places in a file are strings: "FILE" for its top object, "FILE: rows[3]" below it;
`sub` names a field of either.
"""

from __future__ import annotations

import json
import os
import re
import stat
import sys
from collections.abc import Collection, Iterator, Mapping
from typing import Any, NoReturn

from kvmtdx.errors import DataError

MAX_BYTES = 16 * 1024 * 1024
MAX_DEPTH = 32
STDIN = "-"

# Free-text fields people put in hand-written files, accepted on any object.
NOTE_KEYS = frozenset({"about", "comment", "description"})
# The envelope every kvmtdx JSON document starts with (kvmtdx.report.schema).
ENVELOPE_KEYS = frozenset({"schema", "kind", "tool_version"})

_INTEGER = re.compile(r"0[xX][0-9a-fA-F]+|[0-9]+")


def _refuse(where: str, message: str) -> NoReturn:
    raise DataError(f"{where}: {message}")


def sub(where: str, key: str) -> str:
    """The place of field `key` of the object at `where`."""
    return f"{where}.{key}" if ": " in where else f"{where}: {key}"


# ---------------------------------------------------------------------------
# Reading.


def _bounded(data: bytes, path: str, what: str) -> bytes:
    if len(data) > MAX_BYTES:
        _refuse(path, f"{what} larger than {MAX_BYTES >> 20} MiB")
    return data


def _read_stdin() -> bytes:
    stream = getattr(sys.stdin, "buffer", None)
    if stream is None:
        _refuse(STDIN, "standard input is closed")
    try:
        data: bytes = stream.read(MAX_BYTES + 1)
    except OSError as e:
        _refuse(STDIN, f"cannot read standard input: {e.strerror}")
    return _bounded(data, STDIN, "standard input")


def read_bytes(path: str) -> bytes:
    """The bytes of a regular file (or of standard input for '-'), at most MAX_BYTES."""
    if path == STDIN:
        return _read_stdin()
    try:
        # O_NONBLOCK: opening a FIFO must not wait for a writer before it can be refused.
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)
    except OSError as e:
        _refuse(path, f"cannot read: {e.strerror}")
    try:
        mode = os.fstat(fd).st_mode
        if stat.S_ISDIR(mode):
            _refuse(path, "is a directory, not a JSON file")
        if not stat.S_ISREG(mode):
            _refuse(path, "not a regular file (give '-' to read standard input)")
        with os.fdopen(os.dup(fd), "rb") as f:
            return _bounded(f.read(MAX_BYTES + 1), path, "file")
    except OSError as e:
        _refuse(path, f"cannot read: {e.strerror}")
    finally:
        os.close(fd)


def decode(data: bytes, path: str) -> str:
    """UTF-8 text (a leading byte-order mark is dropped)."""
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        _refuse(path, f"not UTF-8: byte 0x{data[e.start]:02x} at offset {e.start}")


# ---------------------------------------------------------------------------
# Parsing.


def _pairs(origin: str) -> Any:
    def no_duplicates(items: list[tuple[str, Any]]) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for key, value in items:
            if key in out:
                _refuse(origin, f"duplicate key {key!r}")
            out[key] = value
        return out
    return no_duplicates


def _constant(origin: str) -> Any:
    def refuse(name: str) -> NoReturn:
        _refuse(origin, f"{name} is not a JSON number")
    return refuse


def _depth(doc: Any) -> int:
    """How deep arrays and objects nest (a scalar is 0), without recursion."""
    deepest = 0
    stack: list[tuple[Any, int]] = [(doc, 1)]
    while stack:
        value, depth = stack.pop()
        items = value.values() if isinstance(value, dict) else value
        if isinstance(value, (dict, list)):
            deepest = max(deepest, depth)
            stack.extend((v, depth + 1) for v in items if isinstance(v, (dict, list)))
    return deepest


def parse(text: str, origin: str) -> Any:
    """Strict JSON: duplicate keys, NaN/Infinity and nesting past MAX_DEPTH refused."""
    too_deep = f"nested deeper than {MAX_DEPTH} levels"
    try:
        doc = json.loads(text, object_pairs_hook=_pairs(origin), parse_constant=_constant(origin))
    except DataError:
        raise
    except json.JSONDecodeError as e:
        _refuse(origin, f"not valid JSON: {e.msg} at line {e.lineno} column {e.colno}")
    except RecursionError:
        _refuse(origin, too_deep)
    except ValueError as e:  # an integer of more digits than Python converts
        _refuse(origin, f"not valid JSON: {e}")
    if _depth(doc) > MAX_DEPTH:
        _refuse(origin, too_deep)
    return doc


def load(path: str) -> Any:
    """A JSON file (or '-', standard input), read and parsed with every limit above."""
    return parse(decode(read_bytes(path), path), path)


# ---------------------------------------------------------------------------
# Fields.


def hex64(value: int) -> str:
    """A 64-bit word as JSON writes it: "0x" and 16 hex digits.  Readers that parse JSON
    numbers as doubles (jq 1.6, JavaScript) would round a number past 2**53."""
    return f"0x{value:016x}"


def type_name(value: Any) -> str:
    names = {dict: "an object", list: "a list", str: "a string", bool: "true/false",
             type(None): "null", float: "a fraction"}
    return names.get(type(value), type(value).__name__)


def parse_int(value: Any, where: str, bits: int = 64) -> int:
    """An integer written as a JSON number or a string of ASCII decimal or 0x hex digits."""
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise DataError(f"{where}: expected an integer, got {type_name(value)}")
    if isinstance(value, str):
        if not _INTEGER.fullmatch(value):
            raise DataError(f"{where}: not an integer: {value!r} (write decimal or 0x hex)")
        n = int(value, 16 if value[1:2] in ("x", "X") else 10)
    else:
        n = value
    if n < 0 or n >> bits:
        raise DataError(f"{where}: {value!r} does not fit in {bits} bits")
    return n


def text(obj: Mapping[str, Any], key: str, where: str, default: str | None = None) -> str:
    """Field `key` as a string; `default` when absent (absent without one is an error)."""
    value = obj.get(key, default)
    if not isinstance(value, str):
        got = "missing" if key not in obj else f"got {type_name(value)}"
        raise DataError(f"{sub(where, key)}: expected a string, {got}")
    return value


def flag(obj: Mapping[str, Any], key: str, where: str, default: bool = False) -> bool:
    value = obj.get(key, default)
    if not isinstance(value, bool):
        raise DataError(f"{sub(where, key)}: expected true or false, got {type_name(value)}")
    return value


def array(value: Any, where: str) -> list[Any]:
    if not isinstance(value, list):
        raise DataError(f"{where}: expected a list, got {type_name(value)}")
    return value


def objects(value: Any, where: str) -> Iterator[tuple[str, dict[str, Any]]]:
    """Each object of the list `value`, with its place ("FILE: field[i]")."""
    for i, item in enumerate(array(value, where)):
        if not isinstance(item, dict):
            raise DataError(f"{where}[{i}]: expected an object, got {type_name(item)}")
        yield f"{where}[{i}]", item


def check_fields(obj: Mapping[str, Any], where: str, known: Collection[str], *,
                 notes: Collection[str] = NOTE_KEYS) -> None:
    """Refuse a field of `obj` that is neither `known`, a note, nor '_'-prefixed."""
    for key in obj:
        if key not in known and key not in notes and not key.startswith("_"):
            raise DataError(f"{sub(where, key)}: unknown field (expected one of "
                            f"{', '.join(sorted(known))})")


def document(doc: Any, origin: str, what: str, known: Collection[str], *,
             kind: str | None = None, notes: Collection[str] = NOTE_KEYS) -> dict[str, Any]:
    """A file's top object: `what` it must be ("a module profile"), its `known` fields,
    and, when it carries the kvmtdx envelope, the `kind` such a file has (None: no kind)."""
    if not isinstance(doc, dict):
        raise DataError(f"{origin}: {what} must be a JSON object")
    found = doc.get("kind")
    if found is not None and found != kind:
        shown = f"a kvmtdx {found} report" if isinstance(found, str) else f"kind {found!r}"
        raise DataError(f"{origin}: {shown}, not {what}")
    check_fields(doc, origin, [*known, *ENVELOPE_KEYS], notes=notes)
    return doc
