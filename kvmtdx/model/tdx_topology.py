"""TDH.MNG.INIT's leaf 0x1F topology check and the leaf 0xB it derives (modules 1.5.05 on).

Source: src/common/helpers/helpers.c, check_cpuid_1f (1.5.05) and
check_cpuid_1f_and_compute_cpuid_0b (2.0.08), called with allow_null after the
CPUID pass.  The check reads the TD's computed 0x1F values (config_direct bits
only, everything else is FIXED0/DYNAMIC): a sub-leaf 0 of all zeros means "use
the native topology", which is then checked the same way.
"""

from __future__ import annotations

from kvmtdx.model import tdx_status as st
from kvmtdx.model.tdx_cpuid import HELPERS, Refusal, Td
from kvmtdx.model.tdx_module_tables import ZERO, Regs

SMT, CORE = 1, 2


def _refuse(rule: str, sub: int, why: str) -> Refusal:
    return Refusal(st.TDX_CPUID_LEAF_1F_FORMAT_UNRECOGNIZED.value, rule,
                   f"{HELPERS}: {rule} ({why})", 0, 0x1F, sub, "ecx", 0xFFFF)


def _subleaf_values(td: Td, rule: str, sub: int, null: bool) -> tuple[Regs, bool] | Refusal:
    """The sub-leaf's value, switching to the native topology on an all-zero sub-leaf 0."""
    pos = td.position(0x1F, sub)
    v = td.values[pos]
    if sub == 0 and v == ZERO:
        null = True
    elif null and v != ZERO:
        return _refuse(rule, sub, "sub-leaf 0 all zero but a later sub-leaf set")
    if null:
        td.set(pos, td.native[pos], "0x1F sub-leaf 0 all zero: the native topology",
               override=True, written=(0x1F, 0xFFFF, 0xFFFF, 0))
        v = td.values[pos]
    return v, null


def _core_level(v: Regs, number: int) -> Regs:
    return (v[0], v[1], CORE << 8 | number, v[3])


def check_1f_v15(td: Td) -> Refusal | None:
    rule = "check_cpuid_1f"
    level, null, core = 0, False, False
    for sub in range(td.tables.const("LEVEL_TYPE_MAX")):
        got = _subleaf_values(td, rule, sub, null)
        if isinstance(got, Refusal):
            return got
        v, null = got
        prev, level = level, v[2] >> 8 & 0xFF
        if level:
            if level <= prev or level >= td.tables.const("LEVEL_TYPE_MAX"):
                return _refuse(rule, sub, "level types must rise and stay below LEVEL_TYPE_MAX")
            if level == SMT:
                td.set(td.position(0xB, 0), v, "0xB.0 = the 0x1F SMT level", override=True)
            core = core or level == CORE
        elif sub == 0 or not core:
            return _refuse(rule, sub, "no valid sub-leaf 0" if sub == 0 else "no core level")
        # 1.5.05 writes 0xB.1 on every iteration: the last sub-leaf scanned wins.
        ecx = (v[2] & ~0xFF00) | CORE << 8
        td.set(td.position(0xB, 1), (v[0], v[1], ecx, v[3]),
               "0xB.1 = the last 0x1F sub-leaf scanned, as a core level", override=True)
    return None


def check_1f_v20(td: Td) -> Refusal | None:
    rule = "check_cpuid_1f_and_compute_cpuid_0b"
    level, null, core, b_level = 0, False, False, 0
    last = ZERO
    for sub in range(td.tables.const("LEVEL_TYPE_MAX")):
        got = _subleaf_values(td, rule, sub, null)
        if isinstance(got, Refusal):
            return got
        v, null = got
        prev, level = level, v[2] >> 8 & 0xFF
        if level:
            if level <= prev or level >= td.tables.const("LEVEL_TYPE_MAX") \
                    or v[2] & 0xFF != sub:
                return _refuse(rule, sub, "level types must rise, and ECX[7:0] = sub-leaf")
            if level == SMT:
                if sub:
                    return _refuse(rule, sub, "an SMT level must be sub-leaf 0")
                td.set(td.position(0xB, 0), v, "0xB.0 = the 0x1F SMT level", override=True)
                b_level = 1
            core = core or level == CORE
            last = v
        elif sub == 0 or not core:
            return _refuse(rule, sub, "no valid sub-leaf 0" if sub == 0 else "no core level")
    td.set(td.position(0xB, b_level), _core_level(last, b_level),
           "0xB core level = the last valid 0x1F level", override=True)
    for n in range(b_level + 1, 3):
        td.set(td.position(0xB, n), (0, 0, n, last[3]), "0xB: end of levels", override=True)
    return None


def check_topology(td: Td) -> Refusal | None:
    mode = td.tables.variant.topology
    if mode == "1.5":
        return check_1f_v15(td)
    if mode == "2.0":
        return check_1f_v20(td)
    return None
