"""One TD across several KVM_TDX_INIT_VM calls: what a kernel keeps of a TD between them.

Pure code.  Linux 7.3 (arch/x86/kvm/vmx/tdx.c) keeps `kvm_tdx->state`:

- `tdx_td_init` refuses anything but TD_STATE_UNINITIALIZED (-EINVAL) and sets
  TD_STATE_INITIALIZED only once `__tdx_td_init` returned 0.  Every refusal before
  that (KVM's own checks in `tdx_td_init` and `setup_tdparams*`, which come before a
  key ID is taken) leaves the TD exactly as it was.
- A TDH.MNG.INIT refusal takes the `teardown` path of `__tdx_td_init`:
  `tdx_mmu_release_hkid` (TDH.MNG.KEY.FREEID, then `tdx_hkid_free`: the key ID goes
  back to the pool at once) and `tdx_reclaim_td_control_pages` (TDR and TDCS pages
  freed).  The state is untouched, so the same TD may take a corrected INIT_VM.
  The same holds for a key-ID shortage (`tdx_guest_keyid_alloc` -ENOSPC, nothing taken).
- A TDH.MNG.INIT status that is not an invalid operand goes through `TDX_BUG_ON_1`
  (Linux 6.19 on): `kvm_vm_bugged` marks the VM dead, and `kvm_vm_ioctl`
  (virt/kvm/kvm_main.c) answers every later VM ioctl -EIO before looking at it.
  Linux 6.16 only warned there (`Policy.module_error_kills_vm`).
- KVM_TDX_CAPABILITIES does not look at the state: `tdx_vm_ioctl` answers it before
  taking the VM state locks, on a fresh, a refused or an initialised TD alike (but
  not on a dead VM).
"""

from __future__ import annotations

import errno
from collections.abc import Sequence
from dataclasses import dataclass
from enum import Enum

from kvmtdx.model.mirror import InitVmPrediction, init_vm_prediction, predict_init_vm
from kvmtdx.model.policy import Policy
from kvmtdx.model.profiles import Host, ModuleProfile
from kvmtdx.model.requests import Request
from kvmtdx.outcome import Decider, Outcome


class TdState(str, Enum):
    """What the kernel keeps of a TD between ioctls."""

    UNINITIALIZED = "uninitialized"  # TD_STATE_UNINITIALIZED: no key ID held
    INITIALIZED = "initialized"  # TD_STATE_INITIALIZED: INIT_VM succeeded
    DEAD = "dead"  # kvm_vm_bugged: every VM ioctl is -EIO


def after(policy: Policy, state: TdState, outcome: Outcome) -> TdState:
    """The TD's state after one INIT_VM answered `outcome`."""
    if state is not TdState.UNINITIALIZED:
        return state
    if outcome.errno == 0:
        return TdState.INITIALIZED
    module_error = outcome.decider is Decider.MODULE and outcome.errno == errno.EIO
    if module_error and policy.module_error_kills_vm:
        return TdState.DEAD
    return state


def dead_vm() -> Outcome:
    """Any VM ioctl on a bugged VM: -EIO before KVM reads the command."""
    return Outcome.classify(errno.EIO, 0, check="vm_dead", decider=Decider.KVM)


def predict_in(module: ModuleProfile, host: Host, policy: Policy, state: TdState,
               request: Request) -> Outcome:
    """One INIT_VM on a TD in `state`."""
    if state is TdState.DEAD:
        return dead_vm()
    return predict_init_vm(module, host, policy, request,
                           td_initialized=state is TdState.INITIALIZED)


def prediction_in(module: ModuleProfile, host: Host, policy: Policy, state: TdState,
                  request: Request, *, detail: bool = True,
                  explain: bool = True) -> InitVmPrediction:
    """One INIT_VM on a TD in `state`, with what lies behind the answer (the module's
    status, a kernel WARN, with `detail` an accepted TD's CPUID and with `explain` what
    changed in it: mirror.init_vm_prediction)."""
    if state is TdState.DEAD:
        return InitVmPrediction(dead_vm())
    return init_vm_prediction(module, host, policy, request,
                              td_initialized=state is TdState.INITIALIZED, detail=detail,
                              explain=explain)


def caps_errno_in(state: TdState) -> int:
    """KVM_TDX_CAPABILITIES' errno on a TD in `state`, beyond what a fresh TD answers:
    only a dead VM differs."""
    return errno.EIO if state is TdState.DEAD else 0


@dataclass(frozen=True, slots=True)
class SequencePrediction:
    """The answers of INIT_VM calls sent one after another to one TD, and the TD's state
    after each."""

    outcomes: tuple[Outcome, ...]
    states: tuple[TdState, ...]

    @property
    def final(self) -> TdState:
        return self.states[-1] if self.states else TdState.UNINITIALIZED


def predict_sequence(module: ModuleProfile, host: Host, policy: Policy,
                     requests: Sequence[Request]) -> SequencePrediction:
    """INIT_VM calls on one fresh TD, in order (a free key ID assumed for each)."""
    state = TdState.UNINITIALIZED
    outcomes: list[Outcome] = []
    states: list[TdState] = []
    for req in requests:
        o = predict_in(module, host, policy, state, req)
        state = after(policy, state, o)
        outcomes.append(o)
        states.append(state)
    return SequencePrediction(tuple(outcomes), tuple(states))


def replay_prediction(module: ModuleProfile, host: Host, policy: Policy,
                      request: Request) -> InitVmPrediction:
    """A replay of a TD's history (`request.before`, then the request): the last call's
    answer, on the TD the earlier ones left."""
    state = predict_sequence(module, host, policy, request.before).final
    return prediction_in(module, host, policy, state, request)
