"""The feature-name catalog: what each CPUID bit, TD attribute and XFAM bit is called.

Pure data lookup over `kvmtdx/data/feature-names.json` (its `source` field
names where every name comes from: Linux's cpufeatures naming first, the Intel
SDM where Linux has no name).  Registers that carry values rather than
features (leaf 1 EAX/EBX, leaves 4, 0x18, 0x1F, 0x80000008 EAX) are described
by fields; a bit inside a field is named after it.  Anything unknown prints
as `bitN`, so every set bit always has a printable name.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import cache
from typing import Any

from kvmtdx.jsonfile import parse_int
from kvmtdx.model.profiles import bundled_json
from kvmtdx.structs import NO_SUBLEAF, REGISTERS

DATA_FILE = "feature-names.json"
ANY_SUBLEAF = -1

# (leaf, subleaf or None for "no sub-leaves" or ANY_SUBLEAF, register)
Key = tuple[int, int | None, str]


@dataclass(frozen=True, slots=True)
class Field:
    """A multi-bit value inside a CPUID register, bits low..high inclusive."""

    name: str
    low: int
    high: int

    @property
    def width(self) -> int:
        return self.high - self.low + 1

    @property
    def mask(self) -> int:
        return ((1 << self.width) - 1) << self.low

    def extract(self, value: int) -> int:
        return (value & self.mask) >> self.low

    def label(self) -> str:
        return self.name if self.width == 1 else f"{self.name}[{self.high}:{self.low}]"


@dataclass(frozen=True, slots=True)
class BitRef:
    """One CPUID bit of a row (subleaf None: the row has no sub-leaves), named on demand."""

    leaf: int
    subleaf: int | None
    register: str
    bit: int

    @property
    def name(self) -> str:
        return bit_name(self.leaf, self.subleaf, self.register, self.bit)

    def label(self) -> str:
        sub = "" if self.subleaf is None else f".{self.subleaf}"
        return f"0x{self.leaf:x}{sub} {self.register.upper()}[{self.bit}] {self.name}"


@dataclass(frozen=True)
class _Catalog:
    source: str
    bits: dict[Key, dict[int, str]]
    origin: dict[Key, dict[int, str]]  # bit -> "linux" | "kvm" | "sdm"
    aliases: dict[Key, dict[int, tuple[str, ...]]]
    fields: dict[Key, tuple[Field, ...]]
    attributes: dict[int, str]
    xfam: dict[int, str]


def _sub(value: Any, where: str) -> int | None:
    if value is None:
        return None
    if value == "*":
        return ANY_SUBLEAF
    return parse_int(value, where, 32)


def _reg(value: Any, where: str) -> str:
    if value not in REGISTERS:
        raise ValueError(f"{where}: register must be one of {', '.join(REGISTERS)}")
    return str(value)


@cache
def _catalog() -> _Catalog:
    data = bundled_json(DATA_FILE)
    bits: dict[Key, dict[int, str]] = {}
    origin: dict[Key, dict[int, str]] = {}
    aliases: dict[Key, dict[int, tuple[str, ...]]] = {}
    for i, r in enumerate(data["registers"]):
        w = f"{DATA_FILE}: registers[{i}]"
        key = (parse_int(r["leaf"], f"{w}.leaf", 32), _sub(r["subleaf"], f"{w}.subleaf"),
               _reg(r["register"], f"{w}.register"))
        names = {int(b): str(n) for b, n in r["bits"].items()}
        bits[key] = names
        sdm = {int(b) for b in r.get("from_sdm", [])}
        kvm = {int(b) for b in r.get("from_kvm", [])}
        origin[key] = {b: "sdm" if b in sdm else "kvm" if b in kvm else "linux" for b in names}
        aliases[key] = {int(b): tuple(a) for b, a in r.get("aliases", {}).items()}
    fields: dict[Key, tuple[Field, ...]] = {}
    for i, f in enumerate(data["fields"]):
        w = f"{DATA_FILE}: fields[{i}]"
        key = (parse_int(f["leaf"], f"{w}.leaf", 32), _sub(f["subleaf"], f"{w}.subleaf"),
               _reg(f["register"], f"{w}.register"))
        fields[key] = tuple(Field(str(n), int(lo), int(hi)) for n, lo, hi in f["fields"])
    return _Catalog(
        source=str(data["source"]),
        bits=bits,
        origin=origin,
        aliases=aliases,
        fields=fields,
        attributes={int(b): str(n) for b, n in data["attributes"].items()},
        xfam={int(b): str(n) for b, n in data["xfam"].items()},
    )


def source() -> str:
    """Where the names come from (the data file's own statement)."""
    return _catalog().source


def _norm_sub(subleaf: int | None) -> int | None:
    return None if subleaf is None or subleaf == NO_SUBLEAF else subleaf


def _candidates(leaf: int, subleaf: int | None, register: str) -> tuple[Key, ...]:
    # KVM reports "no sub-leaves" as index 0, so None and 0 find each other.
    sub = _norm_sub(subleaf)
    keys: list[Key] = [(leaf, sub, register), (leaf, ANY_SUBLEAF, register)]
    if sub is None:
        keys.append((leaf, 0, register))
    elif sub == 0:
        keys.append((leaf, None, register))
    return tuple(keys)


def _lookup(table: dict[Key, Any], leaf: int, subleaf: int | None, register: str) -> Any:
    for key in _candidates(leaf, subleaf, register):
        if key in table:
            return table[key]
    return None


def fields(leaf: int, subleaf: int | None, register: str) -> tuple[Field, ...]:
    """The value fields of a register ((), for a feature register)."""
    found: tuple[Field, ...] | None = _lookup(_catalog().fields, leaf, subleaf, register)
    return found or ()


def has_fields(leaf: int, subleaf: int | None, register: str) -> bool:
    return bool(fields(leaf, subleaf, register))


def field_of(leaf: int, subleaf: int | None, register: str, bit: int) -> Field | None:
    for f in fields(leaf, subleaf, register):
        if f.low <= bit <= f.high:
            return f
    return None


def named_bits(leaf: int, subleaf: int | None, register: str) -> dict[int, str]:
    """The feature bits the catalog names in a register."""
    found: dict[int, str] | None = _lookup(_catalog().bits, leaf, subleaf, register)
    return dict(found or {})


def name_origin(leaf: int, subleaf: int | None, register: str, bit: int) -> str | None:
    """'linux', 'kvm' or 'sdm': which source gave the bit its name (None: unnamed)."""
    found: dict[int, str] | None = _lookup(_catalog().origin, leaf, subleaf, register)
    return None if found is None else found.get(bit)


def bit_name(leaf: int, subleaf: int | None, register: str, bit: int) -> str:
    """A bit's name: the feature, FIELD[i] inside a value field, else bitN."""
    if not 0 <= bit < 32:
        raise ValueError(f"CPUID bit out of range: {bit}")
    name = named_bits(leaf, subleaf, register).get(bit)
    if name is not None:
        return name
    f = field_of(leaf, subleaf, register, bit)
    if f is not None:
        return f.name if f.width == 1 else f"{f.name}[{bit - f.low}]"
    return f"bit{bit}"


def set_bits(value: int) -> list[int]:
    return [b for b in range(value.bit_length()) if value >> b & 1]


def bit_names(leaf: int, subleaf: int | None, register: str, value: int) -> list[str]:
    """A name for every set bit of a register value, lowest bit first."""
    return [bit_name(leaf, subleaf, register, b) for b in set_bits(value & 0xFFFFFFFF)]


def describe(leaf: int, subleaf: int | None, register: str, value: int) -> list[str]:
    """Set bits for people: features by name, value fields as NAME[hi:lo]=value."""
    value &= 0xFFFFFFFF
    out: list[str] = []
    covered = 0
    for f in fields(leaf, subleaf, register):
        covered |= f.mask
        if value & f.mask:
            out.append(f"{f.label()}={f.extract(value):#x}" if f.width > 1 else f.name)
    out += [bit_name(leaf, subleaf, register, b) for b in set_bits(value & ~covered)]
    return out


def attribute_name(bit: int) -> str:
    """TD ATTRIBUTES bit name, else bitN."""
    return _catalog().attributes.get(bit, f"bit{bit}")


def xfam_name(bit: int) -> str:
    """XFAM (XSAVE state component) bit name, else bitN."""
    return _catalog().xfam.get(bit, f"bit{bit}")


def attribute_names(value: int) -> list[str]:
    return [attribute_name(b) for b in set_bits(value)]


def xfam_names(value: int) -> list[str]:
    return [xfam_name(b) for b in set_bits(value)]


def _fold(name: str) -> str:
    # "CNXT-ID", "cnxt_id" and "CnxtId" are one name to a lookup.
    return re.sub(r"[^0-9a-z]", "", name.lower())


def aliases(leaf: int, subleaf: int | None, register: str, bit: int) -> tuple[str, ...]:
    found: dict[int, tuple[str, ...]] | None = _lookup(_catalog().aliases, leaf, subleaf, register)
    return (found or {}).get(bit, ())


def matches(name: str, leaf: int, subleaf: int | None, register: str, bit: int) -> bool:
    """Whether `name` (the catalog's or an alias, any case, '-' or '_') denotes this bit."""
    want = _fold(name)
    names = (bit_name(leaf, subleaf, register, bit), *aliases(leaf, subleaf, register, bit))
    return any(_fold(n) == want for n in names)


def find(name: str) -> tuple[BitRef, ...]:
    """Every CPUID bit that `name` denotes (catalog name or alias)."""
    want = _fold(name)
    cat = _catalog()
    out: list[BitRef] = []
    for (leaf, sub, reg), names in cat.bits.items():
        for bit, n in names.items():
            spellings = (n, *cat.aliases.get((leaf, sub, reg), {}).get(bit, ()))
            if any(_fold(s) == want for s in spellings):
                out.append(BitRef(leaf, sub, reg, bit))
    return tuple(out)
