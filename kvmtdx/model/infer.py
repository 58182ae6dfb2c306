"""The module profile a kernel's KVM_TDX_CAPABILITIES implies, under a known policy.

The public module tables may differ from the module build on a user's host, so
an exact `kvmtdx verify` needs the host's own profile.  A kernel whose policy is
known (say the unpatched distro kernel) reports, per row, the module's mask
less what that policy hides; this module turns that report back into a profile
(`kvmtdx caps --save-module FILE`) that `load_profile` reads.

Without a base table every reported bit becomes config_direct (the profile
cannot tell config_direct from allow_direct, so it claims no allow_direct), and
every bit the policy could have hidden is marked unknown: checks skip them.
With a base table (`--module NAME`), hidden bits and the config/allow split
come from it, and its allow_direct bits the host did not report are kept as
allow_direct (the module clears them silently on a host that lacks them).
"""

from __future__ import annotations

from kvmtdx.model import rules
from kvmtdx.model.policy import Policy
from kvmtdx.model.profiles import CpuidRow, ModuleProfile, Regs
from kvmtdx.structs import REGISTERS, Capabilities, CpuidEntry

FULL = 0xFFFFFFFF
# Leaves whose rows carry sub-leaves in every public TDX module (the rest list
# one row with sub-leaf 0xFFFFFFFF, which KVM reports as index 0).
SUBLEAF_LEAVES = frozenset({0x4, 0x7, 0xB, 0xD, 0xF, 0x10, 0x12, 0x14, 0x17, 0x18, 0x1D,
                            0x1E, 0x1F, 0x20, 0x23, 0x24})
X87_SSE = 0x3  # XFAM bits every TD has


def _regs(v: list[int]) -> Regs:
    a, b, c, d = v
    return (a, b, c, d)


def _base_row(base: ModuleProfile | None, e: CpuidEntry) -> CpuidRow | None:
    if base is None:
        return None
    return next((r for r in base.rows if r.leaf == e.function and r.kvm_index == e.index), None)


def _subleaf(e: CpuidEntry, entries: tuple[CpuidEntry, ...]) -> int | None:
    if e.function in SUBLEAF_LEAVES or sum(x.function == e.function for x in entries) > 1:
        return e.index
    return None


def module_from_capabilities(caps: Capabilities, policy: Policy, *,
                             base: ModuleProfile | None = None, name: str = "saved",
                             source: str = "") -> ModuleProfile:
    rows: list[CpuidRow] = []
    unknown: list[Regs] = []
    for e in caps.entries:
        b = _base_row(base, e)
        cds, ads, unks = [], [], []
        for i, r in enumerate(REGISTERS):
            reported = e.regs()[i]
            if e.function == rules.GPAW_LEAF and r == "eax":
                reported &= ~rules.GPAW_FIELD  # KVM's own knob, never the module's
            hidden = policy.hides(e.function, e.index, r) & ~reported
            if b is None:
                cds.append(reported)
                ads.append(0)
                unks.append(hidden)
                continue
            bcd, bad = b.config_direct[i], b.allow_direct[i]
            cd = (bcd & (reported | hidden)) | (reported & ~bcd & ~bad)
            cds.append(cd)
            ads.append(bad & ~cd)
            unks.append(0)
        rows.append(CpuidRow(leaf=e.function,
                             subleaf=b.subleaf if b is not None else _subleaf(e, caps.entries),
                             config_direct=_regs(cds), allow_direct=_regs(ads)))
        unknown.append(_regs(unks))
    if base is not None:
        attrs0, attrs1 = base.attributes_fixed0, base.attributes_fixed1
        xfam0, xfam1 = base.xfam_fixed0, base.xfam_fixed1
        gates = base.xfam_gates
    else:
        # Only what KVM offers is knowable; it is also all a TD may ask for.
        attrs0, attrs1 = caps.supported_attrs, 0
        xfam0, xfam1 = caps.supported_xfam, X87_SSE & caps.supported_xfam
        gates = ()
    return ModuleProfile(
        name=name,
        source=source or f"inferred from KVM_TDX_CAPABILITIES under policy {policy.name}"
        + (f", gaps filled from module {base.name}" if base is not None else ""),
        rows=tuple(rows), xfam_gates=gates,
        unknown=tuple(unknown) if any(any(u) for u in unknown) else (),
        attributes_fixed0=attrs0, attributes_fixed1=attrs1, xfam_fixed0=xfam0,
        xfam_fixed1=xfam1,
    )
