"""The mirror: what a kernel policy with a TDX module on a host answers, and why.

Pure code, no I/O: given a module profile, a host and a policy, it predicts
KVM_TDX_CAPABILITIES (errno, and the caller's buffer byte for byte) and the
Outcome of any KVM_TDX_INIT_VM request, naming the check that decides it.
It follows the behaviour contract (spec sections 3 to 6) and the project's
decisions where the spec is silent (the shared contract notes), in their order.

What the mirror cannot know, and leaves to the live host:
- TDX key-ID exhaustion (-ENOSPC between KVM's checks and TDH.MNG.INIT) is a
  property of how many TDs the machine holds right now, not of the request;
  a prediction assumes a free key ID.
- -ENOMEM, -EAGAIN (no entropy), -EBUSY (vCPUs): never predicted.
- Addresses: the mirror is handed the caller's bytes, so -EFAULT never arises.

The invariant edge (spec section 4, "silently cleared"): an allow_direct bit the
host lacks natively is not reported by any policy, yet a request carrying it is
ACCEPTED, because TDH.MNG.INIT drops it instead of refusing.  That is the
module's documented behaviour, not a kernel bug; `silently_cleared` gives the
mask so a conformance check can leave those bits out of "never ACCEPTED".
"""

from __future__ import annotations

import errno
from collections.abc import Sequence
from dataclasses import dataclass, replace

from kvmtdx import layout
from kvmtdx.model import builders
from kvmtdx.model.policy import Policy
from kvmtdx.model.profiles import CpuidRow, Host, ModuleProfile, Regs, enumerated
from kvmtdx.model.requests import Request
from kvmtdx.model.rules import (
    GPAW_FIELD,
    GPAW_LEAF,
    GPAW_SHIFT,
    GPAW_VALUES,
    MODULE_COUPLINGS,
    SEPT_VE_DISABLE,
    lowest_bit,
)
from kvmtdx.outcome import Decider, Outcome
from kvmtdx.status import Operand
from kvmtdx.status import operand_invalid as _operand_invalid
from kvmtdx.structs import (
    FLAG_SIGNIFICANT_INDEX,
    KVM_MAX_CPUID_ENTRIES,
    REGISTERS,
    Capabilities,
    CpuidEntry,
    InitVm,
)


@dataclass(frozen=True)
class CapsPrediction:
    """KVM_TDX_CAPABILITIES as the caller sees it afterwards.

    `buffer` is None when KVM returned before reading the buffer (cmd.hw_error
    or cmd.flags refused); on every other error it equals the caller's bytes
    (KVM leaves it untouched); on success it is what KVM wrote over them.
    """

    errno: int  # 0 = success
    buffer: bytes | None
    cmd_written_back: bool
    caps: Capabilities | None  # decoded on success


def _regs_of(e: CpuidEntry) -> Regs:
    return (e.eax, e.ebx, e.ecx, e.edx)


def _entry(function: int, index: int, regs: Sequence[int], flags: int = 0) -> CpuidEntry:
    a, b, c, d = regs
    return CpuidEntry(function=function, index=index, flags=flags, eax=a, ebx=b, ecx=c, edx=d)


# ---------------------------------------------------------------------------
# What KVM reports.


def supported_attrs(module: ModuleProfile) -> int:
    """KVM offers only SEPT_VE_DISABLE, and only when the module can leave it at 0 or 1."""
    if SEPT_VE_DISABLE & module.attributes_fixed1 != module.attributes_fixed1:
        return 0
    return SEPT_VE_DISABLE & module.attributes_fixed0


def supported_xfam(module: ModuleProfile, host: Host) -> int:
    h = host.xfam_supported
    if h & module.xfam_fixed1 != module.xfam_fixed1:
        return 0
    return h & (module.xfam_fixed0 & h)


def _reported_regs(row: CpuidRow, mask: Regs, policy: Policy) -> Regs:
    a, b, c, d = (v & ~policy.hides(row.leaf, row.kvm_index, r)
                  for v, r in zip(mask, REGISTERS, strict=True))
    if row.leaf == GPAW_LEAF:
        a |= GPAW_FIELD
    return (a, b, c, d)


def reported_entries(module: ModuleProfile, host: Host, policy: Policy) -> tuple[CpuidEntry, ...]:
    """The N entries KVM_TDX_CAPABILITIES lists on success, one per module row, in row order.

    Entry flags and padding are 0 (under upstream-6.16 they are undefined; this
    gives 0).  A policy diff compares these per policy.
    """
    return tuple(
        _entry(row.leaf, row.kvm_index, _reported_regs(row, mask, policy))
        for row, mask in zip(module.rows, enumerated(module, host), strict=True)
    )


def _default_caller(nent: int) -> bytes:
    return layout.pack_capabilities(Capabilities(nent=nent), nent_room=nent)


def predict_capabilities(module: ModuleProfile, host: Host, policy: Policy, nent: int, *,
                         flags: int = 0, hw_error: int = 0,
                         caller: bytes | None = None) -> CapsPrediction:
    """KVM_TDX_CAPABILITIES with a caller buffer of room for `nent` entries.

    `caller` is the buffer before the call (default: zeroed, nent set); its
    nent word must equal `nent`.  A `caller` longer than the header plus N
    entries keeps its tail: KVM writes only what it fills.
    """
    buf = _default_caller(nent) if caller is None else caller
    if len(buf) < layout.SIZEOF_CAPS_HEADER:
        raise ValueError("caller buffer shorter than struct kvm_tdx_capabilities")
    before = layout.unpack_capabilities(buf[:layout.SIZEOF_CAPS_HEADER])
    if before.nent != nent:
        raise ValueError(f"caller buffer says nent {before.nent}, not {nent}")
    if hw_error:
        return CapsPrediction(errno.EINVAL, None, False, None)
    # From here Linux 6.16 always copies the (unchanged) cmd back.
    written_back = policy.caps_writes_cmd_back
    if flags:
        return CapsPrediction(errno.EINVAL, None, written_back, None)
    n = len(module.rows)
    if nent < n:
        return CapsPrediction(errno.E2BIG, buf, written_back, None)
    attrs, xfam = supported_attrs(module), supported_xfam(module, host)
    if not attrs or not xfam:
        return CapsPrediction(errno.EIO, buf, written_back, None)
    if len(buf) < layout.caps_size(n):
        raise ValueError("caller buffer shorter than its nent says")
    entries = reported_entries(module, host, policy)
    if policy.caps_echoes_caller:
        caps = replace(before, supported_attrs=attrs, supported_xfam=xfam,
                       user_tdvmcallinfo_1_r11=policy.user_tdvmcallinfo_1_r11,
                       nent=n, entries=entries)
    else:
        caps = Capabilities(supported_attrs=attrs, supported_xfam=xfam,
                            user_tdvmcallinfo_1_r11=policy.user_tdvmcallinfo_1_r11,
                            nent=n, entries=entries)
    written = layout.pack_capabilities(caps, nent_room=n)
    after = written + buf[len(written):]
    return CapsPrediction(0, after, written_back, caps)


# ---------------------------------------------------------------------------
# KVM_TDX_INIT_VM.


def find(entries: Sequence[CpuidEntry], function: int, index: int) -> CpuidEntry | None:
    """KVM's generic lookup: the first entry of that function that lacks the
    significant-index flag or has that index."""
    for e in entries:
        if e.function == function and (not e.flags & FLAG_SIGNIFICANT_INDEX or e.index == index):
            return e
    return None


def _kvm(err: int, check: str, **where: int | str | None) -> Outcome:
    return Outcome.classify(err, 0, check=check, decider=Decider.KVM, **where)


def _module(operand: int, check: str, **where: int | str | None) -> Outcome:
    return Outcome.classify(errno.EINVAL, _operand_invalid(operand), check=check,
                            decider=Decider.MODULE, **where)


def _request_entries(iv: InitVm) -> tuple[CpuidEntry, ...]:
    # KVM reads exactly nent entries.  A request that claims more than it
    # carries is modelled as followed by zeroed room (function 0 matches no
    # module row); callers that lie upward must send that zeroed room.
    nent = iv.effective_nent
    if nent <= len(iv.entries):
        return iv.entries[:nent]
    return iv.entries + (CpuidEntry(function=0),) * (nent - len(iv.entries))


def _rfc_bad_bits(module: ModuleProfile, policy: Policy, row: CpuidRow, listed: Regs,
                  e: CpuidEntry) -> tuple[str, int] | None:
    assert policy.allowlist is not None
    for r, listed_mask, value in zip(REGISTERS, listed, _regs_of(e), strict=True):
        bad = value & listed_mask & ~policy.allowlist.mask(row.leaf, row.kvm_index, r)
        if row.leaf == GPAW_LEAF and r == "eax":
            bad &= ~GPAW_FIELD
        if bad:
            return r, lowest_bit(bad)
    return None


def _td_values(module: ModuleProfile, host: Host, policy: Policy,
               entries: tuple[CpuidEntry, ...], nent: int) -> list[Regs] | Outcome:
    """Steps 8 and 9: the per-row values KVM hands TDH.MNG.INIT, or KVM's refusal."""
    listed = enumerated(module, host)
    values: list[Regs] = []
    count = 0
    for i, row in enumerate(module.rows):
        e = find(entries, row.leaf, row.kvm_index)
        if e is None:
            values.append((0, 0, 0, 0))
            continue
        deny = policy.denylist
        denied = deny.hits(e, row.kvm_index) if deny is not None else None
        if denied is not None:
            return _kvm(errno.EINVAL, "denylist", leaf=e.function, subleaf=e.index,
                        register=denied[0], bit=lowest_bit(denied[1]))
        if policy.allowlist is not None:
            bad = _rfc_bad_bits(module, policy, row, listed[i], e)
            if bad is not None:
                return _kvm(errno.EINVAL, "allowlist", leaf=row.leaf, subleaf=row.subleaf,
                            register=bad[0], bit=bad[1])
        count += 1
        a, b, c, d = _regs_of(e)
        if row.leaf == GPAW_LEAF:
            a &= ~GPAW_FIELD
        values.append((a, b, c, d))
    if count != nent:
        return _kvm(errno.EINVAL, "count_mismatch")
    return values


def module_init(module: ModuleProfile, host: Host, attributes: int, xfam: int,
                 values: list[Regs]) -> Outcome:
    """TDH.MNG.INIT's own checks (contract step 11, public TDX module sources)."""
    if (attributes | module.attributes_fixed1) & ~module.attributes_fixed0:
        bad = (attributes | module.attributes_fixed1) & ~module.attributes_fixed0
        return _module(Operand.ATTRIBUTES, "module_attributes", bit=lowest_bit(bad))
    td_xfam = xfam | module.xfam_fixed1
    bad = td_xfam & ~(module.xfam_fixed0 & host.xfam_supported)
    if bad:
        return _module(Operand.XFAM, "module_xfam", bit=lowest_bit(bad))
    for row, regs in zip(module.rows, values, strict=True):
        for r, v, ok in zip(REGISTERS, regs, row.module_allows(), strict=True):
            if v & ~ok:
                return _module(Operand.CPUID_CONFIG, "module_cpuid_config", leaf=row.leaf,
                               subleaf=row.subleaf, register=r, bit=lowest_bit(v & ~ok))

    def value(leaf: int, subleaf: int | None, register: str) -> int:
        i = module.row_index(leaf, subleaf)
        return 0 if i is None else values[i][REGISTERS.index(register)]

    fms = value(1, None, "eax")
    if fms and fms != host.native_fms():
        return _module(Operand.CPUID_CONFIG, "module_fms", leaf=1, register="eax")
    td_attributes = attributes | module.attributes_fixed1
    for c in MODULE_COUPLINGS:
        v = value(c.leaf, c.subleaf, c.register)
        if c.broken(v, td_attributes):
            return _module(Operand.CPUID_CONFIG, c.check, leaf=c.leaf, subleaf=c.subleaf,
                           register=c.register, bit=lowest_bit(v & c.mask or c.mask))
    for g in module.xfam_gates:
        gated = value(g.leaf, g.subleaf, g.register) & g.mask
        if td_xfam & g.xfam != g.xfam and gated:
            return _module(Operand.CPUID_CONFIG, "module_xfam_gate", leaf=g.leaf,
                           subleaf=g.subleaf, register=g.register, bit=lowest_bit(gated))
    for c in MODULE_COUPLINGS:
        v = value(c.leaf, c.subleaf, c.register) & c.mask
        if c.tsx_ctrl and v and not host.tsx_ctrl:
            # TDX_INCORRECT_MSR_VALUE is not an operand error: KVM says -EIO, hw_error 0.
            return Outcome.classify(errno.EIO, 0, check="module_tsx_ctrl",
                                    decider=Decider.MODULE, leaf=c.leaf,
                                    subleaf=c.subleaf, register=c.register, bit=lowest_bit(v))
    # Allow_direct bits the host lacks are dropped here without complaint.
    return Outcome.classify(0, 0, check="accepted")


def predict_init_vm(module: ModuleProfile, host: Host, policy: Policy,
                    request: Request | InitVm, *, td_initialized: bool = False) -> Outcome:
    """The Outcome of one KVM_TDX_INIT_VM, with the check that decided it.

    Assumes a free TDX key ID (see the module docstring).
    """
    req = request if isinstance(request, Request) else Request(init_vm=request)
    iv = req.init_vm
    if req.hw_error:
        return _kvm(errno.EINVAL, "cmd_hw_error")
    if td_initialized:
        return _kvm(errno.EINVAL, "td_initialized")
    if req.flags:
        return _kvm(errno.EINVAL, "cmd_flags")
    nent = iv.effective_nent
    if nent > KVM_MAX_CPUID_ENTRIES:
        return _kvm(errno.E2BIG, "nent_too_big")
    if any(iv.reserved):
        return _kvm(errno.EINVAL, "reserved_nonzero")
    if iv.cpuid_padding:
        return _kvm(errno.EINVAL, "cpuid_padding")
    bad = iv.attributes & ~supported_attrs(module)
    if bad:
        return _kvm(errno.EINVAL, "attributes_unsupported", bit=lowest_bit(bad))
    bad = iv.xfam & ~supported_xfam(module, host)
    if bad:
        return _kvm(errno.EINVAL, "xfam_unsupported", bit=lowest_bit(bad))
    entries = _request_entries(iv)
    gpaw_entry = find(entries, GPAW_LEAF, 0)
    if gpaw_entry is None:
        return _kvm(errno.EINVAL, "gpaw_missing", leaf=GPAW_LEAF)
    gpaw = (gpaw_entry.eax & GPAW_FIELD) >> GPAW_SHIFT
    if gpaw not in GPAW_VALUES:
        return _kvm(errno.EINVAL, "gpaw_value", leaf=GPAW_LEAF, register="eax", bit=GPAW_SHIFT)
    if gpaw == 52 and not host.ept_5level:
        return _kvm(errno.EINVAL, "gpaw_5level", leaf=GPAW_LEAF, register="eax", bit=GPAW_SHIFT)
    values = _td_values(module, host, policy, entries, nent)
    if isinstance(values, Outcome):
        return values
    return module_init(module, host, iv.attributes, iv.xfam, values)


# ---------------------------------------------------------------------------
# Helpers for the checks and the prober.


def silently_cleared(module: ModuleProfile, host: Host, row_index: int, register: str) -> int:
    """Bits of one row/register that TDH.MNG.INIT drops instead of refusing.

    These are allow_direct bits the host lacks natively (and that config_direct
    does not also cover).  No policy reports them, yet a request carrying them is
    ACCEPTED: the module's behaviour, so "a bit outside what was reported is never
    ACCEPTED" holds only outside this mask.
    """
    row = module.rows[row_index]
    r = REGISTERS.index(register)
    native = host.native_regs(row.leaf, row.subleaf)[r]
    return row.allow_direct[r] & ~row.config_direct[r] & ~native & 0xFFFFFFFF


def full_request(module: ModuleProfile, host: Host, policy: Policy) -> Request:
    """One valid request: every reported feature bit, value registers at valid values.

    Couplings are met: HLE and RTM together and only with TSX_CTRL, PKS as the
    attributes say (off), XFAM-gated bits only when XFAM has the state; leaf 1
    EAX 0 (native FMS), leaf 1 EBX and leaves 4, 0x18, 0x1F zero, GPAW 48.
    Rows with a sub-leaf carry the significant-index flag so find() is unambiguous.
    Meaningful only where KVM_TDX_CAPABILITIES succeeds (supported attrs and XFAM
    non-zero); otherwise the request is built from zeros and is refused.
    """
    return builders.full_request(
        reported_entries(module, host, policy), attributes=supported_attrs(module),
        xfam=supported_xfam(module, host), subleaves=[row.subleaf for row in module.rows],
        tsx_ctrl=host.tsx_ctrl, xfam_gates=module.xfam_gates, xfam_fixed1=module.xfam_fixed1)
