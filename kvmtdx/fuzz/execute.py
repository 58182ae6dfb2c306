"""Sending a scenario to a backend: one fresh TD, its calls in order, the key IDs around them.

Needs no hypothesis: `kvmtdx fuzz --replay` runs saved findings through here too.
"""

from __future__ import annotations

from dataclasses import dataclass

from kvmtdx.device import Kvm, Seam
from kvmtdx.fuzz.judge import Answer, CapsAnswer, Observed
from kvmtdx.fuzz.scenario import CapsCall, Scenario
from kvmtdx.session import free_key_ids, init_vm_bytes


@dataclass
class Tally:
    """The calls a run made, for its report and the benchmark."""

    tds: int = 0
    init_vm_calls: int = 0
    caps_calls: int = 0


def run_scenario(kvm: Kvm, seam: Seam, scenario: Scenario, tally: Tally) -> Observed:
    """The scenario on a fresh TD of `kvm`, closed before this returns."""
    free0 = free_key_ids(seam)
    answers: list[Answer] = []
    held: list[int | None] = []
    with kvm.create_td() as td:
        tally.tds += 1
        for step in scenario:
            if isinstance(step, CapsCall):
                res = td.capabilities_raw(step.nent, flags=step.flags, hw_error=step.hw_error,
                                          fill=step.buffer())
                answers.append(CapsAnswer(res.errno, res.data))
                tally.caps_calls += 1
            else:
                answers.append(td.init_vm(init_vm_bytes(step.init_vm), flags=step.flags,
                                          hw_error=step.hw_error))
                tally.init_vm_calls += 1
            free = free_key_ids(seam)
            held.append(None if free0 is None or free is None else free0 - free)
    free2 = free_key_ids(seam)
    return Observed(tuple(answers), tuple(held),
                    None if free0 is None or free2 is None else free0 - free2)
