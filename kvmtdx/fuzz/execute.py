"""Sending a scenario to a backend: one fresh TD, its calls in order, and what the backend says
of itself around them (free TDX key IDs, kernel WARNs).

The vCPU path goes through the device as a VMM's would (a split irqchip, KVM_CREATE_VCPU,
KVM_TDX_GET_CPUID, KVM_SET_CPUID2 on the vCPU's fd), on any backend that answers it.
Needs no hypothesis: `kvmtdx fuzz --replay` runs saved findings through here too.
"""

from __future__ import annotations

import errno
from dataclasses import dataclass

from kvmtdx import layout
from kvmtdx.device import Kvm, Seam, TdxVm, Vcpu
from kvmtdx.fuzz.judgement import Answer, CapsAnswer, CpuidRead, Observed, VcpuAnswer
from kvmtdx.fuzz.result import End, Stats, VcpuStats
from kvmtdx.fuzz.scenario import CapsCall, Scenario, VcpuCall
from kvmtdx.model.requests import Request
from kvmtdx.session import free_key_ids, send_init_vm
from kvmtdx.structs import KVM_MAX_CPUID_ENTRIES


@dataclass
class Tally:
    """The calls a run made, for its report and the benchmark."""

    tds: int = 0
    init_vm_calls: int = 0
    caps_calls: int = 0
    vcpu_steps: int = 0
    get_cpuid_calls: int = 0
    set_cpuid2_calls: int = 0

    def vcpu(self, refused: str | None) -> VcpuStats:
        return VcpuStats(self.vcpu_steps, self.get_cpuid_calls, self.set_cpuid2_calls, refused)

    def stats(self, seconds: float, examples: int, unjudged: int, end: End,
              refused: str | None) -> Stats:
        return Stats(self.tds, self.init_vm_calls, self.caps_calls, seconds, examples,
                     unjudged, end, self.vcpu(refused))


@dataclass
class _Record:
    answers: list[Answer]
    held: list[int | None]
    warned: list[int | None]


def _init_vm(seam: Seam, td: TdxVm, step: Request, r: _Record) -> None:
    # The judge follows a dead VM through its TD state: asking costs an ioctl per -EIO.
    sent = send_init_vm(seam, td, step, ask_bugged=False)
    r.answers.append(sent.outcome)
    r.warned.append(sent.warned)


def _reads(vcpu: Vcpu, call: VcpuCall) -> tuple[CpuidRead, ...]:
    """KVM_TDX_GET_CPUID with the call's room and, after E2BIG, with the count KVM told."""
    first = vcpu.tdx_get_cpuid_raw(call.nent, fill=call.buffer())
    reads = [CpuidRead(first.errno, first.data)]
    told = layout.unpack_cpuid2_header(first.data)[0]
    if first.errno == errno.E2BIG and call.nent < told <= KVM_MAX_CPUID_ENTRIES:
        again = vcpu.tdx_get_cpuid_raw(told, fill=call.buffer(told))
        reads.append(CpuidRead(again.errno, again.data))
    return tuple(reads)


def _vcpu(td: TdxVm, call: VcpuCall, tally: Tally) -> VcpuAnswer:
    """The vCPU path, stopping where a VMM would: at the first ioctl that fails."""
    tally.vcpu_steps += 1
    split = None
    if call.split_irqchip:
        try:
            td.enable_split_irqchip()
            split = 0
        except OSError as e:
            return VcpuAnswer(e.errno or errno.EIO, None)
    try:
        vcpu = td.create_vcpu(0)
    except OSError as e:
        return VcpuAnswer(split, e.errno or errno.EIO)
    with vcpu:
        reads = _reads(vcpu, call)
        tally.get_cpuid_calls += len(reads)
        if not call.set_cpuid2 or reads[-1].errno:
            return VcpuAnswer(split, 0, reads)
        entries = layout.unpack_cpuid2(reads[-1].buffer)[1]
        tally.set_cpuid2_calls += 1
        return VcpuAnswer(split, 0, reads, vcpu.set_cpuid2(call.told(entries)))


def _caps(td: TdxVm, step: CapsCall, r: _Record) -> None:
    res = td.capabilities_raw(step.nent, flags=step.flags, hw_error=step.hw_error,
                              fill=step.buffer())
    r.answers.append(CapsAnswer(res.errno, res.data))
    r.warned.append(None)


def run_scenario(kvm: Kvm, seam: Seam, scenario: Scenario, tally: Tally) -> Observed:
    """The scenario on a fresh TD of `kvm`, closed (its vCPU too) before this returns."""
    free0 = free_key_ids(seam)
    r = _Record([], [], [])
    with kvm.create_td() as td:
        tally.tds += 1
        for step in scenario:
            if isinstance(step, CapsCall):
                _caps(td, step, r)
                tally.caps_calls += 1
            elif isinstance(step, VcpuCall):
                r.answers.append(_vcpu(td, step, tally))
                r.warned.append(None)
            else:
                _init_vm(seam, td, step, r)
                tally.init_vm_calls += 1
            free = free_key_ids(seam)
            r.held.append(None if free0 is None or free is None else free0 - free)
    free2 = free_key_ids(seam)
    return Observed(tuple(r.answers), tuple(r.held),
                    None if free0 is None or free2 is None else free0 - free2,
                    tuple(r.warned))
