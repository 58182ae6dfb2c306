"""TDX module profiles: the module both the mirror and the simulated host start from.

A profile is a TDX module version's tables (`ModuleTables`, converted from the
public module source: kvmtdx/data/tdx-modules/) under the name a user gave it,
with its CPUID_CONFIG rows as KVM sees them (`rows`, in row order).  A user's
or a saved profile file (`kvmtdx caps --save-module`) names its base module
version, whose rules it runs, and carries its own CPUID_CONFIG rows, which
replace the base's config_direct / allow_direct masks.

Hosts live in kvmtdx.model.tdx_host (the type) and kvmtdx.model.host_files
(loading); `Host`, `MAX_HOST` and `load_host` are re-exported here because
every caller that names a module names a host too.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kvmtdx import jsonfile
from kvmtdx.errors import DataError
from kvmtdx.jsonfile import objects, parse_int, sub, text
from kvmtdx.model.host_files import MAX_HOST, host_from_json, host_to_json, load_host
from kvmtdx.model.tdx_host import Host, enumerate_config, host_problems, reported_xfam_fixed0
from kvmtdx.model.tdx_module_tables import (
    ALIASES,
    BUNDLED_VERSIONS,
    ConfigRow,
    ModuleTables,
    TablesError,
    load_tables,
    with_configurable,
)
from kvmtdx.model.values import ZERO_REGS, Regs, bundled_json, parse_regs
from kvmtdx.structs import KVM_MAX_CPUID_ENTRIES, NO_SUBLEAF

__all__ = ["BUNDLED_MODULES", "MAX_HOST", "ZERO_REGS", "CpuidRow", "Host", "ModuleProfile",
           "Regs", "bundled_json", "enumerated", "host_from_json", "host_to_json",
           "load_host", "load_profile", "parse_regs", "profile_from_json", "profile_of",
           "profile_to_json"]


@dataclass(frozen=True, slots=True)
class CpuidRow:
    """One CPUID_CONFIG row of a TDX module, as KVM sees it."""

    leaf: int
    subleaf: int | None  # None: the module reports sub-leaf 0xffffffff
    config_direct: Regs
    allow_direct: Regs

    @property
    def module_subleaf(self) -> int:
        return NO_SUBLEAF if self.subleaf is None else self.subleaf

    @property
    def kvm_index(self) -> int:
        """The index KVM reports for this row (0 for "no sub-leaves")."""
        return 0 if self.subleaf is None else self.subleaf

    def module_allows(self) -> Regs:
        """Bits TDH.MNG.INIT accepts in this row: config_direct | allow_direct."""
        a, b, c, d = (x | y for x, y in zip(self.config_direct, self.allow_direct, strict=True))
        return (a, b, c, d)

    def label(self) -> str:
        sub = "" if self.subleaf is None else f".{self.subleaf}"
        return f"0x{self.leaf:x}{sub}"


@dataclass(frozen=True, slots=True)
class ModuleProfile:
    """A TDX module: its version's tables and rules, under the name it was asked for."""

    name: str
    source: str
    tables: ModuleTables
    rows: tuple[CpuidRow, ...]
    # Bits whose configurability is not known (a profile saved from a kernel
    # that hides them); per row, [eax, ebx, ecx, edx].  Checks skip them.
    unknown: tuple[Regs, ...] = ()

    @property
    def version(self) -> str:
        return self.tables.version

    @property
    def attributes_fixed0(self) -> int:
        return self.tables.attributes_fixed0

    @property
    def attributes_fixed1(self) -> int:
        return self.tables.attributes_fixed1

    @property
    def xfam_fixed0(self) -> int:
        return self.tables.xfam_fixed0

    @property
    def xfam_fixed1(self) -> int:
        return self.tables.xfam_fixed1

    @property
    def enumerates_topology(self) -> bool:
        """TDX_FEATURES0.TOPOLOGY_ENUM: the module checks leaf 0x1F (1.5.05 on).  Linux 7.3
        refuses to enable TDX on a module without it."""
        return self.tables.variant.topology != "none"

    def row_index(self, leaf: int, subleaf: int | None) -> int | None:
        for i, r in enumerate(self.rows):
            if r.leaf == leaf and r.subleaf == subleaf:
                return i
        return None

    def unknown_mask(self, row: int) -> Regs:
        return self.unknown[row] if row < len(self.unknown) else ZERO_REGS


def kernel_note(module: ModuleProfile) -> str | None:
    """What a user choosing this module with any kvmtdx policy must be told, if anything."""
    if module.enumerates_topology:
        return None
    name = module.name if module.name == module.version else \
        f"{module.name} ({module.version})"
    return (f"Linux 6.16 and later refuse to enable TDX on module {name}: "
            "it has no topology enumeration (TDX_FEATURES0.TOPOLOGY_ENUM), "
            "so it cannot meet the upstream-6.16, upstream or rfc-v2 policies; predictions "
            "for it describe what such a kernel would do if it enabled TDX")


def host_refusal(module: ModuleProfile, host: Host, origin: str) -> DataError | None:
    """The one clear error for a host this module would not initialise on (TDH.SYS.INIT's
    CPUID checks), None when it would.  `origin` names where the host came from."""
    problems = host_problems(module.tables, host)
    if not problems:
        return None
    more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
    return DataError(f"{origin}: TDX module {module.version} would not initialise on host "
                     f"{host.name}: {problems[0]}{more}")


def profile_of(tables: ModuleTables, name: str, source: str,
               unknown: tuple[Regs, ...] = ()) -> ModuleProfile:
    rows = tuple(CpuidRow(r.leaf, r.subleaf, r.config_direct, r.allow_direct)
                 for r in tables.configurable)
    return ModuleProfile(name=name, source=source, tables=tables, rows=rows, unknown=unknown)


def enumerated(profile: ModuleProfile, host: Host) -> tuple[Regs, ...]:
    """What the module hands KVM per row: config_direct | (allow_direct & native)."""
    return enumerate_config(profile.tables, host)


def effective_xfam_fixed0(profile: ModuleProfile, host: Host) -> int:
    """XFAM_FIXED0 as the module reports it on this host."""
    return reported_xfam_fixed0(profile.tables, host)


# ---------------------------------------------------------------------------
# Bundled modules.

# The names kvmtdx offers (`--simulate list`); the versions and ALIASES load too.
BUNDLED_MODULES: tuple[str, ...] = ("1.5.01", "1.5-late", "2.0")
MODULE_CHOICES = ", ".join((*BUNDLED_MODULES, *(v for v in BUNDLED_VERSIONS
                                                 if v not in BUNDLED_MODULES)))


def _source_of(tables: ModuleTables) -> str:
    s = tables.source
    commit = str(s.get("commit", ""))[:12]
    tag = f" tag {s['tag']}" if s.get("tag") else ""
    return (f"{s.get('repo', 'intel/tdx-module')} {tables.version}{tag} at commit {commit}, "
            "converted by scripts/convert-tdx-module")


@functools.cache
def _bundled(name: str) -> ModuleProfile:
    tables = load_tables(name)
    alias = f" ({name} is {tables.version})" if name in ALIASES else ""
    return profile_of(tables, name, _source_of(tables) + alias)


def is_bundled(name: str) -> bool:
    return name in BUNDLED_VERSIONS or name in ALIASES


def bundled_profiles() -> dict[str, ModuleProfile]:
    return {name: _bundled(name) for name in BUNDLED_MODULES}


def load_profile(name_or_file: str) -> ModuleProfile:
    """A bundled module by name or version, or a module profile JSON file."""
    if is_bundled(name_or_file):
        return _bundled(name_or_file)
    if name_or_file.endswith(".json") or Path(name_or_file).exists():
        return profile_from_json(jsonfile.load(name_or_file), name_or_file)
    raise DataError(f"unknown TDX module {name_or_file!r}: use one of {MODULE_CHOICES} "
                    "or a module profile JSON file")


# ---------------------------------------------------------------------------
# Profile files.


def _subleaf(value: Any, where: str) -> int | None:
    if value is None or value == "none":
        return None
    n = parse_int(value, where, 32)
    return None if n == NO_SUBLEAF else n


_PROFILE_FIELDS = ("name", "source", "base", "rows")
_ROW_FIELDS = ("leaf", "subleaf", "config_direct", "allow_direct", "unknown")
PROFILE_KIND = "module-profile"  # the kind `caps --save-module` writes


def _file_rows(value: Any, where: str) -> tuple[list[ConfigRow], list[Regs]]:
    """The CPUID_CONFIG rows, and per row the bits whose configurability is unknown."""
    rows: list[ConfigRow] = []
    unknown: list[Regs] = []
    for w, r in objects(value, where):
        jsonfile.check_fields(r, w, _ROW_FIELDS)
        for key in ("leaf", "config_direct", "allow_direct"):
            if key not in r:
                raise DataError(f"{w}: missing field '{key}'")
        rows.append(ConfigRow(leaf=parse_int(r["leaf"], f"{w}.leaf", 32),
                              subleaf=_subleaf(r.get("subleaf"), f"{w}.subleaf"),
                              config_direct=parse_regs(r["config_direct"], f"{w}.config_direct"),
                              allow_direct=parse_regs(r["allow_direct"], f"{w}.allow_direct"),
                              lookup_index=-1))
        unknown.append(parse_regs(r.get("unknown", [0, 0, 0, 0]), f"{w}.unknown"))
    if not rows:
        raise DataError(f"{where}: must list at least one row")
    # KVM_TDX_CAPABILITIES and INIT_VM carry at most this many entries: a profile with
    # more could only ever end in E2BIG, which would read as the kernel's failure.
    if len(rows) > KVM_MAX_CPUID_ENTRIES:
        raise DataError(f"{where}: {len(rows)} rows; KVM takes at most {KVM_MAX_CPUID_ENTRIES} "
                        "CPUID entries (KVM_MAX_CPUID_ENTRIES)")
    return rows, unknown


def profile_from_json(data: Any, origin: str) -> ModuleProfile:
    """A profile file: `base` (a bundled module version whose rules it runs), `name`,
    `source`, and optionally `rows` replacing the base's CPUID_CONFIG rows."""
    jsonfile.document(data, origin, "a module profile", _PROFILE_FIELDS, kind=PROFILE_KIND)
    base = data.get("base")
    if not isinstance(base, str) or not is_bundled(base):
        raise DataError(f"{sub(origin, 'base')}: must name the module version whose rules the "
                        f"profile runs ({MODULE_CHOICES}); TDH.MNG.INIT differs per version")
    name = text(data, "name", origin, Path(origin).stem)
    if not name:
        raise DataError(f"{origin}: field 'name' must be a non-empty string")
    tables = load_tables(base)
    unknown: list[Regs] = []
    if "rows" in data:
        rows, unknown = _file_rows(data["rows"], sub(origin, "rows"))
        try:
            tables = with_configurable(tables, rows)
        except TablesError as e:
            raise DataError(f"{sub(origin, 'rows')}: {e}") from None
    source = text(data, "source", origin, origin)
    return profile_of(tables, name, f"{source} (rules of module {tables.version})",
                      tuple(unknown) if any(any(u) for u in unknown) else ())


def profile_to_json(p: ModuleProfile) -> dict[str, Any]:
    rows = []
    for i, r in enumerate(p.rows):
        row: dict[str, Any] = {
            "leaf": f"0x{r.leaf:x}",
            "subleaf": r.subleaf,
            "config_direct": [f"0x{v:08x}" for v in r.config_direct],
            "allow_direct": [f"0x{v:08x}" for v in r.allow_direct],
        }
        if any(p.unknown_mask(i)):
            row["unknown"] = [f"0x{v:08x}" for v in p.unknown_mask(i)]
        rows.append(row)
    return {"name": p.name, "source": p.source, "base": p.version, "rows": rows}
