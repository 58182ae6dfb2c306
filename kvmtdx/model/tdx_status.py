"""TDH.MNG.INIT completion statuses and operand ids, with where the module source defines them.

The numbers and names have one home, kvmtdx.status; this module adds what
the model needs on top: report names, and what KVM 7.3 does with a status.

A status is 64 bits: the class in the upper 32, details in the lower 32.  The
module builds an operand error as ``class + operand id``
(include/tdx_api_defs.h, api_error_with_operand_id), so the low bits name the
TD_PARAMS field, register or MSR it objects to.  Values below are identical in
every module version kvmtdx bundles (1.5.01, 1.5.05, 2.0.08).
"""

from __future__ import annotations

from dataclasses import dataclass

from kvmtdx.status import STATUS_MASK, Operand, TdxStatus

STATUS_CLASS_MASK = STATUS_MASK

# The statuses TDH.MNG.INIT gives for TD_PARAMS content, by the names the model uses.
TDX_SUCCESS = TdxStatus.TDX_SUCCESS
TDX_OPERAND_INVALID = TdxStatus.TDX_OPERAND_INVALID
TDX_CPUID_LEAF_1F_FORMAT_UNRECOGNIZED = TdxStatus.TDX_CPUID_LEAF_1F_FORMAT_UNRECOGNIZED
TDX_INCORRECT_MSR_VALUE = TdxStatus.TDX_INCORRECT_MSR_VALUE

# Operand ids (OPERAND_ID_* in include/auto_gen*/tdx_error_codes_defs.h).
OPERAND_ID_RCX = int(Operand.RCX)
OPERAND_ID_RDX = int(Operand.RDX)
OPERAND_ID_ATTRIBUTES = int(Operand.ATTRIBUTES)
OPERAND_ID_XFAM = int(Operand.XFAM)
OPERAND_ID_EXEC_CONTROLS = int(Operand.EXEC_CONTROLS)
OPERAND_ID_EPTP_CONTROLS = int(Operand.EPTP_CONTROLS)
OPERAND_ID_MAX_VCPUS = int(Operand.MAX_VCPUS)
OPERAND_ID_CPUID_CONFIG = int(Operand.CPUID_CONFIG)
OPERAND_ID_TSC_FREQUENCY = int(Operand.TSC_FREQUENCY)
OPERAND_ID_NUM_L2_VMS = int(Operand.NUM_L2_VMS)
OPERAND_ID_IA32_ARCH_CAPABILITIES_CONFIG = int(Operand.IA32_ARCH_CAPABILITIES_CONFIG)

# Report names: the enum's, but for the two whose TD_PARAMS field goes by another name.
_FIELD_NAMES = {Operand.RDX: "RDX (TD_PARAMS reserved bytes)",
                Operand.EXEC_CONTROLS: "CONFIG_FLAGS"}
OPERAND_NAMES: dict[int, str] = {int(o): _FIELD_NAMES.get(o, o.name) for o in Operand}

# The MSR TDX_INCORRECT_MSR_VALUE names when virtual TSX lacks TSX_CTRL
# (src/common/x86_defs/msr_defs.h).
IA32_ARCH_CAPABILITIES_MSR_ADDR = 0x10A


def with_operand(code: TdxStatus, operand: int) -> int:
    """api_error_with_operand_id: the class plus the operand id."""
    return code.value + operand


def status_name(status: int) -> str:
    """'TDX_OPERAND_INVALID(CPUID_CONFIG)' style text for a 64-bit status."""
    cls, detail = status & STATUS_CLASS_MASK, status & ~STATUS_CLASS_MASK
    try:
        name = TdxStatus(cls).name
    except ValueError:
        return f"0x{status:016x}"
    if not detail:
        return name
    if cls == TDX_OPERAND_INVALID:
        return f"{name}({OPERAND_NAMES.get(detail, hex(detail))})"
    return f"{name}(0x{detail:x})"


@dataclass(frozen=True, slots=True)
class KvmOutcome:
    """What KVM 7.3's __tdx_td_init does with a TDH.MNG.INIT status."""

    errno: int  # negative errno returned by KVM_TDX_INIT_VM, 0 on success
    hw_error: int  # what lands in kvm_tdx_cmd.hw_error (0 when KVM does not write it)
    warns: bool  # TDX_BUG_ON_1: WARN_ON_ONCE, VM marked bugged, "SEAMCALL TDH_MNG_INIT failed"


EINVAL = 22
EIO = 5


def kvm73_outcome(status: int) -> KvmOutcome:
    """arch/x86/kvm/vmx/tdx.c (7.3): OPERAND_INVALID -> -EINVAL with hw_error; else -EIO + WARN."""
    if status == TDX_SUCCESS.value:
        return KvmOutcome(0, 0, False)
    if status & STATUS_CLASS_MASK == TDX_OPERAND_INVALID.value:
        return KvmOutcome(-EINVAL, status, False)
    return KvmOutcome(-EIO, 0, True)
