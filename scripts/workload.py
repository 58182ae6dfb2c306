"""The request mixes the benchmarks time: what verify and probe send, and what a fuzzer sends.

`verify_requests` is verify's and probe's workload: the request with every reported bit,
the minimal request, every unreported feature bit of every listed row alone on the
minimal request, every reported bit alone, the lookup traps and the legal encodings
verify's accepting checks send.  `flip_requests` is the full request with each bit of each
entry toggled in turn (every request full length).  `fuzz_requests` is a seeded,
reproducible stream of the
mutations the mirror/simulation cross-check draws (tests/test_sim_crosscheck.py): bits
flipped, bits the module takes, denied bits, rows moved, flags and indexes changed, entries
dropped, duplicated, swapped and trapped, attributes, XFAM, GPAW, F/M/S, 0x1F topologies,
reserved words, padding, a lying nent, kvm_tdx_cmd words.  Both are pure functions of
(module, host, policy, seed), so the counts a benchmark prints are deterministic.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import replace

from kvmtdx.model import builders, mirror
from kvmtdx.model.policy import Policy
from kvmtdx.model.profiles import Host, ModuleProfile
from kvmtdx.model.requests import Request
from kvmtdx.model.rules import LEAF7_ECX_WAITPKG, bits_of, is_value_register
from kvmtdx.structs import FLAG_SIGNIFICANT_INDEX, REGISTERS, CpuidEntry, InitVm


def verify_requests(module: ModuleProfile, host: Host, policy: Policy) -> list[Request]:
    reported = mirror.reported_entries(module, host, policy)
    xfam = mirror.supported_xfam(module, host)
    base = builders.base_request(xfam)
    full = mirror.full_request(module, host, policy)
    out = [full, base, builders.reversed_order(full), builders.with_flag_bits(full),
           builders.with_ignored_indexes(full), builders.with_measurements(full),
           builders.realistic_values(full, reported, fms=host.fms)]
    for e in reported:
        for r in REGISTERS:
            if is_value_register(e.function, e.index, r):
                continue
            for b in bits_of(0xFFFFFFFF):
                entry = CpuidEntry(e.function, e.index, FLAG_SIGNIFICANT_INDEX)
                out.append(builders.base_request(xfam, (entry.with_reg(r, 1 << b),)))
    for trap in builders.Trap:
        out.append(builders.trap_request(trap, base, reported, ebx=0, ecx=LEAF7_ECX_WAITPKG))
    return out


def flip_requests(module: ModuleProfile, host: Host, policy: Policy) -> list[Request]:
    """The full request, then each of its entries with one bit toggled (every bit): what a
    bit-flipping fuzzer sends, every request as long as the full one."""
    base = mirror.full_request(module, host, policy).init_vm
    out = [Request(init_vm=base)]
    for i, e in enumerate(base.entries):
        for r in REGISTERS:
            for bit in range(32):
                flipped = e.with_reg(r, e.reg(r) ^ 1 << bit)
                entries = (*base.entries[:i], flipped, *base.entries[i + 1:])
                out.append(Request(init_vm=replace(base, entries=entries)))
    return out


TSX = (0, 1 << 4, 1 << 11, 1 << 4 | 1 << 11)
XFAM_SET = (0x3, 0x7, 0x23, 0x43, 0xE3, 0xE7, 0x20003, 0x40003, 0x60003, 0x60007, 0x803,
            0x1003, 0x1803, 0x103, 0x8003, 0x2E7, 0x6DBE7)
FUNCTIONS = (0, 1, 4, 7, 0xD, 0x1E, 0x24, 0x80000001, 0x80000008)
OPS = ("flip", "flip", "flip", "flip", "module_bit", "module_bit", "module_bit", "deny",
       "module_row", "flag", "index", "function", "drop", "dup", "trap", "swap", "bypass",
       "attributes", "xfam", "xfam_set", "xfam_set", "gpaw", "fms", "topology", "topology",
       "reserved", "padding", "mr", "flags", "hw_error", "reverse", "flag_bits", "realistic")


class _Fuzz:
    """One request being mutated: the struct's words and its entries."""

    def __init__(self, module: ModuleProfile, host: Host, policy: Policy, rng: random.Random,
                 full: Request) -> None:
        self.m, self.h, self.policy, self.rng = module, host, policy, rng
        self.iv: InitVm = full.init_vm
        self.entries = list(full.init_vm.entries)
        self.flags = 0
        self.hw_error = 0

    def entry_op(self, op: str) -> None:
        rng, entries = self.rng, self.entries
        i = rng.randrange(len(entries))
        e = entries[i]
        if op == "flip":
            r = rng.choice(REGISTERS)
            entries[i] = e.with_reg(r, e.reg(r) ^ 1 << rng.randrange(32))
        elif op == "module_bit":
            k = self.m.row_index(e.function, None if e.function in (1, 0xA, 0x1C, 0x19,
                                                                    0x80000008) else e.index)
            n = rng.randrange(4)
            allowed = bits_of(self.m.rows[k].module_allows()[n]) if k is not None else []
            if allowed:
                reg = REGISTERS[n]
                entries[i] = e.with_reg(reg, e.reg(reg) | 1 << rng.choice(allowed))
        elif op == "module_row":
            row = rng.choice(self.m.rows)
            a, b, c, d = row.module_allows()
            entries[i] = replace(e, function=row.leaf, index=row.kvm_index, eax=a, ebx=b,
                                 ecx=c, edx=d)
        elif op == "flag":
            entries[i] = replace(e, flags=e.flags ^ FLAG_SIGNIFICANT_INDEX)
        elif op == "index":
            entries[i] = replace(e, index=rng.choice((0, 1, 2, 5, 0xFFFFFFFF)))
        elif op == "function":
            entries[i] = replace(e, function=rng.choice(FUNCTIONS))
        elif op == "drop":
            del entries[i]
        elif op == "dup":
            entries.insert(rng.randrange(len(entries) + 1), e)
        elif op == "swap":
            j = rng.randrange(len(entries))
            entries[i], entries[j] = entries[j], entries[i]

    def leaf_op(self, op: str) -> None:
        rng, entries = self.rng, self.entries
        if op == "deny":
            hit = [k for k, x in enumerate(entries) if x.function == 7]
            if hit:
                e = entries[hit[0]]
                entries[hit[0]] = replace(e, ebx=e.ebx | rng.choice(TSX),
                                          ecx=e.ecx | rng.choice((0, LEAF7_ECX_WAITPKG)))
        elif op == "trap":
            entries.insert(rng.randrange(len(entries) + 1), CpuidEntry(
                7, rng.choice((0, 1, 3, 5)), rng.choice((0, FLAG_SIGNIFICANT_INDEX)),
                ebx=rng.choice(TSX), ecx=rng.choice((0, LEAF7_ECX_WAITPKG))))
        elif op == "bypass":
            self.entries = [CpuidEntry(7, 1, FLAG_SIGNIFICANT_INDEX),
                            CpuidEntry(7, 2, FLAG_SIGNIFICANT_INDEX),
                            CpuidEntry(7, 5, 0, ebx=rng.choice(TSX),
                                       ecx=rng.choice((0, LEAF7_ECX_WAITPKG))),
                            *(e for e in entries if e.function != 7)]
        elif op == "gpaw":
            g = rng.choice((48, 52, 0, 39, 57, 0xFF))
            self._set(0x80000008, lambda e: replace(e, eax=(e.eax & ~0xFF0000) | g << 16))
        elif op == "fms":
            fms = rng.choice((0, self.h.fms, 0x000806F8, 0x00050654))
            self._set(1, lambda e: replace(e, eax=fms))
        elif op == "topology":
            self._topology()

    def _set(self, function: int, change: Callable[[CpuidEntry], CpuidEntry]) -> None:
        hit = [k for k, x in enumerate(self.entries) if x.function == function]
        if hit:
            self.entries[hit[0]] = change(self.entries[hit[0]])

    def _topology(self) -> None:
        rng = self.rng
        shape = rng.randrange(3)
        levels = [] if shape == 0 else [(1, 2, 1, None), (7, 0x70, 2, None)] if shape == 1 \
            else [(rng.randrange(32), rng.choice((0, 1, 2, 0x70)), rng.choice((0, 1, 2, 3, 5)),
                   rng.choice((None, 0, 1, 4))) for _ in range(rng.randrange(7))]
        out = []
        for e in self.entries:
            if e.function == 0x1F and e.index < 6:
                shift, count, kind, number = levels[e.index] if e.index < len(levels) \
                    else (0, 0, 0, 0)
                level = (e.index if number is None else number) if kind else 0
                e = replace(e, eax=shift, ebx=count, ecx=kind << 8 | level, edx=0)
            out.append(e)
        self.entries = out

    def word_op(self, op: str) -> None:
        rng, iv = self.rng, self.iv
        if op == "attributes":
            self.iv = replace(iv, attributes=rng.choice((0, 1 << 28, 1 << 30, 1, 1 << 63,
                                                         1 << rng.randrange(64))))
        elif op == "xfam":
            self.iv = replace(iv, xfam=iv.xfam ^ 1 << rng.randrange(64))
        elif op == "xfam_set":
            self.iv = replace(iv, xfam=rng.choice(XFAM_SET))
        elif op == "reserved":
            words = list(iv.reserved)
            words[rng.randrange(12)] = rng.randrange(1, 2**64)
            self.iv = replace(iv, reserved=tuple(words))
        elif op == "padding":
            self.iv = replace(iv, cpuid_padding=rng.randrange(1, 2**32))
        elif op == "mr":
            self.iv = replace(iv, mrowner=(rng.randrange(2**64),) * 6)
        elif op == "flags":
            self.flags = rng.randrange(1, 2**32)
        elif op == "hw_error":
            self.hw_error = rng.randrange(1, 2**64)

    def shape_op(self, op: str) -> None:
        req = Request(init_vm=replace(self.iv, entries=tuple(self.entries)))
        if op == "reverse":
            req = builders.reversed_order(req)
        elif op == "flag_bits":
            req = builders.with_flag_bits(req, self.rng.choice((2, 4, 6, 0x80000000)))
        else:
            reported = mirror.reported_entries(self.m, self.h, self.policy)
            req = builders.realistic_values(req, reported, fms=self.h.fms ^ self.rng.randrange(2))
        self.entries = list(req.init_vm.entries)

    def request(self) -> Request:
        iv = replace(self.iv, entries=tuple(self.entries))
        lie = self.rng.randrange(11)
        if lie == 8 and self.entries:
            iv = replace(iv, nent=self.rng.randrange(len(self.entries)))
        elif lie == 9:
            iv = replace(iv, nent=len(self.entries) + 1
                         + self.rng.randrange(256 - len(self.entries)))
        elif lie == 10:
            iv = replace(iv, nent=self.rng.choice((257, 1000, 0x80000000, 0xFFFFFFFF)))
        return Request(init_vm=iv, flags=self.flags, hw_error=self.hw_error)


_ENTRY_OPS = frozenset({"flip", "module_bit", "module_row", "flag", "index", "function",
                        "drop", "dup", "swap"})
_LEAF_OPS = frozenset({"deny", "trap", "bypass", "gpaw", "fms", "topology"})
_SHAPE_OPS = frozenset({"reverse", "flag_bits", "realistic"})


def fuzz_requests(module: ModuleProfile, host: Host, policy: Policy, n: int,
                  seed: int = 0) -> list[Request]:
    """`n` requests: the full request with up to four mutations each, seeded."""
    rng = random.Random(f"{seed}/{module.name}/{host.name}/{policy.name}")
    full = mirror.full_request(module, host, policy)
    out = []
    for _ in range(n):
        f = _Fuzz(module, host, policy, rng, full)
        for op in rng.choices(OPS, k=rng.randrange(5)):
            if op in _ENTRY_OPS:
                if f.entries:
                    f.entry_op(op)
            elif op in _LEAF_OPS:
                f.leaf_op(op)
            elif op in _SHAPE_OPS:
                f.shape_op(op)
            else:
                f.word_op(op)
        out.append(f.request())
    return out
