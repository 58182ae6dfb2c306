"""What a TD really gets: one INIT_VM on a fresh TD, then its CPUID through a vCPU.

`kvmtdx init-vm --effective` and `kvmtdx td-cpuid` share this: KVM_TDX_CAPABILITIES (the
rows to compare, and what the run knows), KVM_TDX_INIT_VM, and after an ACCEPTED one a
split irqchip, vCPU 0 and KVM_TDX_GET_CPUID.  The TD's CPUID is set beside the request
(kvmtdx.model.td_diff): every bit of a CPUID_CONFIG row that differs, and why, by the
module model when the module is known.  Every fd is closed before this returns.
"""

from __future__ import annotations

from dataclasses import dataclass

from kvmtdx.device import Kvm, TdCpuidRead
from kvmtdx.knowledge import Given, Knowledge, complete
from kvmtdx.model import builders, mirror
from kvmtdx.model.catalog import BitRef
from kvmtdx.model.mirror import InitVmPrediction
from kvmtdx.model.requests import Request
from kvmtdx.model.td_diff import BitDiff, differences, rows_of, smuggled
from kvmtdx.outcome import Kind
from kvmtdx.session import Backend, InitVmRun, send_init_vm
from kvmtdx.structs import Capabilities


@dataclass(frozen=True)
class TdCpuidRun:
    request: Request
    run: InitVmRun
    read: TdCpuidRead | None  # None: INIT_VM was not ACCEPTED
    knowledge: Knowledge
    prediction: InitVmPrediction | None  # the mirror's, where module, host and policy are known
    diffs: tuple[BitDiff, ...]
    smuggled: tuple[BitRef, ...]  # requested, never reported, yet in the TD's CPUID


def default_request(know: Knowledge, caps: Capabilities) -> Request:
    """Every reported feature bit: the mirror's request, or one built from the capabilities."""
    if know.module is not None and know.host is not None and know.policy is not None:
        return mirror.full_request(know.module, know.host, know.policy)
    return builders.full_request(caps.entries, attributes=0, xfam=caps.supported_xfam)


def _predict(know: Knowledge, request: Request) -> InitVmPrediction | None:
    if know.module is None or know.host is None or know.policy is None:
        return None
    return mirror.init_vm_prediction(know.module, know.host, know.policy, request)


def td_cpuid_once(backend: Backend, request: Request | None, known: Given,
                  release: str | None = None) -> TdCpuidRun:
    """INIT_VM with `request` (default: every reported bit) on a fresh TD, and what the TD
    then has.  KvmError(skip=True) without TDX."""
    read: TdCpuidRead | None = None
    with Kvm(backend.seam, backend.path) as kvm, kvm.create_td() as td:
        caps = td.capabilities()
        know = complete(known, caps, release)
        req = request if request is not None else default_request(know, caps)
        sent = send_init_vm(backend.seam, td, req)
        if sent.outcome.kind is Kind.ACCEPTED:
            read = td.read_cpuid()
    run = InitVmRun(outcome=sent.outcome, backend=backend.label, counters=kvm.counters,
                    kernel_warnings=sent.warned, vm_bugged=sent.bugged)
    pred = _predict(know, req)
    diffs: tuple[BitDiff, ...] = ()
    hidden: tuple[BitRef, ...] = ()
    if read is not None and read.entries is not None:
        rows = rows_of(know.module, caps.entries)
        diffs = differences(know.module, rows, req.init_vm.entries, read.entries,
                            pred.changes if pred is not None else ())
        hidden = smuggled(rows, caps.entries, req.init_vm.entries, read.entries)
    return TdCpuidRun(req, run, read, know, pred, diffs, hidden)
