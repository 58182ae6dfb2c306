"""`kvmtdx explain` for people (text) and for tools (JSON, the project's report envelope).

JSON: {"schema": 1, "kind": "explain", "tool_version", "findings": [...],
"unrecognised": [...], "model", "diagnosis", "observed", "backend"}; or, for
--host-check, the same envelope with "host_check" instead.  Every value is
plain JSON: 64-bit words (statuses, hw_error, RCX, attribute and XFAM masks) as "0x" and
16 hex digits and outcomes as every kvmtdx report writes them, errnos by name.
"""

from __future__ import annotations

import textwrap
from collections.abc import Iterable
from typing import Any

from kvmtdx.explain import Explanation, Item, qemu
from kvmtdx.explain.diagnose import Diagnosis, Fault
from kvmtdx.explain.facts import BitInfo
from kvmtdx.explain.host_check import Cause, HostCheck
from kvmtdx.explain.logs import Finding, Kind
from kvmtdx.explain.reasons import Category
from kvmtdx.explain.statuses import ErrnoExplanation, StatusExplanation, knowledge
from kvmtdx.jsonfile import hex64
from kvmtdx.model import catalog
from kvmtdx.outcome import Outcome
from kvmtdx.report import encode
from kvmtdx.report.schema import ReportKind
from kvmtdx.report.schema import envelope as report_envelope
from kvmtdx.status import errno_name

WIDTH = 100


def _hx(v: int | None) -> str | None:
    return None if v is None else f"0x{v:x}"


def _hx64(v: int | None) -> str | None:
    """A 64-bit word as every kvmtdx report spells it (jsonfile.hex64); None stays null."""
    return None if v is None else hex64(v)


def envelope(**body: Any) -> dict[str, Any]:
    return report_envelope(ReportKind.EXPLAIN, body)


# --- JSON --------------------------------------------------------------------------


def bit_json(b: BitInfo) -> dict[str, Any]:
    return {"leaf": _hx(b.leaf), "subleaf": b.subleaf, "register": b.register, "bit": b.bit,
            "name": b.name, "qemu": b.qemu}


def outcome_json(o: Outcome) -> dict[str, Any]:
    """An outcome as every report writes it (report.encode), and who decided it."""
    return {**encode.outcome_json(o), "decider": o.decider.value if o.decider else None}


def status_json(s: StatusExplanation) -> dict[str, Any]:
    kb = knowledge()
    info = s.info
    row = s.rcx_row()
    return {
        "raw": hex64(s.raw), "status": hex64(s.status), "name": s.name, "known": info is not None,
        "class": {"id": s.class_id, "name": s.class_name}, "flags": list(s.flags),
        "detail": _hx(s.detail),
        "operand": None if s.operand is None else {
            "id": s.operand.id, "name": s.operand.name, "field": s.operand.field,
            "causes": s.operand.causes, "sources": [kb.source(x) for x in s.operand.sources]},
        "msr": None if s.msr is None else {"index": _hx(s.msr[0]), "name": s.msr[1],
                                           "about": s.msr[2] or None},
        "meaning": info.meaning if info else None, "causes": info.causes if info else None,
        "seamcalls": list(info.seamcalls) if info else [], "seamcall": s.seamcall,
        "rcx": _hx64(s.rcx), "rcx_row": None if row is None else {"leaf": _hx(row[0]),
                                                                 "subleaf": row[1]},
        "seamcall_kvm": s.seamcall_kvm,
        "kvm": None if s.kvm is None else {
            "errno": errno_name(s.kvm.errno), "status_in_hw_error": s.kvm.hw_error,
            "warn": s.kvm.warn,
            "text": s.kvm.text, "source": s.kvm.source},
        "sources": [kb.source(x) for x in info.sources] if info else [],
        "unknown": list(s.unknown),
    }


def errno_json(e: ErrnoExplanation) -> dict[str, Any]:
    return {"errno": e.name, "value": e.errno, "ioctl": e.ioctl, "causes": list(e.causes),
            "hw_error": _hx64(e.hw_error)}


def _finding_value(f: Finding) -> str | int | None:
    if f.kind == Kind.STATUS:
        return hex64(f.value)
    if f.kind == Kind.ERRNO:
        return errno_name(f.value)
    return f.value


def item_json(item: Item) -> dict[str, Any]:
    f = item.finding
    return {
        "origin": f.origin, "line_no": f.line_no or None, "line": f.line or None,
        "source": f.source, "kind": f.kind.value,
        "value": _finding_value(f),
        "ioctl": f.ioctl, "seamcall": f.seamcall, "rcx": _hx64(f.rcx),
        "hw_error": _hx64(f.hw_error),
        "name": f.name, "why": f.why,
        "status": status_json(item.status) if item.status else None,
        "errno": errno_json(item.errno) if item.errno else None,
        "bit": bit_json(item.bit) if item.bit else None, "facts": list(item.facts),
    }


def fault_json(f: Fault) -> dict[str, Any]:
    entry = f.entry
    return {
        "category": f.category.value, "check": f.check,
        "decider": f.decider.value if f.decider else None, "outcome": outcome_json(f.outcome),
        "why": f.why, "fix": f.fix, "bits": [bit_json(b) for b in f.bits],
        "xfam_bits": hex64(f.xfam_bits) if f.xfam_bits else None,
        "attribute_bits": hex64(f.attribute_bits) if f.attribute_bits else None,
        "entry": None if entry is None else {"function": _hx(entry.function),
                                             "index": entry.index, "flags": entry.flags},
        "facts": list(f.facts),
    }


def diagnosis_json(d: Diagnosis, model_source: str) -> dict[str, Any]:
    return {
        "module": d.module, "host": d.host, "policy": d.policy, "model_source": model_source,
        "outcome": outcome_json(d.outcome), "faults": [fault_json(f) for f in d.faults],
        "final": outcome_json(d.final), "stopped": d.stopped, "replays": d.replays,
        "silent": [{**bit_json(s.bit), "why": s.why} for s in d.silent],
        "qemu_names": qemu.source(),
    }


def explanation_json(e: Explanation) -> dict[str, Any]:
    d = e.diagnosis
    return envelope(
        findings=[item_json(i) for i in e.items], unrecognised=list(e.silent_inputs),
        model=None if e.model is None else {"module": e.model.module.name,
                                            "host": e.model.host.name,
                                            "policy": e.model.policy.name,
                                            "source": e.model.source},
        diagnosis=None if d is None or e.model is None else diagnosis_json(d, e.model.source),
        observed=None if e.observed is None else outcome_json(e.observed),
        backend=e.backend)


def host_check_json(h: HostCheck) -> dict[str, Any]:
    return envelope(host_check={
        "backend": h.backend, "module": h.module, "policy": h.policy,
        "policy_reason": h.policy_reason, "host": h.host,
        "supported_attrs": hex64(h.supported_attrs),
        "supported_xfam": hex64(h.supported_xfam),
        "wanted": h.wanted, "available": h.available,
        "missing": [{**bit_json(m.bit), "cause": m.cause.value, "why": m.why}
                    for m in h.missing],
        "xfam_missing": [{"bit": b, "name": n, "why": w} for b, n, w in h.xfam_missing],
        "unjudged": [{"leaf": _hx(k[0]), "subleaf": k[1], "register": k[2]} for k in h.unjudged],
        "qemu_names": qemu.source(),
    })


# --- text ----------------------------------------------------------------------------


def _field(label: str, text: str, indent: int = 2) -> list[str]:
    head = " " * indent + f"{label:<11}"
    return textwrap.wrap(text, WIDTH, initial_indent=head,
                         subsequent_indent=" " * len(head)) or [head.rstrip()]


def _wrapped(text: str, indent: int) -> list[str]:
    return textwrap.wrap(text, WIDTH, initial_indent=" " * indent,
                         subsequent_indent=" " * (indent + 2))


def status_lines(s: StatusExplanation) -> list[str]:
    kb = knowledge()
    title = f"0x{s.raw:016x}: {s.name}"
    if s.operand is not None:
        title += f", operand {s.operand.id} ({s.operand.name})"
    elif s.msr is not None:
        title += f", MSR 0x{s.msr[0]:x} ({s.msr[1]})"
    out = [title]
    fields = ", ".join(s.flags) or "no error bit"
    cls = f"class 0x{s.class_id:02x}" + (f" ({s.class_name})" if s.class_name else "")
    out += _field("fields", f"{fields}; {cls}; bits 31:0 = 0x{s.detail:x}")
    if s.info is not None:
        out += _field("meaning", s.info.meaning)
    if s.operand is not None:
        out += _field("operand", f"{s.operand.name}: {s.operand.field}")
        out += _field("causes", s.operand.causes)
    elif s.info is not None:
        out += _field("causes", s.info.causes)
    if s.msr is not None and s.msr[2]:
        out += _field("MSR", f"{s.msr[1]}: {s.msr[2]}")
    row = s.rcx_row()
    if row is not None:
        out += _field("row", f"RCX names CPUID 0x{row[0]:x} sub-leaf {row[1]}")
    if s.info is not None and s.info.seamcalls:
        out += _field("from", ", ".join(s.info.seamcalls))
    if s.kvm is not None:
        only_init = s.info is not None and s.info.seamcalls == ("TDH.MNG.INIT",)
        known = s.seamcall is not None or only_init
        out += _field("KVM 7.3", s.kvm.text if known
                      else f"if TDH.MNG.INIT returned it: {s.kvm.text}")
    if s.seamcall_kvm is not None:
        out += _field("KVM 7.3", s.seamcall_kvm)
    sources = (s.info.sources if s.info else ()) + (s.operand.sources if s.operand else ())
    if sources:
        out += _field("sources", "; ".join(dict.fromkeys(kb.source(x) for x in sources)))
    for u in s.unknown:
        out += _field("unknown", u)
    if s.operand is not None and s.operand.name == "CPUID_CONFIG":
        out += _field("next", "replay the request to name every bit: kvmtdx explain --request "
                      "REQUEST.json --simulate MODULE:POLICY (or --module, --policy, --host)")
    return out


def errno_lines(e: ErrnoExplanation) -> list[str]:
    out = [f"{e.name} ({e.errno}) from {e.ioctl}"]
    if e.hw_error is not None:
        out += _field("hw_error", f"0x{e.hw_error:x}")
    for c in e.causes or ("not an errno kvmtdx knows this ioctl to return",):
        out += _field("when", c)
    return out


def _item_body(item: Item) -> list[str]:
    if item.status is not None:
        return status_lines(item.status)
    if item.errno is not None:
        return errno_lines(item.errno)
    f = item.finding
    if item.bit is not None:
        label = f"{item.bit.vmm_label()} = {item.bit.label()}"
        out = [f"{f.why}: {label}"]
        for fact in item.facts:
            out += _field("fact", fact)
        return out
    return [f"kernel WARN in {f.name} (arch/x86/kvm/vmx/tdx.c:{f.value}): a TDX_BUG_ON fired; "
            "the SEAMCALL line logged with it carries the status"]


def explanation_text(e: Explanation) -> str:
    out: list[str] = []
    shown: dict[tuple[Any, ...], int] = {}
    last_line: tuple[str, int] | None = None
    for item in e.items:
        f = item.finding
        key = (f.kind, f.value, f.seamcall, f.rcx, f.ioctl, f.hw_error)
        if f.line_no and (f.origin, f.line_no) != last_line:
            out.append(f"{f.origin}:{f.line_no} ({f.source}): {f.line}")
            last_line = (f.origin, f.line_no)
        if key in shown:
            out.append(f"  the same as #{shown[key]} above")
            continue
        n = shown[key] = len(shown) + 1
        body = _item_body(item)
        out += [f"#{n} {body[0]}", *body[1:], ""]
    for origin in e.silent_inputs:
        out.append(f"{origin}: no TDX status, errno or feature warning recognised")
    if e.diagnosis is not None and e.model is not None:
        out += diagnosis_lines(e.diagnosis, e.model.source)
    if e.observed is not None:
        same = e.diagnosis is not None and e.observed.same_answer(e.diagnosis.outcome)
        out.append(f"on {e.backend}: {e.observed.describe()}"
                   + (" (as predicted)" if same else " (NOT as predicted)"))
    return "\n".join(out).rstrip() + "\n"


CATEGORY_TEXT: dict[Category, str] = {
    Category.HIDDEN_BY_POLICY: "hidden by the kernel's policy",
    Category.NOT_CONFIGURABLE: "not configurable on this module",
    Category.COUPLING: "coupling rule",
    Category.XFAM_RULE: "XFAM rule",
    Category.ATTRIBUTES: "attribute rule",
    Category.TOPOLOGY_RULE: "topology rule (leaf 0x1F)",
    Category.VALUE_RULE: "value rule",
    Category.GPAW: "GPAW rule",
    Category.UNLISTED_LEAF: "entry on no module row",
    Category.STRUCTURE: "the ioctl's own words",
    Category.UNKNOWN: "other",
}


def _group(faults: Iterable[Fault]) -> list[list[Fault]]:
    groups: list[list[Fault]] = []
    for f in faults:
        last = groups[-1][0] if groups else None
        if (last is not None and f.bits and last.bits and f.entry is None
                and (last.category, last.check, last.why, last.xfam_bits)
                == (f.category, f.check, f.why, f.xfam_bits)
                and _template(last) == _template(f)):
            groups[-1].append(f)
        else:
            groups.append([f])
    return groups


def _template(f: Fault) -> str:
    return f.fix.replace(", ".join(b.vmm_label() for b in f.bits), "{}", 1)


def fault_lines(n: int, group: list[Fault]) -> list[str]:
    f = group[0]
    who = "KVM" if f.decider and f.decider.value == "kvm" else "the TDX module"
    head = (f"{n}. {CATEGORY_TEXT[f.category]}: {who} refuses ({f.check or 'no check name'}, "
            f"{f.outcome.describe().split(' (')[0]})")
    out = textwrap.wrap(head, WIDTH, initial_indent="  ", subsequent_indent="     ")
    bits = [b for g in group for b in g.bits]
    if bits:
        out += _field("bits", ", ".join(f"{b.vmm_label()} = {b.label()}" if b.qemu
                                         else b.label() for b in bits), 5)
    if f.entry is not None:
        out += _field("entry", f"CPUID 0x{f.entry.function:x} index {f.entry.index} "
                      f"flags {f.entry.flags}", 5)
    out += _field("why", f.why, 5)
    for fact in dict.fromkeys(x for g in group for x in g.facts):
        out += _field("fact", fact, 5)
    fix = _template(f).replace("{}", ", ".join(b.vmm_label() for b in bits), 1) \
        if len(group) > 1 else f.fix
    out += _field("fix", fix, 5)
    return out


def diagnosis_lines(d: Diagnosis, source: str) -> list[str]:
    out = [f"request replayed on module {d.module}, host {d.host}, policy {d.policy} ({source})",
           f"  outcome    {d.outcome.describe()}"]
    if not d.faults:
        out.append("  no fault: the request is accepted")
    else:
        end = d.final.describe() if d.stopped is None else d.stopped
        out.append(f"  faults     {len(d.faults)} ({d.replays} replays); with all removed: {end}")
    for n, group in enumerate(_group(d.faults), start=1):
        out += fault_lines(n, group)
    for s in d.silent:
        out += _field("silent", f"{s.bit.vmm_label()} ({s.bit.label()}) is accepted but dropped: "
                      f"{s.why}")
    out += _field("names", f"CPUID bits as Linux cpufeatures.h names them; -cpu names from "
                  f"{qemu.source()}")
    return out


CAUSE_TEXT: dict[Cause, str] = {
    Cause.MODULE: "the module does not allow it",
    Cause.KVM: "KVM hides it",
    Cause.HOST: "the host lacks it",
    Cause.XFAM: "KVM offers no XFAM state for it",
    Cause.ATTRIBUTE: "KVM offers no TD attribute for it",
    Cause.QEMU: "QEMU does not offer it to a TD",
    Cause.UNEXPLAINED: "not reported, though the model allows it",
}


def host_check_text(h: HostCheck) -> str:
    missing = len(h.missing)
    out = [f"kvmtdx explain --host-check: {missing} of the {h.wanted} features a -cpu host TD "
           f"asks for are not available here",
           f"  backend    {h.backend}",
           f"  module     {h.module or 'unknown (give --module to tell the module from KVM)'}",
           f"  policy     {h.policy or 'unknown'} ({h.policy_reason})",
           f"  host       {h.host or 'native CPUID unknown'}",
           f"  offered    attributes {' '.join(catalog.attribute_names(h.supported_attrs))}; "
           f"XFAM {' '.join(catalog.xfam_names(h.supported_xfam))}"]
    groups: dict[tuple[Cause, str], list[BitInfo]] = {}
    for m in h.missing:
        groups.setdefault((m.cause, m.why), []).append(m.bit)
    for (cause, why), bits in groups.items():
        out += _wrapped(f"{CAUSE_TEXT[cause]} ({len(bits)}): {why}", 2)
        out += _wrapped(", ".join(f"{b.vmm_label()} ({b.label()})" for b in bits), 5)
    xfam: dict[str, list[str]] = {}
    for bit, name, why in h.xfam_missing:
        xfam.setdefault(why, []).append(f"{bit} {name}")
    for why, names in xfam.items():
        out += _wrapped(f"XFAM state not offered ({len(names)}): {why}", 2)
        out += _wrapped(", ".join(names), 5)
    if h.unjudged:
        leaves = ", ".join(f"0x{k[0]:x}{'' if k[1] is None else f'.{k[1]}'} {k[2].upper()}"
                           for k in h.unjudged)
        out += _field("unjudged", f"the module alone decides what a TD sees of {leaves}")
    out.append(f"  names      -cpu names: {qemu.source()}")
    return "\n".join(out) + "\n"
