"""What this host offers: the KVM/TDX environment (`kvmtdx info`) and TDX capabilities (`caps`).

Built on the device layer and whatever seam the session chose, so the same
questions get the same answers from the real /dev/kvm, the simulated host or a
plug-in.  The machine facts (kernel release, CPU model, native CPUID source)
always describe the machine kvmtdx runs on.
"""

from __future__ import annotations

import os
import platform
from dataclasses import dataclass

from kvmtdx.device import Counters, Kvm, require_tdx, tdx_status
from kvmtdx.identity import read_cpu
from kvmtdx.native import CPUID_DEVICE, CPUINFO, LOAD_HINT
from kvmtdx.session import Backend
from kvmtdx.structs import Capabilities


@dataclass(frozen=True, slots=True)
class NativeCpuid:
    """Where native CPUID can be read (the Linux cpuid driver's node), and how to get it."""

    path: str
    present: bool
    readable: bool
    hint: str


@dataclass(frozen=True, slots=True)
class Info:
    backend: str
    simulated: bool
    kvm_path: str
    kvm_api_version: int | None
    vm_types: tuple[int, ...]
    tdx_available: bool
    skip: bool  # not available because TDX (or KVM) is absent, not because of a failure
    reason: str
    kernel_release: str
    cpu_model: str
    native_cpuid: NativeCpuid


def vm_type_list(mask: int) -> tuple[int, ...]:
    return tuple(t for t in range(64) if mask >> t & 1)


def cpu_model(cpuinfo: str = CPUINFO) -> str:
    return read_cpu(cpuinfo).model_name


def native_cpuid_source(cpu: int = 0) -> NativeCpuid:
    path = CPUID_DEVICE.format(cpu=cpu)
    present = os.path.exists(path)
    readable = present and os.access(path, os.R_OK)
    if not present:
        hint = LOAD_HINT
    elif not readable:
        hint = "the node is root-only: run as root to read native CPUID (--host native)"
    else:
        hint = "kvmtdx predict --host native reads it"
    return NativeCpuid(path=path, present=present, readable=readable, hint=hint)


def gather_info(backend: Backend) -> Info:
    status = tdx_status(backend.seam, backend.path)
    return Info(
        backend=backend.label,
        simulated=backend.simulated,
        kvm_path=backend.path,
        kvm_api_version=status.kvm_api_version,
        vm_types=vm_type_list(status.vm_types),
        tdx_available=status.available,
        skip=status.skip,
        reason=status.reason,
        kernel_release=platform.release(),
        cpu_model=cpu_model(),
        native_cpuid=native_cpuid_source(),
    )


@dataclass(frozen=True, slots=True)
class CapsReading:
    caps: Capabilities
    counters: Counters


def read_capabilities(backend: Backend, start_nent: int = 6) -> CapsReading:
    """KVM_TDX_CAPABILITIES on a fresh TD (grow and retry), every fd closed after.

    Raises KvmError(skip=True) with the reason when the seam offers no TDX.
    """
    with Kvm(backend.seam, backend.path) as kvm:
        require_tdx(kvm)
        td = kvm.create_td(checked=True)
        with td:
            caps = td.capabilities(start_nent=start_nent)
    return CapsReading(caps=caps, counters=kvm.counters)
