"""Reading verify and probe reports back as the columns of a matrix (`kvmtdx report`).

One report is one run: a host, a kernel and a TDX module, which name its
column.  Reports carry their `host_identity` (kvmtdx.identity); one written
before it existed is labelled from what it has (its backend, policy and
module).  Every field error names the file and the field, in one line.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from kvmtdx.errors import DataError
from kvmtdx.jsonfile import parse_int
from kvmtdx.model import catalog
from kvmtdx.report.schema import ReportKind, read_report
from kvmtdx.report.snapshot import json_bit_key, json_objects, json_register, json_subleaf
from kvmtdx.structs import REGISTERS

READS = (ReportKind.VERIFY, ReportKind.PROBE)
STATUSES = ("pass", "fail", "skip", "info")
VERDICTS = ("pass", "fail", "skip")
UNKNOWN = "?"

# A probe's bit classes, then what the map shows of a bit the probe did not try:
# (class, what it means, colour).  The one table the page, its legend and the tests use.
BIT_CLASSES: tuple[tuple[str, str, str], ...] = (
    ("REPORTED_ACCEPTED", "reported, accepted", "#2e7d32"),
    ("REPORTED_REJECTED", "reported, yet refused", "#ef6c00"),
    ("HIDDEN_KVM_REJECTED", "hidden: KVM refuses it", "#1565c0"),
    ("HIDDEN_MODULE_REJECTED", "hidden: the TDX module refuses it", "#90caf9"),
    ("HIDDEN_ACCEPTED", "hidden, yet accepted: leaks to the TD", "#c62828"),
    ("FIELD_ACCEPTED", "value field: a valid value accepted", "#9575cd"),
    ("FIELD_REJECTED", "value field: a valid value refused", "#6a1b9a"),
    ("UNPROBED_REPORTED", "reported, not probed", "#c8e6c9"),
    ("UNPROBED_HIDDEN", "not reported, not probed", "#eeeeee"),
)
BIT_CLASS_NAMES = tuple(c for c, _, _ in BIT_CLASSES)
# A bit class that breaks the rule (accepted if reported, refused if hidden) unless the
# report explains it (a module coupling).
FAILING = frozenset({"REPORTED_REJECTED", "HIDDEN_ACCEPTED", "FIELD_REJECTED"})

_SIM_LABEL = re.compile(r"simulated TDX host \(module (?P<module>[^,]+), policy (?P<policy>[^,]+),"
                        r" host (?P<host>[^,)]+)(?:, mutant (?P<mutant>[^)]+))?\)")

RegKey = tuple[int, int, str]  # leaf, KVM index, register


@dataclass(frozen=True, slots=True)
class CheckCell:
    """One check of one verify run."""

    status: str
    group: str
    detail: str
    expected: str
    actual: str
    bits: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class BitCell:
    """One bit of one probe run: its class, its name, and what decided it."""

    cls: str
    name: str
    why: str
    failed: bool


@dataclass(frozen=True)
class Run:
    """One report: the column it makes, and what it found."""

    origin: str
    kind: ReportKind
    host: str
    kernel: str
    module: str
    policy: str | None
    policy_source: str | None
    verdict: str
    counts: str
    identity: dict[str, Any] | None  # as the report carries it (None: written before it)
    checks: dict[str, CheckCell] = field(default_factory=dict)  # verify: by check id
    bitmaps: dict[RegKey, tuple[BitCell, ...]] = field(default_factory=dict)  # probe: 32 each

    @property
    def label(self) -> str:
        return f"{self.host} / {self.kernel} / {self.module}"


def _text(value: Any, where: str, *, optional: bool = False) -> str:
    if value is None and optional:
        return ""
    if not isinstance(value, str):
        raise DataError(f"{where}: expected a string")
    return value


# ---------------------------------------------------------------------------
# Which host, kernel and module a report ran on.


def _member(obj: dict[str, Any], key: str) -> dict[str, Any]:
    """An object member of a host identity; {} where the report has none (or not an object)."""
    value = obj.get(key)
    return value if isinstance(value, dict) else {}


def _labels(doc: dict[str, Any], origin: str) -> tuple[str, str, str, str | None, str | None]:
    """host, kernel, module, policy and the policy's provenance of a report."""
    ident = doc.get("host_identity")
    if ident is None:
        return _labels_before_identity(doc)
    if not isinstance(ident, dict):
        raise DataError(f"{origin}: host_identity: expected an object")
    policy = _member(ident, "policy")
    pname, psource = policy.get("name"), policy.get("source")
    sim = ident.get("simulated")
    if isinstance(sim, dict):
        mutant = sim.get("mutant")
        return (f"simulated host {sim.get('host', UNKNOWN)}",
                f"{sim.get('policy', UNKNOWN)}" + (f" + {mutant}" if mutant else ""),
                f"module {sim.get('module', UNKNOWN)}", pname, psource)
    cpu, module = _member(ident, "cpu"), _member(ident, "tdx_module")
    host = str(ident.get("hostname") or UNKNOWN)
    if cpu.get("fms"):
        host += f" ({cpu['fms']})"
    return (host, str(ident.get("kernel_release") or UNKNOWN),
            f"module {module.get('version') or UNKNOWN}", pname, psource)


def _labels_before_identity(doc: dict[str, Any]
                            ) -> tuple[str, str, str, str | None, str | None]:
    """A report from before host_identity: the simulated host's make-up from its backend
    label, else the backend, the judged policy and module, as far as the report has them."""
    backend = doc.get("backend") if isinstance(doc.get("backend"), str) else None
    policy = doc.get("policy") if isinstance(doc.get("policy"), str) else None
    reason = doc.get("policy_reason") if isinstance(doc.get("policy_reason"), str) else None
    m = _SIM_LABEL.fullmatch(backend or "")
    if m is not None:
        kernel = m["policy"] + (f" + {m['mutant']}" if m["mutant"] else "")
        return f"simulated host {m['host']}", kernel, f"module {m['module']}", policy, reason
    module = doc.get("module") if isinstance(doc.get("module"), str) else None
    return (backend or UNKNOWN, f"policy {policy}" if policy else UNKNOWN,
            f"module {module or UNKNOWN}", policy, reason)


# ---------------------------------------------------------------------------
# verify


def _verify(doc: dict[str, Any], origin: str) -> tuple[dict[str, CheckCell], str, str]:
    cells: dict[str, CheckCell] = {}
    for w, c in json_objects(doc.get("checks"), f"{origin}: checks"):
        cid = _text(c.get("id"), f"{w}.id")
        status = _text(c.get("status"), f"{w}.status")
        if status not in STATUSES:
            raise DataError(f"{w}.status: expected pass, fail, skip or info, got {status!r}")
        bits = tuple(_bit_label(b, wb) for wb, b in json_objects(c.get("bits", []), f"{w}.bits"))
        cells[cid] = CheckCell(status=status, group=_text(c.get("group"), f"{w}.group"),
                               detail=_text(c.get("detail"), f"{w}.detail", optional=True),
                               expected=_text(c.get("expected"), f"{w}.expected", optional=True),
                               actual=_text(c.get("actual"), f"{w}.actual", optional=True),
                               bits=bits)
    skip = doc.get("skip")
    verdict = doc.get("verdict")
    if verdict not in VERDICTS:
        raise DataError(f"{origin}: verdict: expected pass, fail or skip")
    n = {s: sum(c.status == s for c in cells.values()) for s in STATUSES}
    info = f", {n['info']} informational" if n["info"] else ""
    counts = (f"skipped: {skip.get('reason')}" if isinstance(skip, dict) else
              f"{n['pass']} passed, {n['fail']} failed, {n['skip']} skipped{info} of {len(cells)}")
    return cells, str(verdict), counts


def _bit_label(b: dict[str, Any], where: str) -> str:
    leaf, sub, reg, bit = json_bit_key(b, where)
    index = "" if b.get("subleaf") is None else f".{sub}"
    name = _text(b.get("name"), f"{where}.name", optional=True)
    return f"0x{leaf:x}{index} {reg.upper()}[{bit}] {name}".rstrip()


# ---------------------------------------------------------------------------
# probe: a 32-cell map per listed register


Field = tuple[int, int, str, str]  # lo, hi, name, class


def _why(b: dict[str, Any]) -> str:
    result = b.get("result")
    text = "inferred by splitting a refused group"
    if isinstance(result, dict) and isinstance(result.get("outcome"), str):
        text = result["outcome"] + (f" -{result['errno']}" if result.get("errno") else "")
    explained = b.get("explained")
    return text + (f" ({explained})" if isinstance(explained, str) and explained else "")


def _probed(doc: dict[str, Any], origin: str) -> dict[tuple[int, int, str, int], BitCell]:
    out: dict[tuple[int, int, str, int], BitCell] = {}
    for w, b in json_objects(doc.get("bits"), f"{origin}: bits"):
        key = json_bit_key(b, w)
        cls = _text(b.get("class"), f"{w}.class")
        if cls not in BIT_CLASS_NAMES[:5]:
            raise DataError(f"{w}.class: unknown class {cls!r}")
        explained = isinstance(b.get("explained"), str) and bool(b.get("explained"))
        out[key] = BitCell(cls=cls, name=_text(b.get("name"), f"{w}.name", optional=True),
                           why=_why(b), failed=cls in FAILING and not explained)
    return out


def _fields(doc: dict[str, Any], origin: str) -> dict[RegKey, list[Field]]:
    out: dict[RegKey, list[Field]] = {}
    for w, f in json_objects(doc.get("fields", []), f"{origin}: fields"):
        key = (parse_int(f.get("leaf"), f"{w}.leaf", 32),
               json_subleaf(f.get("subleaf"), f"{w}.subleaf"),
               json_register(f.get("register"), f"{w}.register"))
        cls = _text(f.get("class"), f"{w}.class")
        if cls not in ("FIELD_ACCEPTED", "FIELD_REJECTED"):
            raise DataError(f"{w}.class: unknown class {cls!r}")
        if f.get("informational") is True and cls == "FIELD_REJECTED":
            cls = "FIELD_ACCEPTED"  # a host-dependent try informs, never fails
        out.setdefault(key, []).append((parse_int(f.get("lo"), f"{w}.lo", 5),
                                        parse_int(f.get("hi"), f"{w}.hi", 5),
                                        _text(f.get("name"), f"{w}.name", optional=True), cls))
    return out


def _cell(key: RegKey, bit: int, value: int, probed: dict[tuple[int, int, str, int], BitCell],
          fields: dict[RegKey, list[Field]]) -> BitCell:
    found = probed.get((*key, bit))
    if found is not None:
        return found
    for lo, hi, name, cls in fields.get(key, ()):
        if lo <= bit <= hi:
            return BitCell(cls=cls, name=name, why="tried with a valid value",
                           failed=cls == "FIELD_REJECTED")
    name = catalog.bit_name(key[0], key[1], key[2], bit)
    if value >> bit & 1:
        return BitCell("UNPROBED_REPORTED", name, "reported; not probed in this run", False)
    return BitCell("UNPROBED_HIDDEN", name, "not reported; not probed in this run", False)


def _probe(doc: dict[str, Any], origin: str
           ) -> tuple[dict[RegKey, tuple[BitCell, ...]], str, str]:
    caps = doc.get("capabilities")
    if not isinstance(caps, dict):
        raise DataError(f"{origin}: capabilities: expected an object")
    probed, fields = _probed(doc, origin), _fields(doc, origin)
    maps: dict[RegKey, tuple[BitCell, ...]] = {}
    for w, e in json_objects(caps.get("cpuid"), f"{origin}: capabilities.cpuid"):
        leaf = parse_int(e.get("function"), f"{w}.function", 32)
        index = json_subleaf(e.get("index"), f"{w}.index")
        for r in REGISTERS:
            value = parse_int(e.get(r, 0), f"{w}.{r}", 32)
            maps[(leaf, index, r)] = tuple(_cell((leaf, index, r), bit, value, probed, fields)
                                           for bit in range(32))
    failed = sum(c.failed for cells in maps.values() for c in cells)
    complete = doc.get("complete") is not False
    verdict = "fail" if failed else "pass"
    tried = len(probed)
    counts = f"{tried} bits probed, {failed} failing" + ("" if complete else " (incomplete)")
    return maps, verdict, counts


# ---------------------------------------------------------------------------


def read_run(path: str) -> Run:
    """One verify or probe report as a run; DataError (one line naming the file) otherwise."""
    kind, doc = read_report(path, READS, "kvmtdx report")
    host, kernel, module, policy, psource = _labels(doc, path)
    ident = doc.get("host_identity")
    common: dict[str, Any] = {"origin": path, "kind": kind, "host": host, "kernel": kernel,
                              "module": module, "policy": policy, "policy_source": psource,
                              "identity": ident if isinstance(ident, dict) else None}
    if kind is ReportKind.VERIFY:
        checks, verdict, counts = _verify(doc, path)
        return Run(**common, verdict=verdict, counts=counts, checks=checks)
    maps, verdict, counts = _probe(doc, path)
    return Run(**common, verdict=verdict, counts=counts, bitmaps=maps)
