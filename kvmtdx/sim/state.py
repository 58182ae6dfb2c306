"""What the simulated kernel keeps between calls: open files, VMs, TDX key IDs, its log."""

from __future__ import annotations

import heapq
from collections.abc import Mapping
from dataclasses import dataclass, field

from kvmtdx import uapi
from kvmtdx.sim.tdx_module import MngInit
from kvmtdx.structs import CpuidEntry

Regs = tuple[int, int, int, int]

_FIRST_KEY_ID = 32  # private HKIDs start above the host's shared ones


class System:
    """An open /dev/kvm."""


@dataclass(slots=True)
class Vm:
    """A VM file: its type and, for a TD, how far it got (kvm_tdx's state)."""

    vm_type: int
    initialized: bool = False
    finalized: bool = False
    key_id: int | None = None
    # kvm_vm_bugged (kvm->vm_dead): a TDH.MNG.INIT failure that was not the caller's
    # operand; every later ioctl on the VM fd is -EIO.
    dead: bool = False
    # TDH.MNG.INIT's answer once INIT_VM succeeded: the TD's CPUID as TDCS holds it.
    mng_init: MngInit | None = None
    # TD_PARAMS.CPUID_CONFIG as KVM built it from the request, and the GPAW (48 or 52) KVM
    # chose: what KVM_TDX_GET_CPUID's 0x80000008 fix-up reports.
    config_values: tuple[Regs, ...] = ()
    gpaw: int = 48
    # kvm->arch.irqchip_mode == KVM_IRQCHIP_SPLIT; the vCPU ids created; open fds on the VM
    # (its own and its vCPUs': KVM frees the VM, a TD's key ID included, with the last).
    split_irqchip: bool = False
    vcpu_ids: set[int] = field(default_factory=set)
    refs: int = 1

    @property
    def is_td(self) -> bool:
        return self.vm_type == uapi.VmType.KVM_X86_TDX_VM

    @property
    def cpuid(self) -> Mapping[tuple[int, int | None], Regs]:
        """The TD's CPUID (what KVM_TDX_GET_CPUID reads); empty before INIT_VM succeeded."""
        return {} if self.mng_init is None else self.mng_init.cpuid

    @property
    def faulting(self) -> frozenset[tuple[int, int | None]]:
        """The TD's CPUID entries whose CPUID_VALID is 0 (a #VE for the guest)."""
        return frozenset() if self.mng_init is None else self.mng_init.faulting


@dataclass(slots=True)
class Vcpu:
    """A vCPU file: KVM's own view of the guest's CPUID and, on a TD, the vCPU's TDX state."""

    vm: Vm
    vcpu_id: int
    cpuid: tuple[CpuidEntry, ...] = ()
    # The local APIC base MSR: KVM_APIC_BASE ENABLE once an in-kernel APIC exists.
    apic_base: int = 0
    td_initialized: bool = False  # KVM_TDX_INIT_VCPU done (VCPU_TD_STATE_INITIALIZED)


File = System | Vm | Vcpu


class KeyIds:
    """The host's pool of TDX private key IDs; the lowest free one goes first."""

    def __init__(self, count: int) -> None:
        # A heap: the lowest free key ID is always first.
        self._free: list[int] = list(range(_FIRST_KEY_ID, _FIRST_KEY_ID + count))

    @property
    def free(self) -> int:
        return len(self._free)

    def alloc(self) -> int | None:
        return heapq.heappop(self._free) if self._free else None

    def release(self, key_id: int) -> None:
        heapq.heappush(self._free, key_id)


@dataclass(frozen=True, slots=True)
class KernelWarning:
    """A TDX_BUG_ON the simulated kernel hit (Linux 7.3 arch/x86/kvm/vmx/tdx.c __TDX_BUG_ON).

    WARN_ON_ONCE prints its splat once per boot and call site (`splat`), but the
    condition holds, the VM is marked bugged and the error line is logged every time.
    """

    seamcall: str
    status: int
    rcx: int
    line: str  # what pr_err_ratelimited logs
    splat: bool  # the first at this call site: the WARNING splat is printed
    vm_dead: bool  # kvm_vm_bugged() (Linux 6.19 on)


class KernelLog:
    """What the simulated kernel reported: its WARNs, in order (the first `KEPT` of them;
    `warnings` counts them all, so a long probe run does not hoard memory)."""

    KEPT = 1024

    def __init__(self) -> None:
        self.events: list[KernelWarning] = []
        self._count = 0
        self._sites: set[str] = set()  # call sites whose WARN_ON_ONCE already printed

    @property
    def warnings(self) -> int:
        """How often a WARN_ON_ONCE condition held (each a kernel bug if userspace caused it)."""
        return self._count

    def tdx_bug_on(self, seamcall: str, status: int, rcx: int, vm: Vm, kills_vm: bool) -> None:
        """TDX_BUG_ON_1(status, seamcall, rcx, kvm) with a non-zero status on a live VM
        (Linux 6.16: WARN_ON_ONCE and the error line, the VM left alive)."""
        splat = seamcall not in self._sites
        self._sites.add(seamcall)
        self._count += 1
        if kills_vm:
            vm.dead = True
        if len(self.events) < self.KEPT:
            # pr_fmt is KBUILD_MODNAME ": ": tdx.c is part of kvm-intel.ko.
            line = f"kvm_intel: SEAMCALL {seamcall} failed: 0x{status:x}, rcx 0x{rcx:x}"
            self.events.append(KernelWarning(seamcall, status, rcx, line, splat, kills_vm))
