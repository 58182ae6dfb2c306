"""capabilities: KVM_TDX_CAPABILITIES, its refusals, its buffer handling and what it reports."""

from __future__ import annotations

import errno
from collections.abc import Sequence

from kvmtdx import layout
from kvmtdx.checks.context import Context
from kvmtdx.checks.registry import (
    NEEDS_POLICY,
    Verdict,
    bad,
    check,
    labels,
    need,
    ok,
    skip,
)
from kvmtdx.knowledge import caps_equal
from kvmtdx.model import mirror
from kvmtdx.model.catalog import BitRef
from kvmtdx.model.profiles import ModuleProfile
from kvmtdx.model.rules import bits_of
from kvmtdx.status import errno_name
from kvmtdx.structs import REGISTERS, CpuidEntry

GROUP = "capabilities"
HEADER_FIELDS = ("supported_attrs", "supported_xfam", "kernel_tdvmcallinfo_1_r11",
                 "user_tdvmcallinfo_1_r11", "kernel_tdvmcallinfo_1_r12",
                 "user_tdvmcallinfo_1_r12", "nent")
# Header words a kernel after 6.16 writes 0 whatever the caller's buffer held.
ZEROED_FIELDS = ("kernel_tdvmcallinfo_1_r11", "kernel_tdvmcallinfo_1_r12",
                 "user_tdvmcallinfo_1_r12", "cpuid_padding")


@check("caps_grow_and_retry", GROUP,
       "KVM_TDX_CAPABILITIES answers E2BIG until the buffer is big enough, then N entries")
def caps_grow_and_retry(ctx: Context) -> Verdict:
    n = len(ctx.caps.entries)
    if ctx.caps.nent != n or n == 0:
        return bad(f"nent {ctx.caps.nent} with {n} entries read", "nent = entries > 0",
                   f"nent {ctx.caps.nent}")
    m = ctx.know.module
    if m is not None and len(m.rows) != n:
        return bad(f"{n} entries, the module lists {len(m.rows)} rows", str(len(m.rows)), str(n))
    return ok(f"{n} entries", actual=str(n))


def _caps_fill(nent: int, pattern: int = 0xA5) -> bytes:
    """A caller buffer of a byte pattern, with a valid nent word."""
    data = bytearray([pattern]) * layout.caps_size(nent)
    data[layout.OFFSET_CAPS_NENT:layout.OFFSET_CAPS_NENT + 4] = nent.to_bytes(4, "little")
    return bytes(data)


def _caps_errno(ctx: Context, what: str, want: int, *, flags: int = 0,
                hw_error: int = 0) -> Verdict:
    n = len(ctx.caps.entries)
    with ctx.td() as td:
        res = td.capabilities_raw(n, flags=flags, hw_error=hw_error)
    pred = ctx.predict_caps(n, flags=flags, hw_error=hw_error)
    if pred is not None:
        want = pred.errno
    got, exp = errno_name(res.errno), errno_name(want)
    if res.errno != want:
        return bad(f"{what}: {got}, expected {exp}", exp, got)
    if hw_error and res.cmd.hw_error != hw_error:
        return bad(f"{what}: cmd.hw_error changed to 0x{res.cmd.hw_error:x}; KVM must refuse "
                   "before writing cmd back", f"hw_error 0x{hw_error:x}",
                   f"hw_error 0x{res.cmd.hw_error:x}")
    return ok(f"{what}: {got}", exp, got)


@check("caps_flags_rejected", GROUP, "cmd.flags != 0 is EINVAL")
def caps_flags_rejected(ctx: Context) -> Verdict:
    return _caps_errno(ctx, "flags 1", errno.EINVAL, flags=1)


@check("caps_hw_error_rejected", GROUP, "cmd.hw_error != 0 is EINVAL")
def caps_hw_error_rejected(ctx: Context) -> Verdict:
    return _caps_errno(ctx, "hw_error 1", errno.EINVAL, hw_error=1)


@check("caps_e2big_buffer_untouched", GROUP,
       "a buffer one entry short is E2BIG and KVM writes none of it")
def caps_e2big_buffer_untouched(ctx: Context) -> Verdict:
    n = len(ctx.caps.entries)
    short = n - 1
    fill = _caps_fill(short)
    with ctx.td() as td:
        res = td.capabilities_raw(short, fill=fill)
    got = errno_name(res.errno)
    if res.errno != errno.E2BIG:
        return bad(f"nent {short} (N = {n}): {got}, expected E2BIG", "E2BIG", got)
    if res.data != fill:
        changed = [i for i, (a, b) in enumerate(zip(res.data, fill, strict=True)) if a != b]
        return bad(f"E2BIG, but KVM wrote {len(changed)} bytes of the caller's buffer "
                   f"(first at offset {changed[0]})", "buffer untouched",
                   f"{len(changed)} bytes changed")
    return ok(f"nent {short}: E2BIG, buffer untouched", "E2BIG, untouched", got)


def _pattern_caps(ctx: Context) -> tuple[bytes, bytes, int]:
    n = len(ctx.caps.entries)
    fill = _caps_fill(n, 0x5A)
    with ctx.td() as td:
        res = td.capabilities_raw(n, fill=fill)
    return fill, res.data, res.errno


@check("caps_reserved_zero", GROUP,
       "reserved words, cpuid.padding and unused tdvmcallinfo words are written 0 "
       "(kernels after 6.16), even over a caller's pattern")
def caps_reserved_zero(ctx: Context) -> Verdict:
    p = need(ctx.know.policy, NEEDS_POLICY)
    if p.caps_echoes_caller:
        return skip(f"{p.name} echoes the caller's header words (as Linux 6.16 does); "
                    "caps_buffer_matches_prediction checks the echo")
    _fill, data, err = _pattern_caps(ctx)
    if err:
        return bad(f"capabilities over a patterned buffer: {errno_name(err)}",
                   "success", errno_name(err))
    c = layout.unpack_capabilities(data)
    dirty = [f"reserved[{i}]" for i, w in enumerate(c.reserved) if w]
    dirty += [name for name in ZEROED_FIELDS if getattr(c, name)]
    dirty += [f"entries[{i}].flags/padding" for i, e in enumerate(c.entries)
              if e.flags or any(e.padding)]
    if dirty:
        more = f" and {len(dirty) - 3} more" if len(dirty) > 3 else ""
        return bad(f"not zeroed: {', '.join(dirty[:3])}{more}", "0", "caller's pattern left")
    return ok("every reserved and unused word 0 over a 0x5a pattern", "0", "0")


def _entries_only(data: bytes, n: int) -> bytes:
    """The buffer with entry flags and padding blanked (undefined under 6.16)."""
    out = bytearray(data)
    for i in range(n):
        entry = layout.SIZEOF_CAPS_HEADER + i * layout.SIZEOF_CPUID_ENTRY2
        for off, size in ((layout.OFFSET_ENTRY_FLAGS, layout.SIZEOF_ENTRY_FLAGS),
                          (layout.OFFSET_ENTRY_PADDING, layout.SIZEOF_ENTRY_PADDING)):
            out[entry + off:entry + off + size] = bytes(size)
    return bytes(out)


def _first_difference(data: bytes, want: bytes) -> Verdict:
    diff = [i for i, (a, b) in enumerate(zip(data, want, strict=False)) if a != b]
    first = diff[0] if diff else min(len(data), len(want))
    where = "header" if first < layout.SIZEOF_CAPS_HEADER else (
        f"entry {(first - layout.SIZEOF_CAPS_HEADER) // layout.SIZEOF_CPUID_ENTRY2}")
    return bad(f"{len(diff)} bytes differ, first at offset {first} ({where})",
               f"byte 0x{want[first]:02x}" if first < len(want) else "end",
               f"byte 0x{data[first]:02x}" if first < len(data) else "end")


@check("caps_buffer_matches_prediction", GROUP,
       "over a patterned caller buffer, every byte KVM leaves is the mirror's")
def caps_buffer_matches_prediction(ctx: Context) -> Verdict:
    m = need(ctx.model(), ctx.needs_module)
    fill, data, err = _pattern_caps(ctx)
    n = len(ctx.caps.entries)
    pred = mirror.predict_capabilities(*m, n, caller=fill)
    if err != pred.errno:
        return bad(f"{errno_name(err)}, expected {errno_name(pred.errno)}")
    want = pred.buffer if pred.buffer is not None else fill
    if m[2].caps_echoes_caller:
        data, want = _entries_only(data, n), _entries_only(want, n)
    if data == want:
        return ok(f"{len(data)} bytes as predicted")
    return _first_difference(data, want)


@check("caps_two_calls_equal", GROUP, "two calls report the same")
def caps_two_calls_equal(ctx: Context) -> Verdict:
    with ctx.td() as td:
        again = td.capabilities()
    echo = ctx.know.policy is not None and ctx.know.policy.caps_echoes_caller
    if caps_equal(again, ctx.caps, entry_flags=not echo):
        return ok("equal")
    return bad("a second KVM_TDX_CAPABILITIES reported something else")


@check("caps_header_matches_prediction", GROUP,
       "supported_attrs, supported_xfam, tdvmcallinfo and nent are the mirror's")
def caps_header_matches_prediction(ctx: Context) -> Verdict:
    m = need(ctx.model(), ctx.needs_module)
    pred = mirror.predict_capabilities(*m, len(m[0].rows))
    if pred.caps is None:
        return bad(f"the mirror predicts {errno_name(pred.errno)}, the kernel reported",
                   errno_name(pred.errno), "success")
    differ = [(name, getattr(pred.caps, name), getattr(ctx.caps, name))
              for name in HEADER_FIELDS if getattr(pred.caps, name) != getattr(ctx.caps, name)]
    if differ:
        name, want, got = differ[0]
        return bad(f"{len(differ)} header fields differ: " + ", ".join(d[0] for d in differ),
                   f"{name} 0x{want:x}", f"{name} 0x{got:x}")
    return ok(f"attrs 0x{ctx.caps.supported_attrs:x}, xfam 0x{ctx.caps.supported_xfam:x}, "
              f"nent {ctx.caps.nent}")


def _entry_label(e: CpuidEntry) -> str:
    return f"0x{e.function:x}.{e.index}"


def _reported(entries: Sequence[CpuidEntry], module: ModuleProfile, b: BitRef) -> bool:
    for row, e in zip(module.rows, entries, strict=False):
        if row.leaf == b.leaf and row.subleaf == b.subleaf:
            return bool(e.reg(b.register) >> b.bit & 1)
    return False


def _entries_differ(got: Sequence[CpuidEntry], module: ModuleProfile,
                    bits: list[BitRef]) -> Verdict:
    extra = [b for b in bits if _reported(got, module, b)]
    missing = [b for b in bits if b not in extra]
    parts = []
    if extra:
        parts.append(f"reported but not predicted: {labels(extra)}")
    if missing:
        parts.append(f"predicted but not reported: {labels(missing)}")
    return bad("; ".join(parts),
               "hidden: " + labels(extra) if extra else "reported: " + labels(missing),
               "reported: " + labels(extra) if extra else "hidden: " + labels(missing),
               tuple(bits))


@check("caps_entries_match_prediction", GROUP,
       "every row, register and bit reported is the mirror's")
def caps_entries_match_prediction(ctx: Context) -> Verdict:
    m = need(ctx.model(), ctx.needs_module)
    module = m[0]
    want = mirror.reported_entries(*m)
    got = ctx.caps.entries
    if len(want) != len(got):
        return bad(f"{len(got)} entries, expected {len(want)}", str(len(want)), str(len(got)))
    bits: list[BitRef] = []
    for i, (w, g) in enumerate(zip(want, got, strict=True)):
        if (w.function, w.index) != (g.function, g.index):
            return bad(f"entry {i} is {_entry_label(g)}, expected {_entry_label(w)}",
                       _entry_label(w), _entry_label(g))
        for r, wv, gv, u in zip(REGISTERS, w.regs(), g.regs(), module.unknown_mask(i),
                                strict=True):
            bits += [BitRef(w.function, module.rows[i].subleaf, r, b)
                     for b in bits_of((wv ^ gv) & ~u)]
    if not bits:
        return ok(f"{len(got)} entries, every bit as predicted")
    return _entries_differ(got, module, bits)
