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
from kvmtdx.model.rules import GPAW_LEAF, bits_of, is_value_register
from kvmtdx.model.tdx_cpuid import xfam_needed
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
    table = qemu.tdx_table().xfam
    for each in bits:
        gate = xfam_needed(module.tables, row.leaf, row.subleaf, each.register, each.bit)
        native = table.get(((each.leaf, each.subleaf, each.register), each.bit))
        if native is not None:
            mask = gate if gate >> native & 1 else 1 << native
            facts.append(f"a TD gets it from the CPU, not from its CPUID configuration, with "
                         f"{xfam_label(mask)}")
            need |= mask & ~td_xfam
        elif gate & ~td_xfam:
            need |= gate & ~td_xfam
            facts.append(f"the module clears it (it does not refuse it) unless XFAM has "
                         f"{xfam_label(gate)}")
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


def silently_dropped(module: ModuleProfile, host: Host, policy: Policy,
                     request: Request) -> tuple[Dropped, ...]:
    """Bits of an accepted request the TD will not see, with the module's reason: allow_direct
    bits the host lacks, features whose XSAVE state XFAM lacks, bits the module sets from
    the TD's attributes (the mirror's effective CPUID)."""
    pred = mirror.init_vm_prediction(module, host, policy, request)
    out: list[Dropped] = []
    for c in pred.changes:
        if c.kind not in ("cleared", "overridden"):
            continue
        row = row_of(module, c.leaf, c.subleaf)
        e = None if row is None else mirror.find(request.init_vm.entries, row.leaf,
                                                  row.kvm_index)
        asked = 0 if e is None else e.reg(c.register)
        if is_value_register(c.leaf, c.subleaf, c.register) or (
                c.leaf == GPAW_LEAF and c.register == "eax"):
            continue
        out += [Dropped(bit_info(c.leaf, c.subleaf, c.register, b), c.reason)
                for b in bits_of(asked & c.mask)]
    return tuple(out)
