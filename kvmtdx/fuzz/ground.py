"""What the request generators draw from: what the kernel reported, row by row, and the
module profile and host the run knows.

Pure code.  Every generated request starts from one of two valid requests built here (the
minimal one, and the one with every reported feature bit) and is changed by operations
that pick rows, registers and bits by class: inside what was reported, hidden by KVM but
taken by the module, outside what the module takes.
"""

from __future__ import annotations

from dataclasses import dataclass

from kvmtdx.model import builders, get_cpuid, mirror
from kvmtdx.model.policy import Policy
from kvmtdx.model.profiles import Host, ModuleProfile, Regs
from kvmtdx.model.requests import Request
from kvmtdx.model.rules import bits_of, is_value_register
from kvmtdx.structs import FLAG_SIGNIFICANT_INDEX, REGISTERS, CpuidEntry

FULL = 0xFFFFFFFF


@dataclass(frozen=True, slots=True)
class Row:
    """One reported row as a request addresses it."""

    leaf: int
    index: int  # KVM's index
    flags: int  # the flag its entry carries: the significant index where the row has sub-leaves
    reported: Regs
    takes: Regs  # what the module takes (config_direct | allow_direct)
    value: tuple[bool, bool, bool, bool]  # per register: a value register, not features

    def template(self) -> CpuidEntry:
        return CpuidEntry(self.leaf, self.index, self.flags)

    def mask(self, register: int, kind: int) -> int:
        """Bits of one register of a class: 0 inside what was reported, 1 hidden by KVM but
        taken by the module, 2 outside what the module takes, 3 any."""
        rep, take = self.reported[register], self.takes[register]
        if kind == 0:
            return rep
        if kind == 1:
            return take & ~rep & FULL
        if kind == 2:
            return ~take & FULL
        return FULL


# The bits of one class, by row and register: (row position in Ground.rows, ((register,
# (bit, ...)), ...)), only rows and registers that have some.
RegisterBits = tuple[int, tuple[int, ...]]
RowBits = tuple[int, tuple[RegisterBits, ...]]
KINDS = 3  # the bit classes listed whole (Row.mask 0-2; class 3, any bit, is drawn directly)


@dataclass(frozen=True, slots=True)
class Ground:
    reported: tuple[CpuidEntry, ...]
    supported_attrs: int
    supported_xfam: int
    rows: tuple[Row, ...]  # the reported rows the module profile names
    minimal: Request
    full: Request
    native_fms: int
    multi: tuple[int, ...]  # the positions in `rows` of the rows of multi-row leaves
    # Per bit class (Row.mask 0 to 2), the rows and registers that have bits of it: a class
    # is drawn first, then a row, a register and a bit, so the few bits KVM hides are drawn
    # as often as the hundreds it reports, and a row's one hidden bit as often as another
    # row's eight.  `multi_bits`: the same within the rows of multi-row leaves.
    bits: tuple[tuple[RowBits, ...], ...]
    multi_bits: tuple[tuple[RowBits, ...], ...]
    # How many entries KVM_TDX_GET_CPUID gives after each valid request (where the policy
    # is known and the mirror foresees them): the vCPU path's buffers are drawn around them.
    td_entries: tuple[int, ...] = ()

    @property
    def valid(self) -> tuple[Request, Request]:
        return (self.minimal, self.full)


def _bit_lists(rows: tuple[Row, ...], among: range | tuple[int, ...]
               ) -> tuple[tuple[RowBits, ...], ...]:
    out = []
    for kind in range(KINDS):
        per_row = []
        for k in among:
            regs = tuple((r, tuple(bits_of(rows[k].mask(r, kind)))) for r in range(4))
            regs = tuple((r, b) for r, b in regs if b)
            if regs:
                per_row.append((k, regs))
        out.append(tuple(per_row))
    return tuple(out)


def _td_entries(module: ModuleProfile, host: Host, policy: Policy | None,
                requests: tuple[Request, ...]) -> tuple[int, ...]:
    """KVM_TDX_GET_CPUID's count after each request the mirror foresees ACCEPTED."""
    if policy is None:
        return ()
    counts = []
    for req in requests:
        pred = mirror.init_vm_prediction(module, host, policy, req, explain=False)
        entries = get_cpuid.predicted(module.tables, pred)
        if entries is not None:
            counts.append(len(entries))
    return tuple(dict.fromkeys(counts))


def ground(reported: tuple[CpuidEntry, ...], supported_attrs: int, supported_xfam: int,
           module: ModuleProfile, host: Host, policy: Policy | None = None) -> Ground:
    """The generators' ground for a kernel that reported `reported` (and those attributes
    and XFAM) on `module` and `host` (and, where known, `policy`)."""
    rows: list[Row] = []
    subleaves: list[int | None] = []
    for e in reported:
        k = next((i for i, r in enumerate(module.rows)
                  if (r.leaf, r.kvm_index) == (e.function, e.index)), None)
        sub = module.rows[k].subleaf if k is not None else e.index
        subleaves.append(sub)
        if k is None:
            continue
        values = tuple(is_value_register(e.function, sub, r) for r in REGISTERS)
        a, b, c, d = values
        rows.append(Row(e.function, e.index, 0 if sub is None else FLAG_SIGNIFICANT_INDEX,
                        e.regs(), module.rows[k].module_allows(), (a, b, c, d)))
    full = builders.full_request(reported, attributes=supported_attrs, xfam=supported_xfam,
                                 subleaves=subleaves, tsx_ctrl=host.tsx_ctrl)
    leaves = builders.multi_row_leaves(reported)
    all_rows = tuple(rows)
    multi = tuple(k for k, r in enumerate(all_rows) if r.index in leaves.get(r.leaf, ()))
    minimal = builders.base_request(supported_xfam)
    return Ground(reported, supported_attrs, supported_xfam, all_rows, minimal, full,
                  host.native_fms(), multi, _bit_lists(all_rows, range(len(all_rows))),
                  _bit_lists(all_rows, multi), _td_entries(module, host, policy, (minimal, full)))
