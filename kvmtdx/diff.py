"""The diff of two results: which bits changed class or reported state, by name.

Two kinds of input:
- two JSON files written by kvmtdx (probe, verify or caps), from two kernels,
  hosts or modules: every bit whose probed class, verify verdict or reported
  state differs, plus the supported attributes and XFAM;
- one module under two kernel policies, from the mirror: the bits TDs can no
  longer be given under the second, and those they newly can.

Bits are keyed by (leaf, index as KVM reports it, register, bit): "no
sub-leaves" rows appear as index 0 in capabilities and as null in verify
reports, and must meet.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from kvmtdx.errors import DataError
from kvmtdx.model import catalog, mirror
from kvmtdx.model.catalog import BitRef
from kvmtdx.model.policy import Policy
from kvmtdx.model.profiles import Host, ModuleProfile, load_json, parse_int
from kvmtdx.structs import REGISTERS, CpuidEntry

Key = tuple[int, int, str, int]
RegKey = tuple[int, int, str]


@dataclass
class Snapshot:
    """What one JSON file says, normalised."""

    origin: str
    kind: str  # probe | verify | caps
    # Registers whose reported bits the file gives, with those bits.
    reported: dict[RegKey, int] = field(default_factory=dict)
    classes: dict[Key, str] = field(default_factory=dict)
    supported_attrs: int | None = None
    supported_xfam: int | None = None


@dataclass(frozen=True)
class Change:
    leaf: int
    subleaf: int
    register: str
    bit: int
    name: str
    what: str  # "reported" | "class" | "attribute" | "xfam"
    a: str
    b: str

    def to_json(self) -> dict[str, Any]:
        return {"leaf": f"0x{self.leaf:x}", "subleaf": self.subleaf,
                "register": self.register, "bit": self.bit, "name": self.name,
                "what": self.what, "a": self.a,
                "b": self.b}


@dataclass
class FileDiff:
    a: Snapshot
    b: Snapshot
    changes: list[Change]
    only_a: list[RegKey]  # registers one file lists and the other does not
    only_b: list[RegKey]

    @property
    def count(self) -> int:
        """Differences: bits (one per bit, whether its class, reported state or both changed),
        attribute and XFAM bits, and registers only one side lists."""
        bits = {(c.what in ("attribute", "xfam") and c.what, c.leaf, c.subleaf, c.register,
                 c.bit) for c in self.changes}
        return len(bits) + len(self.only_a) + len(self.only_b)


def _int(value: Any, where: str, bits: int = 64) -> int:
    return parse_int(value, where, bits)


def _sub(value: Any, where: str) -> int:
    if value is None or value == "none":
        return 0
    n = _int(value, where, 32)
    return 0 if n == 0xFFFFFFFF else n


def _reg(value: Any, where: str) -> str:
    if value not in REGISTERS:
        raise DataError(f"{where}: expected one of {', '.join(REGISTERS)}, got {value!r}")
    return str(value)


def _bit(value: Any, where: str) -> int:
    return _int(value, where, 5)


def _cpuid(entries: Any, where: str, snap: Snapshot) -> None:
    if not isinstance(entries, list):
        raise DataError(f"{where}: expected a list of CPUID entries")
    for i, e in enumerate(entries):
        w = f"{where}[{i}]"
        if not isinstance(e, dict):
            raise DataError(f"{w}: must be an object")
        leaf = _int(e.get("function", e.get("leaf")), f"{w}.function", 32)
        index = _sub(e.get("index", e.get("subleaf", 0)), f"{w}.index")
        for r in REGISTERS:
            snap.reported[(leaf, index, r)] = _int(e.get(r, 0), f"{w}.{r}", 32)


def _caps_header(doc: dict[str, Any], where: str, snap: Snapshot) -> None:
    if "supported_attrs" in doc:
        snap.supported_attrs = _int(doc["supported_attrs"], f"{where}supported_attrs")
    if "supported_xfam" in doc:
        snap.supported_xfam = _int(doc["supported_xfam"], f"{where}supported_xfam")


def snapshot_from_json(doc: Any, origin: str) -> Snapshot:
    """A probe, verify or caps JSON document, normalised; DataError names the file and field."""
    if not isinstance(doc, dict):
        raise DataError(f"{origin}: expected a JSON object (a kvmtdx probe, verify or caps report)")
    if "bits" in doc:
        snap = Snapshot(origin, "probe")
        bits = doc["bits"]
        if not isinstance(bits, list):
            raise DataError(f"{origin}: bits: expected a list")
        for i, b in enumerate(bits):
            w = f"{origin}: bits[{i}]"
            if not isinstance(b, dict):
                raise DataError(f"{w}: must be an object")
            cls = b.get("class")
            if not isinstance(cls, str):
                raise DataError(f"{w}.class: expected a string")
            key = (_int(b.get("leaf"), f"{w}.leaf", 32), _sub(b.get("subleaf"), f"{w}.subleaf"),
                   _reg(b.get("register"), f"{w}.register"), _bit(b.get("bit"), f"{w}.bit"))
            snap.classes[key] = cls
        caps = doc.get("capabilities")
        if isinstance(caps, dict):
            _cpuid(caps.get("cpuid", []), f"{origin}: capabilities.cpuid", snap)
        _caps_header(doc, f"{origin}: ", snap)
        return snap
    if "checks" in doc:
        snap = Snapshot(origin, "verify")
        checks = doc["checks"]
        if not isinstance(checks, list):
            raise DataError(f"{origin}: checks: expected a list")
        verdicts: dict[Key, list[str]] = {}
        for i, c in enumerate(checks):
            w = f"{origin}: checks[{i}]"
            if not isinstance(c, dict):
                raise DataError(f"{w}: must be an object")
            cid, status = c.get("id"), c.get("status")
            if not isinstance(cid, str) or not isinstance(status, str):
                raise DataError(f"{w}: expected string fields 'id' and 'status'")
            bits = c.get("bits", [])
            if not isinstance(bits, list):
                raise DataError(f"{w}.bits: expected a list")
            for j, b in enumerate(bits):
                wb = f"{w}.bits[{j}]"
                if not isinstance(b, dict):
                    raise DataError(f"{wb}: must be an object")
                key = (_int(b.get("leaf"), f"{wb}.leaf", 32),
                       _sub(b.get("subleaf"), f"{wb}.subleaf"),
                       _reg(b.get("register"), f"{wb}.register"), _bit(b.get("bit"), f"{wb}.bit"))
                verdicts.setdefault(key, []).append(f"{cid}={status}")
        for key, v in verdicts.items():
            snap.classes[key] = ", ".join(sorted(set(v)))
        caps = doc.get("capabilities")
        if isinstance(caps, dict):
            _cpuid(caps.get("cpuid", []), f"{origin}: capabilities.cpuid", snap)
            _caps_header(caps, f"{origin}: capabilities.", snap)
        return snap
    caps_doc = doc.get("capabilities") if isinstance(doc.get("capabilities"), dict) else doc
    assert isinstance(caps_doc, dict)
    if "cpuid" in caps_doc:
        snap = Snapshot(origin, "caps")
        _cpuid(caps_doc["cpuid"], f"{origin}: cpuid", snap)
        _caps_header(caps_doc, f"{origin}: ", snap)
        return snap
    raise DataError(f"{origin}: not a kvmtdx probe, verify or caps report "
                    "(expected a 'bits', 'checks' or 'cpuid' field)")


def load_snapshot(path: str) -> Snapshot:
    return snapshot_from_json(load_json(path), path)


def _name(key: Key) -> str:
    return catalog.bit_name(key[0], key[1], key[2], key[3])


def diff_files(a: Snapshot, b: Snapshot) -> FileDiff:
    changes: list[Change] = []
    common = sorted(set(a.reported) & set(b.reported), key=_reg_order)
    for rk in common:
        va, vb = a.reported[rk], b.reported[rk]
        for bit in range(32):
            if (va ^ vb) >> bit & 1:
                key = (*rk, bit)
                changes.append(Change(*key, _name(key), "reported",
                                      "yes" if va >> bit & 1 else "no",
                                      "yes" if vb >> bit & 1 else "no"))
    for key in sorted(set(a.classes) & set(b.classes), key=_key_order):
        if a.classes[key] != b.classes[key]:
            changes.append(Change(*key, _name(key), "class", a.classes[key], b.classes[key]))
    changes.sort(key=lambda c: (_key_order((c.leaf, c.subleaf, c.register, c.bit)), c.what))
    for what, va_, vb_, namer in (("attribute", a.supported_attrs, b.supported_attrs,
                                   catalog.attribute_name),
                                  ("xfam", a.supported_xfam, b.supported_xfam, catalog.xfam_name)):
        if va_ is None or vb_ is None:
            continue
        for bit in range(64):
            if (va_ ^ vb_) >> bit & 1:
                changes.append(Change(0, 0, "", bit, namer(bit), what,
                                      "yes" if va_ >> bit & 1 else "no",
                                      "yes" if vb_ >> bit & 1 else "no"))
    only_a = sorted(set(a.reported) - set(b.reported), key=_reg_order)
    only_b = sorted(set(b.reported) - set(a.reported), key=_reg_order)
    return FileDiff(a, b, changes, only_a, only_b)


def _reg_order(rk: RegKey) -> tuple[int, int, int]:
    return (rk[0], rk[1], REGISTERS.index(rk[2]))


def _key_order(k: Key) -> tuple[int, int, int, int]:
    return (k[0], k[1], REGISTERS.index(k[2]), k[3])


# ---------------------------------------------------------------------------
# Two policies, one module.


@dataclass
class PolicyDiff:
    module: str
    host: str
    a: Policy
    b: Policy
    no_longer: list[BitRef]  # reported under a, not under b
    newly: list[BitRef]  # reported under b, not under a

    @property
    def differs(self) -> bool:
        return bool(self.no_longer or self.newly)


def diff_policies(module: ModuleProfile, host: Host, a: Policy, b: Policy) -> PolicyDiff:
    """What KVM_TDX_CAPABILITIES offers TDs under `a` and not `b`, and the reverse (the mirror)."""
    ea = mirror.reported_entries(module, host, a)
    eb = mirror.reported_entries(module, host, b)
    lost: list[BitRef] = []
    gained: list[BitRef] = []
    for row, x, y in zip(module.rows, ea, eb, strict=True):
        for r in REGISTERS:
            va, vb = _regs(x)[r], _regs(y)[r]
            for bit in range(32):
                if (va ^ vb) >> bit & 1:
                    ref = BitRef(row.leaf, row.subleaf, r, bit)
                    (lost if va >> bit & 1 else gained).append(ref)
    return PolicyDiff(module.name, host.name, a, b, lost, gained)


def _regs(e: CpuidEntry) -> dict[str, int]:
    return dict(zip(REGISTERS, e.regs(), strict=True))
