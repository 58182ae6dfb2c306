"""TDH.MNG.INIT as the public TDX module source does it, rule by rule, in its order.

    mng_init(tables, host, td_params) -> MngInitResult

Order (src/vmm_dispatcher/api_calls/tdh_mng_init.c, tdh_mng_init):
read_and_set_td_configurations (ATTRIBUTES, XFAM, MAX_VCPUS, NUM_L2_VMS,
reserved bytes, CONFIG_FLAGS, EPTP_CONTROLS, TSC_FREQUENCY), then the CPUID
pass (kvmtdx.model.tdx_cpuid) and the 0x1F topology check
(kvmtdx.model.tdx_topology), then the immutable-state cross-check.  The first
failing rule decides; its status carries the operand id and RCX carries the
leaf for CPUID_CONFIG refusals.  Host-state failures that no TD_PARAMS content
causes (IA32_TSC_ADJUST changed, MISC_ENABLE.LIMIT_CPUID_MAXVAL, TDCS pages)
are not modelled.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from functools import partial

from kvmtdx.model import tdx_status as st
from kvmtdx.model.rules import GPAW_FIELD, GPAW_LEAF, lowest_bit
from kvmtdx.model.tdx_cpuid import (
    ATTR_DEBUG,
    ATTR_ICSSD,
    ATTR_MIGRATABLE,
    ATTR_PERFMON,
    FLAG_GPAW,
    FLAG_MAXGPA_VIRT,
    FLAG_MAXPA_VIRT,
    HELPERS,
    MNG_INIT,
    Event,
    Refusal,
    Td,
    cpuid_pass,
    leaf_rcx,
)
from kvmtdx.model.tdx_host import (
    Host,
    reported_attributes_fixed0,
    reported_xfam_fixed0,
    sampled_native,
)
from kvmtdx.model.tdx_module_tables import REGISTER_NAMES, ZERO, ConfigRow, ModuleTables, Regs
from kvmtdx.model.tdx_topology import check_topology
from kvmtdx.status import operand_invalid

MAX_L2_VMS = 3  # MAX_VMS - 1 (src/common/data_structures/tdx_tdvps.h)
EPTP_MT_WB, PWL_4, PWL_5 = 6, 3, 4
CONFIG_FLAGS_NO_RBP_MOD = 1 << 2
RESERVED_REGIONS = ("reserved_0", "reserved_1", "reserved_2", "reserved_3")


@dataclass(frozen=True, slots=True)
class TdParams:
    """The TD_PARAMS fields TDH.MNG.INIT checks (KVM 7.3 leaves every other byte zero)."""

    attributes: int
    xfam: int
    cpuid_values: tuple[Regs, ...]  # one per CPUID_CONFIG row, in row order
    max_vcpus: int = 1
    eptp_controls: int = EPTP_MT_WB | PWL_4 << 3
    config_flags: int = CONFIG_FLAGS_NO_RBP_MOD
    tsc_frequency: int = 84  # units of 25 MHz: 2.1 GHz
    num_l2_vms: int = 0
    reserved_nonzero: frozenset[str] = frozenset()  # names from RESERVED_REGIONS


@dataclass(frozen=True, slots=True)
class Change:
    """Requested bits of one CPUID_CONFIG row register that the TD does not see as asked."""

    leaf: int
    subleaf: int | None
    register: str
    mask: int
    kind: str  # "cleared" (asked 1, got 0), "forced_1" (asked 0, got 1), "overridden"
    reason: str


@dataclass(frozen=True, slots=True)
class MngInitResult:
    status: int
    rule: str  # "accepted", or the rule that refused
    source: str  # file and function of that rule
    rcx: int = 0  # extended error information (leaf | sub-leaf << 32)
    leaf: int | None = None
    subleaf: int | None = None
    register: str | None = None
    mask: int = 0
    cpuid: Mapping[tuple[int, int | None], Regs] | None = None  # TDCS CPUID_VALUES
    faulting: frozenset[tuple[int, int | None]] = frozenset()  # CPUID_VALID = 0: #VE
    changes: tuple[Change, ...] = ()

    @property
    def accepted(self) -> bool:
        return self.status == st.TDX_SUCCESS.value

    def describe(self) -> str:
        if self.accepted:
            return "accepted"
        where = f" at 0x{self.leaf:x}.{self.subleaf} {self.register}" if self.leaf is not None \
            else ""
        return f"{st.status_name(self.status)} 0x{self.status:016x}{where}: {self.rule}"


def _refusal(operand: int, rule: str, source: str) -> Refusal:
    return Refusal(operand_invalid(operand), rule, source)


def _check_attributes(tables: ModuleTables, host: Host, attributes: int) -> Refusal | None:
    fixed0 = reported_attributes_fixed0(tables, host)

    def bit(n: int) -> bool:
        return bool(attributes >> n & 1)

    bad = attributes & ~fixed0 or attributes & tables.attributes_fixed1 != tables.attributes_fixed1
    if not bad and bit(ATTR_MIGRATABLE):
        bad = bit(ATTR_DEBUG) or bit(ATTR_PERFMON)
    if not bad and tables.variant.attributes_perfmon_icssd:
        bad = bit(ATTR_PERFMON) and bit(ATTR_ICSSD)
    return _refusal(st.OPERAND_ID_ATTRIBUTES, "verify_td_attributes",
                    f"{HELPERS}: verify_td_attributes") if bad else None


# The XFAM bit groups check_xfam wants all or none of: AVX-512 (5-7), CET (11-12), AMX (17-18).
XFAM_GROUPS = (0b111 << 5, 0b11 << 11, 0b11 << 17)


def xfam_culprit(tables: ModuleTables, host: Host, xfam: int) -> int | None:
    """check_xfam: the XFAM bit it objects to (the status names only the operand), or None.
    One the platform lacks or a missing fixed-1 bit, else AVX-512 without AVX, else a
    present bit of a group that must be all or none (dropping it is a step towards a
    valid XFAM)."""
    bad = xfam & ~reported_xfam_fixed0(tables, host) | tables.xfam_fixed1 & ~xfam
    if not bad and xfam >> 5 & 1 and not xfam >> 2 & 1:
        bad = 1 << 5
    for group in XFAM_GROUPS:
        if not bad and xfam & group not in (0, group):
            bad = xfam & group
    return lowest_bit(bad) if bad else None


def _check_xfam(tables: ModuleTables, host: Host, xfam: int) -> Refusal | None:
    bad = xfam_culprit(tables, host, xfam) is not None
    return _refusal(st.OPERAND_ID_XFAM, "check_xfam", f"{HELPERS}: check_xfam") if bad else None


def _check_config_flags(tables: ModuleTables, flags: int) -> Refusal | None:
    bad = bool(flags & ~tables.config_flags_fixed0
               or flags & tables.config_flags_fixed1 != tables.config_flags_fixed1)
    if not bad and tables.variant.config_flags_maxpa:
        bad = bool(flags >> FLAG_MAXPA_VIRT & flags >> FLAG_MAXGPA_VIRT & 1)
    return _refusal(st.OPERAND_ID_EXEC_CONTROLS, "verify_td_config_flags",
                    f"{HELPERS}: verify_td_config_flags") if bad else None


def _check_eptp(tables: ModuleTables, host: Host, eptp: int, flags: int) -> Refusal | None:
    pwl = eptp >> 3 & 7
    bad = (eptp & 7 != EPTP_MT_WB or pwl < PWL_4 or pwl > (PWL_5 if host.ept_5level else PWL_4)
           or eptp & ~0x3F != 0)  # A/D, SSS, reserved and the base address must be 0
    if not bad and tables.variant.eptp_pml5_needs_min_pa:
        bad = pwl == PWL_5 and host.max_pa < tables.const("MIN_PA_FOR_PML5")
    if not bad:
        bad = bool(flags >> FLAG_GPAW & 1) and pwl < PWL_5
    return _refusal(st.OPERAND_ID_EPTP_CONTROLS, "verify_and_set_td_eptp_controls",
                    f"{HELPERS}: verify_and_set_td_eptp_controls") if bad else None


def td_configuration(tables: ModuleTables, host: Host, p: TdParams) -> Refusal | None:
    """read_and_set_td_configurations, in its order."""
    here = f"{MNG_INIT}: read_and_set_td_configurations"
    limit = tables.max_vcpus_per_td if tables.variant.max_vcpus_limit else None
    def vcpus() -> Refusal | None:
        bad = p.max_vcpus == 0 or (limit is not None and p.max_vcpus > limit)
        return _refusal(st.OPERAND_ID_MAX_VCPUS, "max_vcpus", here) if bad else None

    def l2_vms() -> Refusal | None:
        bad = p.num_l2_vms > MAX_L2_VMS
        return _refusal(st.OPERAND_ID_NUM_L2_VMS, "num_l2_vms", here) if bad else None

    def tsc() -> Refusal | None:
        bad = not tables.tsc_frequency_min <= p.tsc_frequency <= tables.tsc_frequency_max
        return _refusal(st.OPERAND_ID_TSC_FREQUENCY, "tsc_frequency", here) if bad else None

    steps: tuple[Callable[[], Refusal | None], ...] = (
        partial(_check_attributes, tables, host, p.attributes),
        partial(_check_xfam, tables, host, p.xfam),
        vcpus, l2_vms, partial(_reserved, p, "reserved_0"),
        partial(_check_config_flags, tables, p.config_flags),
        partial(_check_eptp, tables, host, p.eptp_controls, p.config_flags),
        tsc, partial(_reserved, p, "reserved_1"), partial(_reserved, p, "reserved_2"),
    )
    for step in steps:
        refusal = step()
        if refusal is not None:
            return refusal
    return None


def _reserved(p: TdParams, region: str) -> Refusal | None:
    if region in p.reserved_nonzero:
        return _refusal(st.OPERAND_ID_RDX, f"td_params_{region}",
                        f"{MNG_INIT}: TD_PARAMS {region} must be zero")
    return None


def _cpuid_rows(tables: ModuleTables, p: TdParams) -> tuple[Regs, ...]:
    rows = tuple(p.cpuid_values) + (ZERO,) * (len(tables.configurable) - len(p.cpuid_values))
    if len(rows) != len(tables.configurable):
        raise ValueError(f"TD_PARAMS has {len(p.cpuid_values)} CPUID values; module "
                         f"{tables.name} has {len(tables.configurable)} CPUID_CONFIG rows")
    return rows


def after_cpuid_pass(tables: ModuleTables, p: TdParams, td: Td) -> Refusal | None:
    """What follows the CPUID pass: the 0x1F topology, reserved_3, the immutable-state
    cross-check.  Reads only the TD's 0x1F values, its attributes and TD_PARAMS' L2 VMs
    and reserved bytes (the compiled mirror remembers it on those)."""
    refusal = check_topology(td)
    if refusal is None:
        refusal = _reserved(p, "reserved_3")
    if refusal is None and tables.variant.migratable_l2_cross_check \
            and td.attr(ATTR_MIGRATABLE) and p.num_l2_vms > 0:
        refusal = _refusal(st.OPERAND_ID_RDX, "td_immutable_state_cross_check",
                           f"{HELPERS}: td_immutable_state_cross_check")
    return refusal


def mng_init(tables: ModuleTables, host: Host, p: TdParams, *,
             detail: bool = True, explain: bool = True) -> MngInitResult:
    """TDH.MNG.INIT of a TD with these TD_PARAMS on this host, by this module version.

    Without `detail` only the status and the refusing rule are worked out: an accepted
    TD's CPUID values and changes are left out (the mirror's hot path needs the answer
    only).  Without `explain`, an accepted TD's CPUID values are worked out but not the
    changes that explain them (a differential check needs the values only)."""
    td = Td(tables=tables, host=host, attributes=p.attributes, xfam=p.xfam,
            config_flags=p.config_flags, tsc_frequency=p.tsc_frequency,
            config=_cpuid_rows(tables, p), native=sampled_native(tables, host),
            log=detail and explain)
    refusal = td_configuration(tables, host, p)
    if refusal is None:
        refusal = cpuid_pass(td)
    if refusal is None:
        refusal = after_cpuid_pass(tables, p, td)
    if refusal is not None:
        return MngInitResult(refusal.status, refusal.rule, refusal.source, refusal.rcx,
                             refusal.leaf, refusal.subleaf, refusal.register, refusal.mask)
    if not detail:
        return MngInitResult(st.TDX_SUCCESS.value, "accepted", f"{MNG_INIT}: tdh_mng_init")
    faulting = frozenset(e.key for e in tables.lookup
                         if e.faulting and tables.variant.faulting_leaves)
    return MngInitResult(
        st.TDX_SUCCESS.value, "accepted", f"{MNG_INIT}: tdh_mng_init",
        cpuid={e.key: v for e, v in zip(tables.lookup, td.values, strict=True)},
        faulting=faulting, changes=changes(td) if explain else ())


def changes(td: Td) -> tuple[Change, ...]:
    """Requested bits of each CPUID_CONFIG row the TD does not get as asked, with the reason."""
    out: list[Change] = []
    for pos, e in enumerate(td.tables.lookup):
        if e.config_index is None:
            continue
        row = td.tables.configurable[e.config_index]
        asked, got = td.config[e.config_index], td.values[pos]
        for reg in range(4):
            events = [ev for ev in td.events if ev.position == pos and ev.register == reg]
            watched = row.allowed()[reg]
            for ev in events:
                watched |= ev.mask if ev.override else 0
            out += _register_changes(e.leaf, e.subleaf, reg, asked[reg], got[reg],
                                     watched, events)
    return tuple(out)


def _register_changes(leaf: int, subleaf: int | None, reg: int, asked: int, got: int,
                      watched: int, events: Sequence[Event]) -> list[Change]:
    groups: dict[tuple[str, str], int] = {}
    diff = (asked ^ got) & watched
    for bit in range(32):
        if not diff >> bit & 1:
            continue
        last = next((ev for ev in reversed(events) if ev.mask >> bit & 1), None)
        reason = last.reason if last is not None else "row value"
        kind = "overridden" if last is not None and last.override else (
            "cleared" if asked >> bit & 1 else "forced_1")
        groups[(kind, reason)] = groups.get((kind, reason), 0) | 1 << bit
    return [Change(leaf, subleaf, REGISTER_NAMES[reg], mask, kind, reason)
            for (kind, reason), mask in groups.items()]


# ---------------------------------------------------------------------------
# TD_PARAMS as KVM 7.3 fills it (arch/x86/kvm/vmx/tdx.c, setup_tdparams*).

def kvm73_row_value(row: ConfigRow, regs: Regs | None) -> Regs:
    """The value KVM 7.3 puts in one CPUID_CONFIG row (setup_tdparams_cpuids): the entry's,
    0x80000008 EAX[23:16] (the GPAW, KVM's own interface) zeroed; zero without an entry."""
    if regs is None:
        return ZERO
    if row.leaf == GPAW_LEAF:
        return (regs[0] & ~GPAW_FIELD, regs[1], regs[2], regs[3])
    return regs


def kvm73_td_params(tables: ModuleTables, *, attributes: int, xfam: int,
                    rows: Sequence[Regs | None], guest_pa_bits: int, tsc_khz: int,
                    max_vcpus: int) -> TdParams:
    """attributes/xfam ORed with fixed1; EPTP and CONFIG_FLAGS.MAX_GPAW from the GPAW entry;
    NO_RBP_MOD always; 0x80000008 EAX[23:16] zeroed; rows KVM found no entry for are zero.

    The KVM-side refusals (supported attributes/XFAM, GPAW 48/52, the denylist, the
    entry count) belong to the kernel model, not here."""
    values = tuple(kvm73_row_value(row, regs)
                   for row, regs in zip(tables.configurable, rows, strict=True))
    wide = guest_pa_bits == 52
    return TdParams(
        attributes=attributes | tables.attributes_fixed1, xfam=xfam | tables.xfam_fixed1,
        cpuid_values=values, max_vcpus=max_vcpus,
        eptp_controls=EPTP_MT_WB | (PWL_5 if wide else PWL_4) << 3,
        config_flags=CONFIG_FLAGS_NO_RBP_MOD | (1 << FLAG_GPAW if wide else 0),
        tsc_frequency=tsc_khz // 25000)


def row_rcx(leaf: int, subleaf: int | None) -> int:
    """The RCX a CPUID_CONFIG refusal of this row reports."""
    return leaf_rcx(leaf, subleaf)
