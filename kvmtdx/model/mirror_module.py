"""The TDX module's half of the mirror: TD_PARAMS as KVM builds them, TDH.MNG.INIT by the
module model (kvmtdx.model.tdx_module, rule by rule as the public module source does it),
and what KVM makes of the status it returns.

KVM (arch/x86/kvm/vmx/tdx.c, setup_tdparams and __tdx_td_init) hands the module
TD_PARAMS: attributes and XFAM ORed with the fixed-1 bits, one CPUID value per
CPUID_CONFIG row, EPTP and CONFIG_FLAGS from the GPAW, the TSC frequency and the
vCPU limit.  The module's status comes back as -EINVAL with the status in
hw_error when it names an invalid operand (TDX_OPERAND_INVALID), else as -EIO
with hw_error 0, a WARN_ON_ONCE splat and (Linux 7.3) the VM marked bugged.

What does not depend on the request is worked out once per module and host
(kvmtdx.model.memo), and TDH.MNG.INIT answers are remembered per TD_PARAMS, so
verify's thousand TDs and probe's thousands of predictions stay cheap.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from kvmtdx.model import tdx_status as st
from kvmtdx.model.memo import per_pair
from kvmtdx.model.policy import Policy
from kvmtdx.model.profiles import Host, ModuleProfile
from kvmtdx.model.rules import lowest_bit
from kvmtdx.model.tdx_host import row_natives
from kvmtdx.model.tdx_module import (
    Change,
    MngInitResult,
    TdParams,
    kvm73_td_params,
    mng_init,
    xfam_culprit,
)
from kvmtdx.model.tdx_module_tables import ModuleTables, Regs
from kvmtdx.outcome import Decider, Outcome

# KVM_MAX_VCPUS on x86-64 (arch/x86/include/asm/kvm_host.h, CONFIG_MAXSMP off).
KVM_MAX_VCPUS = 1024
ACCEPTED = "accepted"

# The module rule that refused, by the name an Outcome's `check` carries.  Names of
# rules the old module model had keep their check names.
RULE_CHECKS: dict[str, str] = {
    "verify_td_attributes": "module_attributes",
    "check_xfam": "module_xfam",
    "max_vcpus": "module_max_vcpus",
    "num_l2_vms": "module_num_l2_vms",
    "td_params_reserved_0": "module_td_params_reserved",
    "td_params_reserved_1": "module_td_params_reserved",
    "td_params_reserved_2": "module_td_params_reserved",
    "td_params_reserved_3": "module_td_params_reserved",
    "verify_td_config_flags": "module_config_flags",
    "verify_and_set_td_eptp_controls": "module_eptp_controls",
    "tsc_frequency": "module_tsc_frequency",
    "cpuid_config_mask": "module_cpuid_config",
    "fms_native": "module_fms",
    "check_fms_config": "module_fms_config",
    "tsx_hle_rtm": "module_hle_rtm",
    "tsx_ctrl": "module_tsx_ctrl",
    "check_cpuid_1f": "module_topology",
    "check_cpuid_1f_and_compute_cpuid_0b": "module_topology",
    "td_immutable_state_cross_check": "module_immutable_state",
}
MODULE_CHECKS: frozenset[str] = frozenset(RULE_CHECKS.values())
VALUE_CHECKS = frozenset({"module_fms", "module_fms_config", "module_topology"})


@dataclass(frozen=True, slots=True)
class InitVmPrediction:
    """One KVM_TDX_INIT_VM as the mirror sees it: the outcome, and what lies behind it.

    `status` and the rest of the module's side are None/empty when KVM refused the
    request before calling TDH.MNG.INIT.  `effective` is what TDH.MNG.RD of the TDCS
    CPUID_VALUES gives for every leaf the module virtualises (an accepted TD only);
    `changes` names the requested bits the TD does not see as asked.
    """

    outcome: Outcome
    status: int | None = None
    rule: str | None = None
    source: str | None = None  # module source file and function of the deciding rule
    rcx: int = 0
    warns: bool = False  # KVM hit WARN_ON_ONCE (a kernel splat, the kernel tainted)
    vm_bugged: bool = False  # KVM marked the VM bugged: every later ioctl on it fails
    effective: Mapping[tuple[int, int | None], Regs] | None = None
    faulting: frozenset[tuple[int, int | None]] = frozenset()
    changes: tuple[Change, ...] = ()
    td_params: TdParams | None = None


# ---------------------------------------------------------------------------
# What does not depend on the request.


@per_pair
def td_limits(tables: ModuleTables, host: Host) -> tuple[int, int]:
    """(TSC frequency in kHz, max vCPUs) KVM puts in every TD's TD_PARAMS on this host."""
    return host.tsc_khz, min(KVM_MAX_VCPUS, host.present_cpus)


def silently_cleared(module: ModuleProfile, host: Host, row_index: int, register: str) -> int:
    """Bits of one row/register that TDH.MNG.INIT drops instead of refusing, whatever the
    TD's attributes and XFAM: allow_direct bits the host lacks natively (and config_direct
    does not also cover).  No policy reports them, yet a request carrying them is ACCEPTED."""
    row = module.rows[row_index]
    r = ("eax", "ebx", "ecx", "edx").index(register)
    native = row_natives(module.tables, host)[row_index][r]
    return row.allow_direct[r] & ~row.config_direct[r] & ~native & 0xFFFFFFFF


# ---------------------------------------------------------------------------
# TDH.MNG.INIT, remembered per TD_PARAMS.

_MEMO_SIZE = 4096


@per_pair
def _answers(tables: ModuleTables, host: Host) -> OrderedDict[TdParams, MngInitResult]:
    return OrderedDict()


def decide(tables: ModuleTables, host: Host, params: TdParams) -> MngInitResult:
    """TDH.MNG.INIT's status and deciding rule (no effective CPUID), remembered."""
    memo = _answers(tables, host)
    hit = memo.get(params)
    if hit is not None:
        return hit
    result = mng_init(tables, host, params, detail=False)
    memo[params] = result
    if len(memo) > _MEMO_SIZE:
        memo.popitem(last=False)
    return result


# ---------------------------------------------------------------------------
# KVM's side: TD_PARAMS in, status out.


def td_params(module: ModuleProfile, host: Host, attributes: int, xfam: int,
              rows: Sequence[Regs | None], gpaw: int) -> TdParams:
    """TD_PARAMS as KVM 7.3 fills them (setup_tdparams); rows without an entry are zero."""
    tsc_khz, max_vcpus = td_limits(module.tables, host)
    return kvm73_td_params(module.tables, attributes=attributes, xfam=xfam, rows=rows,
                           guest_pa_bits=gpaw, tsc_khz=tsc_khz, max_vcpus=max_vcpus)


def _bit_of(result: MngInitResult, module: ModuleProfile, host: Host,
            params: TdParams) -> int | None:
    if result.rule == "check_xfam":
        return xfam_culprit(module.tables, host, params.xfam)
    # A value (F/M/S, the 0x1F topology) is refused as a whole: no bit to name.
    named = result.mask and RULE_CHECKS.get(result.rule) not in VALUE_CHECKS
    return lowest_bit(result.mask) if named else None


def outcome_of(result: MngInitResult, module: ModuleProfile, host: Host, policy: Policy,
               params: TdParams) -> tuple[Outcome, bool, bool]:
    """(the Outcome, KVM WARNs, the VM is bugged) for a TDH.MNG.INIT result."""
    kvm = st.kvm73_outcome(result.status)
    if result.accepted:
        return Outcome.classify(0, 0, check=ACCEPTED), False, False
    where = dict(leaf=result.leaf, subleaf=result.subleaf, register=result.register,
                 bit=_bit_of(result, module, host, params))
    check = RULE_CHECKS.get(result.rule, f"module_{result.rule}")
    out = Outcome.classify(-kvm.errno, kvm.hw_error, check=check, decider=Decider.MODULE,
                           **where)
    return out, kvm.warns, kvm.warns and policy.module_error_kills_vm


def module_prediction(module: ModuleProfile, host: Host, policy: Policy, params: TdParams,
                      *, detail: bool, explain: bool = True) -> InitVmPrediction:
    """What KVM answers once TDH.MNG.INIT has decided on `params` (tdx_module.mng_init's
    `detail` and `explain`)."""
    if detail:
        result = mng_init(module.tables, host, params, explain=explain)
    else:
        result = decide(module.tables, host, params)
    outcome, warns, bugged = outcome_of(result, module, host, policy, params)
    return InitVmPrediction(outcome, result.status, result.rule, result.source, result.rcx,
                            warns, bugged, result.cpuid, result.faulting, result.changes,
                            params)

