"""The seam: open/ioctl/close on a table of file descriptors, as a process sees them."""

from __future__ import annotations

import errno
import os

from kvmtdx.model.policy import Policy
from kvmtdx.model.profiles import Host, ModuleProfile
from kvmtdx.sim.kvm import Kvm
from kvmtdx.sim.mutants import get_mutant
from kvmtdx.sim.state import File, KernelLog, KeyIds, System, Vm
from kvmtdx.sim.tdx import Tdx
from kvmtdx.sim.tdx_module import TdxModule
from kvmtdx.sim.uaccess import fail

_FIRST_FD = 3


class SimulatedHost:
    """A syscall seam answering as `policy`'s kernel with `module` on `host` would.

    `key_ids` is the number of TDX private key IDs; each initialised TD holds
    one until its VM fd is closed, so the (key_ids + 1)-th live TD gets ENOSPC.
    """

    def __init__(self, module: ModuleProfile, host: Host, policy: Policy,
                 mutant: str | None = None, key_ids: int = 16) -> None:
        bug = get_mutant(mutant)
        if key_ids < 0:
            raise ValueError("key_ids must not be negative")
        self.module = module
        self.host = host
        self.policy = policy
        self.mutant = mutant
        self.key_ids = key_ids
        self._files: dict[int, File] = {}
        self._keys = KeyIds(key_ids)
        self.kernel_log = KernelLog()
        # The module runs its own reading of its version's converted tables on this CPU.
        tdx = Tdx(TdxModule(module.tables, host), host, policy, self._keys, bug, self.kernel_log)
        self._kvm = Kvm(host, module, tdx, self._install)

    # ------------------------------------------------------------------
    # What tests look at.

    @property
    def open_fds(self) -> tuple[int, ...]:
        return tuple(sorted(self._files))

    @property
    def live_tds(self) -> int:
        """Open VM fds of type KVM_X86_TDX_VM."""
        return sum(1 for f in self._files.values() if isinstance(f, Vm) and f.is_td)

    @property
    def free_key_ids(self) -> int:
        return self._keys.free

    def vm_state(self, fd: int) -> Vm:
        """What the simulated kernel keeps for the VM behind `fd` (its TD state, key ID and,
        once INIT_VM succeeded, the TD's CPUID as TDH.MNG.INIT left it)."""
        f = self._files.get(fd)
        if not isinstance(f, Vm):
            raise ValueError(f"fd {fd} is not a VM of this simulated host")
        return f

    @property
    def kernel_warnings(self) -> int:
        """How often the simulated kernel hit a WARN (a userspace-reachable WARN is a kernel
        bug of its own); `kernel_log.events` says which, with the line the kernel logged."""
        return self.kernel_log.warnings

    # ------------------------------------------------------------------
    # The seam.

    def open(self, path: str, flags: int) -> int:
        if path != "/dev/kvm":
            raise OSError(errno.ENOENT, os.strerror(errno.ENOENT), path)
        return self._install(System())

    def close(self, fd: int) -> None:
        f = self._files.pop(fd, None)
        if f is None:
            raise fail(errno.EBADF)
        self._kvm.release(f)

    def ioctl(self, fd: int, request: int, arg: int) -> int:
        f = self._files.get(fd)
        if f is None:
            raise fail(errno.EBADF)
        return self._kvm.ioctl(f, request, arg)

    def _install(self, f: File) -> int:
        # Like the kernel: the lowest number not in use.
        fd = _FIRST_FD
        while fd in self._files:
            fd += 1
        self._files[fd] = f
        return fd
