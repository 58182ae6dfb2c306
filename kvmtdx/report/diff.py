"""Rendering of `kvmtdx diff`: changed bits by name, as text or JSON."""

from __future__ import annotations

from typing import Any

from kvmtdx.diff import Change, FileDiff, PolicyDiff, RegKey
from kvmtdx.model.catalog import BitRef
from kvmtdx.report.encode import allowlist_ref_json, bitref_json
from kvmtdx.report.schema import ReportKind, document


def _reg_label(rk: RegKey) -> str:
    return f"0x{rk[0]:x}.{rk[1]} {rk[2]}"


def change_json(c: Change) -> dict[str, Any]:
    return {"leaf": f"0x{c.leaf:x}", "subleaf": c.subleaf, "register": c.register,
            "bit": c.bit, "name": c.name, "what": c.what, "a": c.a, "b": c.b}


def file_diff_json(d: FileDiff) -> dict[str, Any]:
    """The body of a "diff" report (the envelope comes from report.schema)."""
    return {
        "a": {"file": d.a.origin, "kind": d.a.kind},
        "b": {"file": d.b.origin, "kind": d.b.kind},
        "differences": d.count,
        "changes": [change_json(c) for c in d.changes],
        "only_a": [{"leaf": f"0x{k[0]:x}", "subleaf": k[1], "register": k[2]} for k in d.only_a],
        "only_b": [{"leaf": f"0x{k[0]:x}", "subleaf": k[1], "register": k[2]} for k in d.only_b],
        "verdict": {"a": d.verdict_a, "b": d.verdict_b},  # null where a kind has none
        "checks": [{"id": c.id, "a": c.a, "b": c.b} for c in d.checks],
    }


def file_diff_text(d: FileDiff) -> str:
    out = [f"a: {d.a.origin} ({d.a.kind})", f"b: {d.b.origin} ({d.b.kind})", ""]
    # One line per bit: a bit that changed class usually changed reported state too.
    lines: dict[tuple[str, int, int, str, int], tuple[str, list[str]]] = {}
    for c in d.changes:
        if c.what in ("attribute", "xfam"):
            where = f"{'ATTRIBUTES' if c.what == 'attribute' else 'XFAM'} bit {c.bit}"
            what = "supported"
        else:
            where = f"0x{c.leaf:x}.{c.subleaf} {c.register.upper()}[{c.bit}]"
            what = c.what
        key = (c.what if c.what in ("attribute", "xfam") else "", c.leaf, c.subleaf,
               c.register, c.bit)
        lines.setdefault(key, (f"{where:<26}{c.name:<24}", []))[1].append(
            f"{what}: {c.a} -> {c.b}")
    out.extend(head + "; ".join(parts) for head, parts in lines.values())
    for rk in d.only_a:
        out.append(f"{_reg_label(rk):<26}listed only in a")
    for rk in d.only_b:
        out.append(f"{_reg_label(rk):<26}listed only in b")
    if d.verdict_changed:
        out.append(f"{'verdict':<26}{d.verdict_a} -> {d.verdict_b}")
    out.extend(f"check {c.id}: {c.a} -> {c.b}" for c in d.checks)
    n = d.count
    out.append("" if n else "no differences")
    if n:
        out.append(f"{n} difference{'s' if n != 1 else ''}")
    return "\n".join(out).lstrip("\n") + "\n"


def _ref_label(b: BitRef) -> str:
    sub = "" if b.subleaf is None else f".{b.subleaf}"
    return f"0x{b.leaf:x}{sub} {b.register.upper()}[{b.bit}]"


def policy_diff_json(d: PolicyDiff) -> dict[str, Any]:
    """The body of a "policy-diff" report."""
    return {
        "module": d.module,
        "host": d.host,
        "a": {"policy": d.a.name, "allowlist": allowlist_ref_json(d.a)},
        "b": {"policy": d.b.name, "allowlist": allowlist_ref_json(d.b)},
        "no_longer_available": [bitref_json(b) for b in d.no_longer],
        "newly_available": [bitref_json(b) for b in d.newly],
    }


def policy_diff_text(d: PolicyDiff) -> str:
    out = [f"module {d.module}, host {d.host}: policy {d.a.name} -> {d.b.name}"]
    for p in (d.a, d.b):
        if p.allowlist is not None:
            out.append(f"allowlist of {p.name}: {p.allowlist.name} ({p.allowlist.provenance})")
    out.append("")
    out.append(f"TDs can no longer be given ({len(d.no_longer)}):")
    out.extend(f"  {_ref_label(b):<22}{b.name}" for b in d.no_longer)
    if not d.no_longer:
        out.append("  (none)")
    out.append(f"TDs can newly be given ({len(d.newly)}):")
    out.extend(f"  {_ref_label(b):<22}{b.name}" for b in d.newly)
    if not d.newly:
        out.append("  (none)")
    return "\n".join(out) + "\n"


def render(d: FileDiff | PolicyDiff, fmt: str) -> str:
    if isinstance(d, PolicyDiff):
        if fmt == "json":
            return document(ReportKind.POLICY_DIFF, policy_diff_json(d))
        return policy_diff_text(d)
    return document(ReportKind.DIFF, file_diff_json(d)) if fmt == "json" else file_diff_text(d)
