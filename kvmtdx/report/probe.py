"""Rendering of `kvmtdx probe`: a table by leaf, register and bit, or JSON (schema 1)."""

from __future__ import annotations

from collections import Counter
from typing import Any

from kvmtdx.jsonfile import hex64
from kvmtdx.model.policy import allowlist_to_json
from kvmtdx.outcome import Outcome
from kvmtdx.probe import BitClass, BitResult, ProbeResult, effective_allowlist
from kvmtdx.report import hx
from kvmtdx.report.encode import capabilities_json
from kvmtdx.report.schema import ReportKind, document
from kvmtdx.structs import CpuidEntry


def row_label(leaf: int, index: int, rows: tuple[CpuidEntry, ...]) -> str:
    """0x7.1; a leaf listed once at index 0 (no sub-leaves, as far as KVM shows) is just 0x1."""
    same_leaf = sum(1 for e in rows if e.function == leaf)
    return f"0x{leaf:x}" if same_leaf <= 1 and index == 0 else f"0x{leaf:x}.{index}"


def _outcome_json(o: Outcome | None) -> dict[str, Any] | None:
    if o is None:
        return None
    return {"outcome": o.kind.value, "errno": o.errno_name, "hw_error": hex64(o.hw_error)}


def result_to_json(r: ProbeResult) -> dict[str, Any]:
    """The body of a "probe" report (the envelope comes from report.schema)."""
    return {
        "backend": r.backend,
        "module": r.module,
        "policy": r.policy,
        "mode": r.mode,
        "complete": r.complete,
        "tds": r.tds,
        "ioctls": r.ioctls,
        "seconds": round(r.seconds, 3),
        "supported_attrs": hex64(r.caps.supported_attrs),
        "supported_xfam": hex64(r.caps.supported_xfam),
        "capabilities": capabilities_json(r.caps),
        "summary": r.counts(),
        "untested": r.untested,
        "failures": len(r.failures),
        "mismatches": len(r.mismatches),
        "notes": r.notes,
        "bits": [
            {
                "leaf": f"0x{b.leaf:x}", "subleaf": b.subleaf, "register": b.register, "bit": b.bit,
                "name": b.name, "class": b.cls.value, "reported": b.reported,
                "result": _outcome_json(b.outcome), "explained": b.explained,
                "cleared": b.cleared,
                "expected": b.expected.value if b.expected is not None else None,
            }
            for b in r.bits
        ],
        "fields": [
            {
                "leaf": f"0x{f.leaf:x}", "subleaf": f.subleaf, "register": f.register,
                "lo": f.lo, "hi": f.hi, "name": f.name, "value": f.value,
                "class": f.cls.value, "informational": f.informational,
                "result": _outcome_json(f.outcome),
            }
            for f in r.fields
        ],
    }


def render_json(r: ProbeResult) -> str:
    return document(ReportKind.PROBE, result_to_json(r))


def _why(b: BitResult) -> str:
    parts = [b.outcome.describe() if b.outcome is not None else "(inferred by splitting)"]
    if b.explained:
        parts.append(f"- {b.explained}")
    elif b.cleared:
        parts.append(f"- {b.cleared}")
    elif b.failed:
        parts.append("- KERNEL BUG" if b.cls is BitClass.HIDDEN_ACCEPTED
                     else "- KERNEL BUG (no module coupling explains it)")
    if b.expected is not None and b.expected is not b.cls:
        parts.append(f"[mirror: {b.expected.value}]")
    return " ".join(parts)


def render_text(r: ProbeResult) -> str:
    rows = r.caps.entries
    out = [
        f"kvmtdx probe: {r.backend}",
        f"mode {r.mode}: {r.tds} TDs, {r.ioctls} ioctls, {r.seconds:.2f} s"
        + ("" if r.complete else "  (INCOMPLETE)"),
        f"supported_attrs {hx(r.caps.supported_attrs, 16)}  "
        f"supported_xfam {hx(r.caps.supported_xfam, 16)}",
        "",
        f"{'leaf':<13}{'reg':<5}{'bit':>3}  {'name':<22}{'class':<24}outcome",
    ]
    # Hidden bits the module refuses are the bulk and the expected case: one line per register.
    quiet: dict[tuple[int, int, str], list[BitResult]] = {}
    for b in r.bits:
        if b.cls is BitClass.HIDDEN_MODULE_REJECTED and b.expected in (None, b.cls):
            quiet.setdefault((b.leaf, b.subleaf, b.register), []).append(b)
            continue
        out.append(f"{row_label(b.leaf, b.subleaf, rows):<13}{b.register:<5}{b.bit:>3}  "
                   f"{b.name:<22}{b.cls.value:<24}{_why(b)}")
    if quiet:
        out.append("")
        out.append("hidden, refused by the TDX module (as expected):")
        for (leaf, sub, reg), bs in quiet.items():
            named = [x.name for x in bs if not x.name.startswith("bit")]
            unnamed = [str(x.bit) for x in bs if x.name.startswith("bit")]
            text = " ".join(named)
            if unnamed:
                text += (" " if text else "") + "bits " + ",".join(unnamed)
            out.append(f"  {row_label(leaf, sub, rows):<11}{reg:<5}{text}")
    if r.fields:
        out.append("")
        out.append("value fields (tried with valid values):")
        for f in r.fields:
            span = f"{f.hi}:{f.lo}" if f.hi != f.lo else str(f.lo)
            note = "  (informational)" if f.informational else ""
            out.append(f"  {row_label(f.leaf, f.subleaf, rows):<11}{f.register:<5}{span:>5}  "
                       f"{f.name:<28}{f.cls.value:<16}value {hx(f.value)}{note}")
    out.append("")
    counts = Counter({k: v for k, v in r.counts().items() if v})
    out.append("summary: " + ", ".join(f"{k} {v}" for k, v in counts.items())
               + (f"; {r.untested} bits not tried" if r.untested else ""))
    for n in r.notes:
        out.append(f"note: {n}")
    fails = r.failures
    if r.mismatches:
        out.append(f"{len(r.mismatches)} bits differ from the mirror's prediction for policy "
                   f"{r.policy}")
    out.append(f"FAIL: {len(fails)} bits break the rule that a kernel accepts what it "
               "reports and nothing it hides" if fails
               else "PASS: every probed bit is accepted if reported and refused if hidden")
    return "\n".join(out) + "\n"


def allowlist_text(r: ProbeResult, date: str) -> str:
    return document(ReportKind.ALLOWLIST, allowlist_to_json(effective_allowlist(r, date=date)))
