"""TDX module profiles and hosts: the facts both the mirror and the simulated host start from.

Pure data and its loading.  A module profile is what a TDX module version
lists as configurable (its CPUID_CONFIG rows, in row order) and its fixed
attribute / XFAM bits; a host is what that module and KVM see of the CPU.
Combining the two gives the masks the module hands KVM for each row
(spec section 2).  Nothing here knows how a kernel filters them.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from kvmtdx import jsonfile
from kvmtdx.errors import DataError
from kvmtdx.jsonfile import flag, hex64, objects, parse_int, sub, text
from kvmtdx.structs import KVM_MAX_CPUID_ENTRIES, NO_SUBLEAF, REGISTERS

Regs = tuple[int, int, int, int]
ZERO_REGS: Regs = (0, 0, 0, 0)


def parse_regs(value: Any, where: str) -> Regs:
    if not isinstance(value, list) or len(value) != 4:
        raise DataError(f"{where}: expected a list of 4 registers [eax, ebx, ecx, edx]")
    a, b, c, d = (parse_int(v, f"{where}[{i}]", 32) for i, v in enumerate(value))
    return (a, b, c, d)


def bundled_json(name: str) -> Any:
    return json.loads(resources.files("kvmtdx").joinpath("data").joinpath(name).read_text())


@dataclass(frozen=True, slots=True)
class CpuidRow:
    """One CPUID_CONFIG row of a TDX module."""

    leaf: int
    subleaf: int | None  # None: the module reports sub-leaf 0xffffffff
    config_direct: Regs
    allow_direct: Regs

    @property
    def module_subleaf(self) -> int:
        return NO_SUBLEAF if self.subleaf is None else self.subleaf

    @property
    def kvm_index(self) -> int:
        """The index KVM reports for this row (0 for "no sub-leaves")."""
        return 0 if self.subleaf is None else self.subleaf

    def module_allows(self) -> Regs:
        """Bits TDH.MNG.INIT accepts in this row: config_direct | allow_direct."""
        a, b, c, d = (x | y for x, y in zip(self.config_direct, self.allow_direct, strict=True))
        return (a, b, c, d)

    def label(self) -> str:
        sub = "" if self.subleaf is None else f".{self.subleaf}"
        return f"0x{self.leaf:x}{sub}"


@dataclass(frozen=True, slots=True)
class XfamGate:
    """CPUID bits the module rejects unless every bit of `xfam` is set in TD XFAM."""

    xfam: int
    leaf: int
    subleaf: int | None
    register: str
    mask: int
    why: str


@dataclass(frozen=True, slots=True)
class ModuleProfile:
    name: str
    source: str
    rows: tuple[CpuidRow, ...]
    attributes_fixed0: int
    attributes_fixed1: int
    xfam_fixed0: int  # before masking with what the host supports
    xfam_fixed1: int
    xfam_gates: tuple[XfamGate, ...] = ()
    # Bits whose configurability is not known (a profile saved from a kernel
    # that hides them); per row, [eax, ebx, ecx, edx].  Checks skip them.
    unknown: tuple[Regs, ...] = ()

    def row_index(self, leaf: int, subleaf: int | None) -> int | None:
        for i, r in enumerate(self.rows):
            if r.leaf == leaf and r.subleaf == subleaf:
                return i
        return None

    def unknown_mask(self, row: int) -> Regs:
        return self.unknown[row] if row < len(self.unknown) else ZERO_REGS


@dataclass(frozen=True, slots=True)
class Host:
    """The CPU as the TDX module and KVM see it.

    `native` maps (leaf, subleaf or None) to the native CPUID registers;
    a missing leaf reads as zeros.  `xfam_supported` is the host KVM's
    supported XCR0 | XSS; `tsx_ctrl` is IA32_ARCH_CAPABILITIES.TSX_CTRL.
    """

    name: str
    native: Mapping[tuple[int, int | None], Regs] = field(default_factory=dict)
    xfam_supported: int = 0
    ept_5level: bool = False
    tsx_ctrl: bool = False
    all_ones: bool = False  # every native bit set, but for leaf 1 EAX (FMS)
    fms: int = 0

    def native_regs(self, leaf: int, subleaf: int | None) -> Regs:
        if leaf == 1 and self.all_ones:
            return (self.fms, 0xFFFFFFFF, 0xFFFFFFFF, 0xFFFFFFFF)
        if self.all_ones:
            return (0xFFFFFFFF,) * 4
        regs = self.native.get((leaf, subleaf))
        if regs is None and subleaf is None:
            regs = self.native.get((leaf, 0))
        return regs if regs is not None else ZERO_REGS

    def native_fms(self) -> int:
        return self.native_regs(1, None)[0]


# The 'max' host: every feature any module could allow, AVX-512 and AMX state,
# 5-level EPT and TSX_CTRL.  FMS 0x000806f8 is a Sapphire Rapids part
# (family 6, model 0x8f, stepping 8), the first TDX generation.
MAX_HOST = Host(
    name="max",
    xfam_supported=0xFFFFFFFFFFFFFFFF,
    ept_5level=True,
    tsx_ctrl=True,
    all_ones=True,
    fms=0x000806F8,
)


def enumerated(profile: ModuleProfile, host: Host) -> tuple[Regs, ...]:
    """What the module hands KVM per row: config_direct | (allow_direct & native)."""
    out: list[Regs] = []
    for row in profile.rows:
        nat = host.native_regs(row.leaf, row.subleaf)
        a, b, c, d = (
            cd | (ad & n)
            for cd, ad, n in zip(row.config_direct, row.allow_direct, nat, strict=True)
        )
        out.append((a, b, c, d))
    return tuple(out)


def effective_xfam_fixed0(profile: ModuleProfile, host: Host) -> int:
    return profile.xfam_fixed0 & host.xfam_supported


# ---------------------------------------------------------------------------
# Loading.


def _subleaf(value: Any, where: str) -> int | None:
    if value is None or value == "none":
        return None
    n = parse_int(value, where, 32)
    return None if n == NO_SUBLEAF else n


_PROFILE_FIELDS = ("name", "source", "rows", "attributes_fixed0", "attributes_fixed1",
                   "xfam_fixed0", "xfam_fixed1", "xfam_gates")
_ROW_FIELDS = ("leaf", "subleaf", "config_direct", "allow_direct", "unknown")
_GATE_FIELDS = ("xfam", "leaf", "subleaf", "register", "mask", "why")
PROFILE_KIND = "module-profile"  # the kind `caps --save-module` writes


def _rows(value: Any, where: str) -> tuple[tuple[CpuidRow, ...], tuple[Regs, ...]]:
    """The CPUID_CONFIG rows, and per row the bits whose configurability is unknown."""
    rows: list[CpuidRow] = []
    unknown: list[Regs] = []
    for w, r in objects(value, where):
        jsonfile.check_fields(r, w, _ROW_FIELDS)
        for key in ("leaf", "config_direct", "allow_direct"):
            if key not in r:
                raise DataError(f"{w}: missing field '{key}'")
        rows.append(CpuidRow(leaf=parse_int(r["leaf"], f"{w}.leaf", 32),
                             subleaf=_subleaf(r.get("subleaf"), f"{w}.subleaf"),
                             config_direct=parse_regs(r["config_direct"], f"{w}.config_direct"),
                             allow_direct=parse_regs(r["allow_direct"], f"{w}.allow_direct")))
        unknown.append(parse_regs(r.get("unknown", [0, 0, 0, 0]), f"{w}.unknown"))
    if not rows:
        raise DataError(f"{where}: must list at least one row")
    # KVM_TDX_CAPABILITIES and INIT_VM carry at most this many entries: a profile with
    # more could only ever end in E2BIG, which would read as the kernel's failure.
    if len(rows) > KVM_MAX_CPUID_ENTRIES:
        raise DataError(f"{where}: {len(rows)} rows; KVM takes at most {KVM_MAX_CPUID_ENTRIES} "
                        "CPUID entries (KVM_MAX_CPUID_ENTRIES)")
    return tuple(rows), tuple(unknown)


def _gates(value: Any, where: str) -> tuple[XfamGate, ...]:
    gates: list[XfamGate] = []
    for w, g in objects(value, where):
        jsonfile.check_fields(g, w, _GATE_FIELDS)
        reg = g.get("register")
        if reg not in REGISTERS:
            raise DataError(f"{w}.register: must be one of {', '.join(REGISTERS)}")
        gates.append(XfamGate(xfam=parse_int(g.get("xfam"), f"{w}.xfam"),
                              leaf=parse_int(g.get("leaf"), f"{w}.leaf", 32),
                              subleaf=_subleaf(g.get("subleaf"), f"{w}.subleaf"),
                              register=str(reg), mask=parse_int(g.get("mask"), f"{w}.mask", 32),
                              why=text(g, "why", w, "")))
    return tuple(gates)


def profile_from_json(data: Any, origin: str) -> ModuleProfile:
    jsonfile.document(data, origin, "a module profile", _PROFILE_FIELDS, kind=PROFILE_KIND)
    name = text(data, "name", origin)
    if not name:
        raise DataError(f"{origin}: field 'name' must be a non-empty string")
    rows, unknown = _rows(data.get("rows"), sub(origin, "rows"))

    def word(key: str, default: int | str) -> int:
        return parse_int(data.get(key, default), sub(origin, key))

    return ModuleProfile(
        name=name,
        source=text(data, "source", origin, origin),
        rows=rows,
        attributes_fixed0=word("attributes_fixed0", "0xffffffffffffffff"),
        attributes_fixed1=word("attributes_fixed1", 0),
        xfam_fixed0=word("xfam_fixed0", "0xffffffffffffffff"),
        xfam_fixed1=word("xfam_fixed1", 0),
        xfam_gates=_gates(data.get("xfam_gates", []), sub(origin, "xfam_gates")),
        unknown=unknown if any(any(u) for u in unknown) else (),
    )


def profile_to_json(p: ModuleProfile) -> dict[str, Any]:
    def hx(v: int) -> str:
        return f"0x{v:x}"

    rows = []
    for i, r in enumerate(p.rows):
        row: dict[str, Any] = {
            "leaf": hx(r.leaf),
            "subleaf": r.subleaf,
            "config_direct": [f"0x{v:08x}" for v in r.config_direct],
            "allow_direct": [f"0x{v:08x}" for v in r.allow_direct],
        }
        if any(p.unknown_mask(i)):
            row["unknown"] = [f"0x{v:08x}" for v in p.unknown_mask(i)]
        rows.append(row)
    return {
        "name": p.name,
        "source": p.source,
        "attributes_fixed0": hex64(p.attributes_fixed0),
        "attributes_fixed1": hex64(p.attributes_fixed1),
        "xfam_fixed0": hex64(p.xfam_fixed0),
        "xfam_fixed1": hex64(p.xfam_fixed1),
        "xfam_gates": [
            {"xfam": hex64(g.xfam), "leaf": hx(g.leaf), "subleaf": g.subleaf,
             "register": g.register, "mask": hx(g.mask), "why": g.why}
            for g in p.xfam_gates
        ],
        "rows": rows,
    }


# Parsed once per process: profiles are frozen, and verify, probe and the
# tests ask for the same bundled tables thousands of times.
@functools.cache
def _bundled_profiles() -> tuple[tuple[str, ModuleProfile], ...]:
    data = bundled_json("modules.json")
    return tuple((m["name"], profile_from_json(m, f"bundled module {m['name']}"))
                 for m in data["modules"])


def bundled_profiles() -> dict[str, ModuleProfile]:
    return dict(_bundled_profiles())


BUNDLED_MODULES: tuple[str, ...] = ("1.5.01", "1.5-late", "2.0")


def load_profile(name_or_file: str) -> ModuleProfile:
    """A bundled module by name, or a module profile JSON file."""
    bundled = bundled_profiles()
    if name_or_file in bundled:
        return bundled[name_or_file]
    if name_or_file.endswith(".json") or Path(name_or_file).exists():
        return profile_from_json(jsonfile.load(name_or_file), name_or_file)
    raise DataError(
        f"unknown TDX module {name_or_file!r}: use one of {', '.join(bundled)} or a JSON file"
    )


_HOST_FIELDS = ("name", "cpuid", "xfam_supported", "ept_5level", "tsx_ctrl")
_HOST_ENTRY_FIELDS = ("leaf", "function", "subleaf", "index", *REGISTERS)


def _native(value: Any, where: str) -> dict[tuple[int, int | None], Regs]:
    native: dict[tuple[int, int | None], Regs] = {}
    for w, e in objects(value, where):
        jsonfile.check_fields(e, w, _HOST_ENTRY_FIELDS)
        leaf = parse_int(e.get("leaf", e.get("function")), f"{w}.leaf", 32)
        subleaf = _subleaf(e.get("subleaf", e.get("index")), f"{w}.subleaf")
        a, b, c, d = (parse_int(e.get(r, 0), f"{w}.{r}", 32) for r in REGISTERS)
        native[(leaf, subleaf)] = (a, b, c, d)
    return native


def host_from_json(data: Any, origin: str) -> Host:
    jsonfile.document(data, origin, "a host", _HOST_FIELDS)
    return Host(
        name=text(data, "name", origin, origin),
        native=_native(data.get("cpuid", []), sub(origin, "cpuid")),
        xfam_supported=parse_int(data.get("xfam_supported", "0x2e7"),
                                 sub(origin, "xfam_supported")),
        ept_5level=flag(data, "ept_5level", origin),
        tsx_ctrl=flag(data, "tsx_ctrl", origin),
    )


def host_to_json(h: Host, leaves: tuple[tuple[int, int | None], ...] = ()) -> dict[str, Any]:
    keys = sorted(h.native, key=lambda k: (k[0], -1 if k[1] is None else k[1])) or list(leaves)
    return {
        "name": h.name,
        "xfam_supported": hex64(h.xfam_supported),
        "ept_5level": h.ept_5level,
        "tsx_ctrl": h.tsx_ctrl,
        "cpuid": [
            {"leaf": f"0x{k[0]:x}", "subleaf": k[1],
             **{r: f"0x{v:08x}" for r, v in zip(REGISTERS, h.native_regs(*k), strict=True)}}
            for k in keys
        ],
    }


def load_host(name_or_file: str) -> Host:
    if name_or_file == "max":
        return MAX_HOST
    return host_from_json(jsonfile.load(name_or_file), name_or_file)
