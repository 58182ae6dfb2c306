"""The kernel's CPUID rules for TDs, each in one place: GPAW, value registers, the denylist,
the allowlist, and the module couplings a request must meet (the rest of what the TDX
module does is kvmtdx.model.tdx_module's).

The mirror predicts with these, `verify` and `probe` build requests and judge
answers with them, and `infer` reads capabilities back with them.  The
simulated host keeps its own, independent copy of the same facts on purpose
(it is the second reading of the contract the tests hold this one to).
"""

from __future__ import annotations

from dataclasses import dataclass

from kvmtdx.structs import REGISTERS, CpuidEntry

FULL = 0xFFFFFFFF
ANY = -1  # a wildcard sub-leaf in register keys

# Bit numbers, as in Linux arch/x86/include/asm/cpufeatures.h and the TDX module ABI.
SEPT_VE_DISABLE = 1 << 28  # TD attribute; the one KVM 6.16 to 7.3 supports
LEAF7_EBX_HLE = 1 << 4
LEAF7_EBX_RTM = 1 << 11
LEAF7_ECX_WAITPKG = 1 << 5
LEAF7_ECX_PKS = 1 << 31
LEAF7_EDX_CORE_CAPABILITIES = 1 << 30

# KVM's knob for the guest physical address width: CPUID 0x80000008 EAX[23:16]
# carries it in INIT_VM, and KVM_TDX_CAPABILITIES reports the field as 0xff.
GPAW_LEAF = 0x80000008
GPAW_SHIFT = 16
GPAW_FIELD = 0xFF << GPAW_SHIFT
GPAW_VALUES = (48, 52)


def gpaw_of(e: CpuidEntry) -> int:
    return (e.eax & GPAW_FIELD) >> GPAW_SHIFT


def gpaw_entry(gpaw: int = 48, flags: int = 1) -> CpuidEntry:
    """The INIT_VM entry that carries a GPAW (flagged: find() takes it for index 0 only)."""
    return CpuidEntry(GPAW_LEAF, 0, flags, eax=gpaw << GPAW_SHIFT)


# Registers that carry values (counts, topology, F/M/S, address widths), not
# feature bits (spec section 6): a request gives them a valid value, never
# "every bit", and the series' allowlist does not filter them.
RegisterKey = tuple[int, int, str]  # (leaf, KVM index or ANY, register or "*")
VALUE_REGISTERS: frozenset[RegisterKey] = frozenset({
    (0x1, 0, "eax"), (0x1, 0, "ebx"),
    (0x4, ANY, "*"), (0x18, ANY, "*"), (0x1F, ANY, "*"),
    (GPAW_LEAF, 0, "eax"),
})


def key_matches(keys: frozenset[RegisterKey], leaf: int, index: int, register: str) -> bool:
    """Whether (leaf, index, register) is among `keys` (sub-leaf ANY, register '*' match all)."""
    return any((leaf, s, r) in keys for s in (index, ANY) for r in (register, "*"))


def is_value_register(leaf: int, index: int | None, register: str) -> bool:
    """True for registers that hold fields rather than features (spec section 6)."""
    return key_matches(VALUE_REGISTERS, leaf, 0 if index is None else index, register)


@dataclass(frozen=True, slots=True)
class Denylist:
    """Bits KVM hides from capabilities and refuses in INIT_VM, per row (upstream kernels).

    The refusal looks at the entry find() matched, by that entry's own leaf and
    index (not the row's): the hole the adversarial checks exercise.
    """

    bits: dict[tuple[int, int], dict[str, int]]
    # The hole closed: the refusal judges the row find() landed the entry on, not the entry's
    # own index (what a kernel that fixes the bypass does; kvmtdx.model.invariant.hole_closed).
    judges_row: bool = False

    def mask(self, leaf: int, index: int, register: str) -> int:
        return self.bits.get((leaf, index), {}).get(register, 0)

    def hits(self, e: CpuidEntry, row_index: int | None = None) -> tuple[str, int] | None:
        """(register, bits) of the first denied bits the entry carries, judged by its own index
        (by `row_index`, the row it landed on, when the denylist judges rows)."""
        index = row_index if self.judges_row and row_index is not None else e.index
        for r in REGISTERS:
            hit = e.reg(r) & self.mask(e.function, index, r)
            if hit:
                return r, hit
        return None


# Linux 6.16 to 7.3, arch/x86/kvm/vmx/tdx.c: TSX and WAITPKG in leaf 7 index 0.
TSX_WAITPKG_DENYLIST = Denylist({(7, 0): {"ebx": LEAF7_EBX_HLE | LEAF7_EBX_RTM,
                                          "ecx": LEAF7_ECX_WAITPKG}})


@dataclass(frozen=True)
class Coupling:
    """CPUID bits TDH.MNG.INIT wants all set or all clear on the TD's FINAL values (after
    the row masks and the host's native bits: public TDX module sources,
    tdh_mng_init.c read_and_set_cpuid_configurations), else CPUID_CONFIG.

    `tsx_ctrl`: set, they also need the host's TSX_CTRL (IA32_ARCH_CAPABILITIES bit 7),
    or the module fails the call with TDX_INCORRECT_MSR_VALUE, which KVM answers with
    -EIO and a kernel WARN.
    """

    leaf: int
    subleaf: int | None
    register: str
    mask: int
    check: str  # the Outcome check naming a break
    why: str
    tsx_ctrl: bool = False

    def broken(self, value: int) -> bool:
        return value & self.mask not in (0, self.mask)

    def met(self, value: int, *, tsx_ctrl: bool = True) -> int:
        """`value` with the coupled bits cleared unless the request can carry them."""
        keep = value & self.mask == self.mask
        return value if keep and (tsx_ctrl or not self.tsx_ctrl) else value & ~self.mask

    def covers(self, leaf: int, index: int, register: str, bit: int) -> bool:
        return ((self.leaf, self.subleaf or 0, self.register) == (leaf, index, register)
                and bool(self.mask >> bit & 1))


# Every coupling the mirror's users (builders, checks, the prober) respect; a new one goes
# here.  (PKS is not one: the module overwrites 7.0 ECX.PKS with ATTRIBUTES.PKS.)
MODULE_COUPLINGS: tuple[Coupling, ...] = (
    Coupling(7, 0, "ebx", LEAF7_EBX_HLE | LEAF7_EBX_RTM, "module_hle_rtm",
             "HLE and RTM must be equal on the TD's final values", tsx_ctrl=True),
)


def coupling_of(leaf: int, index: int, register: str, bit: int) -> Coupling | None:
    return next((c for c in MODULE_COUPLINGS if c.covers(leaf, index, register, bit)), None)


def lowest_bit(mask: int) -> int:
    return (mask & -mask).bit_length() - 1


def bits_of(mask: int, width: int = 32) -> list[int]:
    return [b for b in range(width) if mask >> b & 1]
