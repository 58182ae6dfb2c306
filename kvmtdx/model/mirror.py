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

The KVM half, step by step in the kernel's order, is kvmtdx.model.mirror_kvm; the
module half (TD_PARAMS, TDH.MNG.INIT by the module model, KVM's reading of its
status) is kvmtdx.model.mirror_module.  `init_vm_prediction` runs them in turn and
adds the module's status, the kernel WARN and bugged VM that follow a non-operand
status, and (asked for detail) an accepted TD's effective CPUID with its changes.
`predict_init_vm` gives the Outcome alone, the same Outcome, from the model
compiled once per (module, host, policy) (kvmtdx.model.compiled): it is what
verify, probe and a fuzzer call thousands of times.

The invariant edge (spec section 4, "silently cleared"): an allow_direct bit the
host lacks natively is not reported by any policy, yet a request carrying it is
ACCEPTED, because TDH.MNG.INIT drops it instead of refusing.  That is the
module's documented behaviour, not a kernel bug; `silently_cleared` gives the
mask so a conformance check can leave those bits out of "never ACCEPTED".
"""

from __future__ import annotations

import errno
from dataclasses import dataclass, replace

from kvmtdx import layout
from kvmtdx.model import builders
from kvmtdx.model.compiled import compiled
from kvmtdx.model.mirror_kvm import (
    find,
    kvm_checks,
    supported_attrs,
    supported_xfam,
    td_values,
)
from kvmtdx.model.mirror_module import (
    InitVmPrediction,
    module_prediction,
    silently_cleared,
    td_params,
)
from kvmtdx.model.policy import Policy
from kvmtdx.model.profiles import Host, ModuleProfile
from kvmtdx.model.requests import Request
from kvmtdx.outcome import Outcome
from kvmtdx.structs import Capabilities, CpuidEntry, InitVm

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


# ---------------------------------------------------------------------------
# What KVM reports (kvmtdx.model.mirror_kvm), remembered in the compiled model.


def reported_entries(module: ModuleProfile, host: Host, policy: Policy) -> tuple[CpuidEntry, ...]:
    """The N entries KVM_TDX_CAPABILITIES lists on success, one per module row, in row order.

    Entry flags and padding are 0 (under upstream-6.16 they are undefined; this
    gives 0).  A policy diff compares these per policy.
    """
    return compiled(module, host, policy).reported


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


def init_vm_prediction(module: ModuleProfile, host: Host, policy: Policy,
                       request: Request | InitVm, *, td_initialized: bool = False,
                       detail: bool = True, explain: bool = True) -> InitVmPrediction:
    """One KVM_TDX_INIT_VM: the Outcome with the check that decided it, and behind it the
    module's status, whether KVM WARNs and bugs the VM, and (`detail`, accepted) the TD's
    effective CPUID with (`explain`) the requested bits it does not get as asked.

    Assumes a free TDX key ID (see the module docstring).
    """
    req = request if isinstance(request, Request) else Request(init_vm=request)
    checked = kvm_checks(module, host, req, td_initialized)
    if isinstance(checked, Outcome):
        return InitVmPrediction(checked)
    entries, gpaw = checked
    values = td_values(module, host, policy, entries, req.init_vm.effective_nent)
    if isinstance(values, Outcome):
        return InitVmPrediction(values)
    params = td_params(module, host, req.init_vm.attributes, req.init_vm.xfam, values, gpaw)
    return module_prediction(module, host, policy, params, detail=detail, explain=explain)


def predict_init_vm(module: ModuleProfile, host: Host, policy: Policy,
                    request: Request | InitVm, *, td_initialized: bool = False) -> Outcome:
    """The Outcome of one KVM_TDX_INIT_VM, with the check that decided it: the same Outcome
    init_vm_prediction gives, from the model compiled once per (module, host, policy).

    Assumes a free TDX key ID (see the module docstring).
    """
    model = compiled(module, host, policy)
    if not model.exact:
        return init_vm_prediction(module, host, policy, request, td_initialized=td_initialized,
                                  detail=False).outcome
    return model.outcome(request, td_initialized)


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
