"""The kernel-source host: a syscall seam whose TDX VM ioctls run the kernel's own code.

`/dev/kvm` and its generic ioctls (API version, VM types, creating a VM,
the host's supported CPUID) are answered here, as KVM's common code would
(KVM_GET_SUPPORTED_CPUID by the simulated host's copy of that code);
every KVM_MEMORY_ENCRYPT_OP on a TDX VM goes to the extracted
`tdx_vm_ioctl`, compiled from the tree, which reads and writes the
caller's memory at the address it is handed.  Its SEAMCALLs come back here
and go to `module_bridge`.

Everything cffi touches stays in this module: the rest of kvmtdx sees
integers, bytes and OSError, as from any seam.
"""

from __future__ import annotations

import errno
import os
import threading
from pathlib import Path
from typing import Any

import cffi

from kvmtdx import uapi
from kvmtdx.kernelsrc.module_bridge import ModuleBridge, Seamcall, TdParams
from kvmtdx.model.profiles import Regs
from kvmtdx.sim.kvm import get_supported_cpuid, supported_cpuid
from kvmtdx.sim.uaccess import fail
from kvmtdx.status import errno_name

_CDEF = """
typedef uint64_t (*kt_seamcall_fn)(int fn, const uint64_t *in, int nin, uint64_t *out);
struct kt_host;
struct kt_vm;
struct kt_host *kt_host_new(void);
void kt_host_free(struct kt_host *h);
int kt_host_setup(struct kt_host *h, const uint64_t *fixed, int n, const uint64_t *leaves,
                  const uint64_t *values, int key_first, int key_count, kt_seamcall_fn fn);
struct kt_vm *kt_vm_new(struct kt_host *h);
int kt_vm_ioctl(struct kt_host *h, struct kt_vm *vm, uint64_t argp);
int kt_vm_dead(struct kt_host *h, struct kt_vm *vm);
void kt_vm_free(struct kt_host *h, struct kt_vm *vm);
void kt_host_stats(struct kt_host *h, long *out);
int kt_host_bringup(struct kt_host *h);
"""
_ffi = cffi.FFI()
_ffi.cdef(_CDEF)
_libs: dict[str, Any] = {}
# One library is one set of C globals (the kernel's tdx_sysinfo): one call at a time.
_lock = threading.Lock()

_API_VERSION = 12
_VM_TYPES = 1 << uapi.VmType.KVM_X86_DEFAULT_VM | 1 << uapi.VmType.KVM_X86_TDX_VM
_FIRST_FD = 3
_FIRST_KEY_ID = 32  # private HKIDs start above the host's shared ones


def load(path: Path) -> Any:
    """The library at `path`, loaded once per process."""
    key = str(path)
    if key not in _libs:
        _libs[key] = _ffi.dlopen(key)
    return _libs[key]


class _System:
    """An open /dev/kvm."""


class _Vm:
    def __init__(self, vm_type: int, handle: Any) -> None:
        self.vm_type = vm_type
        self.handle = handle  # struct kt_vm *, or NULL for a non-TDX VM


class KernelSourceHost:
    """A seam answering as the compiled kernel tree, with `bridge`'s module, would.

    `key_ids` TDX private key IDs; each initialised TD holds one until its
    VM fd is closed.  `warnings` counts WARN_ON_ONCE splats the kernel code
    hit (a userspace-reachable WARN is a kernel bug of its own).
    """

    def __init__(self, library: Path, bridge: ModuleBridge, *, key_ids: int = 16) -> None:
        self.bridge = bridge
        self.library = library
        self.key_ids = key_ids
        self._lib = load(library)
        self._files: dict[int, _System | _Vm] = {}
        self._error: BaseException | None = None
        self._callback = _ffi.callback("kt_seamcall_fn", self._seamcall,
                                       error=0xC000000000000000, onerror=self._onerror)
        self._host = _ffi.gc(self._lib.kt_host_new(), self._lib.kt_host_free)
        info = bridge.sysinfo()
        fixed = [info.attributes_fixed0, info.attributes_fixed1, info.xfam_fixed0,
                 info.xfam_fixed1, bridge.host.xfam_supported, int(bridge.host.ept_5level),
                 info.features0]
        values = [w for a, b, c, d in info.values for w in (a | b << 32, c | d << 32)]
        n = len(info.leaves)
        rc = self._lib.kt_host_setup(self._host, _ffi.new("uint64_t[]", fixed), n,
                                     _ffi.new("uint64_t[]", list(info.leaves) or [0]),
                                     _ffi.new("uint64_t[]", values or [0]),
                                     _FIRST_KEY_ID, key_ids, self._callback)
        if rc:
            raise ValueError(f"module {bridge.module.name}: {n} CPUID_CONFIG rows or "
                             f"{key_ids} key IDs do not fit the kernel's tables")
        self._supported_cpuid = supported_cpuid(bridge.host, bridge.module)
        with _lock:
            # What kvm_intel decides at load time on this host and module.
            self.bringup = -int(self._lib.kt_host_bringup(self._host))

    # ------------------------------------------------------------------
    # What tests and verify's hygiene checks look at.

    def _stats(self) -> tuple[int, int, int]:
        out = _ffi.new("long[3]")
        with _lock:
            self._lib.kt_host_stats(self._host, out)
        return int(out[0]), int(out[1]), int(out[2])

    @property
    def free_key_ids(self) -> int:
        return self._stats()[0]

    @property
    def live_allocations(self) -> int:
        """kzalloc()s the kernel code made and has not freed (TDs alive hold some)."""
        return self._stats()[1]

    @property
    def warnings(self) -> int:
        return self._stats()[2]

    @property
    def kernel_warnings(self) -> int:
        """WARN splats so far, under the name every backend that counts them uses (the
        simulated host too): verify's init_vm_no_kernel_warn and init-vm read it."""
        return self.warnings

    @property
    def open_fds(self) -> tuple[int, ...]:
        return tuple(sorted(self._files))

    @property
    def live_tds(self) -> int:
        return sum(1 for f in self._files.values()
                   if isinstance(f, _Vm) and f.vm_type == uapi.VmType.KVM_X86_TDX_VM)

    # ------------------------------------------------------------------
    # The seam.

    @property
    def bringup_failure(self) -> str | None:
        """Why KVM would not offer TDX here (None: it does), from the tree's bring-up checks."""
        if self.bringup == 0:
            return None
        what = "disables TDX" if self.bringup == errno.ENODEV else "fails to load kvm_intel"
        return (f"the kernel's TDX bring-up {what} on this host and module "
                f"(__tdx_hardware_setup: -{errno_name(self.bringup)})")

    @property
    def _tdx(self) -> bool:
        return self.bringup == 0

    @property
    def _vm_types(self) -> int:
        return _VM_TYPES if self._tdx else 1 << uapi.VmType.KVM_X86_DEFAULT_VM

    def open(self, path: str, flags: int) -> int:
        # kvm_intel registers /dev/kvm only after its hardware setup succeeded.
        if path != "/dev/kvm" or self.bringup not in (0, errno.ENODEV):
            raise OSError(errno.ENOENT, os.strerror(errno.ENOENT), path)
        return self._install(_System())

    def close(self, fd: int) -> None:
        f = self._files.pop(fd, None)
        if f is None:
            raise fail(errno.EBADF)
        if isinstance(f, _Vm) and f.handle != _ffi.NULL:
            with _lock:
                self._lib.kt_vm_free(self._host, f.handle)
            f.handle = _ffi.NULL

    def ioctl(self, fd: int, request: int, arg: int) -> int:
        f = self._files.get(fd)
        if f is None:
            raise fail(errno.EBADF)
        if isinstance(f, _System):
            return self._system_ioctl(request, arg)
        if f.handle != _ffi.NULL:
            with _lock:
                dead = bool(self._lib.kt_vm_dead(self._host, f.handle))
            if dead:  # kvm_vm_ioctl: a VM KVM_BUG_ON marked dead refuses every ioctl
                raise fail(errno.EIO)
        if request == uapi.Ioctl.KVM_CHECK_EXTENSION:
            return self._vm_types if arg == uapi.KVM_CAP_VM_TYPES else 0
        # kvm_arch_vm_ioctl -> vt_mem_enc_ioctl: only a TD has the TDX commands.
        if request != uapi.Ioctl.KVM_MEMORY_ENCRYPT_OP or f.handle == _ffi.NULL:
            raise fail(errno.ENOTTY)
        with _lock:
            self._error = None
            rc = int(self._lib.kt_vm_ioctl(self._host, f.handle, arg))
            error, self._error = self._error, None
        if error is not None:
            raise RuntimeError("the TDX module model failed inside a SEAMCALL") from error
        if rc < 0:
            raise fail(-rc)
        return rc

    def _install(self, f: _System | _Vm) -> int:
        fd = _FIRST_FD
        while fd in self._files:
            fd += 1
        self._files[fd] = f
        return fd

    def _system_ioctl(self, request: int, arg: int) -> int:
        if request == uapi.Ioctl.KVM_GET_API_VERSION:
            if arg:
                raise fail(errno.EINVAL)
            return _API_VERSION
        if request == uapi.Ioctl.KVM_CHECK_EXTENSION:
            return self._vm_types if arg == uapi.KVM_CAP_VM_TYPES else 0
        if request == uapi.Ioctl.KVM_CREATE_VM:
            if arg == uapi.VmType.KVM_X86_DEFAULT_VM:
                return self._install(_Vm(arg, _ffi.NULL))
            if arg != uapi.VmType.KVM_X86_TDX_VM or not self._tdx:
                raise fail(errno.EINVAL)
            with _lock:
                handle = self._lib.kt_vm_new(self._host)
            if handle == _ffi.NULL:
                raise fail(errno.ENOMEM)
            return self._install(_Vm(arg, handle))
        if request == uapi.Ioctl.KVM_GET_SUPPORTED_CPUID:
            return get_supported_cpuid(self._supported_cpuid, arg)
        raise fail(errno.ENOTTY)

    # ------------------------------------------------------------------
    # SEAMCALLs, called from the kernel code while the lock is held.

    def _seamcall(self, fn: int, inp: Any, nin: int, out: Any) -> int:
        params = _td_params([int(v) for v in _ffi.unpack(inp, nin)]) if (
            fn == Seamcall.MNG_INIT) else None
        status, extended = self.bridge.seamcall(Seamcall(fn), params)
        out[0] = extended
        return status

    def _onerror(self, exc_type: Any, exc: BaseException | None, tb: Any) -> None:
        self._error = exc


def _td_params(words: list[int]) -> TdParams:
    n = words[5]
    rows: list[Regs] = []
    for i in range(n):
        lo, hi = words[6 + 2 * i], words[7 + 2 * i]
        rows.append((lo & 0xFFFFFFFF, lo >> 32, hi & 0xFFFFFFFF, hi >> 32))
    return TdParams(attributes=words[0], xfam=words[1], max_vcpus=words[2],
                    eptp_controls=words[3], config_flags=words[4], cpuid_values=tuple(rows))

