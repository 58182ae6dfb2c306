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

from kvmtdx.errors import DataError
from kvmtdx.structs import NO_SUBLEAF, REGISTERS

Regs = tuple[int, int, int, int]
ZERO_REGS: Regs = (0, 0, 0, 0)


def parse_int(value: Any, where: str, bits: int = 64) -> int:
    """An integer written as a JSON number or a string ("0x1f", "31")."""
    if isinstance(value, bool):
        raise DataError(f"{where}: expected an integer, got {value!r}")
    if isinstance(value, int):
        n = value
    elif isinstance(value, str):
        try:
            n = int(value.strip(), 0)
        except ValueError:
            raise DataError(f"{where}: not an integer: {value!r}") from None
    else:
        raise DataError(f"{where}: expected an integer, got {type(value).__name__}")
    if n < 0 or n >> bits:
        raise DataError(f"{where}: {value!r} does not fit in {bits} bits")
    return n


def parse_regs(value: Any, where: str) -> Regs:
    if not isinstance(value, list) or len(value) != 4:
        raise DataError(f"{where}: expected a list of 4 registers [eax, ebx, ecx, edx]")
    a, b, c, d = (parse_int(v, f"{where}[{i}]", 32) for i, v in enumerate(value))
    return (a, b, c, d)


def load_json(path: str | Path) -> Any:
    p = Path(path)
    try:
        text = p.read_text()
    except OSError as e:
        raise DataError(f"{p}: cannot read: {e.strerror}") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(
            f"{p}: not valid JSON: {e.msg} at line {e.lineno} column {e.colno}"
        ) from None


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


def profile_from_json(data: Any, origin: str) -> ModuleProfile:
    if not isinstance(data, dict):
        raise DataError(f"{origin}: a module profile must be a JSON object")
    name = data.get("name")
    if not isinstance(name, str) or not name:
        raise DataError(f"{origin}: field 'name' must be a non-empty string")
    rows_in = data.get("rows")
    if not isinstance(rows_in, list) or not rows_in:
        raise DataError(f"{origin}: field 'rows' must be a non-empty list")
    rows: list[CpuidRow] = []
    unknown: list[Regs] = []
    for i, r in enumerate(rows_in):
        w = f"{origin}: rows[{i}]"
        if not isinstance(r, dict):
            raise DataError(f"{w}: must be an object")
        for key in ("leaf", "config_direct", "allow_direct"):
            if key not in r:
                raise DataError(f"{w}: missing field '{key}'")
        rows.append(
            CpuidRow(
                leaf=parse_int(r["leaf"], f"{w}.leaf", 32),
                subleaf=_subleaf(r.get("subleaf"), f"{w}.subleaf"),
                config_direct=parse_regs(r["config_direct"], f"{w}.config_direct"),
                allow_direct=parse_regs(r["allow_direct"], f"{w}.allow_direct"),
            )
        )
        unknown.append(parse_regs(r.get("unknown", [0, 0, 0, 0]), f"{w}.unknown"))
    gates: list[XfamGate] = []
    for i, g in enumerate(data.get("xfam_gates", [])):
        w = f"{origin}: xfam_gates[{i}]"
        if not isinstance(g, dict):
            raise DataError(f"{w}: must be an object")
        reg = g.get("register")
        if reg not in REGISTERS:
            raise DataError(f"{w}.register: must be one of {', '.join(REGISTERS)}")
        gates.append(
            XfamGate(
                xfam=parse_int(g.get("xfam"), f"{w}.xfam"),
                leaf=parse_int(g.get("leaf"), f"{w}.leaf", 32),
                subleaf=_subleaf(g.get("subleaf"), f"{w}.subleaf"),
                register=str(reg),
                mask=parse_int(g.get("mask"), f"{w}.mask", 32),
                why=str(g.get("why", "")),
            )
        )
    return ModuleProfile(
        name=name,
        source=str(data.get("source", origin)),
        rows=tuple(rows),
        attributes_fixed0=parse_int(data.get("attributes_fixed0", "0xffffffffffffffff"),
                                    f"{origin}: attributes_fixed0"),
        attributes_fixed1=parse_int(data.get("attributes_fixed1", 0),
                                    f"{origin}: attributes_fixed1"),
        xfam_fixed0=parse_int(data.get("xfam_fixed0", "0xffffffffffffffff"),
                              f"{origin}: xfam_fixed0"),
        xfam_fixed1=parse_int(data.get("xfam_fixed1", 0), f"{origin}: xfam_fixed1"),
        xfam_gates=tuple(gates),
        unknown=tuple(unknown) if any(any(u) for u in unknown) else (),
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
        "attributes_fixed0": hx(p.attributes_fixed0),
        "attributes_fixed1": hx(p.attributes_fixed1),
        "xfam_fixed0": hx(p.xfam_fixed0),
        "xfam_fixed1": hx(p.xfam_fixed1),
        "xfam_gates": [
            {"xfam": hx(g.xfam), "leaf": hx(g.leaf), "subleaf": g.subleaf,
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
        return profile_from_json(load_json(name_or_file), name_or_file)
    raise DataError(
        f"unknown TDX module {name_or_file!r}: use one of {', '.join(bundled)} or a JSON file"
    )


def host_from_json(data: Any, origin: str) -> Host:
    if not isinstance(data, dict):
        raise DataError(f"{origin}: a host must be a JSON object")
    native: dict[tuple[int, int | None], Regs] = {}
    cpuid = data.get("cpuid", [])
    if not isinstance(cpuid, list):
        raise DataError(f"{origin}: field 'cpuid' must be a list")
    for i, e in enumerate(cpuid):
        w = f"{origin}: cpuid[{i}]"
        if not isinstance(e, dict):
            raise DataError(f"{w}: must be an object")
        leaf = parse_int(e.get("leaf", e.get("function")), f"{w}.leaf", 32)
        sub = _subleaf(e.get("subleaf", e.get("index")), f"{w}.subleaf")
        native[(leaf, sub)] = (
            parse_int(e.get("eax", 0), f"{w}.eax", 32),
            parse_int(e.get("ebx", 0), f"{w}.ebx", 32),
            parse_int(e.get("ecx", 0), f"{w}.ecx", 32),
            parse_int(e.get("edx", 0), f"{w}.edx", 32),
        )
    for key in ("ept_5level", "tsx_ctrl"):
        if not isinstance(data.get(key, False), bool):
            raise DataError(f"{origin}: field '{key}' must be true or false")
    return Host(
        name=str(data.get("name", origin)),
        native=native,
        xfam_supported=parse_int(data.get("xfam_supported", "0x2e7"), f"{origin}: xfam_supported"),
        ept_5level=bool(data.get("ept_5level", False)),
        tsx_ctrl=bool(data.get("tsx_ctrl", False)),
    )


def host_to_json(h: Host, leaves: tuple[tuple[int, int | None], ...] = ()) -> dict[str, Any]:
    keys = sorted(h.native, key=lambda k: (k[0], -1 if k[1] is None else k[1])) or list(leaves)
    return {
        "name": h.name,
        "xfam_supported": f"0x{h.xfam_supported:x}",
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
    return host_from_json(load_json(name_or_file), name_or_file)
