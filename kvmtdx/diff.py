"""The diff of two results: which bits changed class or reported state, by name.

Two kinds of input:
- two kvmtdx reports (probe, verify, caps or predict; read back into a
  `Snapshot` by report.snapshot), from two kernels, hosts or modules: every
  bit whose probed class, verify verdict or reported state differs, plus the
  supported attributes and XFAM, and for two verify reports every check whose
  status changed (most checks name no bit) and the verdict;
- one module under two kernel policies, from the mirror: the bits TDs can no
  longer be given under the second, and those they newly can.

Bits are keyed by (leaf, index as KVM reports it, register, bit): "no
sub-leaves" rows appear as index 0 in capabilities and as null in verify
reports, and must meet.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from kvmtdx.model import catalog, mirror
from kvmtdx.model.catalog import BitRef
from kvmtdx.model.policy import Policy
from kvmtdx.model.profiles import Host, ModuleProfile
from kvmtdx.structs import REGISTERS, CpuidEntry

Key = tuple[int, int, str, int]
RegKey = tuple[int, int, str]


@dataclass
class Snapshot:
    """What one JSON file says, normalised."""

    origin: str
    kind: str  # the report kind it was read from: probe | verify | caps | predict
    # Registers whose reported bits the file gives, with those bits.
    reported: dict[RegKey, int] = field(default_factory=dict)
    classes: dict[Key, str] = field(default_factory=dict)
    supported_attrs: int | None = None
    supported_xfam: int | None = None
    # A verify report's checks in report order (id -> status); None for other kinds.
    checks: dict[str, str] | None = None
    verdict: str | None = None  # the report's own verdict, where it has one


ABSENT = "absent"  # a check one report has and the other does not


@dataclass(frozen=True)
class CheckChange:
    """A check whose status differs between two verify reports (ABSENT: not in that one)."""

    id: str
    a: str
    b: str


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


@dataclass
class FileDiff:
    a: Snapshot
    b: Snapshot
    changes: list[Change]
    only_a: list[RegKey]  # registers one file lists and the other does not
    only_b: list[RegKey]
    checks: list[CheckChange] = field(default_factory=list)
    verdict_a: str | None = None
    verdict_b: str | None = None

    @property
    def verdict_changed(self) -> bool:
        return self.verdict_a is not None and self.verdict_b is not None and \
            self.verdict_a != self.verdict_b

    @property
    def count(self) -> int:
        """Differences: bits (one per bit, whether its class, reported state or both changed),
        attribute and XFAM bits, registers only one side lists, checks whose status changed
        (or that only one side ran) and the verdict."""
        bits = {(c.what in ("attribute", "xfam") and c.what, c.leaf, c.subleaf, c.register,
                 c.bit) for c in self.changes}
        return (len(bits) + len(self.only_a) + len(self.only_b) + len(self.checks)
                + self.verdict_changed)


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
    return FileDiff(a, b, changes, only_a, only_b, diff_checks(a, b), a.verdict, b.verdict)


def diff_checks(a: Snapshot, b: Snapshot) -> list[CheckChange]:
    """Checks whose status differs, in a's order, then the checks only b ran.  A check's
    status is compared whether or not it names bits: most failures name none."""
    if a.checks is None or b.checks is None:
        return []
    out = [CheckChange(cid, sa, b.checks.get(cid, ABSENT)) for cid, sa in a.checks.items()
           if b.checks.get(cid) != sa]
    out += [CheckChange(cid, ABSENT, sb) for cid, sb in b.checks.items() if cid not in a.checks]
    return out


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
