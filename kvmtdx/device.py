"""The syscall seam and the KVM / TDX handles built on it.

The seam is three calls, the only way kvmtdx reaches a kernel:
`open(path, flags) -> fd`, `ioctl(fd, request, arg) -> int` and `close(fd)`.
`arg` is an immediate or the address of memory the callee reads and writes;
a failure raises OSError carrying the errno.  `RealSeam` calls libc; the
simulated host (`kvmtdx.sim`) is another seam; a user can plug in their own.

Handles own their file descriptors and close them on every path (context
managers, and close() is idempotent).  Every handle counts what it did, so
benchmarks and reports can state ioctls and TD creations, not only seconds.
"""

from __future__ import annotations

import errno
import functools
import os
from dataclasses import dataclass
from types import TracebackType
from typing import Protocol, TypeVar, runtime_checkable

from kvmtdx import layout, uapi
from kvmtdx.errors import KvmError
from kvmtdx.outcome import Outcome
from kvmtdx.status import errno_name
from kvmtdx.structs import (
    KVM_MAX_CPUID_ENTRIES,
    Capabilities,
    CpuidEntry,
    EnableCap,
    InitVm,
    TdxCmd,
)

DEFAULT_KVM_PATH = "/dev/kvm"
# The I/O APIC routes QEMU reserves when it splits the irqchip (KVM_CAP_SPLIT_IRQCHIP).
SPLIT_IRQCHIP_PINS = 24


@runtime_checkable
class Seam(Protocol):
    def open(self, path: str, flags: int) -> int: ...

    def ioctl(self, fd: int, request: int, arg: int) -> int: ...

    def close(self, fd: int) -> None: ...


class RealSeam:
    """The real kernel, through libc."""

    def open(self, path: str, flags: int) -> int:
        return uapi.sys_open(path, flags)

    def ioctl(self, fd: int, request: int, arg: int) -> int:
        return uapi.sys_ioctl(fd, request, arg)

    def close(self, fd: int) -> None:
        uapi.sys_close(fd)


@dataclass
class Counters:
    """What went through the seam: deterministic numbers for reports and benchmarks."""

    opens: int = 0
    closes: int = 0
    ioctls: int = 0
    vms_created: int = 0
    tds_created: int = 0
    init_vm_calls: int = 0
    vcpus_created: int = 0


def open_error(path: str, err: OSError) -> KvmError:
    if err.errno in (errno.ENOENT, errno.ENODEV, errno.ENXIO):
        return KvmError(
            f"no {path}: KVM is not available on this host (load kvm_intel, or check that "
            "virtualization is enabled)",
            skip=True,
            errno_=err.errno,
        )
    if err.errno in (errno.EACCES, errno.EPERM):
        # kselftest's convention: a test that lacks a resource it needs is skipped, with
        # how to get it; nothing about the kernel was judged.
        return KvmError(
            f"cannot open {path}: permission denied; run as root or add this user to the "
            f"group that owns {path} (usually 'kvm': sudo usermod -aG kvm $USER, "
            "then log in again)",
            skip=True,
            errno_=err.errno,
        )
    return KvmError(f"cannot open {path}: {os.strerror(err.errno or 0)}", skip=False,
                    errno_=err.errno or 0)


def no_tdx_reason(vm_types: int) -> str:
    names = ", ".join(
        uapi.vm_type_name(t) for t in range(64) if vm_types >> t & 1
    ) or "none"
    return (
        f"KVM on this host does not offer KVM_X86_TDX_VM (VM types: {names}); "
        "TDX needs a TDX-enabled CPU, BIOS and kernel (kvm_intel.tdx=1)"
    )


@dataclass(frozen=True, slots=True)
class CmdResult:
    """One KVM_MEMORY_ENCRYPT_OP as the caller sees it afterwards."""

    errno: int
    ret: int
    cmd: TdxCmd
    data: bytes

    @property
    def ok(self) -> bool:
        return self.errno == 0


_HandleT = TypeVar("_HandleT", bound="_FdHandle")


class _FdHandle:
    """An owned file descriptor on a seam: closed once, on every path out of a with-block."""

    def __init__(self, seam: Seam, fd: int | None, counters: Counters) -> None:
        self._seam = seam
        self.fd = fd
        self.counters = counters

    def __enter__(self: _HandleT) -> _HandleT:
        return self

    def __exit__(self, t: type[BaseException] | None, v: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def close(self) -> None:
        fd, self.fd = self.fd, None
        if fd is not None:
            self.counters.closes += 1
            self._seam.close(fd)

    def ioctl(self, request: int, arg: int) -> int:
        if self.fd is None:
            raise ValueError(f"{type(self).__name__} handle is closed")
        self.counters.ioctls += 1
        return self._seam.ioctl(self.fd, request, arg)

    def memory_encrypt_op(self, cmd: TdxCmd, data: bytes | None, *,
                          cmd_address: int | None = None) -> CmdResult:
        """Send one KVM_MEMORY_ENCRYPT_OP; `data`, when given, is placed in memory
        and its address replaces cmd.data.  `cmd_address` sends a raw address instead
        of a kvm_tdx_cmd (to prove EFAULT handling)."""
        buf = uapi.Memory(data) if data is not None else None
        cmd_mem = uapi.Memory(layout.pack_cmd_words(
            cmd.id, cmd.flags, cmd.data if buf is None else buf.address, cmd.hw_error))
        err, ret = 0, 0
        try:
            ret = self.ioctl(uapi.Ioctl.KVM_MEMORY_ENCRYPT_OP,
                             cmd_mem.address if cmd_address is None else cmd_address)
        except OSError as e:
            err = e.errno or errno.EIO
        return CmdResult(
            errno=err,
            ret=ret,
            cmd=layout.unpack_cmd(cmd_mem.read()),
            data=buf.read() if buf is not None else b"",
        )


class Vm(_FdHandle):
    """A VM file descriptor.  KVM releases what it holds for the VM (a TD's key ID included)
    once this fd and every vCPU fd of the VM are closed."""

    def __init__(self, seam: Seam, fd: int, vm_type: int, counters: Counters) -> None:
        super().__init__(seam, fd, counters)
        self.vm_type = vm_type

    def enable_cap(self, cap: EnableCap) -> int:
        """KVM_ENABLE_CAP on the VM; OSError carries KVM's errno."""
        mem = uapi.Memory(layout.pack_enable_cap(cap))
        return self.ioctl(uapi.Ioctl.KVM_ENABLE_CAP, mem.address)

    def enable_split_irqchip(self, ioapic_pins: int = SPLIT_IRQCHIP_PINS) -> None:
        """An in-kernel local APIC with the I/O APIC left to userspace (KVM_CAP_SPLIT_IRQCHIP),
        which a TD's vCPUs require; `ioapic_pins` are the routes reserved for it."""
        self.enable_cap(EnableCap(uapi.Cap.KVM_CAP_SPLIT_IRQCHIP, args=(ioapic_pins, 0, 0, 0)))

    def create_vcpu(self, vcpu_id: int = 0) -> Vcpu:
        """KVM_CREATE_VCPU: a vCPU handle owning its fd (OSError carries KVM's errno)."""
        fd = self.ioctl(uapi.Ioctl.KVM_CREATE_VCPU, vcpu_id)
        self.counters.vcpus_created += 1
        self.counters.opens += 1
        return Vcpu(self._seam, fd, vcpu_id, self.counters)

    def is_dead(self) -> bool:
        """Whether KVM marked this VM bugged (KVM_BUG_ON, TDX_BUG_ON): every ioctl on it then
        fails with EIO, KVM_CHECK_EXTENSION included, which costs nothing otherwise."""
        try:
            self.ioctl(uapi.Ioctl.KVM_CHECK_EXTENSION, uapi.KVM_CAP_VM_TYPES)
        except OSError as e:
            return e.errno == errno.EIO
        return False


class Vcpu(_FdHandle):
    """A vCPU file descriptor: its CPUID as KVM keeps it (KVM_SET_CPUID2 / KVM_GET_CPUID2) and,
    on a TD, what the TDX module holds (KVM_TDX_GET_CPUID) and KVM_TDX_INIT_VCPU."""

    def __init__(self, seam: Seam, fd: int, vcpu_id: int, counters: Counters) -> None:
        super().__init__(seam, fd, counters)
        self.vcpu_id = vcpu_id

    def set_cpuid2(self, entries: tuple[CpuidEntry, ...], *, nent: int | None = None) -> int:
        """KVM_SET_CPUID2: 0, or KVM's errno (`nent` may lie about the entries' count)."""
        mem = uapi.Memory(layout.pack_cpuid2(entries, nent=nent))
        try:
            self.ioctl(uapi.Ioctl.KVM_SET_CPUID2, mem.address)
        except OSError as e:
            return e.errno or errno.EIO
        return 0

    def get_cpuid2_raw(self, nent: int) -> tuple[int, bytes]:
        """One KVM_GET_CPUID2 with room for `nent` entries: (errno, the buffer after it)."""
        mem = uapi.Memory(layout.pack_cpuid2((), nent=nent, room=nent))
        try:
            self.ioctl(uapi.Ioctl.KVM_GET_CPUID2, mem.address)
        except OSError as e:
            return e.errno or errno.EIO, mem.read()
        return 0, mem.read()

    def get_cpuid2(self, start_nent: int = 64) -> tuple[CpuidEntry, ...]:
        """KVM's own view of the guest's CPUID, grown on E2BIG (which says nothing of the
        room needed) up to KVM_MAX_CPUID_ENTRIES."""
        nent = start_nent
        while True:
            err, data = self.get_cpuid2_raw(nent)
            if not err:
                return layout.unpack_cpuid2(data)[1]
            if err != errno.E2BIG or nent >= KVM_MAX_CPUID_ENTRIES:
                raise OSError(err, f"KVM_GET_CPUID2: {os.strerror(err)}")
            nent = min(nent * 2, KVM_MAX_CPUID_ENTRIES)

    def tdx_get_cpuid_raw(self, nent: int, *, fill: bytes | None = None, flags: int = 0,
                          hw_error: int = 0) -> CmdResult:
        """One KVM_TDX_GET_CPUID with a struct kvm_cpuid2 of room for `nent` entries (or the
        bytes `fill`, to see what KVM writes)."""
        data = layout.pack_cpuid2((), nent=nent, room=nent) if fill is None else fill
        return self.memory_encrypt_op(
            TdxCmd(id=uapi.TdxCommand.KVM_TDX_GET_CPUID, flags=flags, hw_error=hw_error), data)

    def tdx_get_cpuid(self, start_nent: int = 128) -> tuple[CpuidEntry, ...]:
        """The TD's CPUID as the TDX module holds it.  KVM answers E2BIG with the count it
        needs in nent; a kernel that does not is grown by doubling."""
        nent = start_nent
        while True:
            res = self.tdx_get_cpuid_raw(nent)
            if res.ok:
                return layout.unpack_cpuid2(res.data)[1]
            if res.errno != errno.E2BIG or nent >= KVM_MAX_CPUID_ENTRIES:
                raise OSError(res.errno, f"KVM_TDX_GET_CPUID: {os.strerror(res.errno)}")
            wanted = layout.unpack_cpuid2(res.data)[0]
            nent = min(wanted if wanted > nent else nent * 2, KVM_MAX_CPUID_ENTRIES)

    def tdx_init_vcpu(self, rcx: int = 0, *, flags: int = 0) -> CmdResult:
        """KVM_TDX_INIT_VCPU: `rcx` is handed to the guest's BIOS."""
        return self.memory_encrypt_op(
            TdxCmd(id=uapi.TdxCommand.KVM_TDX_INIT_VCPU, flags=flags, data=rcx), None)


@dataclass(frozen=True, slots=True)
class TdCpuidRead:
    """The TD's CPUID as KVM_TDX_GET_CPUID gave it, or the ioctl that failed and its errno."""

    entries: tuple[CpuidEntry, ...] | None
    step: str = ""
    errno: int = 0

    @property
    def unsupported(self) -> bool:
        """The backend answers no vCPU ioctl (ENOTTY), or its kernel predates
        KVM_TDX_GET_CPUID (EINVAL for the command: Linux 6.16 added it)."""
        return self.errno == errno.ENOTTY or (self.step == "KVM_TDX_GET_CPUID"
                                              and self.errno == errno.EINVAL)

    def describe(self) -> str:
        return f"{self.step}: {errno_name(self.errno)}"


class TdxVm(Vm):
    """A VM of type KVM_X86_TDX_VM: KVM_TDX_CAPABILITIES and KVM_TDX_INIT_VM."""

    def read_cpuid(self, vcpu_id: int = 0) -> TdCpuidRead:
        """What a VMM does after INIT_VM to learn the TD's CPUID: a split irqchip, a vCPU,
        KVM_TDX_GET_CPUID (the vCPU closed again).  Once per TD: the irqchip is split once."""
        step = "KVM_ENABLE_CAP(KVM_CAP_SPLIT_IRQCHIP)"
        try:
            self.enable_split_irqchip()
            step = "KVM_CREATE_VCPU"
            with self.create_vcpu(vcpu_id) as vcpu:
                step = "KVM_TDX_GET_CPUID"
                return TdCpuidRead(vcpu.tdx_get_cpuid())
        except OSError as e:
            return TdCpuidRead(None, step, e.errno or errno.EIO)

    def capabilities_raw(self, nent: int, *, flags: int = 0, hw_error: int = 0,
                         fill: bytes | None = None) -> CmdResult:
        """One KVM_TDX_CAPABILITIES with a buffer of room for `nent` entries.

        `fill` gives the buffer's bytes before the call (to see what KVM leaves
        untouched); its nent word is set to `nent` unless fill is that long already.
        """
        size = layout.caps_size(nent)
        if fill is None:
            data = layout.pack_capabilities(Capabilities(nent=nent), nent_room=nent)
        else:
            data = (fill + bytes(size))[:size] if len(fill) < size else fill
        return self.memory_encrypt_op(
            TdxCmd(id=uapi.TdxCommand.KVM_TDX_CAPABILITIES, flags=flags, hw_error=hw_error), data
        )

    def capabilities(self, start_nent: int = 6, max_nent: int = KVM_MAX_CPUID_ENTRIES
                     ) -> Capabilities:
        """Grow and retry: KVM answers E2BIG without saying how much room it needs."""
        nent = start_nent
        while True:
            res = self.capabilities_raw(nent)
            if res.ok:
                return layout.unpack_capabilities(res.data)
            if res.errno != errno.E2BIG or nent >= max_nent:
                raise OSError(res.errno, f"KVM_TDX_CAPABILITIES: {os.strerror(res.errno)}")
            nent = min(nent * 2, max_nent)

    def init_vm_raw(self, request: InitVm | bytes, *, flags: int = 0,
                    hw_error: int = 0) -> CmdResult:
        data = request if isinstance(request, bytes) else layout.init_vm_bytes(request)
        self.counters.init_vm_calls += 1
        return self.memory_encrypt_op(
            TdxCmd(id=uapi.TdxCommand.KVM_TDX_INIT_VM, flags=flags, hw_error=hw_error), data
        )

    def init_vm(self, request: InitVm | bytes, *, flags: int = 0, hw_error: int = 0) -> Outcome:
        res = self.init_vm_raw(request, flags=flags, hw_error=hw_error)
        # KVM refuses a non-zero hw_error before writing kvm_tdx_cmd back, so
        # the caller's own value still sitting there is not a module status.
        reported = 0 if hw_error and res.cmd.hw_error == hw_error else res.cmd.hw_error
        return _outcome(res.errno, reported)


@functools.lru_cache(maxsize=1024)
def _outcome(err: int, hw_error: int) -> Outcome:
    """An observed answer (values: a prober sees the same few thousands of times)."""
    return Outcome.classify(err, hw_error)


class Kvm(_FdHandle):
    """The KVM system handle (/dev/kvm)."""

    def __init__(self, seam: Seam | None = None, path: str = DEFAULT_KVM_PATH) -> None:
        the_seam: Seam = seam if seam is not None else RealSeam()
        self.path = path
        try:
            fd = the_seam.open(path, uapi.O_RDWR | uapi.O_CLOEXEC)
        except OSError as e:
            raise open_error(path, e) from None
        super().__init__(the_seam, fd, Counters())
        self.counters.opens += 1

    def api_version(self) -> int:
        return self.ioctl(uapi.Ioctl.KVM_GET_API_VERSION, 0)

    def check_extension(self, cap: int) -> int:
        return self.ioctl(uapi.Ioctl.KVM_CHECK_EXTENSION, cap)

    def vm_types(self) -> int:
        """The KVM_CAP_VM_TYPES bitmask (bit 0 alone on kernels without the capability)."""
        mask = self.check_extension(uapi.KVM_CAP_VM_TYPES)
        return mask if mask > 0 else 1 << uapi.VmType.KVM_X86_DEFAULT_VM

    def has_tdx(self) -> bool:
        return bool(self.vm_types() >> uapi.VmType.KVM_X86_TDX_VM & 1)

    def supported_cpuid(self, start_nent: int = 64) -> tuple[CpuidEntry, ...]:
        nent = start_nent
        while True:
            mem = uapi.Memory(layout.pack_cpuid2((), nent=nent, room=nent))
            try:
                self.ioctl(uapi.Ioctl.KVM_GET_SUPPORTED_CPUID, mem.address)
            except OSError as e:
                if e.errno == errno.E2BIG and nent < KVM_MAX_CPUID_ENTRIES * 4:
                    nent *= 2
                    continue
                raise
            return layout.unpack_cpuid2(mem.read())[1]

    def create_vm(self, vm_type: int = uapi.VmType.KVM_X86_DEFAULT_VM) -> Vm:
        fd = self.ioctl(uapi.Ioctl.KVM_CREATE_VM, vm_type)
        self.counters.vms_created += 1
        self.counters.opens += 1
        if vm_type == uapi.VmType.KVM_X86_TDX_VM:
            self.counters.tds_created += 1
            return TdxVm(self._seam, fd, vm_type, self.counters)
        return Vm(self._seam, fd, vm_type, self.counters)

    def create_td(self, *, checked: bool = False) -> TdxVm:
        """A fresh TD, or KvmError(skip=True) when KVM does not offer the TDX VM type.

        `checked`: the caller has just seen `availability` say yes, so the VM type is
        not asked again (one ioctl less, as reports count them).
        """
        if not checked and not self.has_tdx():
            raise KvmError(no_tdx_reason(self.vm_types()), skip=True)
        vm = self.create_vm(uapi.VmType.KVM_X86_TDX_VM)
        assert isinstance(vm, TdxVm)
        return vm


@dataclass(frozen=True, slots=True)
class TdxStatus:
    """Whether TDX is usable through a seam, and if not exactly why."""

    available: bool
    reason: str
    skip: bool
    kvm_api_version: int | None
    vm_types: int


def availability(kvm: Kvm) -> TdxStatus:
    """Whether TDX is usable through an open KVM handle: the one test info, verify and probe
    share (API version 12, then the KVM_X86_TDX_VM type), with the reason when it is not."""
    version = kvm.api_version()
    if version != uapi.KVM_API_VERSION:
        return TdxStatus(False, f"unexpected KVM API version {version} "
                                f"(want {uapi.KVM_API_VERSION})", False, version, 0)
    types = kvm.vm_types()
    if not types >> uapi.VmType.KVM_X86_TDX_VM & 1:
        return TdxStatus(False, no_tdx_reason(types), True, version, types)
    return TdxStatus(True, "KVM offers KVM_X86_TDX_VM", False, version, types)


def require_tdx(kvm: Kvm) -> TdxStatus:
    """`availability`, raising KvmError (skip when TDX is absent) unless TDX is usable."""
    status = availability(kvm)
    if not status.available:
        raise KvmError(status.reason, skip=status.skip)
    return status


def tdx_status(seam: Seam | None = None, path: str = DEFAULT_KVM_PATH) -> TdxStatus:
    """`availability` of the KVM at `path`, opened and closed here (a failed open is a status)."""
    try:
        kvm = Kvm(seam, path)
    except KvmError as e:
        return TdxStatus(False, e.reason, e.skip, None, 0)
    with kvm:
        return availability(kvm)
