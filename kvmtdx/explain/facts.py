"""What the model says about one CPUID bit of a request: names, and why it is where it is.

A bit is named three ways: the catalog's (Linux cpufeatures), QEMU's -cpu
name, and its place (leaf, sub-leaf, register, bit).  Its facts come from the
module profile (config_direct, allow_direct, XFAM gates), the host's native
CPUID and the policy (what the kernel hides); nothing here predicts.
"""

from __future__ import annotations

from dataclasses import dataclass

from kvmtdx.explain import qemu
from kvmtdx.model import catalog, mirror
from kvmtdx.model.policy import Policy
from kvmtdx.model.profiles import CpuidRow, Host, ModuleProfile
from kvmtdx.model.requests import Request
from kvmtdx.model.rules import GPAW_FIELD, GPAW_LEAF, bits_of, is_value_register
from kvmtdx.structs import REGISTERS


@dataclass(frozen=True, slots=True)
class BitInfo:
    leaf: int
    subleaf: int | None
    register: str
    bit: int
    name: str  # the catalog's name
    qemu: str | None  # QEMU's -cpu name, None when QEMU has none

    def label(self) -> str:
        sub = "" if self.subleaf is None else f".{self.subleaf}"
        return f"0x{self.leaf:x}{sub} {self.register.upper()}[{self.bit}] {self.name}"

    def vmm_label(self) -> str:
        """How a QEMU user spells it ('+avx512-fp16'), else the bit's place."""
        return f"+{self.qemu}" if self.qemu else self.label()


@dataclass(frozen=True, slots=True)
class Dropped:
    """A bit the module drops without refusing the request."""

    bit: BitInfo
    why: str


def bit_info(leaf: int, subleaf: int | None, register: str, bit: int) -> BitInfo:
    return BitInfo(leaf, subleaf, register, bit, catalog.bit_name(leaf, subleaf, register, bit),
                   qemu.feature_name(leaf, subleaf, register, bit))


def row_of(module: ModuleProfile, leaf: int, subleaf: int | None) -> CpuidRow | None:
    """The module row a (leaf, index) names; index 0 also finds a row without sub-leaves."""
    for sub in (subleaf, None if subleaf == 0 else subleaf, 0 if subleaf is None else subleaf):
        i = module.row_index(leaf, sub)
        if i is not None:
            return module.rows[i]
    return None


def _ranges(bits: list[int]) -> str:
    parts: list[str] = []
    start = prev = bits[0]
    for b in [*bits[1:], -2]:
        if b != prev + 1:
            parts.append(f"{start}" if start == prev else f"{start}-{prev}")
            start = b
        prev = b
    return ", ".join(parts)


def xfam_label(mask: int) -> str:
    """'XFAM bits 5-7 (AVX512_OPMASK, ...; QEMU: +avx512f)'."""
    bits = bits_of(mask, 64)
    if not bits:
        return "no XFAM bit"
    names = ", ".join(catalog.xfam_name(b) for b in bits)
    enablers = qemu.xfam_enablers(mask)
    vmm = f"; QEMU: {', '.join('+' + f for f in enablers)}" if enablers else ""
    word = "bit" if len(bits) == 1 else "bits"
    return f"XFAM {word} {_ranges(bits)} ({names}{vmm})"


def _row_facts(module: ModuleProfile, host: Host, policy: Policy, row: CpuidRow,
               b: BitInfo) -> list[str]:
    r = REGISTERS.index(b.register)
    on = 1 << b.bit
    out: list[str] = []
    if policy.hides(row.leaf, row.kvm_index, b.register) & on:
        out.append(f"the kernel ({policy.name}) hides it: KVM_TDX_CAPABILITIES never reports it")
    if not row.module_allows()[r] & on:
        out.append(f"module {module.name} does not list it as configurable in row {row.label()}")
    elif row.config_direct[r] & on:
        out.append(f"module {module.name} lets a VMM set it directly (config_direct)")
    elif host.native_regs(row.leaf, row.subleaf)[r] & on:
        out.append(f"module {module.name} allows it where the host has it (allow_direct), "
                   f"and host {host.name} has it")
    else:
        out.append(f"module {module.name} allows it only where the host has it (allow_direct); "
                   f"host {host.name} lacks it, so the module would drop it silently")
    return out


def bit_facts(module: ModuleProfile, host: Host, policy: Policy, request: Request,
              bits: tuple[BitInfo, ...]) -> tuple[tuple[str, ...], int]:
    """Facts about the bits of one fault, and the XFAM bits their features still need."""
    if not bits:
        return (), 0
    b = bits[0]
    row = row_of(module, b.leaf, b.subleaf)
    if row is None:
        return (f"module {module.name} lists no configurable row for CPUID 0x{b.leaf:x}",), 0
    facts: list[str] = []
    for each in bits:
        facts += _row_facts(module, host, policy, row, each)
    td_xfam = request.init_vm.xfam | module.xfam_fixed1
    need = 0
    gated = [g for g in module.xfam_gates
             if (g.leaf, g.subleaf, g.register) == (row.leaf, row.subleaf, b.register)
             and any(g.mask >> x.bit & 1 for x in bits)]
    table = qemu.tdx_table().xfam
    for each in bits:
        native = table.get(((each.leaf, each.subleaf, each.register), each.bit))
        if native is not None:
            mask = next((g.xfam for g in gated if g.xfam >> native & 1), 1 << native)
            facts.append(f"a TD gets it from the CPU, not from its CPUID configuration, with "
                         f"{xfam_label(mask)}")
            need |= mask & ~td_xfam
    for g in gated:
        missing = g.xfam & ~td_xfam
        if missing and not need & g.xfam:
            need |= missing
            facts.append(f"it needs {xfam_label(g.xfam)}: {g.why}")
    return tuple(dict.fromkeys(facts)), need


def qemu_facts(b: BitInfo) -> tuple[str, ...]:
    """What QEMU's TDX tables alone say of a bit (when there is no module profile)."""
    t = qemu.tdx_table()
    key = (b.leaf, b.subleaf, b.register)
    out: list[str] = []
    if t.fixed1.get(key, 0) >> b.bit & 1:
        out.append("every TDX module sets it for a TD")
    if (key, b.bit) in t.xfam:
        out.append(f"a TD gets it from the CPU, not from its CPUID configuration, with "
                   f"{xfam_label(1 << t.xfam[(key, b.bit)])}")
    if (key, b.bit) in t.attributes:
        out.append(f"the module sets it from TD attribute "
                   f"{catalog.attribute_name(t.attributes[(key, b.bit)])}")
    return tuple(out)


def silently_dropped(module: ModuleProfile, host: Host, request: Request) -> tuple[Dropped, ...]:
    """Bits of an accepted request the TD will not see: allow_direct bits the host lacks,
    and XFAM-gated bits without their XFAM state."""
    entries = request.init_vm.entries
    td_xfam = request.init_vm.xfam | module.xfam_fixed1
    out: list[Dropped] = []
    for row in module.rows:
        e = mirror.find(entries, row.leaf, row.kvm_index)
        if e is None:
            continue
        native = host.native_regs(row.leaf, row.subleaf)
        for r, reg in enumerate(REGISTERS):
            if is_value_register(row.leaf, row.subleaf, reg):
                continue
            value = e.reg(reg) & row.module_allows()[r]
            if row.leaf == GPAW_LEAF and reg == "eax":
                value &= ~GPAW_FIELD
            lacking = value & row.allow_direct[r] & ~row.config_direct[r] & ~native[r]
            out += [Dropped(bit_info(row.leaf, row.subleaf, reg, b),
                            f"host {host.name} lacks it (allow_direct)") for b in bits_of(lacking)]
            for g in module.xfam_gates:
                if (g.leaf, g.subleaf, g.register) != (row.leaf, row.subleaf, reg):
                    continue
                if td_xfam & g.xfam != g.xfam:
                    out += [Dropped(bit_info(row.leaf, row.subleaf, reg, b),
                                    f"XFAM lacks {xfam_label(g.xfam & ~td_xfam)}")
                            for b in bits_of(value & g.mask & ~lacking)]
    return tuple(out)
