"""The simulated TDX host: /dev/kvm, VM file descriptors and a TDX module behind the seam.

`SimulatedHost` answers open/ioctl/close the way a Linux kernel of a given
policy, running a given TDX module on a given CPU, answers them.  It is
written as operational code in the kernel's own order (Linux 7.3
arch/x86/kvm/vmx/tdx.c and cpuid.c; the behaviour contract, sections 3 and 4),
reads and writes the caller's memory at the addresses it is handed, and keeps
per-VM state (initialised or not, the TDX key ID a TD holds).

It deliberately knows nothing of `kvmtdx.model.mirror`: the mirror predicts, this
module behaves, and the test suite holds each to the other.  Both start from
the same facts (module profile, host, policy, allowlist) and nothing more.

Seeded kernel bugs (`MUTANTS`) switch single decisions of this code so the
verifier can prove it catches them.
"""

from __future__ import annotations

import errno
import os
from dataclasses import dataclass, replace
from typing import Any

from kvmtdx import layout, uapi
from kvmtdx.model.policy import POLICY_NAMES, Policy
from kvmtdx.model.profiles import (
    BUNDLED_MODULES,
    Host,
    ModuleProfile,
    effective_xfam_fixed0,
    enumerated,
)
from kvmtdx.status import Operand, TdxStatus, operand_invalid, status_class
from kvmtdx.structs import (
    FLAG_SIGNIFICANT_INDEX,
    KVM_MAX_CPUID_ENTRIES,
    REGISTERS,
    Capabilities,
    CpuidEntry,
    TdxCmd,
)

# Seeded kernel bugs: name -> one line.  The bracket names the policies whose
# answers the bug changes; every mutant can be switched on under any policy.
MUTANTS: dict[str, str] = {
    "caps_allowlist_unapplied":
        "[rfc-v2] KVM_TDX_CAPABILITIES reports the module's masks without the allowlist filter",
    "init_vm_allowlist_unenforced":
        "[rfc-v2] capabilities are filtered but KVM_TDX_INIT_VM never checks the allowlist",
    "allowlist_skips_row_7_1":
        "[rfc-v2] the INIT_VM allowlist check skips the leaf 7.1 row",
    "allowlist_skips_7_0_edx":
        "[rfc-v2] the INIT_VM allowlist check skips register EDX of leaf 7.0",
    "value_registers_filtered":
        "[rfc-v2] value registers (leaf 1 EAX/EBX, 4, 0x18, 0x1F) are treated as features: "
        "zeroed in capabilities, refused in INIT_VM",
    "core_capabilities_forgotten":
        "[rfc-v2] the allowlist lacks CORE_CAPABILITIES (7.0 EDX bit 30): hidden and rejected",
    "denylist_hle_not_rtm":
        "[upstream, upstream-6.16] the TSX denylist covers HLE but forgets RTM",
    "subleaf_ffffffff_unmapped":
        "[all] rows without sub-leaves keep index 0xFFFFFFFF in capabilities and INIT_VM lookups",
    "gpaw_not_forced":
        "[all] capabilities leave CPUID 0x80000008 EAX[23:16] as the module lists it, not 0xff",
    "e2big_writes_buffer":
        "[all] CAPABILITIES answers E2BIG after writing a header with the needed nent",
    "flags_unchecked":
        "[all] kvm_tdx_cmd.flags is not checked by CAPABILITIES or INIT_VM",
    "reserved_unchecked":
        "[all] INIT_VM does not check that reserved[] is zero",
    "padding_unchecked":
        "[all] INIT_VM does not check that cpuid.padding is zero",
    "hw_error_not_copied":
        "[all] INIT_VM drops the TDX module status: -EINVAL with hw_error 0",
    "allowlist_reject_eio":
        "[rfc-v2] an allowlist rejection returns -EIO instead of -EINVAL",
    "key_id_leak_on_failure":
        "[all] a TD key ID is never freed when TDH.MNG.INIT fails",
    "denylist_checks_row_index":
        "[upstream, upstream-6.16] a fix: the denylist tests the row's leaf/index, not the "
        "matched entry's, closing the unflagged-entry bypass",
    "count_check_missing":
        "[all] INIT_VM does not require every entry to land on a module row (count != nent)",
    "nent_limit_off_by_one":
        "[all] INIT_VM refuses nent == 256 with E2BIG (>= instead of >)",
    "caps_header_not_echoed":
        "[upstream-6.16] capabilities zero the header words 6.16 echoes from the caller",
}



def choices() -> dict[str, Any]:
    """What `--simulate MODULE[:POLICY[:MUTANT]]` accepts (`--simulate list`)."""
    return {
        "modules": list(BUNDLED_MODULES),
        "policies": list(POLICY_NAMES),
        "mutants": [{"name": n, "description": d} for n, d in MUTANTS.items()],
    }


# Addresses the simulated kernel can reach: nothing in the first 64 KiB
# (mmap_min_addr), nothing above the x86-64 4-level user address space.
_LOWEST_USER_ADDRESS = 0x10000
_TASK_SIZE_MAX = 0x7FFFFFFFF000

# Bits the kernel names (Linux arch/x86/include/asm/cpufeatures.h, word.bit).
_HLE = 1 << 4  # 9*32+4, CPUID 7.0 EBX
_RTM = 1 << 11  # 9*32+11, CPUID 7.0 EBX
_WAITPKG = 1 << 5  # 16*32+5, CPUID 7.0 ECX
_PKS = 1 << 31  # 16*32+31, CPUID 7.0 ECX
_CORE_CAPABILITIES = 1 << 30  # 18*32+30, CPUID 7.0 EDX
_ATTR_PKS = 1 << 30  # TD ATTRIBUTES.PKS
_ATTR_SEPT_VE_DISABLE = 1 << 28  # what KVM 7.3 supports of TD attributes
_GPAW_FIELD = 0x00FF0000  # CPUID 0x80000008 EAX[23:16]
_GPAW_LEAF = 0x80000008
_NO_SUBLEAF = 0xFFFFFFFF
_API_VERSION = 12
_VM_TYPES = 1 << uapi.VmType.KVM_X86_DEFAULT_VM | 1 << uapi.VmType.KVM_X86_TDX_VM
_FIRST_FD = 3
_FIRST_KEY_ID = 32  # private HKIDs start above the host's shared ones


def _fail(code: int) -> OSError:
    return OSError(code, os.strerror(code))


def _copy_from_user(address: int, size: int) -> bytes:
    if address < _LOWEST_USER_ADDRESS or address + size > _TASK_SIZE_MAX:
        raise _fail(errno.EFAULT)
    return uapi.peek(address, size)


def _copy_to_user(address: int, data: bytes) -> None:
    if address < _LOWEST_USER_ADDRESS or address + len(data) > _TASK_SIZE_MAX:
        raise _fail(errno.EFAULT)
    uapi.poke(address, data)


class _System:
    """An open /dev/kvm."""


@dataclass
class _Vm:
    vm_type: int
    initialized: bool = False
    finalized: bool = False
    key_id: int | None = None


Regs = tuple[int, int, int, int]
_ZERO: Regs = (0, 0, 0, 0)


@dataclass(frozen=True, slots=True)
class _Row:
    """What the simulated kernel precomputes of one module row."""

    leaf: int
    index: int  # the index KVM looks the row up by
    # Upstream's TSX/WAITPKG denylist can fire on what this row matches.
    denylist: bool
    # INIT_VM allowlist (rfc-v2): bits the module lists that KVM does not allow.
    forbidden: Regs
    checks_allowlist: bool


class _Module:
    """The TDX module's TDH.MNG.INIT, on the TD_PARAMS KVM built.

    Row values arrive in the module's row order (zeros for rows KVM found no
    entry for), as TD_PARAMS.CPUID_VALUES carries them.
    """

    def __init__(self, profile: ModuleProfile, host: Host) -> None:
        self.profile = profile
        self.host = host
        self.xfam_fixed0 = effective_xfam_fixed0(profile, host)
        self.allows: tuple[Regs, ...] = tuple(r.module_allows() for r in profile.rows)
        self.leaf1 = profile.row_index(1, None)
        self.leaf7 = profile.row_index(7, 0)
        self.gates = tuple(
            (g.xfam, profile.row_index(g.leaf, g.subleaf), REGISTERS.index(g.register), g.mask)
            for g in profile.xfam_gates
        )
        self.fms = host.native_fms()

    def mng_init(self, attributes: int, xfam: int, values: list[Regs]) -> int:
        p = self.profile
        td_attributes = attributes | p.attributes_fixed1
        td_xfam = xfam | p.xfam_fixed1
        if td_attributes & ~p.attributes_fixed0:
            return operand_invalid(Operand.ATTRIBUTES)
        if td_xfam & ~self.xfam_fixed0:
            return operand_invalid(Operand.XFAM)
        for (a, b, c, d), (ma, mb, mc, md) in zip(values, self.allows, strict=True):
            if a & ~ma or b & ~mb or c & ~mc or d & ~md:
                return operand_invalid(Operand.CPUID_CONFIG)
        leaf1 = _ZERO if self.leaf1 is None else values[self.leaf1]
        leaf7 = _ZERO if self.leaf7 is None else values[self.leaf7]
        # CPUID(1).EAX: 0 asks for the native family/model/stepping.
        if leaf1[0] and leaf1[0] != self.fms:
            return operand_invalid(Operand.CPUID_CONFIG)
        if bool(leaf7[1] & _HLE) != bool(leaf7[1] & _RTM):
            return operand_invalid(Operand.CPUID_CONFIG)
        if bool(leaf7[2] & _PKS) != bool(td_attributes & _ATTR_PKS):
            return operand_invalid(Operand.CPUID_CONFIG)
        for gate_xfam, row, register, mask in self.gates:
            if td_xfam & gate_xfam != gate_xfam and row is not None and (
                    values[row][register] & mask):
                return operand_invalid(Operand.CPUID_CONFIG)
        if leaf7[1] & _HLE and not self.host.tsx_ctrl:
            return int(TdxStatus.TDX_INCORRECT_MSR_VALUE)
        # An allow_direct bit the CPU lacks is dropped silently, not refused.
        return 0


class SimulatedHost:
    """A syscall seam answering as `policy`'s kernel with `module` on `host` would.

    `key_ids` is the number of TDX private key IDs; each initialised TD holds
    one until its VM fd is closed, so the (key_ids + 1)-th live TD gets ENOSPC.
    """

    def __init__(self, module: ModuleProfile, host: Host, policy: Policy,
                 mutant: str | None = None, key_ids: int = 16) -> None:
        if mutant is not None and mutant not in MUTANTS:
            raise ValueError(f"unknown mutant {mutant!r}")
        if key_ids < 0:
            raise ValueError("key_ids must not be negative")
        self.module = module
        self.host = host
        self.policy = policy
        self.mutant = mutant
        self.key_ids = key_ids
        self._files: dict[int, _System | _Vm] = {}
        self._free_keys: list[int] = list(range(_FIRST_KEY_ID, _FIRST_KEY_ID + key_ids))
        self._tdx_module = _Module(module, host)
        self._n = len(module.rows)
        self._supported_attrs = self._get_supported_attrs()
        self._supported_xfam = self._get_supported_xfam()
        self._caps_entries = tuple(self._caps_entry(i) for i in range(self._n))
        self._rows = self._init_vm_rows()
        rows_of: dict[int, list[tuple[int, int]]] = {}
        for k, row in enumerate(self._rows):
            rows_of.setdefault(row.leaf, []).append((k, row.index))
        self._rows_of_function = {f: tuple(v) for f, v in rows_of.items()}
        self._allowlist_errno = errno.EIO if mutant == "allowlist_reject_eio" else errno.EINVAL
        self._caps_bytes = layout.pack_capabilities(Capabilities(
            supported_attrs=self._supported_attrs,
            supported_xfam=self._supported_xfam,
            user_tdvmcallinfo_1_r11=policy.user_tdvmcallinfo_1_r11,
            nent=self._n,
            entries=self._caps_entries,
        ))
        self._supported_cpuid = self._host_cpuid()

    # ------------------------------------------------------------------
    # What tests look at.

    @property
    def open_fds(self) -> tuple[int, ...]:
        return tuple(sorted(self._files))

    @property
    def live_tds(self) -> int:
        """Open VM fds of type KVM_X86_TDX_VM."""
        return sum(
            1 for f in self._files.values()
            if isinstance(f, _Vm) and f.vm_type == uapi.VmType.KVM_X86_TDX_VM
        )

    @property
    def free_key_ids(self) -> int:
        return len(self._free_keys)

    # ------------------------------------------------------------------
    # The seam.

    def open(self, path: str, flags: int) -> int:
        if path != "/dev/kvm":
            raise OSError(errno.ENOENT, os.strerror(errno.ENOENT), path)
        return self._install(_System())

    def close(self, fd: int) -> None:
        f = self._files.pop(fd, None)
        if f is None:
            raise _fail(errno.EBADF)
        if isinstance(f, _Vm) and f.key_id is not None:
            self._release_key(f.key_id)
            f.key_id = None

    def ioctl(self, fd: int, request: int, arg: int) -> int:
        f = self._files.get(fd)
        if f is None:
            raise _fail(errno.EBADF)
        if isinstance(f, _System):
            return self._system_ioctl(request, arg)
        return self._vm_ioctl(f, request, arg)

    def _install(self, f: _System | _Vm) -> int:
        # Like the kernel: the lowest number not in use.
        fd = _FIRST_FD
        while fd in self._files:
            fd += 1
        self._files[fd] = f
        return fd

    # ------------------------------------------------------------------
    # /dev/kvm

    def _system_ioctl(self, request: int, arg: int) -> int:
        if request == uapi.Ioctl.KVM_GET_API_VERSION:
            if arg:
                raise _fail(errno.EINVAL)
            return _API_VERSION
        if request == uapi.Ioctl.KVM_CHECK_EXTENSION:
            return self._check_extension(arg)
        if request == uapi.Ioctl.KVM_CREATE_VM:
            if arg not in (uapi.VmType.KVM_X86_DEFAULT_VM, uapi.VmType.KVM_X86_TDX_VM):
                raise _fail(errno.EINVAL)
            return self._install(_Vm(vm_type=arg))
        if request == uapi.Ioctl.KVM_GET_SUPPORTED_CPUID:
            return self._get_supported_cpuid(arg)
        raise _fail(errno.ENOTTY)

    @staticmethod
    def _check_extension(cap: int) -> int:
        return _VM_TYPES if cap == uapi.KVM_CAP_VM_TYPES else 0

    def _host_cpuid(self) -> tuple[CpuidEntry, ...]:
        """What KVM_GET_SUPPORTED_CPUID lists: the host's leaves (the module's, for 'max')."""
        if self.host.native:
            keys = sorted(self.host.native, key=lambda k: (k[0], -1 if k[1] is None else k[1]))
        else:
            keys = sorted({(r.leaf, r.subleaf) for r in self.module.rows},
                          key=lambda k: (k[0], -1 if k[1] is None else k[1]))
        out = []
        for leaf, sub in keys:
            a, b, c, d = self.host.native_regs(leaf, sub)
            out.append(CpuidEntry(
                function=leaf, index=0 if sub is None else sub,
                flags=0 if sub is None else FLAG_SIGNIFICANT_INDEX,
                eax=a, ebx=b, ecx=c, edx=d,
            ))
        return tuple(out)

    def _get_supported_cpuid(self, arg: int) -> int:
        # Linux cpuid.c: the header is read, a too small nent is E2BIG with
        # nothing written back; nent is clamped to KVM_MAX_CPUID_ENTRIES.
        nent, _ = layout.unpack_cpuid2(_copy_from_user(arg, layout.SIZEOF_CPUID2))
        if nent < 1:
            raise _fail(errno.E2BIG)
        room = min(nent, KVM_MAX_CPUID_ENTRIES)
        entries = self._supported_cpuid
        if len(entries) > room:
            raise _fail(errno.E2BIG)
        packed = layout.pack_cpuid2(entries)
        _copy_to_user(arg + layout.SIZEOF_CPUID2, packed[layout.SIZEOF_CPUID2:])
        # The header goes back with the caller's own padding: only nent changes.
        _copy_to_user(arg, packed[: layout.OFFSET_CPUID2_PADDING])
        return 0

    # ------------------------------------------------------------------
    # VM fds

    def _vm_ioctl(self, vm: _Vm, request: int, arg: int) -> int:
        if request == uapi.Ioctl.KVM_CHECK_EXTENSION:
            return self._check_extension(arg)
        if request != uapi.Ioctl.KVM_MEMORY_ENCRYPT_OP or vm.vm_type != uapi.VmType.KVM_X86_TDX_VM:
            raise _fail(errno.ENOTTY)
        cmd = layout.unpack_cmd(_copy_from_user(arg, layout.SIZEOF_TDX_CMD))
        # Userspace never sets hw_error; KVM refuses before anything else.
        if cmd.hw_error:
            raise _fail(errno.EINVAL)
        if cmd.id == uapi.TdxCommand.KVM_TDX_CAPABILITIES:
            if not self.policy.caps_writes_cmd_back:
                return self._get_capabilities(cmd)
            try:
                self._get_capabilities(cmd)
                err = 0
            except OSError as e:
                err = e.errno or errno.EIO
            return self._write_back(arg, cmd, err)
        if cmd.id == uapi.TdxCommand.KVM_TDX_INIT_VM:
            err, hw_error = self._td_init(vm, cmd)
            back = cmd if hw_error == cmd.hw_error else TdxCmd(cmd.id, cmd.flags, cmd.data,
                                                                hw_error)
            return self._write_back(arg, back, err)
        if cmd.id == uapi.TdxCommand.KVM_TDX_FINALIZE_VM:
            return self._write_back(arg, cmd, self._td_finalize(vm))
        # INIT_VCPU and GET_CPUID are vCPU ioctls; INIT_MEM_REGION needs a
        # vCPU; anything else is unknown: all refused without a write-back.
        raise _fail(errno.EINVAL)

    @staticmethod
    def _write_back(arg: int, cmd: TdxCmd, err: int) -> int:
        _copy_to_user(arg, layout.pack_cmd(cmd))
        if err:
            raise _fail(err)
        return 0

    # ------------------------------------------------------------------
    # KVM_TDX_CAPABILITIES

    def _get_supported_attrs(self) -> int:
        fixed1 = self.module.attributes_fixed1
        if _ATTR_SEPT_VE_DISABLE & fixed1 != fixed1:
            return 0
        return _ATTR_SEPT_VE_DISABLE & self.module.attributes_fixed0

    def _get_supported_xfam(self) -> int:
        supported = self.host.xfam_supported
        fixed1 = self.module.xfam_fixed1
        if supported & fixed1 != fixed1:
            return 0
        return supported & effective_xfam_fixed0(self.module, self.host)

    def _row_index(self, i: int) -> int:
        row = self.module.rows[i]
        if row.subleaf is None and self.mutant == "subleaf_ffffffff_unmapped":
            return _NO_SUBLEAF
        return row.kvm_index

    def _allowed(self, leaf: int, index: int, register: str) -> int:
        """The allowlist's mask as this kernel (or its bug) has it."""
        allowlist = self.policy.allowlist
        assert allowlist is not None
        if self.mutant == "value_registers_filtered":
            mask = allowlist.allowed.get((leaf, index, register), 0)
        else:
            mask = allowlist.mask(leaf, index, register)
        if self.mutant == "core_capabilities_forgotten" and (leaf, index, register) == (
                7, 0, "edx"):
            mask &= ~_CORE_CAPABILITIES
        return mask

    def _caps_entry(self, i: int) -> CpuidEntry:
        row = self.module.rows[i]
        a, b, c, d = enumerated(self.module, self.host)[i]
        index = self._row_index(i)
        if row.leaf == _GPAW_LEAF and self.mutant != "gpaw_not_forced":
            a |= _GPAW_FIELD  # KVM's knob for the guest physical address width
        if self.policy.denylist is not None and row.leaf == 7 and index == 0:
            b &= ~(_HLE if self.mutant == "denylist_hle_not_rtm" else _HLE | _RTM)
            c &= ~_WAITPKG
        if self.policy.allowlist is not None and self.mutant != "caps_allowlist_unapplied":
            gpaw = a & _GPAW_FIELD if row.leaf == _GPAW_LEAF else 0
            a, b, c, d = (v & self._allowed(row.leaf, row.kvm_index, r)
                          for v, r in zip((a, b, c, d), REGISTERS, strict=True))
            a |= gpaw
        return CpuidEntry(function=row.leaf, index=index, eax=a, ebx=b, ecx=c, edx=d)

    def _get_capabilities(self, cmd: TdxCmd) -> int:
        if cmd.flags and self.mutant != "flags_unchecked":
            raise _fail(errno.EINVAL)
        if self.policy.caps_echoes_caller:
            caller = layout.unpack_capabilities(
                _copy_from_user(cmd.data, layout.SIZEOF_CAPS_HEADER))
            nent = caller.nent
        else:
            caller = None
            nent, _ = layout.unpack_cpuid2(
                _copy_from_user(cmd.data + layout.OFFSET_CAPS_NENT, layout.SIZEOF_CPUID2))
        if nent < self._n:
            if self.mutant == "e2big_writes_buffer":
                _copy_to_user(cmd.data, self._caps_bytes[: layout.SIZEOF_CAPS_HEADER])
            raise _fail(errno.E2BIG)
        if not self._supported_attrs or not self._supported_xfam:
            raise _fail(errno.EIO)
        if caller is None or self.mutant == "caps_header_not_echoed":
            _copy_to_user(cmd.data, self._caps_bytes)
            return 0
        # Linux 6.16 filled a copy of the caller's header: whatever it does
        # not set goes back as the caller sent it.
        answer = replace(
            caller,
            supported_attrs=self._supported_attrs,
            supported_xfam=self._supported_xfam,
            user_tdvmcallinfo_1_r11=self.policy.user_tdvmcallinfo_1_r11,
            nent=self._n,
            entries=self._caps_entries,
        )
        _copy_to_user(cmd.data, layout.pack_capabilities(answer))
        return 0

    # ------------------------------------------------------------------
    # KVM_TDX_INIT_VM

    def _init_vm_rows(self) -> tuple[_Row, ...]:
        listed = enumerated(self.module, self.host)
        rows = []
        for i, row in enumerate(self.module.rows):
            forbidden = _ZERO
            checks = self.policy.allowlist is not None and self._checks_row(row.leaf,
                                                                             row.kvm_index)
            if checks:
                regs = []
                for r, v in zip(REGISTERS, listed[i], strict=True):
                    bad = v & ~self._allowed(row.leaf, row.kvm_index, r)
                    if row.leaf == _GPAW_LEAF and r == "eax":
                        bad &= ~_GPAW_FIELD  # GPAW has its own rule
                    if self.mutant == "allowlist_skips_7_0_edx" and (
                            row.leaf, row.kvm_index, r) == (7, 0, "edx"):
                        bad = 0
                    regs.append(bad)
                forbidden = (regs[0], regs[1], regs[2], regs[3])
            # find() only returns entries of the row's own function, so the
            # denylist (leaf 7 index 0 of the matched entry) can only fire on leaf 7 rows.
            rows.append(_Row(leaf=row.leaf, index=self._row_index(i),
                             denylist=self.policy.denylist is not None and row.leaf == 7,
                             forbidden=forbidden, checks_allowlist=checks))
        return tuple(rows)

    def _checks_row(self, leaf: int, index: int) -> bool:
        if self.mutant == "init_vm_allowlist_unenforced":
            return False
        return not (self.mutant == "allowlist_skips_row_7_1" and (leaf, index) == (7, 1))

    def _td_init(self, vm: _Vm, cmd: TdxCmd) -> tuple[int, int]:
        """(errno, hw_error) of one KVM_TDX_INIT_VM, in the kernel's order."""
        if vm.initialized:
            return errno.EINVAL, 0
        if cmd.flags and self.mutant != "flags_unchecked":
            return errno.EINVAL, 0
        try:
            nent, _ = layout.unpack_cpuid2(
                _copy_from_user(cmd.data + layout.OFFSET_INIT_VM_NENT, layout.SIZEOF_CPUID2))
        except OSError:
            return errno.EFAULT, 0
        limit = KVM_MAX_CPUID_ENTRIES - (self.mutant == "nent_limit_off_by_one")
        if nent > limit:
            return errno.E2BIG, 0
        try:
            init_vm = layout.unpack_init_vm(_copy_from_user(cmd.data, layout.init_vm_size(nent)))
        except OSError:
            return errno.EFAULT, 0
        if any(init_vm.reserved) and self.mutant != "reserved_unchecked":
            return errno.EINVAL, 0
        if init_vm.cpuid_padding and self.mutant != "padding_unchecked":
            return errno.EINVAL, 0
        # (No vCPUs are ever created on a simulated TD, so no -EBUSY.)
        if init_vm.attributes & ~self._supported_attrs:
            return errno.EINVAL, 0
        if init_vm.xfam & ~self._supported_xfam:
            return errno.EINVAL, 0
        # KVM's kvm_find_cpuid_entry2 for the GPAW lookup and for every row: the
        # first entry in array order whose function matches and that either lacks
        # the significant-index flag or has the index.  One pass over the array
        # gives every row its first match.
        matched: list[CpuidEntry | None] = [None] * self._n
        gpaw_entry: CpuidEntry | None = None
        rows_of = self._rows_of_function
        for entry in init_vm.entries:
            loose = not entry.flags & FLAG_SIGNIFICANT_INDEX
            if gpaw_entry is None and entry.function == _GPAW_LEAF and (
                    loose or entry.index == 0):
                gpaw_entry = entry
            for k, index in rows_of.get(entry.function, ()):
                if matched[k] is None and (loose or entry.index == index):
                    matched[k] = entry
        if gpaw_entry is None:
            return errno.EINVAL, 0
        gpaw = (gpaw_entry.eax & _GPAW_FIELD) >> 16
        if gpaw not in (48, 52) or (gpaw == 52 and not self.host.ept_5level):
            return errno.EINVAL, 0

        values: list[Regs] = []
        count = 0
        for row, e in zip(self._rows, matched, strict=True):
            if e is None:
                values.append(_ZERO)
                continue
            a, b, c, d = e.eax, e.ebx, e.ecx, e.edx
            if row.denylist and self._denied(row, e):
                return errno.EINVAL, 0
            if row.checks_allowlist:
                fa, fb, fc, fd = row.forbidden
                if a & fa or b & fb or c & fc or d & fd:
                    return self._allowlist_errno, 0
            count += 1
            if row.leaf == _GPAW_LEAF:
                a &= ~_GPAW_FIELD  # the module refuses a GPAW here; KVM passed it separately
            values.append((a, b, c, d))
        if count != nent and self.mutant != "count_check_missing":
            return errno.EINVAL, 0

        # __tdx_td_init: the TD takes a private key ID before the module sees it.
        if not self._free_keys:
            return errno.ENOSPC, 0
        vm.key_id = self._free_keys.pop(0)
        status = self._tdx_module.mng_init(init_vm.attributes, init_vm.xfam, values)
        if status:
            if self.mutant != "key_id_leak_on_failure":
                self._release_key(vm.key_id)
            vm.key_id = None
            if status_class(status) == TdxStatus.TDX_OPERAND_INVALID:
                return errno.EINVAL, 0 if self.mutant == "hw_error_not_copied" else status
            return errno.EIO, 0
        vm.initialized = True
        return 0, 0

    def _denied(self, row: _Row, e: CpuidEntry) -> bool:
        """Upstream's TSX/WAITPKG denylist, on the matched entry (its own leaf and index)."""
        index = row.index if self.mutant == "denylist_checks_row_index" else e.index
        if e.function != 7 or index != 0:
            return False
        tsx = _HLE if self.mutant == "denylist_hle_not_rtm" else _HLE | _RTM
        return bool(e.ebx & tsx or e.ecx & _WAITPKG)

    def _td_finalize(self, vm: _Vm) -> int:
        # Before INIT_VM there is no key ID and nothing to finalise.  The
        # simulation's module finalises a TD that has no memory yet; a real
        # one may refuse, which is beyond what kvmtdx checks.
        if not vm.initialized or vm.finalized:
            return errno.EINVAL
        vm.finalized = True
        return 0

    def _release_key(self, key_id: int) -> None:
        self._free_keys.append(key_id)
        self._free_keys.sort()
