"""What a TDX module status or a KVM errno means for a TD launch, down to the bit.

The knowledge is data (`kvmtdx/data/explain-statuses.json`, every entry with
its sources; statuses and operands by name, their numbers are kvmtdx.status's);
this module decodes a raw 64-bit status into its fields (the module's
api_error_code_t layout: operand 31:0, details 39:32, class 47:40,
flags 60-63), finds what is known of it, and says what is not.  How Linux 7.3
hands a status of TDH.MNG.INIT to userspace follows from its class alone:
TDX_OPERAND_INVALID is -EINVAL with the status in hw_error; anything else is
-EIO, hw_error 0, a kernel WARN and a bugged VM.
"""

from __future__ import annotations

import errno as _errno
import functools
from dataclasses import dataclass
from typing import Any

from kvmtdx.model.profiles import bundled_json
from kvmtdx.model.tdx_status import kvm73_outcome
from kvmtdx.status import STATUS_MASK, Operand, TdxStatus, errno_from_name, errno_name

DATA_FILE = "explain-statuses.json"
ERROR_BIT = 1 << 63
NON_RECOVERABLE_BIT = 1 << 62
FATAL_BIT = 1 << 61
RECOVERABLE_HINT_BIT = 1 << 60
CLASS_SHIFT = 40
DETAIL_MASK = 0xFFFFFFFF


@dataclass(frozen=True, slots=True)
class StatusInfo:
    code: int  # the status with bits 31:0 clear
    name: str
    detail: str  # what bits 31:0 hold: operand | msr | index | sw | none
    meaning: str
    causes: str
    seamcalls: tuple[str, ...]
    sources: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class OperandInfo:
    id: int
    name: str
    field: str
    causes: str
    sources: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class Knowledge:
    sources: dict[str, str]
    classes: dict[int, str]
    statuses: dict[int, StatusInfo]
    operands: dict[int, OperandInfo]
    msrs: dict[int, tuple[str, str]]
    seamcalls: dict[str, tuple[int, str, tuple[str, ...]]]
    errnos: dict[str, dict[int, tuple[str, ...]]]

    def source(self, key: str) -> str:
        return self.sources.get(key, key)


@functools.cache
def knowledge() -> Knowledge:
    data: Any = bundled_json(DATA_FILE)
    statuses = {
        int(TdxStatus[s["name"]]): StatusInfo(int(TdxStatus[s["name"]]), s["name"], s["detail"],
                                              s["meaning"], s["causes"],
                                              tuple(s.get("seamcalls", ())), tuple(s["sources"]))
        for s in data["statuses"]
    }
    operands = {int(Operand[o["name"]]): OperandInfo(int(Operand[o["name"]]), o["name"],
                                                     o["field"], o["causes"], tuple(o["sources"]))
                for o in data["operands"]}
    return Knowledge(
        sources=dict(data["sources"]),
        classes={int(k, 16): v for k, v in data["classes"].items()},
        statuses=statuses,
        operands=operands,
        msrs={int(m["index"], 16): (m["name"], m.get("about", "")) for m in data["msrs"]},
        seamcalls={k: (v["leaf"], v["kvm"], tuple(v["sources"]))
                   for k, v in data["seamcalls"].items()},
        errnos={ioctl: {errno_from_name(name): tuple(texts) for name, texts in by_errno.items()}
                for ioctl, by_errno in data["errnos"].items()},
    )


def seamcall_name(text: str) -> str:
    """'TDH_MNG_INIT' or 'tdh.mng.init' as the module spells it: 'TDH.MNG.INIT'."""
    return text.upper().replace("_", ".")


def seamcall_by_leaf(leaf: int) -> str | None:
    for name, (number, _, _) in knowledge().seamcalls.items():
        if number == leaf:
            return name
    return None


@dataclass(frozen=True, slots=True)
class KvmHandling:
    """What Linux 7.3's KVM_TDX_INIT_VM does with a status of TDH.MNG.INIT."""

    errno: int
    hw_error: bool  # the status reaches userspace in kvm_tdx_cmd.hw_error
    warn: bool  # WARN_ON_ONCE, VM bugged, "SEAMCALL TDH_MNG_INIT failed" logged
    text: str
    source: str


def kvm_handling(status: int) -> KvmHandling | None:
    """How KVM 7.3 maps a TDH.MNG.INIT status (None for success or a non-error); the
    mapping itself is the model's (kvm73_outcome), this adds the words and the source."""
    if not status & ERROR_BIT:
        return None
    src = knowledge().source("kvm_init")
    kvm = kvm73_outcome(status)
    if not kvm.warns:
        return KvmHandling(-kvm.errno, bool(kvm.hw_error), False,
                           "KVM_TDX_INIT_VM fails with -EINVAL and copies the status to "
                           "kvm_tdx_cmd.hw_error (no kernel WARN: the caller gave the operand)",
                           src)
    return KvmHandling(-kvm.errno, bool(kvm.hw_error), True,
                       "KVM_TDX_INIT_VM fails with -EIO and hw_error 0; the kernel WARNs once, "
                       "marks the VM bugged (every later ioctl on it fails) and logs "
                       "'SEAMCALL TDH_MNG_INIT failed: 0x<status>, rcx 0x<rcx>' - the status "
                       "reaches userspace only through the kernel log",
                       src)


@dataclass(frozen=True, slots=True)
class StatusExplanation:
    """One raw status, its fields, and what is known (and not) of it."""

    raw: int
    info: StatusInfo | None
    class_id: int
    class_name: str | None
    detail: int  # bits 31:0
    operand: OperandInfo | None
    msr: tuple[int, str, str] | None  # (index, name, about)
    seamcall: str | None  # the SEAMCALL the status came from, when the log said
    rcx: int | None  # the extended error information, when the log carried it
    kvm: KvmHandling | None  # when it came (or may have come) from TDH.MNG.INIT
    seamcall_kvm: str | None  # what KVM does with a failure of another SEAMCALL
    unknown: tuple[str, ...]  # what kvmtdx does not know about this status

    @property
    def status(self) -> int:
        return self.raw & STATUS_MASK

    @property
    def name(self) -> str:
        return self.info.name if self.info else f"0x{self.status:016x}"

    @property
    def flags(self) -> tuple[str, ...]:
        bits = ((ERROR_BIT, "error"), (NON_RECOVERABLE_BIT, "non-recoverable"),
                (FATAL_BIT, "fatal"), (RECOVERABLE_HINT_BIT, "host-recoverable"))
        return tuple(name for bit, name in bits if self.raw & bit)

    def rcx_row(self) -> tuple[int, int] | None:
        """(leaf, sub-leaf) from RCX for a CPUID_CONFIG refusal, when RCX was seen."""
        if self.rcx is None or self.operand is None or self.operand.name != "CPUID_CONFIG":
            return None
        if not self.rcx:
            return None
        return self.rcx & 0xFFFFFFFF, self.rcx >> 32


def _detail(info: StatusInfo | None, detail: int
            ) -> tuple[OperandInfo | None, tuple[int, str, str] | None, list[str]]:
    kb = knowledge()
    unknown: list[str] = []
    if info is None or info.detail == "none":
        if detail:
            unknown.append(f"what bits 31:0 (0x{detail:x}) hold for this status" if info is None
                           else f"bits 31:0 (0x{detail:x}) are not used by this status")
        return None, None, unknown
    if info.detail == "operand":
        operand = kb.operands.get(detail)
        if operand is None:
            unknown.append(f"operand id {detail} (0x{detail:x}) is not one kvmtdx knows")
        return operand, None, unknown
    if info.detail == "msr":
        if not detail:
            return None, None, unknown
        name, about = kb.msrs.get(detail, ("", ""))
        if not name:
            unknown.append(f"MSR 0x{detail:x} is not one kvmtdx knows")
            return None, (detail, f"MSR 0x{detail:x}", ""), unknown
        return None, (detail, name, about), unknown
    return None, None, unknown


def explain_status(raw: int, *, seamcall: str | None = None,
                   rcx: int | None = None) -> StatusExplanation:
    """Decode a 64-bit TDX status (from hw_error, a kernel log line, a VMM log)."""
    if not 0 <= raw < 1 << 64:
        raise ValueError(f"a TDX status is 64 bits, not 0x{raw:x}")
    kb = knowledge()
    status = raw & STATUS_MASK
    info = kb.statuses.get(status)
    class_id = status >> CLASS_SHIFT & 0xFF
    class_name = kb.classes.get(class_id)
    operand, msr, unknown = _detail(info, raw & DETAIL_MASK)
    if info is None:
        what = f"class 0x{class_id:02x}" + (f" ({class_name})" if class_name else "")
        unknown.insert(0, f"status 0x{status:016x}: its name, meaning and causes are not "
                          f"ones kvmtdx knows; its {what} is "
                          + ("known" if class_name else "not known either"))
    call = seamcall_name(seamcall) if seamcall else None
    on_init = call is None or call == "TDH.MNG.INIT"
    other = kb.seamcalls.get(call or "") if not on_init else None
    return StatusExplanation(raw=raw, info=info, class_id=class_id, class_name=class_name,
                             detail=raw & DETAIL_MASK, operand=operand, msr=msr,
                             seamcall=call, rcx=rcx,
                             kvm=kvm_handling(raw) if on_init else None,
                             seamcall_kvm=f"{call}: {other[1]}" if other else None,
                             unknown=tuple(unknown))


@dataclass(frozen=True, slots=True)
class ErrnoExplanation:
    """An errno from a TDX ioctl, and what makes KVM 7.3 return it."""

    errno: int
    ioctl: str  # KVM_TDX_INIT_VM unless the log named another
    causes: tuple[str, ...]
    hw_error: int | None  # what the log showed of kvm_tdx_cmd.hw_error

    @property
    def name(self) -> str:
        return errno_name(self.errno)


def explain_errno(err: int, *, ioctl: str | None = None,
                  hw_error: int | None = None) -> ErrnoExplanation:
    kb = knowledge()
    which = ioctl if ioctl in kb.errnos else "KVM_TDX_INIT_VM"
    causes = kb.errnos[which].get(err, ())
    if which == "KVM_TDX_INIT_VM" and err == _errno.EINVAL and hw_error is not None:
        # The log showed hw_error, so only one of the two EINVAL readings applies.
        causes = tuple(c for c in causes
                       if c.startswith("hw_error non-zero" if hw_error else "hw_error 0"))
    return ErrnoExplanation(err, which, causes, hw_error)
