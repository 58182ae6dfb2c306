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
from dataclasses import dataclass
from typing import cast

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
from kvmtdx.structs import FLAG_SIGNIFICANT_INDEX, KVM_MAX_CPUID_ENTRIES, TdxCmd

_GPAW_VALUES = (48, 52)
# TD_PARAMS words KVM 7.3 sets (setup_tdparams): NO_RBP_MOD always, MAX_GPAW for GPAW 52;
# EPTP memory type WB with a 4- or 5-level walk.
_NO_RBP_MOD, _MAX_GPAW = 1 << 2, 1 << 0
_EPTP_WB, _PWL_4, _PWL_5 = 6, 3, 4
_KVM_MAX_VCPUS = 1024  # x86-64 KVM_MAX_VCPUS without CONFIG_MAXSMP
_DEFAULT_TSC_KHZ = 2_100_000
_LOW_32 = 0xFFFFFFFF
_ALL_64 = 0xFFFFFFFFFFFFFFFF

# Bugs that refuse a matched entry for more than its bits.
_ENTRY_BUGS = (mutants.NO_SUBLEAF_INDEX_CHECKED, mutants.STEERED_ENTRY_REFUSED)

# One struct kvm_cpuid_entry2 as the kernel copied it in: its words, in the struct's order
# (layout.entry_words), read by position.
Entry = tuple[int, ...]
FUNCTION, INDEX, FLAGS, EAX, EBX, ECX, EDX = range(7)


@dataclass(slots=True)
class Request:
    """struct kvm_tdx_init_vm as memdup_user copied it: the words KVM reads, and the entries."""

    attributes: int
    xfam: int
    mrownerconfig: tuple[int, ...]
    reserved: tuple[int, ...]
    nent: int
    cpuid_padding: int
    entries: list[Entry]


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
        self.max_vcpus = min(_KVM_MAX_VCPUS, present_cpus(host))
        self.tsc_frequency = _tsc_khz(host) // 25000
        # The lookup's tables: the first row each (function, index) names, and the rows after
        # it that share its (function, index) (a profile may list a leaf with and without
        # sub-leaves: KVM indexes both as 0).
        self.rows_at: dict[tuple[int, int], int] = {}
        self.twins: dict[int, tuple[int, ...]] = {}
        for k, row in enumerate(tables.rows):
            first = self.rows_at.setdefault((row.leaf, row.index), k)
            if first != k:
                self.twins[first] = (*self.twins.get(first, ()), k)
        # Per row: whether KVM looks at the matched entry beyond taking its values.
        self.entry_bugs = bug in _ENTRY_BUGS
        self.steered_allowlist = bug is mutants.ALLOWLIST_STEERED_BY_ENTRY_INDEX
        # The rows where a refusal can fire, with the allowlist's refused bits (None: the
        # allowlist is not checked there, or refuses nothing the module lists).
        checks: list[tuple[int, Row, Regs | None]] = []
        for k, row in enumerate(tables.rows):
            allow = row.checks_allowlist and (row.forbidden != ZERO or self.steered_allowlist)
            if self.entry_bugs or row.denylist or allow:
                checks.append((k, row, row.forbidden if allow else None))
        self.checks = tuple(checks)
        self.gpaw_rows = tuple(k for k, row in enumerate(tables.rows) if row.leaf == GPAW_LEAF)

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

    def _copy_init_vm(self, address: int) -> Request:
        """The request, read in two steps: cpuid.nent first, then the whole array."""
        nent, _ = layout.unpack_cpuid2_header(
            copy_from_user(address + layout.OFFSET_INIT_VM_NENT, layout.SIZEOF_CPUID2))
        signed = nent - (1 << 32) if nent >> 31 else nent
        if (signed if self.bug is mutants.NENT_SIGNED_COMPARE else nent) > self.nent_limit:
            raise fail(errno.E2BIG)
        if nent > KVM_MAX_CPUID_ENTRIES:
            raise fail(errno.ENOMEM)  # memdup_user cannot allocate gigabytes
        data = copy_from_user(address, layout.init_vm_size(nent))
        w = layout.init_vm_words(data)
        init_vm = Request(attributes=w[0], xfam=w[1], mrownerconfig=w[14:20], reserved=w[20:32],
                          nent=w[32], cpuid_padding=w[33],
                          entries=layout.entry_words(data, layout.SIZEOF_INIT_VM_HEADER, w[32]))
        if self._reserved_set(init_vm) and self.bug is not mutants.RESERVED_UNCHECKED:
            raise fail(errno.EINVAL)
        if init_vm.cpuid_padding and self.bug is not mutants.PADDING_UNCHECKED:
            raise fail(errno.EINVAL)
        return init_vm

    def _reserved_set(self, init_vm: Request) -> bool:
        """memchr_inv over reserved[] (or over what a bug reads as reserved)."""
        words = init_vm.reserved
        if self.bug is mutants.RESERVED_LOW_HALVES_ONLY:
            words = tuple(w & _LOW_32 for w in words)
        if self.bug is mutants.RESERVED_CHECK_COVERS_MROWNERCONFIG:
            words += init_vm.mrownerconfig
        return any(words)

    # ------------------------------------------------------------------
    # setup_tdparams: what KVM itself refuses.

    def _setup_tdparams(self, init_vm: Request) -> tuple[list[Regs], int]:
        """The TD_PARAMS.CPUID_VALUES KVM builds and the GPAW, once attributes, XFAM and
        CPUID pass."""
        if init_vm.attributes & self.attributes_checked & ~self.supported_attrs:
            raise fail(errno.EINVAL)
        if init_vm.xfam & self.xfam_checked & ~self.supported_xfam:
            raise fail(errno.EINVAL)
        gpaw_entry, matched = self._find_entries(init_vm.entries)
        gpaw = self._setup_eptp_controls(gpaw_entry)
        values, count = self._setup_cpuids(matched)
        if count != init_vm.nent and self.bug is not mutants.COUNT_CHECK_MISSING:
            raise fail(errno.EINVAL)  # an entry that landed on no module row
        return values, gpaw

    def _find_entries(self, entries: list[Entry]) -> tuple[Entry | None, list[Entry | None]]:
        """kvm_find_cpuid_entry2 for the GPAW lookup and for every module row.

        The first entry in array order whose function matches and that either
        lacks the significant-index flag or has the index.  One pass over the
        array gives every row its first match: an entry the lookup takes by its
        index can only be its own (function, index) rows', an entry without the
        flag is every row of its function not matched yet.
        """
        if self.bug is mutants.LOOKUP_RESUMES_AFTER_FLAGGED_MATCH:
            return self._gpaw_entry(entries), self._find_resuming(entries)
        matched: list[Entry | None] = [None] * len(self.tables.rows)
        gpaw_entry: Entry | None = None
        rows_of, rows_at, twins = self.tables.rows_of_function, self.rows_at, self.twins
        whole = self.bug is mutants.FLAGS_COMPARED_WHOLE
        for entry in entries:
            f = entry[FUNCTION]
            if entry[FLAGS] != FLAG_SIGNIFICANT_INDEX if whole else \
                    not entry[FLAGS] & FLAG_SIGNIFICANT_INDEX:
                if f == GPAW_LEAF and gpaw_entry is None:
                    gpaw_entry = entry
                for k, _ in rows_of.get(f, ()):
                    if matched[k] is None:
                        matched[k] = entry
                continue
            if f == GPAW_LEAF and gpaw_entry is None and entry[INDEX] == 0:
                gpaw_entry = entry
            row = rows_at.get((f, entry[INDEX]))
            if row is None:
                continue
            if matched[row] is None:
                matched[row] = entry
            if twins:
                for twin in twins.get(row, ()):
                    if matched[twin] is None:
                        matched[twin] = entry
        return gpaw_entry, matched

    def _gpaw_entry(self, entries: list[Entry]) -> Entry | None:
        return next((e for e in entries if e[FUNCTION] == GPAW_LEAF
                     and (self._loose(e) or e[INDEX] == 0)), None)

    def _loose(self, entry: Entry) -> bool:
        """Whether the lookup ignores the entry's index (no significant-index flag)."""
        if self.bug is mutants.FLAGS_COMPARED_WHOLE:
            return entry[FLAGS] != FLAG_SIGNIFICANT_INDEX
        return not entry[FLAGS] & FLAG_SIGNIFICANT_INDEX

    def _find_resuming(self, entries: list[Entry]) -> list[Entry | None]:
        """A bug's lookup: row by row, a flagged entry before the leaf's last flagged
        match is never looked at again."""
        matched: list[Entry | None] = []
        resume: dict[int, int] = {}
        for row in self.tables.rows:
            found: Entry | None = None
            for pos, e in enumerate(entries):
                if e[FUNCTION] != row.leaf:
                    continue
                if self._loose(e):
                    found = e
                    break
                if pos > resume.get(row.leaf, -1) and e[INDEX] == row.index:
                    found, resume[row.leaf] = e, pos
                    break
            matched.append(found)
        return matched

    def _setup_eptp_controls(self, gpaw_entry: Entry | None) -> int:
        """The guest physical address width: 48, or 52 with 5-level EPT."""
        if gpaw_entry is None:
            raise fail(errno.EINVAL)
        gpaw = (gpaw_entry[EAX] & GPAW_FIELD) >> GPAW_SHIFT
        valid = 48 <= gpaw <= 52 if self.bug is mutants.GPAW_RANGE_CHECK else (
            gpaw in _GPAW_VALUES)
        if not valid or (gpaw == 52 and not self.host.ept_5level):
            raise fail(errno.EINVAL)
        return gpaw

    def _setup_cpuids(self, matched: list[Entry | None]) -> tuple[list[Regs], int]:
        """Each row's values from its matched entry (zeros without one), and how many matched.

        KVM refuses a matched entry row by row, in row order; taking the values refuses
        nothing, so that comes after."""
        self._check_entries(matched)
        values = [ZERO if e is None else e[EAX:EDX + 1] for e in matched]
        for k in self.gpaw_rows:
            e = matched[k]
            if e is not None:
                # The module refuses a GPAW here; KVM passed it separately.
                values[k] = (e[EAX] & ~GPAW_FIELD, e[EBX], e[ECX], e[EDX])
        return cast(list[Regs], values), len(matched) - matched.count(None)

    def _check_entries(self, matched: list[Entry | None]) -> None:
        """KVM's refusals of the entries the lookup matched, row by row: the denylist or the
        allowlist (and what the bugs add).  Only the rows where one can fire are looked at."""
        entry_bugs, steered_allowlist = self.entry_bugs, self.steered_allowlist
        for k, row, forbidden in self.checks:
            e = matched[k]
            if e is None:
                continue
            if entry_bugs:
                self._entry_bugs(row, e)
            if row.denylist and e[FUNCTION] == 7 and self._denied(row, e):
                raise fail(errno.EINVAL)
            if forbidden is not None:
                fa, fb, fc, fd = forbidden
                if steered_allowlist and self._steered(row, e) and (row.leaf, row.index) != (7, 0):
                    fa, fb, fc, fd = self.tables.forbidden_at.get((e[FUNCTION], e[INDEX]), ZERO)
                if e[EAX] & fa or e[EBX] & fb or e[ECX] & fc or e[EDX] & fd:
                    raise fail(self.allowlist_errno)

    def _steered(self, row: Row, e: Entry) -> bool:
        """The lookup gave the row an entry of another index (one without the flag)."""
        return self._loose(e) and e[INDEX] != row.index

    def _entry_bugs(self, row: Row, e: Entry) -> None:
        """What two bugs refuse of a matched entry besides the denylist and allowlist."""
        if self.bug is mutants.NO_SUBLEAF_INDEX_CHECKED and not row.subleaves and e[INDEX]:
            raise fail(errno.EINVAL)
        if self.bug is mutants.STEERED_ENTRY_REFUSED and self._steered(row, e) and len(
                self.tables.rows_of_function[row.leaf]) > 1:
            raise fail(errno.EINVAL)

    def _denied(self, row: Row, e: Entry) -> bool:
        """Upstream's TSX/WAITPKG denylist, on the matched entry (its own leaf and index)."""
        index = row.index if self.bug is mutants.DENYLIST_CHECKS_ROW_INDEX else e[INDEX]
        if e[FUNCTION] != 7 or index != 0:
            return False
        return bool(e[EBX] & self.tables.tsx or e[ECX] & WAITPKG)

    # ------------------------------------------------------------------
    # __tdx_td_init: a key ID, then the TDX module.

    def _td_params(self, init_vm: Request, values: list[Regs], gpaw: int) -> TdParams:
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
        vm.config_values = params.cpuid_values
        # kvm->arch.gfn_direct_bits: the shared bit is 51 with MAX_GPAW, else 47.
        vm.gpaw = 52 if params.config_flags & _MAX_GPAW else 48
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


def present_cpus(host: Host) -> int:
    """num_present_cpus(): the logical processors the host's CPUID 0x1F levels count."""
    counts = [host.cpuid(0x1F, s)[1] & 0xFFFF for s in range(6)
              if host.cpuid(0x1F, s)[2] >> 8 & 0xFF]
    return max([1, *counts])


def _tsc_khz(host: Host) -> int:
    """The host's TSC in kHz (KVM's default_tsc_khz), from CPUID 0x15's crystal and ratio."""
    den, num, crystal, _ = host.cpuid(0x15, None)
    return crystal * num // den // 1000 if den and num and crystal else _DEFAULT_TSC_KHZ
