"""TDH.MNG.INIT completion statuses and operand ids, with where the module source defines them.

The numbers have one home, kvmtdx.status; this module adds what the model
needs on top: the source file of each, names for reports, and what KVM 7.3
does with a status.

A status is 64 bits: the class in the upper 32, details in the lower 32.  The
module builds an operand error as ``class + operand id``
(include/tdx_api_defs.h, api_error_with_operand_id), so the low bits name the
TD_PARAMS field, register or MSR it objects to.  Values below are identical in
every module version kvmtdx bundles (1.5.01, 1.5.05, 2.0.08).
"""

from __future__ import annotations

from dataclasses import dataclass

from kvmtdx.status import STATUS_MASK, Operand, TdxStatus

ERROR_CODES_FILE = "include/auto_gen*/tdx_error_codes_defs.h"
STATUS_CLASS_MASK = STATUS_MASK


@dataclass(frozen=True, slots=True)
class StatusCode:
    name: str
    value: int
    defined_in: str


def _code(name: str) -> StatusCode:
    return StatusCode(name, int(TdxStatus[name]), ERROR_CODES_FILE)


TDX_SUCCESS = _code("TDX_SUCCESS")
TDX_OPERAND_INVALID = _code("TDX_OPERAND_INVALID")
TDX_CPUID_LEAF_1F_FORMAT_UNRECOGNIZED = _code("TDX_CPUID_LEAF_1F_FORMAT_UNRECOGNIZED")
TDX_INCORRECT_MSR_VALUE = _code("TDX_INCORRECT_MSR_VALUE")
# Statuses TDH.MNG.INIT can return for reasons outside TD_PARAMS' CPUID content
# (host MSR state, TDCS pages); named so a caller can decode them.
TDX_INCONSISTENT_MSR = _code("TDX_INCONSISTENT_MSR")
TDX_TDCS_NOT_ALLOCATED = _code("TDX_TDCS_NOT_ALLOCATED")
TDX_LIMIT_CPUID_MAXVAL_SET = _code("TDX_LIMIT_CPUID_MAXVAL_SET")
TDX_RND_NO_ENTROPY = _code("TDX_RND_NO_ENTROPY")

STATUS_CODES: tuple[StatusCode, ...] = (
    TDX_SUCCESS, TDX_OPERAND_INVALID, TDX_CPUID_LEAF_1F_FORMAT_UNRECOGNIZED,
    TDX_INCORRECT_MSR_VALUE, TDX_INCONSISTENT_MSR, TDX_TDCS_NOT_ALLOCATED,
    TDX_LIMIT_CPUID_MAXVAL_SET, TDX_RND_NO_ENTROPY,
)

# Operand ids (OPERAND_ID_* in ERROR_CODES_FILE); the numbers live in kvmtdx.status.
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

OPERAND_NAMES: dict[int, str] = {
    OPERAND_ID_RCX: "RCX", OPERAND_ID_RDX: "RDX (TD_PARAMS reserved bytes)",
    OPERAND_ID_ATTRIBUTES: "ATTRIBUTES", OPERAND_ID_XFAM: "XFAM",
    OPERAND_ID_EXEC_CONTROLS: "CONFIG_FLAGS", OPERAND_ID_EPTP_CONTROLS: "EPTP_CONTROLS",
    OPERAND_ID_MAX_VCPUS: "MAX_VCPUS", OPERAND_ID_CPUID_CONFIG: "CPUID_CONFIG",
    OPERAND_ID_TSC_FREQUENCY: "TSC_FREQUENCY", OPERAND_ID_NUM_L2_VMS: "NUM_L2_VMS",
    OPERAND_ID_IA32_ARCH_CAPABILITIES_CONFIG: "IA32_ARCH_CAPABILITIES_CONFIG",
}

# The MSR TDX_INCORRECT_MSR_VALUE names when virtual TSX lacks TSX_CTRL
# (src/common/x86_defs/msr_defs.h).
IA32_ARCH_CAPABILITIES_MSR_ADDR = 0x10A


def with_operand(code: StatusCode, operand: int) -> int:
    """api_error_with_operand_id: the class plus the operand id."""
    return code.value + operand


def operand_invalid(operand: int) -> int:
    return with_operand(TDX_OPERAND_INVALID, operand)


def status_name(status: int) -> str:
    """'TDX_OPERAND_INVALID(CPUID_CONFIG)' style text for a 64-bit status."""
    cls = status & STATUS_CLASS_MASK
    for code in STATUS_CODES:
        if code.value == cls:
            detail = status & ~STATUS_CLASS_MASK
            if not detail:
                return code.name
            if code is TDX_OPERAND_INVALID:
                return f"{code.name}({OPERAND_NAMES.get(detail, hex(detail))})"
            return f"{code.name}(0x{detail:x})"
    return f"0x{status:016x}"


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
