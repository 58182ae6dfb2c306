"""KVM's half of the mirror: what KVM reports, and its own KVM_TDX_INIT_VM checks, step by
step in the kernel's order (arch/x86/kvm/vmx/tdx.c, tdx_td_init and setup_tdparams_cpuids).

This is the straightforward reading, the one the explained prediction runs and the one
the compiled mirror (kvmtdx.model.compiled) is held to; the checks of the request's
header (steps 1 to 7 and the GPAW) are shared by both, the per-row steps 8 and 9 are
here and, as tables, in the compiled model.
"""

from __future__ import annotations

import errno
from collections.abc import Sequence

from kvmtdx.model.memo import per_pair
from kvmtdx.model.policy import Policy
from kvmtdx.model.profiles import CpuidRow, Host, ModuleProfile, Regs, enumerated
from kvmtdx.model.requests import Request
from kvmtdx.model.rules import (
    GPAW_FIELD,
    GPAW_LEAF,
    GPAW_SHIFT,
    GPAW_VALUES,
    SEPT_VE_DISABLE,
    lowest_bit,
)
from kvmtdx.model.tdx_host import reported_xfam_fixed0
from kvmtdx.outcome import Decider, Outcome
from kvmtdx.structs import (
    FLAG_SIGNIFICANT_INDEX,
    KVM_MAX_CPUID_ENTRIES,
    REGISTERS,
    CpuidEntry,
    InitVm,
)


def supported_attrs(module: ModuleProfile) -> int:
    """KVM offers only SEPT_VE_DISABLE, and only when the module can leave it at 0 or 1."""
    if SEPT_VE_DISABLE & module.attributes_fixed1 != module.attributes_fixed1:
        return 0
    return SEPT_VE_DISABLE & module.attributes_fixed0


@per_pair
def supported_xfam(module: ModuleProfile, host: Host) -> int:
    """The host KVM's XCR0 | XSS within the module's XFAM_FIXED0 as reported on this host;
    none at all unless KVM supports every fixed-1 bit."""
    h = host.xfam_supported
    if h & module.xfam_fixed1 != module.xfam_fixed1:
        return 0
    return h & reported_xfam_fixed0(module.tables, host)


def _reported_regs(row: CpuidRow, mask: Regs, policy: Policy) -> Regs:
    a, b, c, d = (v & ~policy.hides(row.leaf, row.kvm_index, r)
                  for v, r in zip(mask, REGISTERS, strict=True))
    if row.leaf == GPAW_LEAF:
        a |= GPAW_FIELD
    return (a, b, c, d)


def reported(module: ModuleProfile, host: Host, policy: Policy) -> tuple[CpuidEntry, ...]:
    """The N entries KVM_TDX_CAPABILITIES lists on success, one per module row, in row order:
    what the module enumerates, less what the policy hides, GPAW as 0xff.  Flags and
    padding are 0."""
    return tuple(
        CpuidEntry(row.leaf, row.kvm_index, 0, *_reported_regs(row, mask, policy))
        for row, mask in zip(module.rows, enumerated(module, host), strict=True)
    )


def lands_on(e: CpuidEntry, function: int, index: int | None) -> bool:
    """Whether KVM's generic lookup for (function, index) can land on `e`: an entry of that
    function that lacks the significant-index flag or has that index (None: any entry of it,
    as kvm_find_cpuid_entry asks for a leaf without sub-leaves)."""
    return e.function == function and (index is None or not e.flags & FLAG_SIGNIFICANT_INDEX
                                       or e.index == index)


def find(entries: Sequence[CpuidEntry], function: int, index: int | None) -> CpuidEntry | None:
    """KVM's generic lookup (kvm_find_cpuid_entry2): the first entry it can land on."""
    # lands_on written out: this is the step-by-step mirror's innermost loop, and the call
    # made it three times slower.  tests/test_mirror_init_vm.py holds the two together.
    for e in entries:
        if e.function == function and (index is None or not e.flags & FLAG_SIGNIFICANT_INDEX
                                       or e.index == index):
            return e
    return None


def _kvm(err: int, check: str, **where: int | str | None) -> Outcome:
    return Outcome.classify(err, 0, check=check, decider=Decider.KVM, **where)


# The refusals that name nothing of the request: one value each.
CMD_HW_ERROR = _kvm(errno.EINVAL, "cmd_hw_error")
TD_INITIALIZED = _kvm(errno.EINVAL, "td_initialized")
CMD_FLAGS = _kvm(errno.EINVAL, "cmd_flags")
NENT_TOO_BIG = _kvm(errno.E2BIG, "nent_too_big")
RESERVED_NONZERO = _kvm(errno.EINVAL, "reserved_nonzero")
CPUID_PADDING = _kvm(errno.EINVAL, "cpuid_padding")
GPAW_MISSING = _kvm(errno.EINVAL, "gpaw_missing", leaf=GPAW_LEAF)
GPAW_VALUE = _kvm(errno.EINVAL, "gpaw_value", leaf=GPAW_LEAF, register="eax", bit=GPAW_SHIFT)
GPAW_5LEVEL = _kvm(errno.EINVAL, "gpaw_5level", leaf=GPAW_LEAF, register="eax", bit=GPAW_SHIFT)
COUNT_MISMATCH = _kvm(errno.EINVAL, "count_mismatch")


def header_checks(iv: InitVm, flags: int, hw_error: int, td_initialized: bool, attrs: int,
                  xfam: int) -> Outcome | None:
    """Steps 1 to 7 in the kernel's order, up to the CPUID entries: KVM's refusal, or None.
    `flags` and `hw_error` are kvm_tdx_cmd's; `attrs` and `xfam` what KVM supports
    (supported_attrs, supported_xfam)."""
    if hw_error:
        return CMD_HW_ERROR
    if td_initialized:
        return TD_INITIALIZED
    if flags:
        return CMD_FLAGS
    if iv.effective_nent > KVM_MAX_CPUID_ENTRIES:
        return NENT_TOO_BIG
    if any(iv.reserved):
        return RESERVED_NONZERO
    if iv.cpuid_padding:
        return CPUID_PADDING
    bad = iv.attributes & ~attrs
    if bad:
        return _kvm(errno.EINVAL, "attributes_unsupported", bit=lowest_bit(bad))
    bad = iv.xfam & ~xfam
    if bad:
        return _kvm(errno.EINVAL, "xfam_unsupported", bit=lowest_bit(bad))
    return None


def gpaw_of(gpaw_entry: CpuidEntry | None, ept_5level: bool) -> int | Outcome:
    """The GPAW the entry find() gives for leaf 0x80000008 asks for, or KVM's refusal."""
    if gpaw_entry is None:
        return GPAW_MISSING
    gpaw = (gpaw_entry.eax & GPAW_FIELD) >> GPAW_SHIFT
    if gpaw not in GPAW_VALUES:
        return GPAW_VALUE
    if gpaw == 52 and not ept_5level:
        return GPAW_5LEVEL
    return gpaw


def request_entries(entries: tuple[CpuidEntry, ...], nent: int) -> tuple[CpuidEntry, ...]:
    """The entries KVM reads: exactly nent.  A request that claims more than it carries is
    modelled as followed by zeroed room (function 0 matches no module row); callers that
    lie upward must send that zeroed room."""
    if nent <= len(entries):
        return entries[:nent]
    return entries + (CpuidEntry(function=0),) * (nent - len(entries))


def kvm_checks(module: ModuleProfile, host: Host, req: Request,
               td_initialized: bool) -> tuple[tuple[CpuidEntry, ...], int] | Outcome:
    """Steps 1 to 7 and the GPAW: the request's entries and its GPAW, or KVM's refusal."""
    refused = header_checks(req.init_vm, req.flags, req.hw_error, td_initialized,
                            supported_attrs(module), supported_xfam(module, host))
    if refused is not None:
        return refused
    entries = request_entries(req.init_vm.entries, req.init_vm.effective_nent)
    gpaw = gpaw_of(find(entries, GPAW_LEAF, 0), host.ept_5level)
    if isinstance(gpaw, Outcome):
        return gpaw
    return entries, gpaw


def _regs_of(e: CpuidEntry) -> Regs:
    return (e.eax, e.ebx, e.ecx, e.edx)


def denied(policy: Policy, e: CpuidEntry, row_index: int) -> Outcome | None:
    """The denylist's refusal of the entry find() matched to a row (of KVM index
    `row_index`), judged by the entry's own index (by the row's, where the hole is closed)."""
    hit = policy.denylist.hits(e, row_index) if policy.denylist is not None else None
    if hit is None:
        return None
    return _kvm(errno.EINVAL, "denylist", leaf=e.function, subleaf=e.index, register=hit[0],
                bit=lowest_bit(hit[1]))


def allowlist_refuses(policy: Policy, row: CpuidRow, register: str, listed: int) -> int:
    """The bits of one register of a row the allowlist refuses: ones the module lists
    (`listed`) that KVM does not allow (the GPAW field aside: it is KVM's own interface)."""
    if policy.allowlist is None:
        return 0
    bad = listed & ~policy.allowlist.mask(row.leaf, row.kvm_index, register)
    return bad & ~GPAW_FIELD if row.leaf == GPAW_LEAF and register == "eax" else bad


def disallowed(policy: Policy, row: CpuidRow, listed: Regs, e: CpuidEntry) -> Outcome | None:
    """The allowlist's refusal: a bit the module lists in this row that KVM does not allow."""
    if policy.allowlist is None:
        return None
    for r, listed_mask, value in zip(REGISTERS, listed, _regs_of(e), strict=True):
        bad = value and value & allowlist_refuses(policy, row, r, listed_mask)
        if bad:
            return _kvm(errno.EINVAL, "allowlist", leaf=row.leaf, subleaf=row.subleaf,
                        register=r, bit=lowest_bit(bad))
    return None


def td_values(module: ModuleProfile, host: Host, policy: Policy,
              entries: tuple[CpuidEntry, ...], nent: int) -> list[Regs] | Outcome:
    """Steps 8 and 9: the per-row values KVM copies into TD_PARAMS, or KVM's refusal (the
    GPAW field is cleared where TD_PARAMS is filled, tdx_module.kvm73_td_params)."""
    listed = enumerated(module, host)
    values: list[Regs] = []
    count = 0
    for i, row in enumerate(module.rows):
        e = find(entries, row.leaf, row.kvm_index)
        if e is None:
            values.append((0, 0, 0, 0))
            continue
        refused = denied(policy, e, row.kvm_index) or disallowed(policy, row, listed[i], e)
        if refused is not None:
            return refused
        count += 1
        values.append(_regs_of(e))
    if count != nent:
        return COUNT_MISMATCH
    return values
