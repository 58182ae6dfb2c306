"""Rendering of `kvmtdx probe`: a table by leaf, register and bit, or JSON (schema 1); KTAP
and JUnit are in kvmtdx.report.probe_cases."""

from __future__ import annotations

from collections import Counter
from typing import Any

from kvmtdx.identity import HostIdentity
from kvmtdx.jsonfile import hex64
from kvmtdx.model.policy import allowlist_to_json
from kvmtdx.model.requests import request_to_json
from kvmtdx.outcome import Outcome
from kvmtdx.probe import BitClass, BitResult, FieldResult, ProbeResult, effective_allowlist
from kvmtdx.report import hx
from kvmtdx.report.encode import capabilities_json, host_identity_json
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
        "verdict": r.verdict,
        "summary": r.counts(),
        "untested": r.untested,
        # Bits the run set out to classify and could not (cut short): the verdict is "fail".
        "unclassified": 0 if r.complete else r.untested,
        "failures": len(r.failures),
        "mismatches": len(r.mismatches),
        "notes": r.notes,
        "bits": [
            {
                "leaf": f"0x{b.leaf:x}", "subleaf": b.subleaf, "register": b.register, "bit": b.bit,
                "name": b.name, "class": b.cls.value, "reported": b.reported,
                "result": _outcome_json(b.outcome), "explained": b.explained,
                "cleared": b.cleared, "effective": b.effective,
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
        "traps": [
            {
                "leaf": f"0x{t.leaf:x}", "subleaf": t.subleaf, "register": t.register,
                "bits": list(t.bits), "names": list(t.names), "result": _outcome_json(t.outcome),
                "failed": t.failed, "request": request_to_json(t.request),
            }
            for t in r.traps
        ],
    }


def render_json(r: ProbeResult, identity: HostIdentity) -> str:
    return document(ReportKind.PROBE, result_to_json(r), host_identity_json(identity))


def _why(b: BitResult) -> str:
    parts = [b.outcome.describe() if b.outcome is not None else "(inferred by splitting)"]
    if b.explained:
        parts.append(f"- {b.explained}")
    elif b.cleared:
        parts.append(f"- {b.cleared}")
    if b.effective is not None:
        parts.append(f"- in the TD: {b.effective} (KVM_TDX_GET_CPUID)")
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
    out += _trap_lines(r)
    out.append("")
    counts = Counter({k: v for k, v in r.counts().items() if v})
    out.append("summary: " + (", ".join(f"{k} {v}" for k, v in counts.items())
                              or "nothing classified")
               + (f"; {r.untested} bits not tried" if r.untested else ""))
    seen = Counter(b.effective for b in r.bits if b.effective is not None)
    if seen:
        out.append("in the TD (--effective): " + ", ".join(
            f"{seen[k]} accepted, {k}" for k in ("present", "cleared") if seen[k]))
    for n in r.notes:
        out.append(f"note: {n}")
    if r.mismatches:
        out.append(f"{len(r.mismatches)} bits differ from the mirror's prediction for policy "
                   f"{r.policy}")
    out += _verdict_lines(r)
    return "\n".join(out) + "\n"


def _trap_lines(r: ProbeResult) -> list[str]:
    if not r.traps:
        return []
    out = ["", "lookup traps (each hidden 0x7.0 bit KVM refused, steered onto row 0x7.0 by an "
               "unflagged leaf-7 entry at another index):"]
    for t in r.traps:
        got = t.outcome.describe() if t.outcome is not None else "not sent (--max-tds)"
        bug = " - KERNEL BUG: the hidden bits got past KVM's check" if t.failed else ""
        out.append(f"  0x{t.leaf:x}.{t.subleaf:<7}{t.register:<5}{' '.join(t.names):<22}"
                   f"{got}{bug}")
    return out


def _verdict_lines(r: ProbeResult) -> list[str]:
    """What the run establishes, and no more: the per-bit classes it decided and the traps."""
    out = []
    if not r.complete:
        out.append(f"INCOMPLETE: {r.untested} bits not classified (the run was cut short); "
                   "no verdict on them: rerun with a larger --max-tds")
    bits = [f for f in r.failures if isinstance(f, BitResult | FieldResult)]
    traps = [t for t in r.traps if t.failed]
    if bits or traps:
        parts = ([f"{len(bits)} bits break the rule that a kernel accepts what it reports and "
                  "nothing it hides"] if bits else [])
        parts += [f"{len(traps)} lookup traps let hidden bits past KVM"] if traps else []
        out.append("FAIL: " + "; ".join(parts))
    elif r.complete:
        skipped = (f"; targeted: {r.untested} hidden bits the module profile says the module "
                   "cannot take not tried" if r.untested else "")
        out.append(f"PASS: {len(r.bits)} bits classified, each accepted if reported and "
                   f"refused if hidden, and {len(r.traps)} lookup traps refused by KVM"
                   f"{skipped} (verify runs the other structural and lookup checks)")
    return out


def verdict_line(r: ProbeResult) -> str:
    """The outcome in brief, for stderr when the report goes to a file."""
    done = "" if r.complete else ", incomplete"
    return (f"{r.verdict.upper()} ({len(r.bits)} bits, {len(r.failures)} failing, {r.tds} TDs"
            f"{done})")


def render(r: ProbeResult, fmt: str, identity: HostIdentity) -> str:
    """`r` in `fmt`; only JSON carries the host identity."""
    from kvmtdx.report import probe_cases as cases

    if fmt == "json":
        return render_json(r, identity)
    return {"text": render_text, "ktap": cases.render_ktap, "junit": cases.render_junit}[fmt](r)


def allowlist_text(r: ProbeResult, date: str) -> str:
    return document(ReportKind.ALLOWLIST, allowlist_to_json(effective_allowlist(r, date=date)))
