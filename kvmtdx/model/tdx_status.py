"""TDH.MNG.INIT completion statuses and operand ids, as the public TDX module source defines them.

A status is 64 bits: the class in the upper 32, details in the lower 32.  The
module builds an operand error as ``class + operand id``
(include/tdx_api_defs.h, api_error_with_operand_id), so the low bits name the
TD_PARAMS field, register or MSR it objects to.  Values below are identical in
every module version kvmtdx bundles (1.5.01, 1.5.05, 2.0.08).
"""

from __future__ import annotations

from dataclasses import dataclass

ERROR_CODES_FILE = "include/auto_gen*/tdx_error_codes_defs.h"
STATUS_CLASS_MASK = 0xFFFFFFFF00000000


@dataclass(frozen=True, slots=True)
class StatusCode:
    name: str
    value: int
    defined_in: str


TDX_SUCCESS = StatusCode("TDX_SUCCESS", 0x0, ERROR_CODES_FILE)
TDX_OPERAND_INVALID = StatusCode("TDX_OPERAND_INVALID", 0xC000010000000000, ERROR_CODES_FILE)
TDX_CPUID_LEAF_1F_FORMAT_UNRECOGNIZED = StatusCode(
    "TDX_CPUID_LEAF_1F_FORMAT_UNRECOGNIZED", 0xC000090400000000, ERROR_CODES_FILE)
TDX_INCORRECT_MSR_VALUE = StatusCode("TDX_INCORRECT_MSR_VALUE", 0xC000092100000000,
                                     ERROR_CODES_FILE)
# Statuses TDH.MNG.INIT can return for reasons outside TD_PARAMS' CPUID content
# (host MSR state, TDCS pages); named so a caller can decode them.
TDX_INCONSISTENT_MSR = StatusCode("TDX_INCONSISTENT_MSR", 0xC000092000000000, ERROR_CODES_FILE)
TDX_TDCS_NOT_ALLOCATED = StatusCode("TDX_TDCS_NOT_ALLOCATED", 0xC000060600000000,
                                    ERROR_CODES_FILE)
TDX_LIMIT_CPUID_MAXVAL_SET = StatusCode("TDX_LIMIT_CPUID_MAXVAL_SET", 0xC000090100000000,
                                        ERROR_CODES_FILE)
TDX_RND_NO_ENTROPY = StatusCode("TDX_RND_NO_ENTROPY", 0x8000020300000000, ERROR_CODES_FILE)

STATUS_CODES: tuple[StatusCode, ...] = (
    TDX_SUCCESS, TDX_OPERAND_INVALID, TDX_CPUID_LEAF_1F_FORMAT_UNRECOGNIZED,
    TDX_INCORRECT_MSR_VALUE, TDX_INCONSISTENT_MSR, TDX_TDCS_NOT_ALLOCATED,
    TDX_LIMIT_CPUID_MAXVAL_SET, TDX_RND_NO_ENTROPY,
)

# Operand ids (OPERAND_ID_* in ERROR_CODES_FILE).
OPERAND_ID_RCX = 1
OPERAND_ID_RDX = 2
OPERAND_ID_ATTRIBUTES = 64
OPERAND_ID_XFAM = 65
OPERAND_ID_EXEC_CONTROLS = 66
OPERAND_ID_EPTP_CONTROLS = 67
OPERAND_ID_MAX_VCPUS = 68
OPERAND_ID_CPUID_CONFIG = 69
OPERAND_ID_TSC_FREQUENCY = 70
OPERAND_ID_NUM_L2_VMS = 71
OPERAND_ID_IA32_ARCH_CAPABILITIES_CONFIG = 72

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
