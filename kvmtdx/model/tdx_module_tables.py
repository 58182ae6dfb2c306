"""The TDX module's own tables, per version, as converted from its public source.

Data only: the bundled files in kvmtdx/data/tdx-modules/ are written by
scripts/convert-tdx-module and name the repository, commit and files they come
from.  `RuleVariant` says which version of each TDH.MNG.INIT rule a module
runs; the variants were read from the sources of the bundled versions (see the
rules document) and are keyed by version here because the converted tables
cannot show code paths.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Sequence
from dataclasses import dataclass, replace
from importlib import resources
from typing import Any

Regs = tuple[int, int, int, int]
ZERO: Regs = (0, 0, 0, 0)
REGISTER_NAMES = ("eax", "ebx", "ecx", "edx")

# Names kvmtdx has used for bundled modules, mapped to the converted versions.
ALIASES: dict[str, str] = {"1.5-late": "1.5.05", "2.0": "2.0.08"}
BUNDLED_VERSIONS: tuple[str, ...] = ("1.5.01", "1.5.05", "2.0.08")


class TablesError(ValueError):
    """A module-table file is missing or malformed; the message names it."""


@dataclass(frozen=True, slots=True)
class LookupEntry:
    """One cpuid_lookup[] entry: a leaf the module virtualises."""

    index: int
    leaf: int
    subleaf: int | None  # None: the module's 0xffffffff (no sub-leaves)
    faulting: bool
    config_index: int | None
    fixed0_or_dynamic: Regs
    fixed1: Regs
    verify_mask: Regs
    verify_value: Regs

    @property
    def key(self) -> tuple[int, int | None]:
        return (self.leaf, self.subleaf)


@dataclass(frozen=True, slots=True)
class ConfigRow:
    """One cpuid_configurable[] entry (a CPUID_CONFIG row), in TD_PARAMS order."""

    leaf: int
    subleaf: int | None
    config_direct: Regs
    allow_direct: Regs
    lookup_index: int

    @property
    def key(self) -> tuple[int, int | None]:
        return (self.leaf, self.subleaf)

    def allowed(self) -> Regs:
        a, b, c, d = (x | y for x, y in zip(self.config_direct, self.allow_direct, strict=True))
        return (a, b, c, d)


@dataclass(frozen=True, slots=True)
class PlatformAttribute:
    """An ATTRIBUTES_FIXED0 bit TDH.SYS.INIT keeps only when the platform has `needs`."""

    bit: int
    name: str
    needs: str


@dataclass(frozen=True, slots=True)
class RuleVariant:
    """Which form of each TDH.MNG.INIT rule a module version runs (see tdh-mng-init rules)."""

    max_vcpus_limit: bool  # MAX_VCPUS > MAX_VCPUS_PER_TD refused (1.5.05 on)
    eptp_pml5_needs_min_pa: bool  # 5-level EPT needs MAX_PA >= MIN_PA_FOR_PML5 (1.5.x)
    attributes_perfmon_icssd: bool  # PERFMON with ICSSD refused (2.0)
    config_flags_maxpa: bool  # MAXPA_VIRT / MAXGPA_VIRT exist, not both (2.0)
    tsx_mismatch_sets_rcx: bool  # HLE != RTM reports RCX = leaf 7.0 (1.5.05 on)
    fms_check_native_substitute: bool  # a 0 F/M/S is checked after substitution (1.5.x)
    lass_from_attributes: bool  # 7.1 EAX[6] = ATTRIBUTES.LASS (1.5.05 on)
    leaf_1a_zero_migratable: bool  # 0x1A zeroed for a MIGRATABLE TD (1.5.05 on)
    leaf_23: str  # "native" (1.5.01), "perfmon" (1.5.05), "perfmon_subleaves" (2.0)
    maxpa_0x80000008: bool  # PA bits from the platform or MAXPA_VIRT, GPA bits 0 (2.0)
    topology: str  # "none" (1.5.01), "1.5" (check_cpuid_1f), "2.0" (..._and_compute_cpuid_0b)
    faulting_leaves: bool  # CPUID_VALID = !faulting (1.5.x); every leaf valid (2.0)
    migratable_l2_cross_check: bool  # MIGRATABLE with L2 VMs refused (1.5.x)
    # TDH.SYS.INIT samples leaf 0x23 as zeros on a CPU without PERFMON_EXT (7.1 EAX[8]), and
    # refuses a CPU whose unlisted 0x23 sub-leaves are not zero (2.0.08 tdh_sys_init.c).
    sysinit_23_zeroed: bool = False


V1_5_01 = RuleVariant(
    max_vcpus_limit=False, eptp_pml5_needs_min_pa=True, attributes_perfmon_icssd=False,
    config_flags_maxpa=False, tsx_mismatch_sets_rcx=False, fms_check_native_substitute=True,
    lass_from_attributes=False, leaf_1a_zero_migratable=False, leaf_23="native",
    maxpa_0x80000008=False, topology="none", faulting_leaves=True,
    migratable_l2_cross_check=True)
V1_5_05 = RuleVariant(
    max_vcpus_limit=True, eptp_pml5_needs_min_pa=True, attributes_perfmon_icssd=False,
    config_flags_maxpa=False, tsx_mismatch_sets_rcx=True, fms_check_native_substitute=True,
    lass_from_attributes=True, leaf_1a_zero_migratable=True, leaf_23="perfmon",
    maxpa_0x80000008=False, topology="1.5", faulting_leaves=True,
    migratable_l2_cross_check=True)
V2_0_08 = RuleVariant(
    max_vcpus_limit=True, eptp_pml5_needs_min_pa=False, attributes_perfmon_icssd=True,
    config_flags_maxpa=True, tsx_mismatch_sets_rcx=True, fms_check_native_substitute=False,
    lass_from_attributes=True, leaf_1a_zero_migratable=True, leaf_23="perfmon_subleaves",
    maxpa_0x80000008=True, topology="2.0", faulting_leaves=False,
    migratable_l2_cross_check=False, sysinit_23_zeroed=True)


def variant_for(version: str) -> RuleVariant:
    """The rule variant of a version: the nearest bundled version at or below it."""
    major, minor, update = (int(x) for x in version.split("."))
    if major >= 2:
        return V2_0_08
    return V1_5_05 if (major, minor, update) >= (1, 5, 5) else V1_5_01


@dataclass(frozen=True, slots=True)
class ModuleTables:
    name: str
    version: str
    source: dict[str, Any]
    attributes_fixed0: int  # before TDH.SYS.INIT removes platform bits
    attributes_fixed1: int
    xfam_fixed0: int  # before TDH.SYS.RD masks it with the platform's XCR0 | XSS
    xfam_fixed1: int
    config_flags_fixed0: int
    config_flags_fixed1: int
    attributes_platform: tuple[PlatformAttribute, ...]
    max_vcpus_per_td: int | None
    tsc_frequency_min: int
    tsc_frequency_max: int
    constants: dict[str, int | None]
    allowed_fms: tuple[int, ...]
    configurable: tuple[ConfigRow, ...]
    lookup: tuple[LookupEntry, ...]  # in processing (array index) order
    xfam_masks: dict[str, dict[int, Regs]]
    variant: RuleVariant

    def const(self, name: str) -> int:
        value = self.constants.get(name)
        if value is None:
            raise TablesError(f"module {self.name}: no constant {name}")
        return value

    def lookup_at(self, leaf: int, subleaf: int | None) -> LookupEntry | None:
        """get_cpuid_lookup_entry: a leaf without sub-leaves matches any sub-leaf."""
        for e in self.lookup:
            if e.leaf == leaf and (e.subleaf is None or e.subleaf == subleaf):
                return e
        return None

    def xfam_mask(self, table: str, bit: int) -> Regs:
        return self.xfam_masks.get(table, {}).get(bit, ZERO)

    def row_keys(self) -> tuple[tuple[int, int | None], ...]:
        return tuple(r.key for r in self.configurable)


# ---------------------------------------------------------------------------
# Loading.

def _int(value: Any, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise TablesError(f"{where}: expected an integer, got {value!r}")
    try:
        return value if isinstance(value, int) else int(value, 0)
    except ValueError:
        raise TablesError(f"{where}: not an integer: {value!r}") from None


def _regs(value: Any, where: str) -> Regs:
    if not isinstance(value, list) or len(value) != 4:
        raise TablesError(f"{where}: expected [eax, ebx, ecx, edx]")
    a, b, c, d = (_int(v, f"{where}[{i}]") for i, v in enumerate(value))
    return (a, b, c, d)


def _sub(value: Any, where: str) -> int | None:
    return None if value is None else _int(value, where)


def _lookup(data: list[Any], origin: str) -> tuple[LookupEntry, ...]:
    out = []
    for i, e in enumerate(data):
        w = f"{origin}: cpuid_lookup[{i}]"
        ci = e.get("config_index")
        out.append(LookupEntry(
            index=_int(e["index"], w), leaf=_int(e["leaf"], w), subleaf=_sub(e["subleaf"], w),
            faulting=bool(e["faulting"]), config_index=None if ci is None else _int(ci, w),
            fixed0_or_dynamic=_regs(e["fixed0_or_dynamic"], w), fixed1=_regs(e["fixed1"], w),
            verify_mask=_regs(e["verify_mask"], w), verify_value=_regs(e["verify_value"], w)))
    return tuple(out)


def _configurable(data: list[Any], origin: str) -> tuple[ConfigRow, ...]:
    out = []
    for i, r in enumerate(data):
        w = f"{origin}: cpuid_configurable[{i}]"
        out.append(ConfigRow(
            leaf=_int(r["leaf"], w), subleaf=_sub(r["subleaf"], w),
            config_direct=_regs(r["config_direct"], w), allow_direct=_regs(r["allow_direct"], w),
            lookup_index=_int(r["lookup_index"], w)))
    return tuple(out)


def tables_from_json(data: Any, origin: str) -> ModuleTables:
    if not isinstance(data, dict) or data.get("schema") != 1:
        raise TablesError(f"{origin}: not a schema-1 TDX module table")
    try:
        masks = {name: {int(bit): _regs(v, f"{origin}: {name}[{bit}]") for bit, v in t.items()}
                 for name, t in data["xfam_masks"].items()}
        return ModuleTables(
            name=str(data["name"]), version=str(data["version"]), source=dict(data["source"]),
            **{k: _int(data[k], f"{origin}: {k}") for k in (
                "attributes_fixed0", "attributes_fixed1", "xfam_fixed0", "xfam_fixed1",
                "config_flags_fixed0", "config_flags_fixed1",
                "tsc_frequency_min", "tsc_frequency_max")},
            attributes_platform=tuple(PlatformAttribute(_int(p["bit"], origin), str(p["name"]),
                                                        str(p["needs"]))
                                      for p in data["attributes_platform"]),
            max_vcpus_per_td=_sub(data["max_vcpus_per_td"], f"{origin}: max_vcpus_per_td"),
            constants={k: _sub(v, f"{origin}: {k}") for k, v in data["constants"].items()},
            allowed_fms=tuple(_int(f, f"{origin}: allowed_fms") for f in data["allowed_fms"]),
            configurable=_configurable(data["cpuid_configurable"], origin),
            lookup=_lookup(data["cpuid_lookup"], origin),
            xfam_masks=masks, variant=variant_for(str(data["version"])))
    except (KeyError, TypeError, AttributeError) as e:
        raise TablesError(f"{origin}: malformed module table ({e!r})") from None


def with_configurable(tables: ModuleTables, rows: Sequence[ConfigRow]) -> ModuleTables:
    """`tables` with its CPUID_CONFIG rows replaced by `rows` (a module build whose masks
    differ from the public source's, read off a kernel).  A row's lookup_index is the
    cpuid_lookup[] entry of its leaf; a leaf the base does not virtualise (a later build's
    row) becomes a new entry after the base's, with no fixed bits: its value is what the
    VMM configures within the row's masks."""
    index = {e.key: e.index for e in tables.lookup}
    extra: list[LookupEntry] = []
    out: list[ConfigRow] = []
    config_index: dict[int, int] = {}
    for i, r in enumerate(rows):
        at = index.get(r.key)
        if at is None:
            at = len(tables.lookup) + len(extra)
            extra.append(LookupEntry(at, r.leaf, r.subleaf, False, i, ZERO, ZERO, ZERO, ZERO))
            index[r.key] = at
        elif at in config_index:
            sub = "" if r.subleaf is None else f".{r.subleaf}"
            raise TablesError(f"row {i} (leaf 0x{r.leaf:x}{sub}) is listed twice")
        config_index[at] = i
        out.append(replace(r, lookup_index=at))
    entries = tuple(replace(e, config_index=config_index.get(e.index)) for e in tables.lookup)
    return replace(tables, configurable=tuple(out), lookup=(*entries, *extra))


def load_tables(name: str) -> ModuleTables:
    """A bundled module by version ("1.5.05") or by its older kvmtdx name ("1.5-late", "2.0")."""
    version = ALIASES.get(name, name)
    if version not in BUNDLED_VERSIONS:
        known = ", ".join((*BUNDLED_VERSIONS, *ALIASES))
        raise TablesError(f"unknown TDX module {name!r}: use one of {known}")
    return _bundled(version)


@functools.cache
def _bundled(version: str) -> ModuleTables:
    path = resources.files("kvmtdx").joinpath("data").joinpath("tdx-modules").joinpath(
        f"{version}.json")
    return tables_from_json(json.loads(path.read_text()), f"bundled module {version}")
