"""Plain, frozen Python views of the KVM TDX uapi structs.

Everything above the uapi layer speaks these types; only `kvmtdx.uapi` turns
them into bytes and back.  Fields keep the kernel's names so a reader can hold
them against the header.  Values that the kernel treats as "must be zero"
(reserved words, padding) are kept, because kvmtdx exists to send and observe
exactly those.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

REGISTERS: tuple[str, str, str, str] = ("eax", "ebx", "ecx", "edx")

# The TDX module's "this leaf has no sub-leaves" marker (spec section 1).
NO_SUBLEAF = 0xFFFFFFFF

# KVM_CPUID_FLAG_SIGNIFCANT_INDEX (sic, as in the uapi header).
FLAG_SIGNIFICANT_INDEX = 1

KVM_MAX_CPUID_ENTRIES = 256


@dataclass(frozen=True, slots=True)
class CpuidEntry:
    """struct kvm_cpuid_entry2."""

    function: int
    index: int = 0
    flags: int = 0
    eax: int = 0
    ebx: int = 0
    ecx: int = 0
    edx: int = 0
    padding: tuple[int, int, int] = (0, 0, 0)

    def reg(self, name: str) -> int:
        value: int = getattr(self, name)
        return value

    def regs(self) -> tuple[int, int, int, int]:
        return (self.eax, self.ebx, self.ecx, self.edx)

    def with_reg(self, name: str, value: int) -> CpuidEntry:
        if name not in REGISTERS:
            raise ValueError(f"not a CPUID register: {name}")
        v = value & 0xFFFFFFFF
        if name == "eax":
            return replace(self, eax=v)
        if name == "ebx":
            return replace(self, ebx=v)
        if name == "ecx":
            return replace(self, ecx=v)
        return replace(self, edx=v)

    @property
    def significant_index(self) -> bool:
        return bool(self.flags & FLAG_SIGNIFICANT_INDEX)


@dataclass(frozen=True, slots=True)
class TdxCmd:
    """struct kvm_tdx_cmd."""

    id: int
    flags: int = 0
    data: int = 0
    hw_error: int = 0


@dataclass(frozen=True, slots=True)
class EnableCap:
    """struct kvm_enable_cap (KVM_ENABLE_CAP on a VM or vCPU)."""

    cap: int
    flags: int = 0
    args: tuple[int, int, int, int] = (0, 0, 0, 0)
    pad: bytes = bytes(64)


@dataclass(frozen=True, slots=True)
class Capabilities:
    """struct kvm_tdx_capabilities with its cpuid entries.

    `nent` is the header word as read; `entries` holds the entries that were
    read (for a buffer KVM filled, nent of them).
    """

    supported_attrs: int = 0
    supported_xfam: int = 0
    kernel_tdvmcallinfo_1_r11: int = 0
    user_tdvmcallinfo_1_r11: int = 0
    kernel_tdvmcallinfo_1_r12: int = 0
    user_tdvmcallinfo_1_r12: int = 0
    reserved: tuple[int, ...] = (0,) * 250
    nent: int = 0
    cpuid_padding: int = 0
    entries: tuple[CpuidEntry, ...] = ()


@dataclass(frozen=True, slots=True)
class InitVm:
    """struct kvm_tdx_init_vm with its cpuid entries.

    `nent=None` means "the number of entries"; an explicit value lets a
    request lie about its size, which the kernel must catch.
    """

    attributes: int = 0
    xfam: int = 0
    mrconfigid: tuple[int, ...] = (0,) * 6
    mrowner: tuple[int, ...] = (0,) * 6
    mrownerconfig: tuple[int, ...] = (0,) * 6
    reserved: tuple[int, ...] = (0,) * 12
    nent: int | None = None
    cpuid_padding: int = 0
    entries: tuple[CpuidEntry, ...] = field(default=())

    @property
    def effective_nent(self) -> int:
        return len(self.entries) if self.nent is None else self.nent
