"""The vCPU path's answers (scenario.VcpuCall) against Linux 7.3 as the model predicts it.

Pure code.  After the INIT_VMs before it, a VMM splits the irqchip, creates a vCPU, reads the
TD's CPUID with KVM_TDX_GET_CPUID and may hand KVM_SET_CPUID2 a CPUID of its own; each
answer is held to kvmtdx.model.vcpu (the errnos, what KVM_TDX_GET_CPUID writes where) and
the entries to the mirror's effective CPUID as Linux 7.3's walk returns it
(kvmtdx.model.get_cpuid, GPAW field included), bits a saved profile does not know excused.
With a host inferred from the capabilities (which cannot say what the CPU gives the TD),
KVM_TDX_GET_CPUID is held only to its own count: E2BIG exactly when the room is short,
nothing written but the header then, nothing past the entries otherwise.

Linux 7.3 takes any CPUID in KVM_SET_CPUID2 on a TD vCPU; a kernel that refuses one unlike
the TD's is STRICTER (the series' open question closed: invariant.set_cpuid2_validated).  A
backend that answers no vCPU ioctl (ENOTTY) is not judged here: the judge says so instead.
"""

from __future__ import annotations

import errno
from collections.abc import Sequence
from dataclasses import dataclass

from kvmtdx import layout
from kvmtdx.fuzz.judgement import (
    SPLIT_IRQCHIP,
    Call,
    CpuidRead,
    Discrepancy,
    Model,
    VcpuAnswer,
    Verdict,
    errno_text,
)
from kvmtdx.fuzz.scenario import VcpuCall
from kvmtdx.model import get_cpuid, invariant, lifecycle, vcpu
from kvmtdx.model.lifecycle import TdState
from kvmtdx.model.policy import Policy
from kvmtdx.model.requests import Request
from kvmtdx.outcome import Outcome
from kvmtdx.structs import KVM_MAX_CPUID_ENTRIES, CpuidEntry

ENTRY = layout.SIZEOF_CPUID_ENTRY2
HEADER = layout.SIZEOF_CPUID2
READ_NOTE = ("KVM_TDX_GET_CPUID writes the count it needs to nent with the caller's padding, "
             "and its entries only when they all fit (E2BIG: none)")


@dataclass(frozen=True, slots=True)
class Initialised:
    """The INIT_VM that initialised the TD, and the policy whose answer it was (the run's,
    or for a stricter kernel the one with its known hole closed)."""

    request: Request
    policy: Policy


@dataclass(frozen=True, slots=True)
class _Td:
    """What the TD's CPUID is predicted to be: `known` False where the host cannot tell;
    `entries` None where the walk fails (-EIO)."""

    known: bool
    entries: tuple[CpuidEntry, ...] | None = None
    accepted: Outcome | None = None


def _errno_departure(k: int, ioctl: str, want: int, got: int | None) -> Discrepancy:
    return Discrepancy(k, Call.VCPU, Verdict.DIFFERS, f"{ioctl} {errno_text(want)}",
                       f"{ioctl} {errno_text(got)}",
                       (Call.VCPU.value, ioctl, errno_text(want), errno_text(got)),
                       note="a TD vCPU needs an initialised TD (EIO) and a split irqchip "
                            "(EINVAL), Linux 7.3 tdx_vcpu_create")


def vcpu_step(model: Model, state: TdState, origin: Initialised | None, k: int,
              call: VcpuCall, answer: VcpuAnswer) -> tuple[Discrepancy | None, str | None]:
    """Call `k` of a scenario judged, and (ENOTTY) which vCPU ioctl the backend lacks."""
    refused = answer.refused_by_backend
    if refused is not None:
        return None, refused
    dead = state is TdState.DEAD
    if call.split_irqchip:
        want = vcpu.split_irqchip_errno(dead=dead)
        if answer.split_irqchip != want:
            return _errno_departure(k, SPLIT_IRQCHIP, want, answer.split_irqchip), None
        if want:
            return None, None
    want = vcpu.create_vcpu_errno(dead=dead, initialized=state is TdState.INITIALIZED,
                                  split=call.split_irqchip)
    if answer.create_vcpu != want:
        return _errno_departure(k, "KVM_CREATE_VCPU", want, answer.create_vcpu), None
    if want:
        return None, None
    td = _predicted(model, origin)
    return _reads(model, td, k, call, answer) or _set_cpuid2(k, call, answer), None


def _predicted(model: Model, origin: Initialised | None) -> _Td:
    if origin is None or not model.host_exact:
        return _Td(False)
    pred = lifecycle.prediction_in(model.module, model.host, origin.policy,
                                   TdState.UNINITIALIZED, origin.request, explain=False)
    return _Td(True, get_cpuid.predicted(model.module.tables, pred), pred.outcome)


# ---------------------------------------------------------------------------
# KVM_TDX_GET_CPUID.


def _nent(buffer: bytes) -> int:
    return layout.unpack_cpuid2_header(buffer)[0]


def _expected(td: _Td, buffer: bytes, read: CpuidRead) -> tuple[int, bytes]:
    """The read's errno and buffer: as predicted, or (the TD unknown) as its own count says."""
    if td.known:
        return vcpu.get_cpuid_answer(td.entries, buffer)
    if read.errno == errno.EIO:
        return errno.EIO, buffer
    count = _nent(read.buffer)
    got = layout.unpack_cpuid2(read.buffer)[1]
    return vcpu.get_cpuid_answer(got if len(got) == count else (CpuidEntry(0),) * count, buffer)


def _reads(model: Model, td: _Td, k: int, call: VcpuCall,
           answer: VcpuAnswer) -> Discrepancy | None:
    """Each KVM_TDX_GET_CPUID: the drawn room, then after E2BIG the count KVM told."""
    buffer = call.buffer()
    for n, read in enumerate(answer.reads):
        want_errno, want = _expected(td, buffer, read)
        d = _read(model, td, k, len(buffer), want_errno, want, read)
        if d is not None:
            return d
        told = _nent(want)
        if want_errno != errno.E2BIG or not told <= KVM_MAX_CPUID_ENTRIES or n:
            return None
        buffer = call.buffer(told)
    return None


def _room(size: int) -> str:
    room = (size - HEADER) // ENTRY
    return f"KVM_TDX_GET_CPUID with room for {room} entr{'y' if room == 1 else 'ies'}"


def _read(model: Model, td: _Td, k: int, size: int, want_errno: int, want: bytes,
          read: CpuidRead) -> Discrepancy | None:
    """One read: errno, the header, then the entries (the TD's CPUID), then the rest."""
    got = read.buffer
    head = f"{_room(size)}: "
    if read.errno != want_errno or got[:HEADER] != want[:HEADER]:
        said = [errno_text(want_errno), f"nent {_nent(want)}"]
        saw = [errno_text(read.errno), f"nent {_nent(got)}"]
        if got[4:HEADER] != want[4:HEADER]:
            said.append("the caller's padding")
            saw.append(f"padding 0x{layout.unpack_cpuid2_header(got)[1]:08x}")
        what = "errno" if read.errno != want_errno else "header"
        return _read_departure(k, head + ", ".join(said), head + ", ".join(saw), what,
                               want_errno, read.errno)
    count = _nent(want) if not want_errno else 0
    if td.known and td.entries is not None and count:
        d = _entries(model, td, k, td.entries, layout.unpack_cpuid2(got)[1])
        if d is not None:
            return d
    end = HEADER + count * ENTRY
    if got[end:] != want[end:]:
        first = (next(i for i in range(end, len(got)) if got[i] != want[i]) - HEADER) // ENTRY
        kept = f"nothing past its {count} entries" if count else "no entry"
        return _read_departure(k, head + f"{errno_text(want_errno)}, {kept} written",
                               head + f"{errno_text(read.errno)}, entries[{first}] written",
                               "written", want_errno, read.errno)
    return None


def _read_departure(k: int, expected: str, actual: str, what: str, want: int,
                    got: int) -> Discrepancy:
    return Discrepancy(k, Call.GET_CPUID, Verdict.DIFFERS, expected, actual,
                       (Call.GET_CPUID.value, what, errno_text(want), errno_text(got)),
                       note=READ_NOTE)


def _entries(model: Model, td: _Td, k: int, want: Sequence[CpuidEntry],
             got: Sequence[CpuidEntry]) -> Discrepancy | None:
    """The TD's CPUID, leaf by leaf, against the mirror's (bits the profile cannot know
    excused)."""
    excused = get_cpuid.unknown_bits(model.module)
    for a, b in zip(want, got, strict=False):
        key, label = (a.function, a.index, a.flags), get_cpuid.entry_label(a)
        if key != (b.function, b.index, b.flags):
            return _cpuid_departure(k, td, f"{get_cpuid.entry_label(b)} where {label} belongs",
                                    (label, "row"))
        differ = get_cpuid.differing_registers(b, a, excused.get(key, (0, 0, 0, 0)))
        if differ:
            r, vb, va = differ[0]
            return _cpuid_departure(k, td, f"{label} {r.upper()} 0x{vb:08x}, not 0x{va:08x}",
                                    (label, r))
        if a.padding != b.padding:
            return _cpuid_departure(k, td, f"{label} padding {b.padding}", (label, "padding"))
    return None


def _cpuid_departure(k: int, td: _Td, what: str, where: tuple[str, ...]) -> Discrepancy:
    return Discrepancy(k, Call.TD_CPUID, Verdict.DIFFERS,
                       "the TD's CPUID (KVM_TDX_GET_CPUID) as the mirror's effective CPUID",
                       f"the TD's CPUID differs: {what}", (Call.TD_CPUID.value, *where),
                       predicted=td.accepted,
                       note="TDH.MNG.INIT's CPUID_VALUES for the accepted request, as Linux "
                            "7.3's walk returns them (0x80000008 EAX[23:16]: KVM's GPAW)")


# ---------------------------------------------------------------------------
# KVM_SET_CPUID2.


def _set_cpuid2(k: int, call: VcpuCall, answer: VcpuAnswer) -> Discrepancy | None:
    """Linux 7.3 takes what kvm_check_cpuid lets through; refusing a CPUID unlike the TD's
    is the open question closed (STRICTER)."""
    if not call.set_cpuid2 or not answer.reads or answer.reads[-1].errno:
        return None
    theirs = layout.unpack_cpuid2(answer.reads[-1].buffer)[1]
    told = call.told(theirs)
    want = vcpu.set_cpuid2_errno(told)
    got = answer.set_cpuid2
    if got == want:
        return None
    what = "the TD's CPUID" + (f", {call.lie.label()}" if call.lie is not None else "")
    fixed = invariant.set_cpuid2_validated(theirs, told)
    verdict = Verdict.STRICTER if got is not None and got == fixed else Verdict.DIFFERS
    note = invariant.SET_CPUID2_VALIDATED_NOTE if verdict is Verdict.STRICTER else \
        "KVM_SET_CPUID2 on a TD vCPU is KVM's generic code (kvm_set_cpuid, kvm_check_cpuid)"
    return Discrepancy(k, Call.SET_CPUID2, verdict, f"KVM_SET_CPUID2 with {what}: "
                       f"{errno_text(want)}", f"KVM_SET_CPUID2 with {what}: {errno_text(got)}",
                       (Call.SET_CPUID2.value, verdict.value, errno_text(want), errno_text(got)),
                       note=note)
