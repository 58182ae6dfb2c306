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

The KVM half is here, step by step in the kernel's order; the module half
(TD_PARAMS, TDH.MNG.INIT by the module model, KVM's reading of its status) is
kvmtdx.model.mirror_module.  `predict_init_vm` gives the Outcome alone, fast;
`init_vm_prediction` adds the module's status, the kernel WARN and bugged VM
that follow a non-operand status, and an accepted TD's effective CPUID.

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
from kvmtdx.model.memo import per_pair
from kvmtdx.model.mirror_module import (
    InitVmPrediction,
    module_prediction,
    silently_cleared,
    td_params,
)
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
    Capabilities,
    CpuidEntry,
    InitVm,
)

__all__ = ["CapsPrediction", "InitVmPrediction", "find", "full_request", "init_vm_prediction",
           "predict_capabilities", "predict_init_vm", "reported_entries", "silently_cleared",
           "supported_attrs", "supported_xfam"]


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


@per_pair
def _reported_by_policy(module: ModuleProfile, host: Host
                        ) -> dict[int, tuple[Policy, tuple[CpuidEntry, ...]]]:
    return {}


def reported_entries(module: ModuleProfile, host: Host, policy: Policy) -> tuple[CpuidEntry, ...]:
    """The N entries KVM_TDX_CAPABILITIES lists on success, one per module row, in row order.

    Entry flags and padding are 0 (under upstream-6.16 they are undefined; this
    gives 0).  A policy diff compares these per policy.
    """
    memo = _reported_by_policy(module, host)
    hit = memo.get(id(policy))
    if hit is not None and hit[0] is policy:
        return hit[1]
    entries = tuple(
        _entry(row.leaf, row.kvm_index, _reported_regs(row, mask, policy))
        for row, mask in zip(module.rows, enumerated(module, host), strict=True)
    )
    if len(memo) > 16:  # policies are values: a long run may make many
        memo.clear()
    memo[id(policy)] = (policy, entries)
    return entries


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


def _kvm_checks(module: ModuleProfile, host: Host, req: Request,
                td_initialized: bool) -> tuple[tuple[CpuidEntry, ...], int] | Outcome:
    """Steps 1 to 7 in the kernel's order: the request's entries and its GPAW, or KVM's
    refusal."""
    iv = req.init_vm
    if req.hw_error:
        return _kvm(errno.EINVAL, "cmd_hw_error")
    if td_initialized:
        return _kvm(errno.EINVAL, "td_initialized")
    if req.flags:
        return _kvm(errno.EINVAL, "cmd_flags")
    if iv.effective_nent > KVM_MAX_CPUID_ENTRIES:
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
    return entries, gpaw


def init_vm_prediction(module: ModuleProfile, host: Host, policy: Policy,
                       request: Request | InitVm, *, td_initialized: bool = False,
                       detail: bool = True, explain: bool = True) -> InitVmPrediction:
    """One KVM_TDX_INIT_VM: the Outcome with the check that decided it, and behind it the
    module's status, whether KVM WARNs and bugs the VM, and (`detail`, accepted) the TD's
    effective CPUID with (`explain`) the requested bits it does not get as asked.

    Assumes a free TDX key ID (see the module docstring).
    """
    req = request if isinstance(request, Request) else Request(init_vm=request)
    checked = _kvm_checks(module, host, req, td_initialized)
    if isinstance(checked, Outcome):
        return InitVmPrediction(checked)
    entries, gpaw = checked
    values = _td_values(module, host, policy, entries, req.init_vm.effective_nent)
    if isinstance(values, Outcome):
        return InitVmPrediction(values)
    params = td_params(module, host, req.init_vm.attributes, req.init_vm.xfam, values, gpaw)
    return module_prediction(module, host, policy, params, detail=detail, explain=explain)


def predict_init_vm(module: ModuleProfile, host: Host, policy: Policy,
                    request: Request | InitVm, *, td_initialized: bool = False) -> Outcome:
    """The Outcome of one KVM_TDX_INIT_VM, with the check that decided it.

    Assumes a free TDX key ID (see the module docstring).
    """
    return init_vm_prediction(module, host, policy, request, td_initialized=td_initialized,
                              detail=False).outcome


# ---------------------------------------------------------------------------
# Helpers for the checks and the prober.


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
        tsx_ctrl=host.tsx_ctrl)
