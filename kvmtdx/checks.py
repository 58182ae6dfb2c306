"""The conformance suite behind `kvmtdx verify`: named checks with structured results.

Every check talks to the kernel only through the device layer (a Kvm handle
on any seam: the real /dev/kvm, the simulated host, a plug-in) and judges the
answers in one of two ways:

- against the mirror's exact prediction, when the module profile, the host and
  the kernel policy are known ("exact" knowledge);
- against the kernel-independent invariant of spec section 5 (bits inside what
  KVM_TDX_CAPABILITIES reported are ACCEPTED together; a bit outside it is never
  ACCEPTED), which needs no profile at all.

A check that needs knowledge the run lacks is a skip that says what to supply.
Check ids are stable, ASCII and underscored: reports, CI dashboards and
kselftest logs key on them.  Every TD a check creates is closed on every path.
"""

from __future__ import annotations

import errno
import re
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from typing import Any

import psutil

from kvmtdx import layout, uapi
from kvmtdx.device import Counters, Kvm, Seam, TdxVm, no_tdx_reason
from kvmtdx.errors import KvmError
from kvmtdx.knowledge import Given, Knowledge, caps_equal, complete
from kvmtdx.model import mirror, rules
from kvmtdx.model.catalog import BitRef
from kvmtdx.model.policy import Policy
from kvmtdx.model.profiles import ModuleProfile, Regs
from kvmtdx.model.requests import Request
from kvmtdx.outcome import Kind, Outcome
from kvmtdx.status import Operand, errno_name
from kvmtdx.structs import (
    FLAG_SIGNIFICANT_INDEX,
    REGISTERS,
    Capabilities,
    CpuidEntry,
    InitVm,
)
from kvmtdx.verdict import Status

GROUPS: tuple[str, ...] = (
    "availability", "capabilities", "init_vm_structure", "init_vm_content", "policy",
    "adversarial", "hygiene",
)
PASS, FAIL, SKIP = Status.PASS, Status.FAIL, Status.SKIP

GPAW_LEAF = rules.GPAW_LEAF
GPAW_FIELD = rules.GPAW_FIELD
HLE, RTM, WAITPKG = rules.LEAF7_EBX_HLE, rules.LEAF7_EBX_RTM, rules.LEAF7_ECX_WAITPKG
CORE_CAPABILITIES = 1 << 30  # CPUID 7.0 EDX, cpufeatures.h 18*32+30
# A leaf no TDX module lists (legacy cache descriptors): KVM must count it as a stray.
STRAY_LEAF = 0x2
NEEDS_MODULE = ("needs a TDX module profile: give --module NAME|FILE "
                "(kvmtdx caps --save-module FILE writes one)")


# ---------------------------------------------------------------------------
# Results.


@dataclass(frozen=True, slots=True)
class CheckResult:
    id: str
    group: str
    status: Status
    detail: str  # one line
    expected: str = ""
    actual: str = ""
    bits: tuple[BitRef, ...] = ()


@dataclass(frozen=True, slots=True)
class Summary:
    total: int
    passed: int
    failed: int
    skipped: int
    tds_created: int
    ioctls: int
    init_vm_calls: int
    fds_before: int
    fds_after: int
    rss_before: int
    rss_after: int

    @property
    def verdict(self) -> Status:
        if self.failed:
            return FAIL
        return PASS if self.total else SKIP


@dataclass(frozen=True, slots=True)
class VerifyReport:
    backend: str
    knowledge: Knowledge | None
    checks: tuple[CheckResult, ...]
    summary: Summary
    skip_reason: str | None = None  # TDX not present: the whole suite skipped

    @property
    def verdict(self) -> Status:
        return SKIP if self.skip_reason is not None else self.summary.verdict

    def failures(self) -> tuple[CheckResult, ...]:
        return tuple(c for c in self.checks if c.status == FAIL)


# ---------------------------------------------------------------------------
# Naming bits.


def bitref(leaf: int, subleaf: int | None, register: str, bit: int) -> BitRef:
    return BitRef(leaf, subleaf, register, bit)


def _bits_of(mask: int) -> Iterator[int]:
    for b in range(32):
        if mask >> b & 1:
            yield b


def _regs(e: CpuidEntry) -> Regs:
    return (e.eax, e.ebx, e.ecx, e.edx)


def _entry_label(e: CpuidEntry) -> str:
    return f"0x{e.function:x}.{e.index}"


def _describe(o: Outcome) -> str:
    """An outcome without the mirror's reason (that goes in `expected`)."""
    return Outcome.classify(o.errno, o.hw_error).describe()


def _labels(bits: Sequence[BitRef], limit: int = 4) -> str:
    text = ", ".join(b.label() for b in bits[:limit])
    return text + (f" and {len(bits) - limit} more" if len(bits) > limit else "")


# ---------------------------------------------------------------------------
# Naming rows.


def _subleaf_of(module: ModuleProfile | None, leaf: int, index: int) -> int | None:
    if module is not None:
        for r in module.rows:
            if r.leaf == leaf and r.kvm_index == index:
                return r.subleaf
    return index


# ---------------------------------------------------------------------------
# The run's context: the open KVM handle, what was reported, what is known.


@dataclass
class _Proc:
    fds_before: int = 0
    fds_after: int = 0
    rss_before: int = 0
    rss_after: int = 0



@dataclass
class _Ctx:
    kvm: Kvm
    seam: Seam
    know: Knowledge
    caps: Capabilities
    enospc: int = 0
    key_ids_before: int | None = None
    on_td: Callable[[], None] = field(default=lambda: None)
    # Every adversarial request sent, with its answer, for adversarial_matches_prediction.
    trap_log: list[tuple[str, Request, Outcome]] = field(default_factory=list)
    proc: _Proc = field(default_factory=lambda: _Proc())

    @property
    def exact(self) -> bool:
        return self.know.exact

    def predict(self, req: Request, *, td_initialized: bool = False) -> Outcome | None:
        k = self.know
        if k.module is None or k.host is None or k.policy is None:
            return None
        return mirror.predict_init_vm(k.module, k.host, k.policy, req,
                                      td_initialized=td_initialized)

    @contextmanager
    def td(self) -> Iterator[TdxVm]:
        vm = self.kvm.create_td()
        with vm:
            self.on_td()
            yield vm

    def send(self, td: TdxVm, req: Request) -> Outcome:
        res = td.init_vm_raw(req.init_vm, flags=req.flags, hw_error=req.hw_error)
        if res.errno == errno.ENOSPC:
            self.enospc += 1
        return Outcome.classify(res.errno, res.cmd.hw_error)

    def attempt(self, req: Request) -> Outcome:
        """One INIT_VM on a fresh TD, closed before this returns."""
        with self.td() as td:
            return self.send(td, req)

    # Requests.

    def gpaw_entry(self, gpaw: int = 48) -> CpuidEntry:
        return CpuidEntry(GPAW_LEAF, 0, FLAG_SIGNIFICANT_INDEX, eax=gpaw << 16)

    def base(self, entries: Sequence[CpuidEntry] = (), **changes: Any) -> Request:
        """A minimal request KVM and the module take: attributes 0, every reported
        XFAM bit, GPAW 48; `entries` merge into it by (function, index, flags)."""
        out: list[CpuidEntry] = [self.gpaw_entry()]
        for e in entries:
            for i, o in enumerate(out):
                if (o.function, o.index, o.flags) == (e.function, e.index, e.flags):
                    out[i] = replace(o, eax=o.eax | e.eax, ebx=o.ebx | e.ebx,
                                     ecx=o.ecx | e.ecx, edx=o.edx | e.edx)
                    break
            else:
                out.append(e)
        iv = InitVm(attributes=0, xfam=self.caps.supported_xfam, entries=tuple(out))
        flags = changes.pop("cmd_flags", 0)
        hw_error = changes.pop("cmd_hw_error", 0)
        if changes:
            iv = replace(iv, **changes)
        return Request(init_vm=iv, flags=flags, hw_error=hw_error)

    def full_request(self) -> Request:
        """Every reported feature bit at once (spec section 5's first half)."""
        k = self.know
        if k.module is not None and k.host is not None and k.policy is not None:
            return mirror.full_request(k.module, k.host, k.policy)
        entries: list[CpuidEntry] = []
        for e in self.caps.entries:
            regs = list(_regs(e))
            for i, r in enumerate(REGISTERS):
                if rules.is_value_register(e.function, e.index, r):
                    regs[i] = 0
            if e.function == GPAW_LEAF:
                regs[0] = 48 << 16
            for rule in rules.MODULE_COUPLINGS:
                # The request has attributes 0; the host's TSX_CTRL is not known here.
                if (rule.leaf, rule.subleaf or 0) == (e.function, e.index):
                    i = REGISTERS.index(rule.register)
                    regs[i] = rule.met(regs[i], 0)
            a, b, c, d = regs
            entries.append(CpuidEntry(e.function, e.index, FLAG_SIGNIFICANT_INDEX, a, b, c, d))
        return Request(init_vm=InitVm(attributes=0, xfam=self.caps.supported_xfam,
                                      entries=tuple(entries)))

    def row_of(self, e: CpuidEntry) -> int | None:
        m = self.know.module
        if m is None:
            return None
        for i, r in enumerate(m.rows):
            if r.leaf == e.function and r.kvm_index == e.index:
                return i
        return None


@dataclass(frozen=True, slots=True)
class _V:
    """A check's verdict before the registry stamps its id and group on it."""

    status: Status
    detail: str
    expected: str = ""
    actual: str = ""
    bits: tuple[BitRef, ...] = ()


def _ok(detail: str, expected: str = "", actual: str = "",
        bits: tuple[BitRef, ...] = ()) -> _V:
    return _V(PASS, detail, expected, actual, bits)


def _bad(detail: str, expected: str = "", actual: str = "",
         bits: tuple[BitRef, ...] = ()) -> _V:
    return _V(FAIL, detail, expected, actual, bits)


def _skip(reason: str) -> _V:
    return _V(SKIP, reason)


@dataclass(frozen=True, slots=True)
class CheckSpec:
    id: str
    group: str
    about: str
    fn: Callable[[_Ctx], _V]
    after_close: bool = False  # runs once the KVM handle and every TD are closed


CHECKS: list[CheckSpec] = []


def _check(id_: str, group: str, about: str, *, after_close: bool = False
           ) -> Callable[[Callable[[_Ctx], _V]], Callable[[_Ctx], _V]]:
    assert group in GROUPS and re.fullmatch(r"[a-z0-9_]+", id_), id_

    def register(fn: Callable[[_Ctx], _V]) -> Callable[[_Ctx], _V]:
        CHECKS.append(CheckSpec(id_, group, about, fn, after_close))
        return fn
    return register


def _judge(ctx: _Ctx, req: Request, actual: Outcome, generic: Kind | None,
           what: str, *, td_initialized: bool = False,
           bits: tuple[BitRef, ...] = ()) -> _V:
    """Exact knowledge: the kernel's answer must be the mirror's.  Otherwise the
    answer must be of the kind the spec fixes for every kernel (`generic`)."""
    pred = ctx.predict(req, td_initialized=td_initialized)
    if pred is not None:
        exp = pred.describe()
        if actual.same_answer(pred):
            return _ok(f"{what}: {_describe(actual)}", exp, _describe(actual), bits)
        return _bad(f"{what}: {_describe(actual)}, expected {_describe(pred)}", exp,
                    _describe(actual), bits)
    if generic is None:
        return _skip(f"{what}: {NEEDS_MODULE}")
    if actual.kind == generic:
        return _ok(f"{what}: {_describe(actual)} (no profile: kind only)", generic.value,
                   _describe(actual), bits)
    return _bad(f"{what}: {_describe(actual)}, expected {generic.value}", generic.value,
                _describe(actual), bits)


# ---------------------------------------------------------------------------
# availability


@_check("tdx_available", "availability", "KVM offers KVM_X86_TDX_VM")
def _tdx_available(ctx: _Ctx) -> _V:
    # Reaching the checks means the device opened and listed the TDX VM type.
    return _ok(f"KVM API 12, VM types 0x{ctx.kvm.vm_types():x}, TDX offered")


# ---------------------------------------------------------------------------
# capabilities


@_check("caps_grow_and_retry", "capabilities",
        "KVM_TDX_CAPABILITIES answers E2BIG until the buffer is big enough, then N entries")
def _caps_grow(ctx: _Ctx) -> _V:
    n = len(ctx.caps.entries)
    if ctx.caps.nent != n or n == 0:
        return _bad(f"nent {ctx.caps.nent} with {n} entries read", "nent = entries > 0",
                    f"nent {ctx.caps.nent}")
    if ctx.know.module is not None and len(ctx.know.module.rows) != n:
        return _bad(f"{n} entries, the module lists {len(ctx.know.module.rows)} rows",
                    str(len(ctx.know.module.rows)), str(n))
    return _ok(f"{n} entries", actual=str(n))


def _caps_fill(nent: int, pattern: int = 0xA5) -> bytes:
    """A caller buffer of a byte pattern, with a valid nent word."""
    size = layout.caps_size(nent)
    data = bytearray([pattern]) * size
    data[layout.OFFSET_CAPS_NENT:layout.OFFSET_CAPS_NENT + 4] = nent.to_bytes(4, "little")
    return bytes(data)


def _caps_errno(ctx: _Ctx, what: str, want: int, *, flags: int = 0, hw_error: int = 0) -> _V:
    n = len(ctx.caps.entries)
    with ctx.td() as td:
        res = td.capabilities_raw(n, flags=flags, hw_error=hw_error)
    got = errno_name(res.errno) if res.errno else "success"
    exp = errno_name(want)
    k = ctx.know
    if k.module is not None and k.host is not None and k.policy is not None:
        pred = mirror.predict_capabilities(k.module, k.host, k.policy, n, flags=flags,
                                           hw_error=hw_error)
        exp = errno_name(pred.errno) if pred.errno else "success"
        want = pred.errno
    if res.errno != want:
        return _bad(f"{what}: {got}, expected {exp}", exp, got)
    if hw_error and res.cmd.hw_error != hw_error:
        return _bad(f"{what}: cmd.hw_error changed to 0x{res.cmd.hw_error:x}; KVM must refuse "
                    "before writing cmd back", f"hw_error 0x{hw_error:x}",
                    f"hw_error 0x{res.cmd.hw_error:x}")
    return _ok(f"{what}: {got}", exp, got)


@_check("caps_flags_rejected", "capabilities", "cmd.flags != 0 is EINVAL")
def _caps_flags(ctx: _Ctx) -> _V:
    return _caps_errno(ctx, "flags 1", errno.EINVAL, flags=1)


@_check("caps_hw_error_rejected", "capabilities", "cmd.hw_error != 0 is EINVAL")
def _caps_hw_error(ctx: _Ctx) -> _V:
    return _caps_errno(ctx, "hw_error 1", errno.EINVAL, hw_error=1)


@_check("caps_e2big_buffer_untouched", "capabilities",
        "a buffer one entry short is E2BIG and KVM writes none of it")
def _caps_e2big(ctx: _Ctx) -> _V:
    n = len(ctx.caps.entries)
    short = n - 1
    fill = _caps_fill(short)
    with ctx.td() as td:
        res = td.capabilities_raw(short, fill=fill)
    got = errno_name(res.errno) if res.errno else "success"
    if res.errno != errno.E2BIG:
        return _bad(f"nent {short} (N = {n}): {got}, expected E2BIG", "E2BIG", got)
    if res.data != fill:
        changed = [i for i, (a, b) in enumerate(zip(res.data, fill, strict=True)) if a != b]
        return _bad(f"E2BIG, but KVM wrote {len(changed)} bytes of the caller's buffer "
                    f"(first at offset {changed[0]})", "buffer untouched",
                    f"{len(changed)} bytes changed")
    return _ok(f"nent {short}: E2BIG, buffer untouched", "E2BIG, untouched", got)


def _pattern_caps(ctx: _Ctx) -> tuple[bytes, bytes, int]:
    n = len(ctx.caps.entries)
    fill = _caps_fill(n, 0x5A)
    with ctx.td() as td:
        res = td.capabilities_raw(n, fill=fill)
    return fill, res.data, res.errno


@_check("caps_reserved_zero", "capabilities",
        "reserved words, cpuid.padding and unused tdvmcallinfo words are written 0 "
        "(kernels after 6.16), even over a caller's pattern")
def _caps_reserved(ctx: _Ctx) -> _V:
    p = ctx.know.policy
    if p is None:
        return _skip("needs the kernel policy (give --policy)")
    if p.caps_echoes_caller:
        return _skip(f"{p.name} echoes the caller's header words (as Linux 6.16 does); "
                     "caps_buffer_matches_prediction checks the echo")
    _fill, data, err = _pattern_caps(ctx)
    if err:
        return _bad(f"capabilities over a patterned buffer: {errno_name(err)}",
                    "success", errno_name(err))
    c = layout.unpack_capabilities(data)
    dirty = [f"reserved[{i}]" for i, w in enumerate(c.reserved) if w]
    for name in ("kernel_tdvmcallinfo_1_r11", "kernel_tdvmcallinfo_1_r12",
                 "user_tdvmcallinfo_1_r12", "cpuid_padding"):
        if getattr(c, name):
            dirty.append(name)
    for i, e in enumerate(c.entries):
        if e.flags or any(e.padding):
            dirty.append(f"entries[{i}].flags/padding")
    if dirty:
        more = f" and {len(dirty) - 3} more" if len(dirty) > 3 else ""
        return _bad(f"not zeroed: {', '.join(dirty[:3])}{more}", "0", "caller's pattern left")
    return _ok("every reserved and unused word 0 over a 0x5a pattern", "0", "0")


def _entries_only(data: bytes, n: int) -> bytes:
    """The buffer with entry flags and padding blanked (undefined under 6.16)."""
    out = bytearray(data)
    for i in range(n):
        off = layout.SIZEOF_CAPS_HEADER + i * layout.SIZEOF_CPUID_ENTRY2
        out[off + 8:off + 12] = bytes(4)  # flags
        out[off + 28:off + 40] = bytes(12)  # padding[3]
    return bytes(out)


@_check("caps_buffer_matches_prediction", "capabilities",
        "over a patterned caller buffer, every byte KVM leaves is the mirror's")
def _caps_buffer(ctx: _Ctx) -> _V:
    k = ctx.know
    if k.module is None or k.host is None or k.policy is None:
        return _skip(NEEDS_MODULE)
    fill, data, err = _pattern_caps(ctx)
    n = len(ctx.caps.entries)
    pred = mirror.predict_capabilities(k.module, k.host, k.policy, n, caller=fill)
    if err != pred.errno:
        return _bad(f"{errno_name(err) or 'success'}, expected "
                    f"{errno_name(pred.errno) or 'success'}")
    want = pred.buffer if pred.buffer is not None else fill
    if k.policy.caps_echoes_caller:
        data, want = _entries_only(data, n), _entries_only(want, n)
    if data == want:
        return _ok(f"{len(data)} bytes as predicted")
    diff = [i for i, (a, b) in enumerate(zip(data, want, strict=False)) if a != b]
    first = diff[0] if diff else min(len(data), len(want))
    where = "header" if first < layout.SIZEOF_CAPS_HEADER else (
        f"entry {(first - layout.SIZEOF_CAPS_HEADER) // layout.SIZEOF_CPUID_ENTRY2}")
    return _bad(f"{len(diff)} bytes differ, first at offset {first} ({where})",
                f"byte 0x{want[first]:02x}" if first < len(want) else "end",
                f"byte 0x{data[first]:02x}" if first < len(data) else "end")


@_check("caps_two_calls_equal", "capabilities", "two calls report the same")
def _caps_twice(ctx: _Ctx) -> _V:
    with ctx.td() as td:
        again = td.capabilities()
    echo = ctx.know.policy is not None and ctx.know.policy.caps_echoes_caller
    if caps_equal(again, ctx.caps, entry_flags=not echo):
        return _ok("equal")
    return _bad("a second KVM_TDX_CAPABILITIES reported something else")


@_check("caps_header_matches_prediction", "capabilities",
        "supported_attrs, supported_xfam, tdvmcallinfo and nent are the mirror's")
def _caps_header(ctx: _Ctx) -> _V:
    k = ctx.know
    if k.module is None or k.host is None or k.policy is None:
        return _skip(NEEDS_MODULE)
    pred = mirror.predict_capabilities(k.module, k.host, k.policy, len(k.module.rows))
    if pred.caps is None:
        return _bad(f"the mirror predicts {errno_name(pred.errno)}, the kernel reported",
                    errno_name(pred.errno), "success")
    bad = []
    for name in ("supported_attrs", "supported_xfam", "kernel_tdvmcallinfo_1_r11",
                 "user_tdvmcallinfo_1_r11", "kernel_tdvmcallinfo_1_r12",
                 "user_tdvmcallinfo_1_r12", "nent"):
        want, got = getattr(pred.caps, name), getattr(ctx.caps, name)
        if want != got:
            bad.append((name, want, got))
    if bad:
        name, want, got = bad[0]
        return _bad(f"{len(bad)} header fields differ: " + ", ".join(b[0] for b in bad),
                    f"{name} 0x{want:x}", f"{name} 0x{got:x}")
    return _ok(f"attrs 0x{ctx.caps.supported_attrs:x}, xfam 0x{ctx.caps.supported_xfam:x}, "
               f"nent {ctx.caps.nent}")


@_check("caps_entries_match_prediction", "capabilities",
        "every row, register and bit reported is the mirror's")
def _caps_entries(ctx: _Ctx) -> _V:
    k = ctx.know
    if k.module is None or k.host is None or k.policy is None:
        return _skip(NEEDS_MODULE)
    want = mirror.reported_entries(k.module, k.host, k.policy)
    got = ctx.caps.entries
    if len(want) != len(got):
        return _bad(f"{len(got)} entries, expected {len(want)}", str(len(want)), str(len(got)))
    bits: list[BitRef] = []
    for i, (w, g) in enumerate(zip(want, got, strict=True)):
        if (w.function, w.index) != (g.function, g.index):
            return _bad(f"entry {i} is {_entry_label(g)}, expected {_entry_label(w)}",
                        _entry_label(w), _entry_label(g))
        unknown = k.module.unknown_mask(i)
        for r, wv, gv, u in zip(REGISTERS, _regs(w), _regs(g), unknown, strict=True):
            for b in _bits_of((wv ^ gv) & ~u):
                bits.append(bitref(w.function, k.module.rows[i].subleaf, r, b))
    if not bits:
        return _ok(f"{len(got)} entries, every bit as predicted")
    extra = [b for b in bits if _reported(got, k.module, b)]
    missing = [b for b in bits if b not in extra]
    parts = []
    if extra:
        parts.append(f"reported but not predicted: {_labels(extra)}")
    if missing:
        parts.append(f"predicted but not reported: {_labels(missing)}")
    return _bad("; ".join(parts),
                "hidden: " + _labels(extra) if extra else "reported: " + _labels(missing),
                "reported: " + _labels(extra) if extra else "hidden: " + _labels(missing),
                tuple(bits))


def _reported(entries: Sequence[CpuidEntry], module: ModuleProfile, b: BitRef) -> bool:
    for row, e in zip(module.rows, entries, strict=False):
        if row.leaf == b.leaf and row.subleaf == b.subleaf:
            return bool(e.reg(b.register) >> b.bit & 1)
    return False


# ---------------------------------------------------------------------------
# init_vm_structure


def _structure(ctx: _Ctx, what: str, req: Request, generic: Kind | None) -> _V:
    return _judge(ctx, req, ctx.attempt(req), generic, what)


@_check("init_vm_minimal_accepted", "init_vm_structure",
        "attributes 0, the reported XFAM and a GPAW-48 entry are ACCEPTED")
def _iv_minimal(ctx: _Ctx) -> _V:
    return _structure(ctx, "minimal request", ctx.base(), Kind.ACCEPTED)


@_check("init_vm_hw_error_rejected", "init_vm_structure",
        "cmd.hw_error != 0 is EINVAL and cmd is not written back")
def _iv_hw_error(ctx: _Ctx) -> _V:
    req = ctx.base(cmd_hw_error=1)
    with ctx.td() as td:
        res = td.init_vm_raw(req.init_vm, hw_error=1)
    got = errno_name(res.errno) if res.errno else "success"
    if res.errno != errno.EINVAL:
        return _bad(f"hw_error 1: {got}, expected EINVAL", "EINVAL", got)
    if res.cmd.hw_error != 1:
        return _bad(f"EINVAL, but cmd was written back (hw_error 0x{res.cmd.hw_error:x}); "
                    "KVM must refuse before touching it", "hw_error 1 left",
                    f"hw_error 0x{res.cmd.hw_error:x}")
    return _ok("hw_error 1: EINVAL, cmd left alone", "EINVAL", got)


@_check("init_vm_flags_rejected", "init_vm_structure", "cmd.flags != 0 is EINVAL")
def _iv_flags(ctx: _Ctx) -> _V:
    return _structure(ctx, "flags 1", ctx.base(cmd_flags=1), Kind.KVM_REJECTED)


@_check("init_vm_reserved_rejected", "init_vm_structure", "a non-zero reserved word is EINVAL")
def _iv_reserved(ctx: _Ctx) -> _V:
    results = []
    for i in (0, 11):
        words = tuple(1 if j == i else 0 for j in range(12))
        results.append(_structure(ctx, f"reserved[{i}] = 1", ctx.base(reserved=words),
                                  Kind.KVM_REJECTED))
    return next((r for r in results if r.status != PASS), results[0])


@_check("init_vm_padding_rejected", "init_vm_structure", "cpuid.padding != 0 is EINVAL")
def _iv_padding(ctx: _Ctx) -> _V:
    return _structure(ctx, "cpuid.padding = 1", ctx.base(cpuid_padding=1), Kind.KVM_REJECTED)


@_check("init_vm_nent_over_256_rejected", "init_vm_structure", "nent 257 is E2BIG")
def _iv_nent_257(ctx: _Ctx) -> _V:
    return _structure(ctx, "nent 257", ctx.base(nent=257), Kind.ERROR)


def _strays(n: int) -> tuple[CpuidEntry, ...]:
    return tuple(CpuidEntry(STRAY_LEAF, i, FLAG_SIGNIFICANT_INDEX) for i in range(n))


@_check("init_vm_nent_256_not_e2big", "init_vm_structure",
        "nent 256 is within the limit: the count check refuses it, not E2BIG")
def _iv_nent_256(ctx: _Ctx) -> _V:
    req = ctx.base(_strays(255))
    return _structure(ctx, "nent 256 (255 stray entries)", req, Kind.KVM_REJECTED)


@_check("init_vm_unlisted_leaf_rejected", "init_vm_structure",
        "an entry no module row takes breaks the count: EINVAL")
def _iv_stray(ctx: _Ctx) -> _V:
    return _structure(ctx, f"stray leaf 0x{STRAY_LEAF:x}", ctx.base(_strays(1)),
                      Kind.KVM_REJECTED)


@_check("init_vm_attributes_unsupported_rejected", "init_vm_structure",
        "an attribute outside supported_attrs is EINVAL")
def _iv_attrs(ctx: _Ctx) -> _V:
    outside = ~ctx.caps.supported_attrs & 0xFFFFFFFFFFFFFFFF
    bit = (outside & -outside).bit_length() - 1
    return _structure(ctx, f"attribute bit {bit}", ctx.base(attributes=1 << bit),
                      Kind.KVM_REJECTED)


@_check("init_vm_xfam_unsupported_rejected", "init_vm_structure",
        "an XFAM bit outside supported_xfam is EINVAL")
def _iv_xfam(ctx: _Ctx) -> _V:
    outside = ~ctx.caps.supported_xfam & 0xFFFFFFFFFFFFFFFF
    if not outside:
        return _skip("every XFAM bit is supported")
    bit = (outside & -outside).bit_length() - 1
    return _structure(ctx, f"XFAM bit {bit}",
                      ctx.base(xfam=ctx.caps.supported_xfam | 1 << bit), Kind.KVM_REJECTED)


@_check("init_vm_gpaw_missing_rejected", "init_vm_structure",
        "no CPUID 0x80000008 entry (no GPAW) is EINVAL")
def _iv_gpaw_missing(ctx: _Ctx) -> _V:
    req = replace(ctx.base(), init_vm=replace(ctx.base().init_vm, entries=()))
    return _structure(ctx, "no GPAW entry", req, Kind.KVM_REJECTED)


@_check("init_vm_gpaw_invalid_rejected", "init_vm_structure",
        "a GPAW other than 48 or 52 is EINVAL")
def _iv_gpaw_bad(ctx: _Ctx) -> _V:
    req = replace(ctx.base(), init_vm=replace(ctx.base().init_vm,
                                              entries=(ctx.gpaw_entry(40),)))
    return _structure(ctx, "GPAW 40", req, Kind.KVM_REJECTED)


@_check("init_vm_gpaw_52", "init_vm_structure",
        "GPAW 52 is ACCEPTED with 5-level EPT, else EINVAL")
def _iv_gpaw_52(ctx: _Ctx) -> _V:
    if not ctx.know.host_exact:
        return _skip("needs the host's 5-level EPT support: give --host FILE")
    req = replace(ctx.base(), init_vm=replace(ctx.base().init_vm,
                                              entries=(ctx.gpaw_entry(52),)))
    return _structure(ctx, "GPAW 52", req, None)


@_check("init_vm_second_call_rejected", "init_vm_structure",
        "a second INIT_VM on an initialised TD is EINVAL")
def _iv_second(ctx: _Ctx) -> _V:
    req = ctx.base()
    with ctx.td() as td:
        first = ctx.send(td, req)
        if first.kind != Kind.ACCEPTED:
            return _skip(f"the first INIT_VM was not accepted ({_describe(first)}); "
                         "init_vm_minimal_accepted reports it")
        second = ctx.send(td, req)
    return _judge(ctx, req, second, Kind.KVM_REJECTED, "second INIT_VM", td_initialized=True)


def _module_refused_bit(ctx: _Ctx) -> tuple[int, CpuidEntry, BitRef] | None:
    """A bit of a listed feature register that the module itself refuses."""
    m = ctx.know.module
    if m is None:
        return None
    for i, row in enumerate(m.rows):
        for r, ok in zip(REGISTERS, row.module_allows(), strict=True):
            if rules.is_value_register(row.leaf, row.subleaf, r) or row.leaf == 7:
                continue
            free = ~ok & ~m.unknown_mask(i)[REGISTERS.index(r)] & 0xFFFFFFFF
            if free:
                b = (free & -free).bit_length() - 1
                e = CpuidEntry(row.leaf, row.kvm_index, FLAG_SIGNIFICANT_INDEX).with_reg(r, 1 << b)
                return i, e, bitref(row.leaf, row.subleaf, r, b)
    return None


@_check("init_vm_module_status_written_back", "init_vm_structure",
        "a module refusal comes back as EINVAL with the TDX status in cmd.hw_error")
def _iv_status(ctx: _Ctx) -> _V:
    found = _module_refused_bit(ctx)
    if found is None:
        return _skip(NEEDS_MODULE if ctx.know.module is None
                     else "no bit the module refuses in a listed row")
    _i, e, ref = found
    req = ctx.base((e,))
    actual = ctx.attempt(req)
    v = _judge(ctx, req, actual, None, f"{ref.label()} (not configurable)", bits=(ref,))
    if v.status == PASS and actual.hw.operand != Operand.CPUID_CONFIG:
        return _bad(f"hw_error {actual.hw}, expected operand CPUID_CONFIG", v.expected,
                    v.actual, (ref,))
    return v


# ---------------------------------------------------------------------------
# init_vm_content


@_check("init_vm_all_reported_accepted", "init_vm_content",
        "one TD with every reported feature bit (couplings met) is ACCEPTED")
def _content_all(ctx: _Ctx) -> _V:
    req = ctx.full_request()
    outside = _outside_reported(ctx, req)
    if outside:
        # The prediction is built from the mirror's capabilities; a kernel that
        # reports less makes this request carry unreported bits.
        return _skip(f"the request would carry unreported bits ({_labels(outside)}); "
                     "caps_entries_match_prediction reports the difference")
    actual = ctx.attempt(req)
    bits = sum(bin(v).count("1") for e in req.init_vm.entries for v in _regs(e))
    if actual.kind == Kind.ACCEPTED:
        return _ok(f"{len(req.init_vm.entries)} entries, {bits} bits set: ACCEPTED",
                   "ACCEPTED", _describe(actual))
    pred = ctx.predict(req)
    why = f" (mirror: {pred.describe()})" if pred is not None else ""
    ref: tuple[BitRef, ...] = ()
    if pred is not None and pred.leaf is not None and pred.register and pred.bit is not None:
        ref = (bitref(pred.leaf, pred.subleaf, pred.register, pred.bit),)
    return _bad(f"every reported bit together: {_describe(actual)}{why}", "ACCEPTED",
                _describe(actual), ref)


def _outside_reported(ctx: _Ctx, req: Request) -> list[BitRef]:
    out: list[BitRef] = []
    rep = {(e.function, e.index): e for e in ctx.caps.entries}
    for e in req.init_vm.entries:
        r = rep.get((e.function, e.index))
        for i, reg in enumerate(REGISTERS):
            if rules.is_value_register(e.function, e.index, reg):
                continue
            have = _regs(r)[i] if r is not None else 0
            for b in _bits_of(_regs(e)[i] & ~have):
                out.append(bitref(e.function, _subleaf_of(ctx.know.module, e.function,
                                                          e.index), reg, b))
    return out


@dataclass
class _BitTally:
    tested: int = 0
    exempt: int = 0
    unknown: int = 0
    fails: list[tuple[BitRef, str, str]] = field(default_factory=list)


def _unreported_bits(ctx: _Ctx) -> Iterator[tuple[CpuidEntry, int | None, str, int]]:
    for e in ctx.caps.entries:
        row = ctx.row_of(e)
        for i, r in enumerate(REGISTERS):
            if rules.is_value_register(e.function, e.index, r):
                continue
            for b in _bits_of(~_regs(e)[i] & 0xFFFFFFFF):
                yield e, row, r, b


@_check("init_vm_unreported_bits_refused", "init_vm_content",
        "each feature bit of a listed row that was not reported, alone on its own TD, is "
        "not ACCEPTED, and is refused by KVM or the module as predicted")
def _content_each(ctx: _Ctx) -> _V:
    k = ctx.know
    t = _BitTally()
    for e, row, r, b in _unreported_bits(ctx):
        sub = _subleaf_of(k.module, e.function, e.index)
        ref = bitref(e.function, sub, r, b)
        if k.module is not None and row is not None and \
                k.module.unknown_mask(row)[REGISTERS.index(r)] >> b & 1:
            t.unknown += 1
            continue
        probe = CpuidEntry(e.function, e.index, FLAG_SIGNIFICANT_INDEX).with_reg(r, 1 << b)
        req = ctx.base((probe,))
        actual = ctx.attempt(req)
        t.tested += 1
        pred = ctx.predict(req)
        cleared = 0
        if k.module is not None and k.host is not None and row is not None:
            cleared = mirror.silently_cleared(k.module, k.host, row, r)
        if cleared >> b & 1:
            t.exempt += 1
        elif actual.kind == Kind.ACCEPTED:
            t.fails.append((ref, "KVM_REJECTED or MODULE_REJECTED", "ACCEPTED"))
            continue
        elif pred is None and actual.kind not in (Kind.KVM_REJECTED, Kind.MODULE_REJECTED):
            t.fails.append((ref, "KVM_REJECTED or MODULE_REJECTED", _describe(actual)))
            continue
        if pred is not None and not actual.same_answer(pred):
            t.fails.append((ref, pred.describe(), _describe(actual)))
    notes = []
    if t.exempt:
        notes.append(f"{t.exempt} silently cleared by the module (host lacks them)")
    if t.unknown:
        notes.append(f"{t.unknown} unknown to the profile, skipped")
    if k.module is None:
        notes.append("no profile: invariant only")
    tail = f" ({'; '.join(notes)})" if notes else ""
    if not t.fails:
        if not t.tested:
            return _skip("no unreported feature bit to test" + tail)
        return _ok(f"{t.tested} bits, one TD each, refused as expected{tail}")
    refs = tuple(f[0] for f in t.fails)
    accepted = [f[0] for f in t.fails if f[2] == "ACCEPTED"]
    head = (f"{len(accepted)} unreported bits ACCEPTED: {_labels(accepted)}" if accepted else
            f"{len(t.fails)} of {t.tested} bits answered otherwise: {_labels(list(refs))}")
    first = t.fails[0]
    return _bad(f"{head}{tail}", f"{first[0].label()}: {first[1]}",
                f"{first[0].label()}: {first[2]}", refs)


# ---------------------------------------------------------------------------
# policy


def _policy_or_skip(ctx: _Ctx, names: tuple[str, ...]) -> Policy | _V:
    p = ctx.know.policy
    if p is None:
        return _skip("needs the kernel policy (give --policy)")
    if p.name not in names:
        return _skip(f"a rule of {', '.join(names)}, not of {p.name}")
    return p


@_check("policy_gpaw_reported_ff", "policy",
        "CPUID 0x80000008 EAX[23:16] is reported as 0xff (KVM's GPAW knob)")
def _pol_gpaw(ctx: _Ctx) -> _V:
    for e in ctx.caps.entries:
        if e.function == GPAW_LEAF:
            got = (e.eax & GPAW_FIELD) >> 16
            if got == 0xFF:
                return _ok("0xff")
            return _bad(f"EAX[23:16] = 0x{got:02x}", "0xff", f"0x{got:02x}")
    return _skip("no 0x80000008 row listed")


def _leaf7(ctx: _Ctx) -> CpuidEntry | None:
    return next((e for e in ctx.caps.entries if e.function == 7 and e.index == 0), None)


@_check("policy_denylist_hidden", "policy",
        "upstream: HLE, RTM (7.0 EBX) and WAITPKG (7.0 ECX) are never reported")
def _pol_denylist(ctx: _Ctx) -> _V:
    p = _policy_or_skip(ctx, ("upstream", "upstream-6.16"))
    if isinstance(p, _V):
        return p
    e = _leaf7(ctx)
    if e is None:
        return _skip("no leaf 7.0 row listed")
    shown = [bitref(7, 0, "ebx", b) for b in _bits_of(e.ebx & (HLE | RTM))]
    shown += [bitref(7, 0, "ecx", b) for b in _bits_of(e.ecx & WAITPKG)]
    if shown:
        return _bad(f"reported: {_labels(shown)}", "hidden", "reported", tuple(shown))
    return _ok("HLE, RTM, WAITPKG hidden")


@_check("policy_allowlist_filter", "policy",
        "rfc-v2: every reported feature bit is inside the allowlist")
def _pol_allowlist(ctx: _Ctx) -> _V:
    p = _policy_or_skip(ctx, ("rfc-v2",))
    if isinstance(p, _V):
        return p
    assert p.allowlist is not None
    out: list[BitRef] = []
    for e in ctx.caps.entries:
        for i, r in enumerate(REGISTERS):
            mask = p.allowlist.mask(e.function, e.index, r)
            extra = _regs(e)[i] & ~mask
            if e.function == GPAW_LEAF and r == "eax":
                extra &= ~GPAW_FIELD
            out += [bitref(e.function, _subleaf_of(ctx.know.module, e.function, e.index), r, b)
                    for b in _bits_of(extra)]
    if out:
        return _bad(f"reported outside the allowlist ({p.allowlist.name}): {_labels(out)}",
                    "inside the allowlist", "outside", tuple(out))
    return _ok(f"every reported bit inside {p.allowlist.name}")


@_check("policy_value_registers_unfiltered", "policy",
        "rfc-v2: value registers (1 EAX/EBX, 4, 0x18, 0x1F, 0x80000008 EAX) are reported "
        "as the module lists them")
def _pol_values(ctx: _Ctx) -> _V:
    p = _policy_or_skip(ctx, ("rfc-v2",))
    if isinstance(p, _V):
        return p
    k = ctx.know
    if k.module is None or k.host is None:
        return _skip(NEEDS_MODULE)
    from kvmtdx.model.profiles import enumerated
    bad: list[BitRef] = []
    for row, listed, e in zip(k.module.rows, enumerated(k.module, k.host), ctx.caps.entries,
                              strict=False):
        for i, r in enumerate(REGISTERS):
            if not rules.is_value_register(row.leaf, row.subleaf, r):
                continue
            want = listed[i]
            if row.leaf == GPAW_LEAF and r == "eax":
                want |= GPAW_FIELD
            bad += [bitref(row.leaf, row.subleaf, r, b) for b in _bits_of(want ^ _regs(e)[i])]
    if bad:
        return _bad(f"value register bits filtered or changed: {_labels(bad)}",
                    "as the module lists", "changed", tuple(bad))
    return _ok("value registers unfiltered")


@_check("policy_core_capabilities_reported", "policy",
        "rfc-v2: CORE_CAPABILITIES (7.0 EDX bit 30) is reported where the module allows it")
def _pol_core(ctx: _Ctx) -> _V:
    p = _policy_or_skip(ctx, ("rfc-v2",))
    if isinstance(p, _V):
        return p
    k = ctx.know
    if k.module is None or k.host is None:
        return _skip(NEEDS_MODULE)
    from kvmtdx.model.profiles import enumerated
    i = k.module.row_index(7, 0)
    e = _leaf7(ctx)
    if i is None or e is None:
        return _skip("no leaf 7.0 row")
    listed = enumerated(k.module, k.host)[i][3] & CORE_CAPABILITIES
    allowed = p.allowlist.mask(7, 0, "edx") & CORE_CAPABILITIES if p.allowlist else 0
    want = bool(listed and allowed)
    got = bool(e.edx & CORE_CAPABILITIES)
    ref = (bitref(7, 0, "edx", 30),)
    if want == got:
        return _ok(("reported" if got else "hidden (module or allowlist lacks it)"), bits=ref)
    return _bad(f"{ref[0].label()} {'reported' if got else 'hidden'}",
                "reported" if want else "hidden", "reported" if got else "hidden", ref)


# ---------------------------------------------------------------------------
# adversarial: spec section 4's find() traps


def _hidden_bits(ctx: _Ctx, ebx: int, ecx: int) -> tuple[BitRef, ...] | str:
    """The leaf 7.0 bits a trap smuggles, if KVM hides them and the module would take them."""
    e = _leaf7(ctx)
    if e is None:
        return "no leaf 7.0 row listed"
    refs = [bitref(7, 0, "ebx", b) for b in _bits_of(ebx)]
    refs += [bitref(7, 0, "ecx", b) for b in _bits_of(ecx)]
    if e.ebx & ebx or e.ecx & ecx:
        return f"{_labels(refs)} reported by this kernel: nothing to smuggle"
    k = ctx.know
    if k.module is not None and k.host is not None:
        from kvmtdx.model.profiles import enumerated
        i = k.module.row_index(7, 0)
        if i is None:
            return "the module lists no leaf 7.0 row"
        unknown = k.module.unknown_mask(i)
        if unknown[1] & ebx or unknown[2] & ecx:
            return (f"{_labels(refs)} unknown to the module profile (saved under a policy "
                    "that hides them)")
        listed = enumerated(k.module, k.host)[i]
        if listed[1] & ebx != ebx or listed[2] & ecx != ecx:
            return f"the module would not take {_labels(refs)} on this host: nothing hidden"
    return tuple(refs)


def _leaf7_fillers(ctx: _Ctx) -> tuple[CpuidEntry, ...]:
    """Flagged, empty entries for every listed leaf-7 row but 7.0, to steer find()."""
    return tuple(CpuidEntry(7, e.index, FLAG_SIGNIFICANT_INDEX)
                 for e in ctx.caps.entries if e.function == 7 and e.index != 0)


def _smuggle(ctx: _Ctx, kind: str, ebx: int, ecx: int, what: str) -> _V:
    hidden = _hidden_bits(ctx, ebx, ecx)
    if isinstance(hidden, str):
        return _skip(hidden)
    req = _trap_request(ctx, kind, ebx, ecx)
    actual = ctx.attempt(req)
    ctx.trap_log.append((f"{kind}: {what}", req, actual))
    if actual.kind == Kind.KVM_REJECTED:
        return _ok(f"{what}: KVM refused it ({_describe(actual)})", "KVM_REJECTED",
                   _describe(actual), hidden)
    past = {Kind.ACCEPTED: "ACCEPTED: the hidden bits reach the TD",
            Kind.MODULE_REJECTED: "MODULE_REJECTED: KVM let the hidden bits through to the "
                                  "module, which refused them"}.get(
        actual.kind, f"{_describe(actual)}: past KVM's check")
    return _bad(f"{what}: {_labels(list(hidden))} never reported, yet {past} "
                "(KVM matched the row by its CPUID lookup, not by the entry's own index)",
                "KVM_REJECTED", _describe(actual), hidden)


def _trap_request(ctx: _Ctx, kind: str, ebx: int, ecx: int) -> Request:
    smuggler = CpuidEntry(7, 5, 0, ebx=ebx, ecx=ecx)  # unflagged, index 5: any 7.x row finds it
    fillers = _leaf7_fillers(ctx)
    base = ctx.base()
    gpaw = base.init_vm.entries
    if kind == "steer":
        entries = (*fillers, smuggler, *gpaw)
    elif kind == "multi":
        entries = (smuggler, *gpaw)
    elif kind == "stray":
        # The smuggler counts once per leaf-7 row; strays make nent agree.
        entries = (smuggler, *gpaw, *_strays(len(fillers)))
    elif kind == "dup_first":
        entries = (CpuidEntry(7, 0, FLAG_SIGNIFICANT_INDEX, ebx=ebx, ecx=ecx),
                   CpuidEntry(7, 0, FLAG_SIGNIFICANT_INDEX), *gpaw)
    elif kind == "dup_second":
        entries = (CpuidEntry(7, 0, FLAG_SIGNIFICANT_INDEX),
                   CpuidEntry(7, 0, FLAG_SIGNIFICANT_INDEX, ebx=ebx, ecx=ecx), *gpaw)
    else:
        raise ValueError(kind)
    return replace(base, init_vm=replace(base.init_vm, entries=entries))


@_check("adversarial_denylist_bypass_waitpkg", "adversarial",
        "flagged 7.1/7.2 entries first, then an unflagged leaf-7 entry (index 5) carrying "
        "WAITPKG: KVM must refuse it")
def _adv_bypass_waitpkg(ctx: _Ctx) -> _V:
    return _smuggle(ctx, "steer", 0, WAITPKG, "WAITPKG steered to row 7.0")


@_check("adversarial_denylist_bypass_hle_rtm", "adversarial",
        "the same steering with HLE+RTM: KVM must refuse it")
def _adv_bypass_tsx(ctx: _Ctx) -> _V:
    return _smuggle(ctx, "steer", HLE | RTM, 0, "HLE+RTM steered to row 7.0")


@_check("adversarial_denylist_bypass_stray_balance", "adversarial",
        "an unflagged leaf-7 entry (index 5) carrying WAITPKG, counted once per leaf-7 row, "
        "with stray entries making the count balance: KVM must refuse it")
def _adv_stray(ctx: _Ctx) -> _V:
    return _smuggle(ctx, "stray", 0, WAITPKG, "WAITPKG with stray entries balancing the count")


@_check("adversarial_unflagged_multi_match", "adversarial",
        "an unflagged leaf-7 entry carrying WAITPKG matches several rows: KVM must refuse it")
def _adv_multi(ctx: _Ctx) -> _V:
    return _smuggle(ctx, "multi", 0, WAITPKG, "unflagged WAITPKG entry alone")


@_check("adversarial_duplicate_entries", "adversarial",
        "two 7.0 entries, WAITPKG in the first or the second: KVM must refuse both")
def _adv_dup(ctx: _Ctx) -> _V:
    a = _smuggle(ctx, "dup_first", 0, WAITPKG, "duplicate 7.0, WAITPKG first")
    if a.status != PASS:
        return a
    b = _smuggle(ctx, "dup_second", 0, WAITPKG, "duplicate 7.0, WAITPKG second")
    return b if b.status != PASS else _ok(f"{a.detail}; {b.detail}", a.expected, a.actual,
                                          a.bits)


@_check("adversarial_matches_prediction", "adversarial",
        "every trap request above gets exactly the mirror's answer for this policy")
def _adv_pred(ctx: _Ctx) -> _V:
    if not ctx.exact:
        return _skip(NEEDS_MODULE)
    if not ctx.trap_log:
        return _skip("no trap request was sent")
    for what, req, actual in ctx.trap_log:
        pred = ctx.predict(req)
        assert pred is not None
        if not actual.same_answer(pred):
            ref: tuple[BitRef, ...] = ()
            if pred.leaf is not None and pred.register and pred.bit is not None:
                ref = (bitref(pred.leaf, pred.subleaf, pred.register, pred.bit),)
            return _bad(f"{what}: {_describe(actual)}, expected {_describe(pred)}",
                        pred.describe(), _describe(actual), ref)
    return _ok(f"{len(ctx.trap_log)} trap requests as predicted")


# ---------------------------------------------------------------------------
# hygiene (after the KVM handle is closed)


@_check("hygiene_tds_closed", "hygiene", "every VM fd opened was closed", after_close=True)
def _hyg_tds(ctx: _Ctx) -> _V:
    c = ctx.kvm.counters
    live = getattr(ctx.seam, "live_tds", None)
    if c.opens != c.closes:
        return _bad(f"{c.opens} opens, {c.closes} closes", str(c.opens), str(c.closes))
    if isinstance(live, int) and live:
        return _bad(f"the backend still holds {live} TDs", "0", str(live))
    return _ok(f"{c.tds_created} TDs created, all closed")


@_check("hygiene_key_ids_released", "hygiene",
        "no TDX key ID is left behind: none ran out, and the backend has them all back",
        after_close=True)
def _hyg_keys(ctx: _Ctx) -> _V:
    free = getattr(ctx.seam, "free_key_ids", None)
    if ctx.enospc:
        return _bad(f"{ctx.enospc} INIT_VM calls got ENOSPC: TDX key IDs ran out "
                    "(a key ID leaks)", "0 ENOSPC", f"{ctx.enospc} ENOSPC")
    if isinstance(free, int) and ctx.key_ids_before is not None and free != ctx.key_ids_before:
        return _bad(f"{ctx.key_ids_before - free} key IDs not returned",
                    str(ctx.key_ids_before), str(free))
    return _ok("no ENOSPC" + (f"; {free} key IDs free as before" if isinstance(free, int)
                              else ""))


@_check("hygiene_fds_released", "hygiene",
        "the process has no more open file descriptors than before the run", after_close=True)
def _hyg_fds(ctx: _Ctx) -> _V:
    p = ctx.proc
    mb = 1024 * 1024
    rss = f"RSS {p.rss_before // mb} MiB -> {p.rss_after // mb} MiB"
    if p.fds_after > p.fds_before:
        return _bad(f"{p.fds_after - p.fds_before} fds left open; {rss}",
                    str(p.fds_before), str(p.fds_after))
    return _ok(f"{p.fds_after} fds as before; {rss}")


# ---------------------------------------------------------------------------
# Running.


Progress = Callable[[int, int, int], None]  # checks done, total, TDs created


def _proc_numbers() -> tuple[int, int]:
    p = psutil.Process()
    return p.num_fds(), int(p.memory_info().rss)


def _empty_summary(fds: int, rss: int, counters: Counters | None = None) -> Summary:
    c = counters or Counters()
    return Summary(0, 0, 0, 0, c.tds_created, c.ioctls, c.init_vm_calls, fds, fds, rss, rss)


def run_verify(seam: Seam, *, backend_label: str, given: Given | None = None,
               kernel_release: str | None = None, only: Sequence[str] | None = None,
               progress: Progress | None = None) -> VerifyReport:
    """Run the suite over `seam`; nothing here prints.

    `given` is what is known before the kernel is asked (kvmtdx.knowledge.given);
    the policy and host are completed from the capabilities as `probe` does.
    `only` limits the run to those check ids.
    """
    fds0, rss0 = _proc_numbers()
    specs = [s for s in CHECKS if only is None or s.id in only]
    try:
        kvm = Kvm(seam)
    except KvmError as e:
        if e.skip:
            return VerifyReport(backend_label, None, (), _empty_summary(fds0, rss0),
                                skip_reason=e.reason)
        return _failed_start(backend_label, e.reason, fds0, rss0, None)
    with kvm:
        status = _availability(kvm)
        if status is not None:
            reason, skip = status
            if skip:
                return VerifyReport(backend_label, None, (),
                                    _empty_summary(fds0, rss0, kvm.counters), skip_reason=reason)
            return _failed_start(backend_label, reason, fds0, rss0, kvm.counters)
        try:
            first = kvm.create_td()
            with first:
                caps = first.capabilities()
        except OSError as e:
            return _failed_start(backend_label, f"KVM_TDX_CAPABILITIES failed: {e}", fds0, rss0,
                                 kvm.counters)
        know = complete(given if given is not None else Given(), caps, kernel_release)
        ctx = _Ctx(kvm=kvm, seam=seam, know=know, caps=caps)
        free = getattr(seam, "free_key_ids", None)
        ctx.key_ids_before = free if isinstance(free, int) else None
        done = 0
        total = len(specs)
        if progress is not None:
            ctx.on_td = lambda: progress(done, total, kvm.counters.tds_created)
        results: list[CheckResult] = []
        for s in specs:
            if s.after_close:
                continue
            results.append(_run_one(s, ctx))
            done += 1
            if progress is not None:
                progress(done, total, kvm.counters.tds_created)
    fds1, rss1 = _proc_numbers()
    ctx.proc = _Proc(fds0, fds1, rss0, rss1)
    for s in specs:
        if s.after_close:
            results.append(_run_one(s, ctx))
            done += 1
            if progress is not None:
                progress(done, total, kvm.counters.tds_created)
    order = {s.id: i for i, s in enumerate(specs)}
    results.sort(key=lambda r: order[r.id])
    c = kvm.counters
    summary = Summary(
        total=len(results),
        passed=sum(r.status == PASS for r in results),
        failed=sum(r.status == FAIL for r in results),
        skipped=sum(r.status == SKIP for r in results),
        tds_created=c.tds_created, ioctls=c.ioctls, init_vm_calls=c.init_vm_calls,
        fds_before=fds0, fds_after=fds1, rss_before=rss0, rss_after=rss1,
    )
    return VerifyReport(backend_label, know, tuple(results), summary)


def _availability(kvm: Kvm) -> tuple[str, bool] | None:
    """None when TDX is usable; else the reason and whether it is a skip (not present)."""
    version = kvm.api_version()
    if version != uapi.KVM_API_VERSION:
        return f"unexpected KVM API version {version} (want {uapi.KVM_API_VERSION})", False
    types = kvm.vm_types()
    if not types >> uapi.VmType.KVM_X86_TDX_VM & 1:
        return no_tdx_reason(types), True
    return None


def _run_one(s: CheckSpec, ctx: _Ctx) -> CheckResult:
    try:
        v = s.fn(ctx)
    except OSError as e:
        v = _bad(f"{type(e).__name__}: {e}")
    except KvmError as e:
        v = _bad(e.reason)
    return CheckResult(s.id, s.group, v.status, v.detail, v.expected, v.actual, v.bits)


def _failed_start(label: str, reason: str, fds: int, rss: int,
                  counters: Counters | None) -> VerifyReport:
    r = CheckResult("tdx_available", "availability", FAIL, reason)
    s = _empty_summary(fds, rss, counters)
    return VerifyReport(label, None, (r,), replace(s, total=1, failed=1))
