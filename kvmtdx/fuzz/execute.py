"""Sending a scenario to a backend: one fresh TD, its calls in order, and what the backend says
of itself around them (free TDX key IDs, kernel WARNs, an accepted TD's CPUID).

Needs no hypothesis: `kvmtdx fuzz --replay` runs saved findings through here too.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from kvmtdx.device import Kvm, Seam, TdxVm
from kvmtdx.fuzz.judgement import Answer, CapsAnswer, Observed, TdCpuid
from kvmtdx.fuzz.scenario import CapsCall, Scenario
from kvmtdx.model.requests import Request
from kvmtdx.session import free_key_ids, init_vm_bytes, kernel_warnings


@dataclass
class Tally:
    """The calls a run made, for its report and the benchmark."""

    tds: int = 0
    init_vm_calls: int = 0
    caps_calls: int = 0


def td_cpuid(seam: Seam, td: TdxVm) -> TdCpuid | None:
    """The TD's CPUID as TDH.MNG.INIT left it, where the backend shows it: the simulated
    host's `vm_state(fd)` does; a real kernel gives it only to a vCPU (KVM_TDX_GET_CPUID)."""
    state = getattr(seam, "vm_state", None)
    if not callable(state) or td.fd is None:
        return None
    vm = state(td.fd)
    values = getattr(vm, "cpuid", None)
    if not isinstance(values, Mapping) or not values:
        return None
    return TdCpuid(dict(values), frozenset(getattr(vm, "faulting", ())))


@dataclass
class _Record:
    answers: list[Answer]
    held: list[int | None]
    warned: list[int | None]
    cpuid: list[TdCpuid | None]


def _init_vm(seam: Seam, td: TdxVm, step: Request, r: _Record) -> None:
    before = kernel_warnings(seam)
    o = td.init_vm(init_vm_bytes(step.init_vm), flags=step.flags, hw_error=step.hw_error)
    after = kernel_warnings(seam)
    r.answers.append(o)
    r.warned.append(None if before is None or after is None else after - before)
    r.cpuid.append(td_cpuid(seam, td) if o.errno == 0 else None)


def run_scenario(kvm: Kvm, seam: Seam, scenario: Scenario, tally: Tally) -> Observed:
    """The scenario on a fresh TD of `kvm`, closed before this returns."""
    free0 = free_key_ids(seam)
    r = _Record([], [], [], [])
    with kvm.create_td() as td:
        tally.tds += 1
        for step in scenario:
            if isinstance(step, CapsCall):
                res = td.capabilities_raw(step.nent, flags=step.flags, hw_error=step.hw_error,
                                          fill=step.buffer())
                r.answers.append(CapsAnswer(res.errno, res.data))
                r.warned.append(None)
                r.cpuid.append(None)
                tally.caps_calls += 1
            else:
                _init_vm(seam, td, step, r)
                tally.init_vm_calls += 1
            free = free_key_ids(seam)
            r.held.append(None if free0 is None or free is None else free0 - free)
    free2 = free_key_ids(seam)
    return Observed(tuple(r.answers), tuple(r.held),
                    None if free0 is None or free2 is None else free0 - free2,
                    tuple(r.warned), tuple(r.cpuid))
