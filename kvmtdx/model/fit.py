"""Whether a module profile can describe what a kernel reported, before any kernel is judged.

A wrong `--module` makes every prediction wrong, and every check that holds the kernel to a
prediction would fail as if the kernel were at fault.  Some reports no kernel can produce on
the module a profile describes, whatever its policy or host: a different row list, a bit the
module never lists (KVM only ever removes bits from the module's masks; GPAW's field aside,
which KVM writes itself), supported attributes or XFAM outside what the module lets a TD have,
or XFAM without the bits the module forces.  Those say the profile is not this host's module.

Pure: it reads the profile and the capabilities only.
"""

from __future__ import annotations

from kvmtdx.model.catalog import BitRef
from kvmtdx.model.profiles import CpuidRow, ModuleProfile
from kvmtdx.model.rules import GPAW_FIELD, GPAW_LEAF, bits_of
from kvmtdx.structs import NO_SUBLEAF, REGISTERS, Capabilities, CpuidEntry


def _row_differs(i: int, row: CpuidRow, e: CpuidEntry) -> str | None:
    # A row without sub-leaves is index 0 to KVM; a kernel that passes the module's
    # 0xffffffff through has a bug of its own, which the exact checks name.
    indices = (row.subleaf,) if row.subleaf is not None else (0, NO_SUBLEAF)
    if e.function == row.leaf and e.index in indices:
        return None
    return f"entry {i} is 0x{e.function:x}.{e.index}, the module's row {i} is {row.label()}"


def _never_listed(module: ModuleProfile, caps: Capabilities) -> list[BitRef]:
    out: list[BitRef] = []
    for i, (row, e) in enumerate(zip(module.rows, caps.entries, strict=False)):
        for r, allows, unknown in zip(REGISTERS, row.module_allows(), module.unknown_mask(i),
                                      strict=True):
            extra = e.reg(r) & ~allows & ~unknown
            if row.leaf == GPAW_LEAF and r == "eax":
                extra &= ~GPAW_FIELD
            out.extend(BitRef(row.leaf, row.subleaf, r, b) for b in bits_of(extra))
    return out


def _header(module: ModuleProfile, caps: Capabilities) -> list[str]:
    out = []
    if caps.supported_attrs & ~module.attributes_fixed0:
        out.append(f"supported_attrs 0x{caps.supported_attrs:x} has bits the module never "
                   f"allows (0x{caps.supported_attrs & ~module.attributes_fixed0:x})")
    if caps.supported_xfam & ~module.xfam_fixed0:
        out.append(f"supported_xfam 0x{caps.supported_xfam:x} has bits the module never "
                   f"allows (0x{caps.supported_xfam & ~module.xfam_fixed0:x})")
    if module.xfam_fixed1 & ~caps.supported_xfam:
        out.append(f"supported_xfam 0x{caps.supported_xfam:x} lacks bits the module forces "
                   f"(0x{module.xfam_fixed1 & ~caps.supported_xfam:x})")
    return out


def profile_mismatch(module: ModuleProfile, caps: Capabilities) -> list[str]:
    """Why `module` cannot be the module behind `caps` (empty: it can be)."""
    n, m = len(caps.entries), len(module.rows)
    if n != m:
        return [f"KVM lists {n} CPUID rows, module {module.name} has {m}"]
    rows = [d for i, (row, e) in enumerate(zip(module.rows, caps.entries, strict=True))
            if (d := _row_differs(i, row, e)) is not None]
    if rows:
        return rows[:1] + ([f"{len(rows) - 1} more rows differ"] if len(rows) > 1 else [])
    out = _header(module, caps)
    never = _never_listed(module, caps)
    if never:
        shown = ", ".join(b.label() for b in never[:4])
        more = f" and {len(never) - 4} more" if len(never) > 4 else ""
        out.append(f"reported bits module {module.name} never lists: {shown}{more}")
    return out
