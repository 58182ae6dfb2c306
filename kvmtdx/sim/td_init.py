"""KVM_TDX_INIT_VM in the kernel's order (Linux 7.3 arch/x86/kvm/vmx/tdx.c).

One method per step of the kernel: tdx_td_init copies the request in and
checks its header, setup_tdparams checks attributes and XFAM, the GPAW
(setup_tdparams_eptp_controls) and every module row's entry
(setup_tdparams_cpuids: the lookup, the denylist or allowlist, the count),
then __tdx_td_init takes a key ID, calls TDH.MNG.INIT and maps its status.
A refusing step raises the errno as OSError, as the kernel returns -errno.
"""

from __future__ import annotations

import errno

from kvmtdx import layout
from kvmtdx.model.profiles import Host
from kvmtdx.sim import mutants
from kvmtdx.sim.facts import GPAW_FIELD, GPAW_LEAF, GPAW_SHIFT, WAITPKG, ZERO, Regs
from kvmtdx.sim.mutants import Mutant
from kvmtdx.sim.state import KernelLog, KeyIds, Vm
from kvmtdx.sim.tables import CpuidTables, Row
from kvmtdx.sim.tdx_module import TdParams, TdxModule
from kvmtdx.sim.uaccess import copy_from_user, fail
from kvmtdx.status import TdxStatus, status_class
from kvmtdx.structs import FLAG_SIGNIFICANT_INDEX, KVM_MAX_CPUID_ENTRIES, CpuidEntry, InitVm, TdxCmd

_GPAW_VALUES = (48, 52)
# TD_PARAMS words KVM 7.3 sets (setup_tdparams): NO_RBP_MOD always, MAX_GPAW for GPAW 52;
# EPTP memory type WB with a 4- or 5-level walk.
_NO_RBP_MOD, _MAX_GPAW = 1 << 2, 1 << 0
_EPTP_WB, _PWL_4, _PWL_5 = 6, 3, 4
_KVM_MAX_VCPUS = 1024  # x86-64 KVM_MAX_VCPUS without CONFIG_MAXSMP
_DEFAULT_TSC_KHZ = 2_100_000
_LOW_32 = 0xFFFFFFFF
_ALL_64 = 0xFFFFFFFFFFFFFFFF


class TdInit:
    """KVM_TDX_INIT_VM on a TD of this host."""

    def __init__(self, tables: CpuidTables, supported_attrs: int, supported_xfam: int,
                 host: Host, module: TdxModule, keys: KeyIds, bug: Mutant | None, *,
                 kills_vm: bool, log: KernelLog) -> None:
        self.tables = tables
        self.log = log
        # The bits of attributes and XFAM KVM holds against what it supports (all 64).
        self.attributes_checked = _LOW_32 if bug is mutants.ATTRIBUTES_CHECKED_32_BITS else _ALL_64
        self.xfam_checked = _LOW_32 if bug is mutants.XFAM_CHECKED_32_BITS else _ALL_64
        self.supported_attrs = supported_attrs
        self.supported_xfam = supported_xfam
        self.host = host
        self.module = module
        self.keys = keys
        self.bug = bug
        # Linux 6.19 on: TDX_BUG_ON_1 marks the VM bugged on a module error.
        self.kills_vm = kills_vm
        self.nent_limit = KVM_MAX_CPUID_ENTRIES - (bug is mutants.NENT_LIMIT_OFF_BY_ONE)
        self.allowlist_errno = errno.EIO if bug is mutants.ALLOWLIST_REJECT_EIO else errno.EINVAL
        # kvm->max_vcpus and default_tsc_khz, fixed for the host: worked out once.
        self.max_vcpus = min(_KVM_MAX_VCPUS, _present_cpus(host))
        self.tsc_frequency = _tsc_khz(host) // 25000

    def run(self, vm: Vm, cmd: TdxCmd) -> tuple[int, int]:
        """(errno, hw_error) of one KVM_TDX_INIT_VM (tdx_td_init).

        Only success initialises the TD; a refusal leaves it as it was, so it may take
        another INIT_VM (the TDX module's refusal has given its key ID back by then).
        """
        late_state_check = self.bug is mutants.TD_STATE_CHECKED_AFTER_COPY
        if vm.initialized and not late_state_check:
            return errno.EINVAL, 0
        if cmd.flags and self.bug is not mutants.FLAGS_UNCHECKED:
            return errno.EINVAL, 0
        try:
            init_vm = self._copy_init_vm(cmd.data)
            if vm.initialized:
                raise fail(errno.EINVAL)
            if self.bug is mutants.TD_STATE_SET_BEFORE_CHECKS:
                vm.initialized = True
            # (No vCPUs are ever created on a simulated TD, so no -EBUSY.)
            values, gpaw = self._setup_tdparams(init_vm)
        except OSError as e:
            return e.errno or errno.EIO, 0
        return self._tdx_td_init(vm, self._td_params(init_vm, values, gpaw))

    # ------------------------------------------------------------------
    # tdx_td_init: the request comes in.

    def _copy_init_vm(self, address: int) -> InitVm:
        """The request, read in two steps: cpuid.nent first, then the whole array."""
        nent, _ = layout.unpack_cpuid2(
            copy_from_user(address + layout.OFFSET_INIT_VM_NENT, layout.SIZEOF_CPUID2))
        signed = nent - (1 << 32) if nent >> 31 else nent
        if (signed if self.bug is mutants.NENT_SIGNED_COMPARE else nent) > self.nent_limit:
            raise fail(errno.E2BIG)
        if nent > KVM_MAX_CPUID_ENTRIES:
            raise fail(errno.ENOMEM)  # memdup_user cannot allocate gigabytes
        init_vm = layout.unpack_init_vm(copy_from_user(address, layout.init_vm_size(nent)))
        if self._reserved_set(init_vm) and self.bug is not mutants.RESERVED_UNCHECKED:
            raise fail(errno.EINVAL)
        if init_vm.cpuid_padding and self.bug is not mutants.PADDING_UNCHECKED:
            raise fail(errno.EINVAL)
        return init_vm

    def _reserved_set(self, init_vm: InitVm) -> bool:
        """memchr_inv over reserved[] (or over what a bug reads as reserved)."""
        words = init_vm.reserved
        if self.bug is mutants.RESERVED_LOW_HALVES_ONLY:
            words = tuple(w & _LOW_32 for w in words)
        if self.bug is mutants.RESERVED_CHECK_COVERS_MROWNERCONFIG:
            words += init_vm.mrownerconfig
        return any(words)

    # ------------------------------------------------------------------
    # setup_tdparams: what KVM itself refuses.

    def _setup_tdparams(self, init_vm: InitVm) -> tuple[list[Regs], int]:
        """The TD_PARAMS.CPUID_VALUES KVM builds and the GPAW, once attributes, XFAM and
        CPUID pass."""
        if init_vm.attributes & self.attributes_checked & ~self.supported_attrs:
            raise fail(errno.EINVAL)
        if init_vm.xfam & self.xfam_checked & ~self.supported_xfam:
            raise fail(errno.EINVAL)
        gpaw_entry, matched = self._find_entries(init_vm.entries)
        gpaw = self._setup_eptp_controls(gpaw_entry)
        values, count = self._setup_cpuids(matched)
        if count != init_vm.effective_nent and self.bug is not mutants.COUNT_CHECK_MISSING:
            raise fail(errno.EINVAL)  # an entry that landed on no module row
        return values, gpaw

    def _find_entries(self, entries: tuple[CpuidEntry, ...]
                      ) -> tuple[CpuidEntry | None, list[CpuidEntry | None]]:
        """kvm_find_cpuid_entry2 for the GPAW lookup and for every module row.

        The first entry in array order whose function matches and that either
        lacks the significant-index flag or has the index.  One pass over the
        array gives every row its first match.
        """
        matched: list[CpuidEntry | None] = [None] * len(self.tables.rows)
        gpaw_entry: CpuidEntry | None = None
        rows_of = self.tables.rows_of_function
        for entry in entries:
            loose = self._loose(entry)
            if gpaw_entry is None and entry.function == GPAW_LEAF and (
                    loose or entry.index == 0):
                gpaw_entry = entry
            for k, index in rows_of.get(entry.function, ()):
                if matched[k] is None and (loose or entry.index == index):
                    matched[k] = entry
        if self.bug is mutants.LOOKUP_RESUMES_AFTER_FLAGGED_MATCH:
            matched = self._find_resuming(entries)
        return gpaw_entry, matched

    def _loose(self, entry: CpuidEntry) -> bool:
        """Whether the lookup ignores the entry's index (no significant-index flag)."""
        if self.bug is mutants.FLAGS_COMPARED_WHOLE:
            return entry.flags != FLAG_SIGNIFICANT_INDEX
        return not entry.flags & FLAG_SIGNIFICANT_INDEX

    def _find_resuming(self, entries: tuple[CpuidEntry, ...]) -> list[CpuidEntry | None]:
        """A bug's lookup: row by row, a flagged entry before the leaf's last flagged
        match is never looked at again."""
        matched: list[CpuidEntry | None] = []
        resume: dict[int, int] = {}
        for row in self.tables.rows:
            found: CpuidEntry | None = None
            for pos, e in enumerate(entries):
                if e.function != row.leaf:
                    continue
                if self._loose(e):
                    found = e
                    break
                if pos > resume.get(row.leaf, -1) and e.index == row.index:
                    found, resume[row.leaf] = e, pos
                    break
            matched.append(found)
        return matched

    def _setup_eptp_controls(self, gpaw_entry: CpuidEntry | None) -> int:
        """The guest physical address width: 48, or 52 with 5-level EPT."""
        if gpaw_entry is None:
            raise fail(errno.EINVAL)
        gpaw = (gpaw_entry.eax & GPAW_FIELD) >> GPAW_SHIFT
        valid = 48 <= gpaw <= 52 if self.bug is mutants.GPAW_RANGE_CHECK else (
            gpaw in _GPAW_VALUES)
        if not valid or (gpaw == 52 and not self.host.ept_5level):
            raise fail(errno.EINVAL)
        return gpaw

    def _setup_cpuids(self, matched: list[CpuidEntry | None]) -> tuple[list[Regs], int]:
        """Each row's values from its matched entry (zeros without one), and how many matched."""
        values: list[Regs] = []
        count = 0
        for row, e in zip(self.tables.rows, matched, strict=True):
            if e is None:
                values.append(ZERO)
                continue
            self._check_entry(row, e)
            a, b, c, d = e.eax, e.ebx, e.ecx, e.edx
            count += 1
            if row.leaf == GPAW_LEAF:
                a &= ~GPAW_FIELD  # the module refuses a GPAW here; KVM passed it separately
            values.append((a, b, c, d))
        return values, count

    def _check_entry(self, row: Row, e: CpuidEntry) -> None:
        """KVM's refusals of the entry the lookup matched to `row`: the denylist or the
        allowlist (and what the bugs add)."""
        steered = self._loose(e) and e.index != row.index
        if self.bug is mutants.NO_SUBLEAF_INDEX_CHECKED and not row.subleaves and e.index:
            raise fail(errno.EINVAL)
        if self.bug is mutants.STEERED_ENTRY_REFUSED and steered and len(
                self.tables.rows_of_function[row.leaf]) > 1:
            raise fail(errno.EINVAL)
        if row.denylist and self._denied(row, e):
            raise fail(errno.EINVAL)
        if row.checks_allowlist:
            fa, fb, fc, fd = row.forbidden
            if self.bug is mutants.ALLOWLIST_STEERED_BY_ENTRY_INDEX and steered and (
                    row.leaf, row.index) != (7, 0):
                fa, fb, fc, fd = self.tables.forbidden_at.get((e.function, e.index), ZERO)
            if e.eax & fa or e.ebx & fb or e.ecx & fc or e.edx & fd:
                raise fail(self.allowlist_errno)

    def _denied(self, row: Row, e: CpuidEntry) -> bool:
        """Upstream's TSX/WAITPKG denylist, on the matched entry (its own leaf and index)."""
        index = row.index if self.bug is mutants.DENYLIST_CHECKS_ROW_INDEX else e.index
        if e.function != 7 or index != 0:
            return False
        return bool(e.ebx & self.tables.tsx or e.ecx & WAITPKG)

    # ------------------------------------------------------------------
    # __tdx_td_init: a key ID, then the TDX module.

    def _td_params(self, init_vm: InitVm, values: list[Regs], gpaw: int) -> TdParams:
        """TD_PARAMS as setup_tdparams fills them: the fixed-1 attributes and XFAM bits
        ORed in, the vCPU limit and TSC of this host, EPTP and CONFIG_FLAGS from the GPAW."""
        conf = self.module.td_conf
        wide = gpaw == 52
        return TdParams(
            attributes=init_vm.attributes | conf.attributes_fixed1,
            xfam=init_vm.xfam | conf.xfam_fixed1, cpuid_values=tuple(values),
            max_vcpus=self.max_vcpus,
            config_flags=_NO_RBP_MOD | (_MAX_GPAW if wide else 0),
            eptp_controls=_EPTP_WB | (_PWL_5 if wide else _PWL_4) << 3,
            tsc_frequency=self.tsc_frequency)

    def _tdx_td_init(self, vm: Vm, params: TdParams) -> tuple[int, int]:
        # The TD takes a private key ID before the module sees it (a bug's TD may
        # still hold the one an earlier, refused INIT_VM took).
        key_id = vm.key_id if vm.key_id is not None else self.keys.alloc()
        if key_id is None:
            vm.initialized = False
            return errno.ENOSPC, 0
        vm.key_id = key_id
        result = self.module.mng_init(params)
        if result.status:
            # Both failure paths tear the TD down (tdx_mmu_release_hkid): the key ID is freed.
            self._teardown(vm, key_id)
            return self._map_status(vm, result.status, result.rcx)
        vm.initialized = True
        vm.mng_init = result
        return 0, 0

    def _teardown(self, vm: Vm, key_id: int) -> None:
        """tdx_mmu_release_hkid and tdx_reclaim_td_control_pages: the key ID goes back
        at once, and the TD is as uninitialised as before."""
        vm.initialized = self.bug is mutants.MODULE_REFUSAL_LEAVES_TD_INITIALIZED
        if self.bug is mutants.KEY_ID_HELD_AFTER_REFUSAL:
            return  # vm_destroy frees it
        if self.bug is not mutants.KEY_ID_LEAK_ON_FAILURE:
            self.keys.release(key_id)
        vm.key_id = None

    def _map_status(self, vm: Vm, status: int, rcx: int) -> tuple[int, int]:
        """(errno, hw_error) of a failed TDH.MNG.INIT (__tdx_td_init).

        TDX_OPERAND_INVALID is the caller's: -EINVAL and the status in hw_error.  Anything
        else is TDX_BUG_ON_1: a WARN, the error logged, the VM dead (Linux 6.19 on), -EIO
        and hw_error left as the caller passed it (0)."""
        if self.bug is mutants.MODULE_STATUS_ALWAYS_EINVAL:
            return errno.EINVAL, status
        if status_class(status) == TdxStatus.TDX_OPERAND_INVALID:
            return errno.EINVAL, 0 if self.bug is mutants.HW_ERROR_NOT_COPIED else status
        self.log.tdx_bug_on("TDH_MNG_INIT", status, rcx, vm, self.kills_vm)
        return errno.EIO, 0


def _present_cpus(host: Host) -> int:
    """num_present_cpus(): the logical processors the host's CPUID 0x1F levels count."""
    counts = [host.cpuid(0x1F, s)[1] & 0xFFFF for s in range(6)
              if host.cpuid(0x1F, s)[2] >> 8 & 0xFF]
    return max([1, *counts])


def _tsc_khz(host: Host) -> int:
    """The host's TSC in kHz (KVM's default_tsc_khz), from CPUID 0x15's crystal and ratio."""
    den, num, crystal, _ = host.cpuid(0x15, None)
    return crystal * num // den // 1000 if den and num and crystal else _DEFAULT_TSC_KHZ
