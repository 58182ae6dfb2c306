"""A VMM's view of a CPUID bit: the name a user types after QEMU's -cpu.

Data: `kvmtdx/data/qemu-cpu-features.json`, converted from QEMU's
target/i386/cpu.c by scripts/convert-qemu-features (its `source` names the
QEMU version, file and checksum).  Also which QEMU feature turns on each XSAVE
state component, since QEMU derives a TD's XFAM from the features it enables.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

from kvmtdx.model.profiles import bundled_json
from kvmtdx.structs import NO_SUBLEAF

DATA_FILE = "qemu-cpu-features.json"


@dataclass(frozen=True, slots=True)
class XsaveComponent:
    xfam_bit: int
    component: str  # QEMU's macro name, e.g. XSTATE_OPMASK_BIT
    feature: str | None  # the QEMU feature that enables it, e.g. avx512f


@dataclass(frozen=True, slots=True)
class _Table:
    source: dict[str, Any]
    names: dict[tuple[int, int | None, str], dict[int, str]]
    xsave: dict[int, XsaveComponent]


@functools.cache
def _table() -> _Table:
    data: Any = bundled_json(DATA_FILE)
    names = {
        (int(w["leaf"], 16), w["subleaf"], w["register"]): {int(b): n for b, n in w["bits"].items()}
        for w in data["features"]
    }
    xsave = {int(c["xfam_bit"]): XsaveComponent(int(c["xfam_bit"]), c["component"], c["feature"])
             for c in data["xsave_components"]}
    return _Table(dict(data["source"]), names, xsave)


def source() -> str:
    """Where the names come from, in one line."""
    s = _table().source
    where = f"QEMU {s.get('version') or '?'} {s['file'].split(' ')[0]}"
    if s.get("commit"):
        where += f" (commit {s['commit']})"
    return where


def source_record() -> dict[str, Any]:
    return dict(_table().source)


def feature_name(leaf: int, subleaf: int | None, register: str, bit: int) -> str | None:
    """QEMU's -cpu name of a CPUID bit, or None when QEMU has no name for it.

    QEMU's feature words without a sub-leaf are keyed None; KVM reports such rows
    with index 0, so 0 finds them too.
    """
    table = _table().names
    sub = None if subleaf == NO_SUBLEAF else subleaf
    for key in ((leaf, sub, register), (leaf, None, register) if sub == 0 else None,
                (leaf, 0, register) if sub is None else None):
        if key is not None and key in table:
            return table[key].get(bit)
    return None


def find_feature(name: str) -> tuple[tuple[int, int | None, str, int], ...]:
    """Every (leaf, sub-leaf, register, bit) QEMU calls `name`."""
    want = name.strip().lstrip("+-").lower()
    return tuple((leaf, sub, reg, bit) for (leaf, sub, reg), bits in _table().names.items()
                 for bit, n in bits.items() if n == want)


def resolve_warning(leaf: int, register: str, bit: int, name: str | None
                    ) -> tuple[int, int | None, str, int]:
    """The bit a QEMU warning such as 'CPUID.07H:EDX.avx512-fp16 [bit 23]' means.

    The warning names no sub-leaf; the feature name picks it, else sub-leaf 0.
    """
    if name:
        for found in find_feature(name):
            if found[0] == leaf and found[2] == register and found[3] == bit:
                return found
    subs = sorted({sub for (lf, sub, reg) in _table().names if lf == leaf and reg == register},
                  key=lambda s: -1 if s is None else s)
    return leaf, subs[0] if subs else None, register, bit


def xsave_component(xfam_bit: int) -> XsaveComponent | None:
    return _table().xsave.get(xfam_bit)


def xfam_enablers(xfam_mask: int) -> tuple[str, ...]:
    """The QEMU features that turn on the XSAVE components of `xfam_mask`, once each."""
    out: list[str] = []
    for bit in range(64):
        c = _table().xsave.get(bit) if xfam_mask >> bit & 1 else None
        if c is not None and c.feature and c.feature not in out:
            out.append(c.feature)
    return tuple(out)


# --- what QEMU lets a TD have beyond the configurable rows ---------------------------

TDX_DATA_FILE = "qemu-tdx-cpuid.json"
RegKey = tuple[int, int | None, str]


@dataclass(frozen=True, slots=True)
class TdxTable:
    """QEMU's target/i386/kvm/tdx.c view of a TD's CPUID (see the data file's source)."""

    source: dict[str, Any]
    fixed1: dict[RegKey, int]  # bits every TDX module sets
    supported: dict[RegKey, tuple[int, str]]  # bits QEMU treats as supported, and why
    attributes: dict[tuple[RegKey, int], int]  # (register, bit) -> the TD attribute bit
    xfam: dict[tuple[RegKey, int], int]  # (register, bit) -> the XFAM bit whose state it needs
    leaves: frozenset[RegKey]  # registers QEMU filters for a TD


def _key(item: Any) -> RegKey:
    return (int(item["leaf"], 16), item["subleaf"], str(item["register"]))


def _mask(bits: Any) -> int:
    return sum(1 << int(b) for b in bits)


@functools.cache
def tdx_table() -> TdxTable:
    data: Any = bundled_json(TDX_DATA_FILE)
    fixed1 = {_key(e): _mask(e["bits"]) for e in data["fixed1"]}
    supported = {_key(e): (_mask(e["bits"]), str(e["why"])) for e in data["qemu_supported"]}
    attributes = {(_key(e), int(e["bit"])): int(e["attribute_bit"]) for e in data["attributes"]}
    xfam = {(_key(e), int(e["bit"])): int(e["xfam_bit"]) for e in data["xfam_deps"]}
    leaves = frozenset([*fixed1, *supported, *(k for k, _ in attributes), *(k for k, _ in xfam)])
    return TdxTable(dict(data["source"]), fixed1, supported, attributes, xfam, leaves)


def feature_words() -> tuple[RegKey, ...]:
    """Every CPUID (leaf, sub-leaf, register) QEMU names features in."""
    return tuple(_table().names)


def named_bits(key: RegKey) -> dict[int, str]:
    return dict(_table().names.get(key, {}))
