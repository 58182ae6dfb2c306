"""`kvmtdx td-cpuid` and `kvmtdx init-vm --effective`: the TD's CPUID beside the request.

JSON: the init-vm keys, then `effective_cpuid` (the entries KVM_TDX_GET_CPUID returned,
null when INIT_VM was not ACCEPTED or the read failed: `effective_error` says which ioctl
and errno), `cpuid_changes` (every differing bit of a CPUID_CONFIG row, grouped by row,
register, kind and reason) and `hidden_in_td` (bits the request set that KVM never
reported, in the TD's CPUID).  Text: one line per change, bits by name, value registers
as asked -> got, bits the TD takes from the CPU grouped per register.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from kvmtdx.identity import HostIdentity
from kvmtdx.model import catalog
from kvmtdx.model.requests import request_to_json
from kvmtdx.model.rules import bits_of, is_value_register
from kvmtdx.model.td_diff import BitDiff
from kvmtdx.report import hx
from kvmtdx.report.encode import bitref_json, host_identity_json
from kvmtdx.report.schema import ReportKind, document
from kvmtdx.report.sim import init_vm_text, init_vm_to_json
from kvmtdx.structs import REGISTERS, CpuidEntry
from kvmtdx.td_cpuid import TdCpuidRun

WORDS = {"cleared": "cleared silently", "forced_1": "forced to 1", "overridden": "overridden",
         "native": "native", "unexplained": "UNEXPLAINED", "differs": "differs"}


def entry_json(e: CpuidEntry) -> dict[str, Any]:
    out: dict[str, Any] = {"leaf": f"0x{e.function:x}",
                           "subleaf": e.index if e.significant_index else None}
    out.update({r: hx(v) for r, v in zip(REGISTERS, e.regs(), strict=True)})
    return out


def diff_json(d: BitDiff) -> dict[str, Any]:
    return {"leaf": f"0x{d.leaf:x}", "subleaf": d.subleaf, "register": d.register,
            "mask": hx(d.mask), "asked": hx(d.asked), "got": hx(d.got), "kind": d.kind,
            "reason": d.reason,
            "bits": [catalog.bit_name(d.leaf, d.subleaf, d.register, b) for b in bits_of(d.mask)]}


def effective_json(t: TdCpuidRun) -> dict[str, Any]:
    """The keys init-vm --effective adds, and td-cpuid's core."""
    read = t.read
    return {
        "effective_cpuid": None if read is None or read.entries is None else [
            entry_json(e) for e in read.entries],
        "effective_error": None if read is None or read.entries is not None else {
            "step": read.step, "errno": read.describe().rpartition(": ")[2]},
        "cpuid_changes": [diff_json(d) for d in t.diffs],
        "hidden_in_td": [bitref_json(b) for b in t.smuggled],
    }


def init_vm_json(t: TdCpuidRun, identity: HostIdentity) -> str:
    return document(ReportKind.INIT_VM, {**init_vm_to_json(t.run), **effective_json(t)},
                    host_identity_json(identity))


def td_cpuid_json(t: TdCpuidRun, identity: HostIdentity) -> str:
    k = t.knowledge
    body = {
        "module": k.module.name if k.module is not None else None,
        "policy": k.policy.name if k.policy is not None else None,
        "host": k.host.name if k.host is not None else None,
        "request": request_to_json(t.request),
        "init_vm": init_vm_to_json(t.run),
        **effective_json(t),
    }
    return document(ReportKind.TD_CPUID, body, host_identity_json(identity))


def _where(leaf: int, subleaf: int | None) -> str:
    return f"0x{leaf:x}" + ("" if subleaf is None else f".{subleaf}")


def _bits(d: BitDiff) -> str:
    name = d.register.upper()
    return ", ".join(f"{name}[{b}] {catalog.bit_name(d.leaf, d.subleaf, d.register, b)}"
                     for b in bits_of(d.mask))


def _value_lines(diffs: Sequence[BitDiff]) -> list[str]:
    """One line per value register: asked -> got, with every reason."""
    hows: dict[tuple[int, int | None, str], list[BitDiff]] = {}
    for d in diffs:
        hows.setdefault((d.leaf, d.subleaf, d.register), []).append(d)
    return [f"  {_where(leaf, sub)} {reg.upper()} {hx(ds[0].asked)} -> {hx(ds[0].got)}: "
            + "; ".join(dict.fromkeys(f"{WORDS.get(d.kind, d.kind)} ({d.reason})" for d in ds))
            for (leaf, sub, reg), ds in hows.items()]


def changes_text(diffs: Sequence[BitDiff]) -> list[str]:
    """The requested bits the TD has otherwise, by name; value registers as asked -> got;
    then what the TD takes from the CPU, per register."""
    def value(d: BitDiff) -> bool:
        return is_value_register(d.leaf, d.subleaf, d.register)

    out = [f"  {_where(d.leaf, d.subleaf)} {_bits(d)}: {WORDS.get(d.kind, d.kind)} "
           f"({d.reason})" for d in diffs if d.kind != "native" and not value(d)]
    out += _value_lines([d for d in diffs if value(d) and d.kind != "native"])
    native = [d for d in diffs if d.kind == "native"]
    if native:
        out.append("  from the CPU (not configurable, so not as requested):")
        out += [f"    {_where(d.leaf, d.subleaf)} {_bits(d)}" for d in native if not value(d)]
        fields = [f"{_where(d.leaf, d.subleaf)} {d.register.upper()}" for d in native
                  if value(d)]
        if fields:
            out.append(f"    value registers: {', '.join(dict.fromkeys(fields))}")
    return out


def effective_text(t: TdCpuidRun) -> list[str]:
    read = t.read
    if read is None:
        return ["TD's CPUID: not read (INIT_VM was not ACCEPTED)"]
    if read.entries is None:
        return [f"TD's CPUID: not read ({read.describe()})"]
    ents = read.entries
    why = "" if t.knowledge.module is not None else " (no module profile: no reasons; " \
        "give --module)"
    out = [f"TD's CPUID (KVM_TDX_GET_CPUID): {len(ents)} entries, leaf 0x{ents[0].function:x} "
           f"to 0x{ents[-1].function:x}; beside the request{why}:"]
    if t.smuggled:
        out.append("  requested bits KVM never reported, in the TD: "
                   + ", ".join(b.label() for b in t.smuggled)
                   + " (a hidden bit that got past KVM)")
    out += changes_text(t.diffs) or ["  every bit of every CPUID_CONFIG row as requested"]
    return out


def render_text(t: TdCpuidRun, *, title: bool = True) -> str:
    lines = init_vm_text(t.run).rstrip("\n").splitlines() if title else []
    k = t.knowledge
    if k.module is not None:
        lines.append(f"  judged by module {k.module.name}, host "
                     f"{k.host.name if k.host else 'unknown'}, policy "
                     f"{k.policy.name if k.policy else 'unknown'}")
    return "\n".join([*lines, *effective_text(t)]) + "\n"
