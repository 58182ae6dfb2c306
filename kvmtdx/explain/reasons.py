"""Why a check refuses, for people: one table from the mirror's check names to reasons.

`diagnose` keys on an Outcome's `check`, `decider` and `hw_error` only, so a
check the model gains later needs one row here and nothing else; a check with
no row is still explained, from who decided it and the status it carries.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

from kvmtdx.outcome import Decider, Outcome
from kvmtdx.status import HwError, Operand, TdxStatus


class Category(str, Enum):
    """What kind of rule refused: the user-facing classification of a fault."""

    HIDDEN_BY_POLICY = "hidden_by_policy"  # KVM hides the bit and refuses it
    NOT_CONFIGURABLE = "not_configurable"  # outside the module row's configurable bits
    COUPLING = "coupling"  # bits tied to each other, to an attribute or to an MSR
    XFAM_RULE = "xfam_rule"
    ATTRIBUTES = "attributes"
    TOPOLOGY_RULE = "topology_rule"  # leaf 0x1F
    VALUE_RULE = "value_rule"  # a value register the module checks (family/model/stepping)
    GPAW = "gpaw"
    UNLISTED_LEAF = "unlisted_leaf"  # an entry the module lists no row for
    STRUCTURE = "structure"  # the ioctl's own words: flags, reserved, nent...
    UNKNOWN = "unknown"


@dataclass(frozen=True, slots=True)
class Reason:
    category: Category
    why: str  # what the rule is
    fix: str  # what to change, in words


R = Reason
C = Category

CHECK_REASONS: dict[str, Reason] = {
    "cmd_hw_error": R(C.STRUCTURE, "kvm_tdx_cmd.hw_error must be 0 when calling",
                      "send hw_error 0"),
    "td_initialized": R(C.STRUCTURE, "KVM_TDX_INIT_VM runs once per TD",
                        "create a new VM for each launch"),
    "cmd_flags": R(C.STRUCTURE, "kvm_tdx_cmd.flags must be 0", "send flags 0"),
    "nent_too_big": R(C.STRUCTURE, "at most 256 CPUID entries", "send at most 256 entries"),
    "reserved_nonzero": R(C.STRUCTURE, "kvm_tdx_init_vm.reserved[] must be zero",
                          "zero the reserved words"),
    "cpuid_padding": R(C.STRUCTURE, "kvm_cpuid2.padding must be zero", "zero the padding"),
    "attributes_unsupported": R(C.ATTRIBUTES, "KVM supports only the TD attributes "
                                "KVM_TDX_CAPABILITIES reports (SEPT_VE_DISABLE)",
                                "drop the attribute"),
    "xfam_unsupported": R(C.XFAM_RULE, "KVM supports only the XFAM bits KVM_TDX_CAPABILITIES "
                          "reports", "drop the XFAM bit (and the features that need it)"),
    "gpaw_missing": R(C.GPAW, "KVM takes the guest physical address width from CPUID "
                      "0x80000008 EAX[23:16], and there is no such entry",
                      "send leaf 0x80000008 with EAX[23:16] = 48 (or 52)"),
    "gpaw_value": R(C.GPAW, "the GPAW in CPUID 0x80000008 EAX[23:16] must be 48 or 52",
                    "set EAX[23:16] to 48 (or 52 with 5-level EPT)"),
    "gpaw_5level": R(C.GPAW, "a GPAW of 52 needs 5-level EPT, which this host lacks",
                     "use a GPAW of 48"),
    "denylist": R(C.HIDDEN_BY_POLICY, "the kernel hides this bit (its HLE/RTM/WAITPKG "
                  "denylist) and refuses it in KVM_TDX_INIT_VM", "drop the feature"),
    "allowlist": R(C.HIDDEN_BY_POLICY, "the kernel's allowlist does not allow this bit, so "
                   "KVM hides it and refuses it", "drop the feature"),
    "count_mismatch": R(C.UNLISTED_LEAF, "every CPUID entry must land on a row the module "
                        "lists as configurable (and each only once)",
                        "drop the entry (the TD gets this leaf from the module)"),
    "module_attributes": R(C.ATTRIBUTES, "the module's ATTRIBUTES rules (fixed bits, "
                           "MIGRATABLE without DEBUG or PERFMON; 2.0: PERFMON without ICSSD)",
                           "drop the attribute"),
    "module_xfam": R(C.XFAM_RULE, "the module's XFAM rules (fixed bits, host XCR0 | XSS, "
                     "AVX-512 needs AVX, bits 5-7 equal, CET 11/12 equal, AMX 17/18 equal)",
                     "fix XFAM"),
    "module_max_vcpus": R(C.STRUCTURE, "TD_PARAMS.MAX_VCPUS is 0 or above the module's "
                          "limit per TD (KVM sets it from the host's CPUs)",
                          "a kernel bug or a host with more CPUs than the module allows"),
    "module_num_l2_vms": R(C.STRUCTURE, "TD_PARAMS.NUM_L2_VMS above 3 (KVM sends 0)",
                           "a kernel bug: KVM fills TD_PARAMS"),
    "module_td_params_reserved": R(C.STRUCTURE, "a reserved TD_PARAMS byte is not zero "
                                   "(KVM zeroes them)", "a kernel bug: KVM fills TD_PARAMS"),
    "module_config_flags": R(C.STRUCTURE, "TD_PARAMS.CONFIG_FLAGS outside what the module "
                             "allows (KVM sets them from the GPAW)",
                             "a kernel bug: KVM fills TD_PARAMS"),
    "module_eptp_controls": R(C.GPAW, "TD_PARAMS.EPTP_CONTROLS: the page-walk length KVM "
                              "chose from the GPAW is not one the module takes on this host",
                              "use a GPAW of 48"),
    "module_tsc_frequency": R(C.STRUCTURE, "TD_PARAMS.TSC_FREQUENCY outside 100 MHz to "
                              "10 GHz (KVM sends the host's)", "a host TSC the module refuses"),
    "module_fms_config": R(C.VALUE_RULE, "a MIGRATABLE TD's CPUID(1).EAX must be a "
                           "family/model/stepping the module lists as older than or equal "
                           "to the host's (check_fms_config)",
                           "send 0 in leaf 1 EAX (the host's family/model/stepping)"),
    "module_topology": R(C.TOPOLOGY_RULE, "the module's leaf 0x1F rules: sub-leaf 0 all zero "
                         "means the host's topology, else level types must rise from sub-leaf "
                         "0 with a core level (2.0: ECX[7:0] = sub-leaf); the module fails "
                         "TDH.MNG.INIT with TDX_CPUID_LEAF_1F_FORMAT_UNRECOGNIZED and KVM "
                         "answers -EIO with a kernel WARN",
                         "send leaf 0x1F all zero (the host's topology) or a valid one"),
    "module_immutable_state": R(C.ATTRIBUTES, "1.5: a MIGRATABLE TD cannot have L2 VMs",
                                "drop MIGRATABLE"),
    "module_cpuid_config": R(C.NOT_CONFIGURABLE, "the module does not let a VMM configure "
                             "this bit (outside config_direct | allow_direct of its row)",
                             "drop the feature"),
    "module_fms": R(C.VALUE_RULE, "CPUID(1).EAX must be 0 (the host's family/model/stepping) "
                    "or exactly the host's value for a non-migratable TD",
                    "send 0 in leaf 1 EAX (QEMU: drop family/model/stepping overrides)"),
    "module_hle_rtm": R(C.COUPLING, "HLE and RTM must be both set or both clear in what the "
                        "TD gets (after the host's native bits: a bit the host lacks is 0)",
                        "set both or neither"),
    "module_tsx_ctrl": R(C.COUPLING, "virtual TSX (HLE and RTM) needs IA32_TSX_CTRL on the "
                         "host (IA32_ARCH_CAPABILITIES.TSX_CTRL), which this host lacks; the "
                         "module fails TDH.MNG.INIT with TDX_INCORRECT_MSR_VALUE and KVM "
                         "answers -EIO with a kernel WARN", "drop HLE and RTM"),
}

TOPOLOGY_LEAF = 0x1F

# A refusal without a row is read from the status it carries (or the leaf it names).
_OPERAND_CATEGORY: dict[int, Category] = {
    Operand.ATTRIBUTES: C.ATTRIBUTES, Operand.XFAM: C.XFAM_RULE,
}
_STATUS_CATEGORY: dict[int, Category] = {
    TdxStatus.TDX_CPUID_LEAF_1F_FORMAT_UNRECOGNIZED: C.TOPOLOGY_RULE,
}


def reason_of(outcome: Outcome) -> Reason:
    """The reason for a refused Outcome: its check's row, else what its status says."""
    row = CHECK_REASONS.get(outcome.check or "")
    if row is not None:
        return row
    hw = HwError.decode(outcome.hw_error)
    category = _STATUS_CATEGORY.get(hw.status)
    if category is None and outcome.leaf == TOPOLOGY_LEAF:
        category = C.TOPOLOGY_RULE
    if category is None and hw.status == TdxStatus.TDX_OPERAND_INVALID:
        category = _OPERAND_CATEGORY.get(hw.operand, C.NOT_CONFIGURABLE)
    who = "the TDX module" if outcome.decider == Decider.MODULE else "KVM"
    name = outcome.check or "an unnamed check"
    return Reason(category or C.UNKNOWN, f"{who} refused it ({name})", "see the check")
