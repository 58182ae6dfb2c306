"""KVM's TDX VM ioctls: KVM_MEMORY_ENCRYPT_OP on a TD (Linux 7.3 arch/x86/kvm/vmx/tdx.c).

tdx_vm_ioctl reads struct kvm_tdx_cmd, refuses a caller's hw_error, and
dispatches: KVM_TDX_CAPABILITIES here, KVM_TDX_INIT_VM in `td_init`,
KVM_TDX_FINALIZE_VM here.  Which of them write the command back, and when,
is the policy's.
"""

from __future__ import annotations

import errno
from dataclasses import replace

from kvmtdx import layout, uapi
from kvmtdx.model.policy import Policy
from kvmtdx.model.profiles import Host
from kvmtdx.sim import mutants
from kvmtdx.sim.mutants import Mutant
from kvmtdx.sim.state import KernelLog, KeyIds, Vm
from kvmtdx.sim.tables import CpuidTables, supported_attrs, supported_xfam
from kvmtdx.sim.td_init import TdInit
from kvmtdx.sim.tdx_module import TdxModule
from kvmtdx.sim.uaccess import copy_from_user, copy_to_user, fail
from kvmtdx.structs import Capabilities, TdxCmd


class Tdx:
    """KVM's TDX support on a host running `module`, under `policy` (and `bug`)."""

    def __init__(self, module: TdxModule, host: Host, policy: Policy, keys: KeyIds,
                 bug: Mutant | None, log: KernelLog) -> None:
        self.policy = policy
        self.keys = keys
        self.bug = bug
        conf = module.td_conf
        self.supported_attrs = supported_attrs(conf)
        self.supported_xfam = supported_xfam(conf, host)
        self.tables = CpuidTables(conf, policy, bug)
        self.nent = len(conf.cpuid_config)
        self.caps_bytes = layout.pack_capabilities(self._capabilities())
        self.td_init = TdInit(self.tables, self.supported_attrs, self.supported_xfam, host,
                              module, keys, bug, kills_vm=policy.module_error_kills_vm, log=log)

    def memory_encrypt_op(self, vm: Vm, arg: int) -> int:
        """tdx_vm_ioctl."""
        cmd = layout.unpack_cmd(copy_from_user(arg, layout.SIZEOF_TDX_CMD))
        # Userspace never sets hw_error; KVM refuses before anything else.
        if cmd.hw_error:
            raise fail(errno.EINVAL)
        if cmd.id == uapi.TdxCommand.KVM_TDX_CAPABILITIES:
            if vm.initialized and self.bug is mutants.CAPS_REFUSED_AFTER_INIT_VM:
                raise fail(errno.EINVAL)
            if not self.policy.caps_writes_cmd_back:
                return self._get_capabilities(cmd)
            try:
                self._get_capabilities(cmd)
                err = 0
            except OSError as e:
                err = e.errno or errno.EIO
            return _write_back(arg, cmd, err)
        if cmd.id == uapi.TdxCommand.KVM_TDX_INIT_VM:
            err, hw_error = self.td_init.run(vm, cmd)
            if hw_error != cmd.hw_error:
                cmd = TdxCmd(cmd.id, cmd.flags, cmd.data, hw_error)
            return _write_back(arg, cmd, err)
        if cmd.id == uapi.TdxCommand.KVM_TDX_FINALIZE_VM:
            return _write_back(arg, cmd, self._td_finalize(vm))
        # INIT_VCPU and GET_CPUID are vCPU ioctls; INIT_MEM_REGION needs a
        # vCPU; anything else is unknown: all refused without a write-back.
        raise fail(errno.EINVAL)

    def vm_destroy(self, vm: Vm) -> None:
        """The TD is gone (tdx_vm_destroy): its key ID goes back to the pool."""
        if vm.key_id is not None:
            self.keys.release(vm.key_id)
            vm.key_id = None

    # ------------------------------------------------------------------
    # KVM_TDX_CAPABILITIES

    def _capabilities(self, caller: Capabilities | None = None) -> Capabilities:
        """The answer; Linux 6.16 fills a copy of the caller's header, so whatever it
        does not set goes back as the caller sent it."""
        return replace(
            caller if caller is not None else Capabilities(),
            supported_attrs=self.supported_attrs,
            supported_xfam=self.supported_xfam,
            user_tdvmcallinfo_1_r11=self.policy.user_tdvmcallinfo_1_r11,
            nent=self.nent,
            entries=self.tables.caps_entries,
        )

    def _get_capabilities(self, cmd: TdxCmd) -> int:
        if cmd.flags and self.bug is not mutants.FLAGS_UNCHECKED:
            raise fail(errno.EINVAL)
        if self.policy.caps_echoes_caller:
            caller = layout.unpack_capabilities(
                copy_from_user(cmd.data, layout.SIZEOF_CAPS_HEADER))
            nent = caller.nent
        else:
            caller = None
            nent, _ = layout.unpack_cpuid2(
                copy_from_user(cmd.data + layout.OFFSET_CAPS_NENT, layout.SIZEOF_CPUID2))
        if nent < self.nent:
            if self.bug is mutants.E2BIG_WRITES_BUFFER:
                copy_to_user(cmd.data, self.caps_bytes[: layout.SIZEOF_CAPS_HEADER])
            raise fail(errno.E2BIG)
        if not self.supported_attrs or not self.supported_xfam:
            raise fail(errno.EIO)
        if caller is None or self.bug is mutants.CAPS_HEADER_NOT_ECHOED:
            copy_to_user(cmd.data, self.caps_bytes)
        else:
            copy_to_user(cmd.data, layout.pack_capabilities(self._capabilities(caller)))
        return 0

    # ------------------------------------------------------------------
    # KVM_TDX_FINALIZE_VM

    @staticmethod
    def _td_finalize(vm: Vm) -> int:
        # Before INIT_VM there is no key ID and nothing to finalise.  The
        # simulation's module finalises a TD that has no memory yet; a real
        # one may refuse, which is beyond what kvmtdx checks.
        if not vm.initialized or vm.finalized:
            return errno.EINVAL
        vm.finalized = True
        return 0


def _write_back(arg: int, cmd: TdxCmd, err: int) -> int:
    """Copy the command back to the caller, then return the ioctl's result."""
    copy_to_user(arg, layout.pack_cmd(cmd))
    if err:
        raise fail(err)
    return 0
