"""Reading kvmtdx JSON reports back for `kvmtdx diff`: one reader per report kind.

The file's `kind` (report.schema) picks the reader; a file that is not a
probe, verify, caps or predict report (a request, a host, an allowlist, a
file without a kind) is refused with one line naming it, never read as
something it is not.  Every field error names the file and the field.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

from kvmtdx.diff import Key, Snapshot
from kvmtdx.errors import DataError
from kvmtdx.jsonfile import parse_int
from kvmtdx.report.schema import ReportKind, expect, read_report
from kvmtdx.structs import REGISTERS


def json_subleaf(value: Any, where: str) -> int:
    """A sub-leaf as KVM reports it: "no sub-leaves" (null, "none", 0xffffffff) is index 0."""
    if value is None or value == "none":
        return 0
    n = parse_int(value, where, 32)
    return 0 if n == 0xFFFFFFFF else n


def json_register(value: Any, where: str) -> str:
    if value not in REGISTERS:
        raise DataError(f"{where}: expected one of {', '.join(REGISTERS)}, got {value!r}")
    return str(value)


def json_bit_key(b: dict[str, Any], where: str) -> Key:
    return (parse_int(b.get("leaf"), f"{where}.leaf", 32),
            json_subleaf(b.get("subleaf"), f"{where}.subleaf"),
            json_register(b.get("register"), f"{where}.register"),
            parse_int(b.get("bit"), f"{where}.bit", 5))


def json_objects(value: Any, where: str, what: str = "a list"
                 ) -> Iterator[tuple[str, dict[str, Any]]]:
    """Each object of the JSON list `value`, with where it is ("file: field[i]")."""
    if not isinstance(value, list):
        raise DataError(f"{where}: expected {what}")
    for i, item in enumerate(value):
        if not isinstance(item, dict):
            raise DataError(f"{where}[{i}]: must be an object")
        yield f"{where}[{i}]", item


def _cpuid(entries: Any, where: str, snap: Snapshot) -> None:
    for w, e in json_objects(entries, where, "a list of CPUID entries"):
        leaf = parse_int(e.get("function", e.get("leaf")), f"{w}.function", 32)
        index = json_subleaf(e.get("index", e.get("subleaf", 0)), f"{w}.index")
        for r in REGISTERS:
            snap.reported[(leaf, index, r)] = parse_int(e.get(r, 0), f"{w}.{r}", 32)


def _caps_header(doc: dict[str, Any], where: str, snap: Snapshot) -> None:
    if "supported_attrs" in doc:
        snap.supported_attrs = parse_int(doc["supported_attrs"], f"{where}supported_attrs")
    if "supported_xfam" in doc:
        snap.supported_xfam = parse_int(doc["supported_xfam"], f"{where}supported_xfam")


def _probe(doc: dict[str, Any], origin: str) -> Snapshot:
    snap = Snapshot(origin, ReportKind.PROBE.value, verdict=_verdict(doc, origin))
    for w, b in json_objects(doc.get("bits"), f"{origin}: bits"):
        key = json_bit_key(b, w)
        cls = b.get("class")
        if not isinstance(cls, str):
            raise DataError(f"{w}.class: expected a string")
        snap.classes[key] = cls
    caps = doc.get("capabilities")
    if isinstance(caps, dict):
        _cpuid(caps.get("cpuid", []), f"{origin}: capabilities.cpuid", snap)
    _caps_header(doc, f"{origin}: ", snap)
    return snap


def _verify(doc: dict[str, Any], origin: str) -> Snapshot:
    """A bit's "class" in a verify report: every check that names it, with its status."""
    checks: dict[str, str] = {}
    snap = Snapshot(origin, ReportKind.VERIFY.value, checks=checks,
                    verdict=_verdict(doc, origin))
    verdicts: dict[Key, list[str]] = {}
    for w, c in json_objects(doc.get("checks"), f"{origin}: checks"):
        cid, status = c.get("id"), c.get("status")
        if not isinstance(cid, str) or not isinstance(status, str):
            raise DataError(f"{w}: expected string fields 'id' and 'status'")
        if cid in checks:
            raise DataError(f"{w}.id: check {cid!r} appears twice")
        checks[cid] = status
        for wb, b in json_objects(c.get("bits", []), f"{w}.bits"):
            verdicts.setdefault(json_bit_key(b, wb), []).append(f"{cid}={status}")
    for key, v in verdicts.items():
        snap.classes[key] = ", ".join(sorted(set(v)))
    return snap


def _verdict(doc: dict[str, Any], origin: str) -> str | None:
    v = doc.get("verdict")
    if v is not None and not isinstance(v, str):
        raise DataError(f"{origin}: verdict: expected a string")
    return v


def _caps(doc: dict[str, Any], origin: str) -> Snapshot:
    snap = Snapshot(origin, ReportKind.CAPS.value)
    _cpuid(doc.get("cpuid"), f"{origin}: cpuid", snap)
    _caps_header(doc, f"{origin}: ", snap)
    return snap


def _predict(doc: dict[str, Any], origin: str) -> Snapshot:
    caps = doc.get("capabilities")
    if not isinstance(caps, dict):
        raise DataError(f"{origin}: capabilities: the prediction has none to compare "
                        "(KVM_TDX_CAPABILITIES fails there)")
    snap = Snapshot(origin, ReportKind.PREDICT.value)
    _cpuid(caps.get("cpuid"), f"{origin}: capabilities.cpuid", snap)
    _caps_header(caps, f"{origin}: capabilities.", snap)
    return snap


READERS: dict[ReportKind, Callable[[dict[str, Any], str], Snapshot]] = {
    ReportKind.PROBE: _probe,
    ReportKind.VERIFY: _verify,
    ReportKind.CAPS: _caps,
    ReportKind.PREDICT: _predict,
}


def snapshot_from_json(doc: Any, origin: str) -> Snapshot:
    """A probe, verify, caps or predict report, normalised; DataError names file and field."""
    return READERS[expect(doc, origin, READERS, "diff")](doc, origin)


def load_snapshot(path: str) -> Snapshot:
    kind, doc = read_report(path, READERS, "diff")
    return READERS[kind](doc, path)
