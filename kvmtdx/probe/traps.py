"""The lookup traps a probe sends after classifying bit by bit.

Each bit is classified in a well-formed request (its entry flagged at its own row), which
cannot show the hole in KVM's CPUID lookup: upstream's denylist judges the entry find()
matched by that entry's own index, so an unflagged entry at another index carries hidden
bits onto row 7.0 (spec section 4).  For every hidden leaf-7.0 bit KVM refused itself,
with its coupling partners (HLE with RTM), the probe sends the steering trap of
kvmtdx.model.builders once: one TD each, a handful per run.  A correct kernel refuses the
bit again (KVM_REJECTED).  Without these a probe of today's kernel would pass.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Protocol

from kvmtdx.model import builders, catalog, rules
from kvmtdx.model.builders import Trap
from kvmtdx.model.requests import Request
from kvmtdx.outcome import Outcome
from kvmtdx.probe.oracle import Oracle
from kvmtdx.probe.result import BitClass, BitKey, TrapResult
from kvmtdx.structs import REGISTERS, Capabilities

LEAF, INDEX = 7, 0  # the row upstream's denylist guards, and the lookup lets bits onto


class _HasClass(Protocol):
    @property
    def cls(self) -> BitClass: ...


def units(classes: Mapping[BitKey, _HasClass]) -> list[tuple[str, int]]:
    """(register, mask) of each hidden leaf-7.0 bit KVM refused, coupled bits together."""
    refused = {(k[2], k[3]) for k, c in classes.items()
               if (k[0], k[1]) == (LEAF, INDEX) and c.cls is BitClass.HIDDEN_KVM_REJECTED}
    out: list[tuple[str, int]] = []
    done: set[tuple[str, int]] = set()
    for register, bit in sorted(refused, key=lambda rb: (REGISTERS.index(rb[0]), rb[1])):
        if (register, bit) in done:
            continue
        c = rules.coupling_of(LEAF, INDEX, register, bit)
        mask = 1 << bit
        if c is not None:
            mask = sum(1 << b for b in rules.bits_of(c.mask) if (register, b) in refused)
        done.update((register, b) for b in rules.bits_of(mask))
        out.append((register, mask))
    return out


def case_name(t: TrapResult) -> str:
    """A KTAP/JUnit case name: lookup_trap_7_0_ecx_waitpkg."""
    names = "_".join(n.lower() for n in t.names)
    return re.sub(r"[^a-z0-9_]", "_", f"lookup_trap_{t.leaf:x}_{t.subleaf}_{t.register}_{names}")


def lookup_traps(caps: Capabilities, oracle: Oracle,
                 classes: Mapping[BitKey, _HasClass]) -> list[TrapResult]:
    """Send one steering trap per unit (see units) on the minimal request."""
    base = builders.base_request(caps.supported_xfam)
    planned: list[tuple[str, int, Request]] = []
    for register, mask in units(classes):
        regs = {r: (mask if r == register else 0) for r in REGISTERS}
        req = builders.trap_request(Trap.STEER, base, caps.entries, eax=regs["eax"],
                                    ebx=regs["ebx"], ecx=regs["ecx"], edx=regs["edx"])
        planned.append((register, mask, req))
    outs: Sequence[Outcome | None] = oracle([r.init_vm for _, _, r in planned]) if planned \
        else []
    results: list[TrapResult] = []
    for (register, mask, req), out in zip(planned, outs, strict=True):
        bits = tuple(rules.bits_of(mask))
        names = tuple(catalog.bit_name(LEAF, INDEX, register, b) for b in bits)
        results.append(TrapResult(LEAF, INDEX, register, bits, names, req, out))
    return results
