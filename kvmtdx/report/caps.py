"""Rendering of `kvmtdx caps`: KVM_TDX_CAPABILITIES with every set bit named.

The JSON keeps predict's capabilities object (integers, the uapi's field
names) so the two can be compared directly, and adds the names beside it.
"""

from __future__ import annotations

from typing import Any

from kvmtdx.device import Counters
from kvmtdx.identity import HostIdentity
from kvmtdx.model import catalog
from kvmtdx.model.profiles import ModuleProfile, profile_to_json
from kvmtdx.report import hx
from kvmtdx.report.encode import capabilities_json, host_identity_json
from kvmtdx.report.schema import ReportKind, document
from kvmtdx.structs import FLAG_SIGNIFICANT_INDEX, REGISTERS, Capabilities, CpuidEntry

# Leaves whose sub-leaf is part of their identity (a label shows ".index" for them).
_INDEXED_LEAVES = frozenset({0x4, 0x7, 0xB, 0xD, 0xF, 0x10, 0x12, 0x14, 0x17, 0x18, 0x1D,
                             0x1E, 0x1F, 0x20, 0x23, 0x24, 0x8000001D, 0x80000020})


def leaf_label(e: CpuidEntry) -> str:
    indexed = e.flags & FLAG_SIGNIFICANT_INDEX or e.index or e.function in _INDEXED_LEAVES
    return f"0x{e.function:x}" + (f".{e.index}" if indexed else "")


def entry_names(e: CpuidEntry) -> dict[str, list[str]]:
    return {r: catalog.describe(e.function, e.index, r, v)
            for r, v in zip(REGISTERS, e.regs(), strict=True)}


def caps_to_json(caps: Capabilities, backend: str, counters: Counters | None = None
                 ) -> dict[str, Any]:
    doc: dict[str, Any] = {"backend": backend}
    doc.update(capabilities_json(caps))
    doc["nent"] = caps.nent
    doc["names"] = {
        "supported_attrs": catalog.attribute_names(caps.supported_attrs),
        "supported_xfam": catalog.xfam_names(caps.supported_xfam),
        "cpuid": [{"function": e.function, "index": e.index, **entry_names(e)}
                  for e in caps.entries],
        "source": catalog.source(),
    }
    if counters is not None:
        doc["ioctls"] = counters.ioctls
        doc["tds_created"] = counters.tds_created
    return doc


def render_json(caps: Capabilities, backend: str, counters: Counters | None,
                identity: HostIdentity) -> str:
    return document(ReportKind.CAPS, caps_to_json(caps, backend, counters),
                    host_identity_json(identity))


def render_text(caps: Capabilities, backend: str, counters: Counters | None = None) -> str:
    out = [
        f"KVM_TDX_CAPABILITIES from {backend}: {caps.nent} CPUID entries",
        f"supported_attrs  {hx(caps.supported_attrs, 16)}  "
        + (" ".join(catalog.attribute_names(caps.supported_attrs)) or "-"),
        f"supported_xfam   {hx(caps.supported_xfam, 16)}  "
        + (" ".join(catalog.xfam_names(caps.supported_xfam)) or "-"),
    ]
    for name in ("kernel_tdvmcallinfo_1_r11", "user_tdvmcallinfo_1_r11",
                 "kernel_tdvmcallinfo_1_r12", "user_tdvmcallinfo_1_r12"):
        out.append(f"{name:<25} {hx(getattr(caps, name), 16)}")
    for e in caps.entries:
        flags = f"  flags {hx(e.flags, 1)}" if e.flags else ""
        out.append(f"leaf {leaf_label(e)}{flags}")
        names = entry_names(e)
        for r, v in zip(REGISTERS, e.regs(), strict=True):
            out.append(f"  {r} {hx(v)}  " + (" ".join(names[r]) or "-"))
    if counters is not None:
        out.append(f"({counters.ioctls} ioctls, {counters.tds_created} TD created)")
    return "\n".join(out) + "\n"


def module_profile_json(profile: ModuleProfile) -> str:
    """`caps --save-module`: the profile, loadable with --module, as a "module-profile" report."""
    return document(ReportKind.MODULE_PROFILE, profile_to_json(profile))
