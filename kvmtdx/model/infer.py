"""The module profile a kernel's KVM_TDX_CAPABILITIES implies, under a known policy.

The public module tables may differ from the module build on a user's host, so
an exact `kvmtdx verify` needs the host's own profile.  A kernel whose policy is
known (say the unpatched distro kernel) reports, per row, the module's mask
less what that policy hides; this module turns that report back into a profile
(`kvmtdx caps --save-module FILE`) that `load_profile` reads.

A profile runs the TDH.MNG.INIT rules of a module version (its base).  With
`--module NAME` that module is the base, and hidden bits and the config/allow
split come from its table (its allow_direct bits the host did not report stay
allow_direct: the module clears them silently on a host that lacks them).
Without it the base is the bundled module whose rows the kernel lists, every
reported bit becomes config_direct (the report cannot tell config_direct from
allow_direct) and every bit the policy could have hidden is marked unknown:
checks skip them.
"""

from __future__ import annotations

from kvmtdx.errors import DataError
from kvmtdx.model import rules
from kvmtdx.model.policy import Policy
from kvmtdx.model.profiles import (
    BUNDLED_MODULES,
    CpuidRow,
    ModuleProfile,
    Regs,
    load_profile,
    profile_of,
)
from kvmtdx.model.tdx_module_tables import ConfigRow, with_configurable
from kvmtdx.structs import REGISTERS, Capabilities, CpuidEntry


def _regs(v: list[int]) -> Regs:
    a, b, c, d = v
    return (a, b, c, d)


def base_for(caps: Capabilities) -> ModuleProfile:
    """The bundled module whose CPUID_CONFIG rows are the rows the kernel reports."""
    keys = [(e.function, e.index) for e in caps.entries]
    for name in reversed(BUNDLED_MODULES):
        m = load_profile(name)
        if [(r.leaf, r.kvm_index) for r in m.rows] == keys:
            return m
    raise DataError(f"the kernel reports {len(keys)} CPUID rows that match no bundled TDX "
                    "module's rows: give --module NAME to say whose rules the profile runs")


def _row_masks(e: CpuidEntry, policy: Policy, b: CpuidRow,
               fill: bool) -> tuple[Regs, Regs, Regs]:
    """(config_direct, allow_direct, unknown) of one reported row."""
    cds, ads, unks = [], [], []
    for i, r in enumerate(REGISTERS):
        reported = e.regs()[i]
        if e.function == rules.GPAW_LEAF and r == "eax":
            reported &= ~rules.GPAW_FIELD  # KVM's own knob, never the module's
        hidden = policy.hides(e.function, e.index, r) & ~reported
        if not fill:
            cds.append(reported)
            ads.append(0)
            unks.append(hidden)
            continue
        bcd, bad = b.config_direct[i], b.allow_direct[i]
        cd = (bcd & (reported | hidden)) | (reported & ~bcd & ~bad)
        cds.append(cd)
        ads.append(bad & ~cd)
        unks.append(0)
    return _regs(cds), _regs(ads), _regs(unks)


def module_from_capabilities(caps: Capabilities, policy: Policy, *,
                             base: ModuleProfile | None = None, name: str = "saved",
                             source: str = "") -> ModuleProfile:
    fill = base is not None
    rules_of = base if base is not None else base_for(caps)
    rows: list[ConfigRow] = []
    unknown: list[Regs] = []
    for e in caps.entries:
        b = next((r for r in rules_of.rows if r.leaf == e.function and r.kvm_index == e.index),
                 None)
        if b is None:
            raise DataError(f"the kernel reports CPUID 0x{e.function:x} index {e.index}, which "
                            f"module {rules_of.name} has no row for")
        cd, ad, unk = _row_masks(e, policy, b, fill)
        rows.append(ConfigRow(b.leaf, b.subleaf, cd, ad, lookup_index=-1))
        unknown.append(unk)
    tables = with_configurable(rules_of.tables, rows)
    how = (f"gaps filled from module {rules_of.name}" if fill
           else f"rules of module {rules_of.version}")
    return profile_of(
        tables, name,
        source or f"inferred from KVM_TDX_CAPABILITIES under policy {policy.name}, {how}",
        tuple(unknown) if any(any(u) for u in unknown) else ())
