"""`kvmtdx fuzz` reports: text for people, JSON, and one replay file per finding.

A finding whose calls are all INIT_VM is written, in its report and as its replay file, in
the `kvmtdx init-vm --request` format (kind `request`: the departing call, the earlier ones
on the same TD under "before"), which `init-vm` replays; one that involves a
KVM_TDX_CAPABILITIES call or the vCPU path is a `fuzz-case` (its calls in order), which
`kvmtdx fuzz --replay` replays, as it does request files.
"""

from __future__ import annotations

from typing import Any

from kvmtdx.fuzz.judge import Verdict
from kvmtdx.fuzz.result import End, Finding, FuzzReport, VcpuStats
from kvmtdx.fuzz.scenario import HEADER_WORDS, CapsCall, Lie, Scenario, Step, VcpuCall
from kvmtdx.identity import HostIdentity
from kvmtdx.jsonfile import hex64
from kvmtdx.model.requests import Request, request_to_json
from kvmtdx.report.encode import host_identity_json, outcome_json
from kvmtdx.report.schema import ReportKind, document
from kvmtdx.report.verify import request_line

HEADINGS = {
    Verdict.BREAKS_INVARIANT: "Discrepancies that break the invariant (spec section 5: a bit "
                              "never reported is never ACCEPTED; one KVM hides is refused by "
                              "KVM)",
    Verdict.DIFFERS: "Discrepancies (the kernel is not the one predicted)",
    Verdict.STRICTER: "Stricter than the model, which the invariant allows",
}
NOT_A_FAILURE = "not a failure; --fail-on-stricter makes it one"
END = {End.TDS: "--max-tds spent", End.TIME: "--time spent", End.INTERRUPTED: "interrupted",
       End.REPLAYED: "every case replayed", End.FOUND: "stopped at the first discrepancy"}


def _one_line(text: str) -> str:
    return " ".join(text.split())


# ---------------------------------------------------------------------------
# Scenarios as JSON and as replay files.


def caps_call_json(c: CapsCall) -> dict[str, Any]:
    return {"nent": c.nent, "flags": f"0x{c.flags:x}", "hw_error": hex64(c.hw_error),
            "header": [hex64(w) for w in c.header], "fill": f"0x{c.fill:02x}"}


def lie_json(lie: Lie | None) -> dict[str, Any] | None:
    if lie is None:
        return None
    return {"leaf": f"0x{lie.leaf:x}", "subleaf": lie.subleaf, "register": lie.register,
            "bit": lie.bit, "set": lie.on}


def vcpu_call_json(c: VcpuCall) -> dict[str, Any]:
    return {"split_irqchip": c.split_irqchip, "nent": c.nent, "fill": f"0x{c.fill:02x}",
            "set_cpuid2": c.set_cpuid2, "lie": lie_json(c.lie)}


def _call_json(s: Step) -> dict[str, Any]:
    if isinstance(s, CapsCall):
        return {"capabilities": caps_call_json(s)}
    if isinstance(s, VcpuCall):
        return {"vcpu": vcpu_call_json(s)}
    return {"init_vm": request_to_json(s)}


def calls_json(scenario: Scenario) -> list[dict[str, Any]]:
    return [_call_json(s) for s in scenario]


def as_request(scenario: Scenario) -> Request | None:
    """The scenario as one init-vm request (its last call, the others under "before"), when
    every call is an INIT_VM."""
    reqs = [s for s in scenario if isinstance(s, Request)]
    if len(reqs) != len(scenario) or not reqs:
        return None
    return Request(init_vm=reqs[-1].init_vm, flags=reqs[-1].flags, hw_error=reqs[-1].hw_error,
                   before=tuple(reqs[:-1]))


def replay_name(i: int, f: Finding) -> str:
    d = f.discrepancy
    return f"finding-{i:02d}-{d.call.value}-{d.verdict.value}.json"


def _about(report: FuzzReport, f: Finding) -> str:
    d = f.discrepancy
    return _one_line(f"kvmtdx fuzz on {report.backend}: {d.verdict.value}: expected "
                     f"{d.expected}, got {d.actual}")


def replay_document(report: FuzzReport, f: Finding) -> str:
    """A finding as the file `--save DIR` writes: a request, else a fuzz-case."""
    req = as_request(f.scenario)
    about = {"about": _about(report, f)}
    if req is not None:
        return document(ReportKind.REQUEST, {**about, **request_to_json(req)})
    return document(ReportKind.FUZZ_CASE, {**about, "calls": calls_json(f.scenario)})


def replay_files(report: FuzzReport) -> dict[str, str]:
    """File name -> replay document, one per finding (`kvmtdx fuzz --save DIR`)."""
    return {replay_name(i, f): replay_document(report, f)
            for i, f in enumerate(report.findings, 1)}


# ---------------------------------------------------------------------------
# JSON.


def finding_json(i: int, f: Finding, report: FuzzReport) -> dict[str, Any]:
    d = f.discrepancy
    req = as_request(f.scenario)
    caps = next((s for s in f.scenario[::-1] if isinstance(s, CapsCall)), None)
    return {
        "verdict": d.verdict.value,
        "failing": d.verdict.fails or report.stricter_fails,
        "call": d.call.value,
        "expected": d.expected,
        "actual": d.actual,
        "note": d.note or None,
        "request": request_to_json(req) if req is not None else None,
        "capabilities": caps_call_json(caps) if caps is not None and req is None else None,
        "calls": calls_json(f.scenario),
        "predicted": outcome_json(d.predicted) if d.predicted is not None else None,
        "observed": outcome_json(d.observed) if d.observed is not None else None,
        "found_after_tds": f.found_after_tds,
        "found_after_seconds": round(f.found_after_seconds, 3),
        "smallest_after_tds": f.smallest_after_tds,
        "seen": f.seen,
        "reproduced": f.reproduced,
        "replay": replay_name(i, f),
        "origin": f.origin,
    }


def report_to_json(report: FuzzReport) -> dict[str, Any]:
    k, s = report.knowledge, report.stats
    policy = k.policy
    return {
        "verdict": report.status.value,
        "backend": report.backend,
        "policy": policy.name if policy is not None else None,
        "policy_reason": k.policy_reason,
        "module": k.module.name if k.module is not None else None,
        "module_source": k.module_source,
        "host": k.host.name if k.host is not None else None,
        "host_source": k.host_source,
        "allowlist": policy.allowlist.name if policy is not None and policy.allowlist else None,
        "allowlist_source": k.allowlist_source,
        "seed": report.seed,
        "budget": None if report.budget is None else {
            "max_tds": report.budget.max_tds, "seconds": report.budget.seconds,
            "first": report.budget.first},
        "database": report.database,
        "stricter_fails": report.stricter_fails,
        "summary": {"end": s.end.value, "tds": s.tds, "init_vm_calls": s.init_vm_calls,
                    "caps_calls": s.caps_calls, "vcpu_steps": s.vcpu.steps,
                    "get_cpuid_calls": s.vcpu.get_cpuid_calls,
                    "set_cpuid2_calls": s.vcpu.set_cpuid2_calls,
                    "vcpu_refused": s.vcpu.refused, "examples": s.examples,
                    "seconds": round(s.seconds, 3),
                    "requests_per_second": round(s.requests_per_second, 1),
                    "unjudged": s.unjudged, "failing": len(report.failing()),
                    "stricter": len(report.stricter())},
        "findings": [finding_json(i, f, report) for i, f in enumerate(report.findings, 1)],
    }


def render_json(report: FuzzReport, identity: HostIdentity) -> str:
    return document(ReportKind.FUZZ, report_to_json(report), host_identity_json(identity))


# ---------------------------------------------------------------------------
# Text.


def _counts(report: FuzzReport) -> str:
    failing, stricter = len(report.failing()), len(report.stricter())
    words = [f"{failing} discrepanc{'y' if failing == 1 else 'ies'}"]
    if stricter:
        words.append(f"{stricter} stricter than the model"
                     + ("" if report.stricter_fails else ", allowed"))
    return ", ".join(words)


def verdict_line(report: FuzzReport) -> str:
    s = report.stats
    return (f"{report.status.value.upper()} ({_counts(report)}) after {s.tds} TDs in "
            f"{s.seconds:.1f} s")


def _facts(report: FuzzReport) -> list[tuple[str, str]]:
    k, s = report.knowledge, report.stats
    rows = [("backend", report.backend),
            ("policy", f"{k.policy.name if k.policy else 'unknown'} ({k.policy_reason})"),
            ("module", k.module_source),
            ("host", f"{k.host.name} ({k.host_source})" if k.host else k.host_source),
            ("allowlist", k.allowlist_source.partition(". ")[0])]
    if report.seed is not None:
        rows.append(("seed", f"{report.seed} (--seed {report.seed} repeats the run)"))
    if report.budget is not None:
        first = ", --first" if report.budget.first else ""
        rows.append(("budget", f"--max-tds {report.budget.max_tds}, --time "
                               f"{report.budget.seconds:g} s{first}: {END[s.end]}"))
    work = (f"{s.tds} TDs, {s.init_vm_calls} INIT_VM, {s.caps_calls} KVM_TDX_CAPABILITIES, "
            f"{s.vcpu.get_cpuid_calls} KVM_TDX_GET_CPUID ({s.requests_per_second:.0f} calls/s)")
    if s.unjudged:
        work += f"; {s.unjudged} not judged to the end (no free TDX key ID, or a fact the " \
                "inferred host cannot tell)"
    rows += [("work", work), ("vcpu", _vcpu_text(s.vcpu))]
    if report.budget is not None:
        rows.append(("database", report.database or
                     "none (--no-db, or no writable cache directory)"))
    return rows


def _vcpu_text(v: VcpuStats) -> str:
    if v.refused is not None:
        return (f"not judged: this backend answers no vCPU ioctl ({v.refused}), so no TD's "
                f"CPUID was read ({v.steps} vCPU paths sent)")
    return (f"{v.steps} TDs ended with the vCPU path (split irqchip, KVM_CREATE_VCPU, "
            f"KVM_TDX_GET_CPUID), {v.set_cpuid2_calls} KVM_SET_CPUID2")


def vcpu_call_text(c: VcpuCall) -> str:
    words = [] if c.split_irqchip else ["no split irqchip"]
    words.append(f"KVM_CREATE_VCPU, KVM_TDX_GET_CPUID with room for {c.nent} "
                 f"entr{'y' if c.nent == 1 else 'ies'}")
    if c.fill:
        words[-1] += f" (every other byte 0x{c.fill:02x})"
    if c.set_cpuid2:
        lie = f", {c.lie.label()}" if c.lie is not None else ""
        words.append(f"KVM_SET_CPUID2 with the TD's CPUID{lie}")
    return "vCPU: " + ", ".join(words)


def _calls_text(scenario: Scenario) -> list[str]:
    if len(scenario) == 1 and isinstance(scenario[0], Request):
        return [f"request:  {request_line(scenario[0])}"]
    out = ["calls on one TD:"]
    for k, s in enumerate(scenario, 1):
        if isinstance(s, CapsCall):
            words = [f"nent {s.nent}"] + [f"{n} 0x{v:x}" for n, v in
                                          (("flags", s.flags), ("hw_error", s.hw_error)) if v]
            if any(s.header):
                words.append("header words " + ", ".join(
                    f"{n}=0x{v:x}" for n, v in zip(HEADER_WORDS, s.header, strict=True) if v))
            if s.fill:
                words.append(f"every other byte 0x{s.fill:02x}")
            out.append(f"  {k}. KVM_TDX_CAPABILITIES {', '.join(words)}")
        elif isinstance(s, VcpuCall):
            out.append(f"  {k}. {vcpu_call_text(s)}")
        else:
            out.append(f"  {k}. KVM_TDX_INIT_VM {request_line(s)}")
    return out


def _finding_text(i: int, f: Finding, report: FuzzReport) -> list[str]:
    d = f.discrepancy
    out = [f"  {i}. {d.call.value}: expected {d.expected}", f"     got {d.actual}"]
    if d.note:
        out.append(f"     {d.note}")
    out += [f"     {line}" for line in _calls_text(f.scenario)]
    if f.origin is not None:
        out.append(f"     replayed from {f.origin}")
    else:
        again = {True: "; replayed: the same", False: "; replayed: did NOT show again",
                 None: ""}[f.reproduced]
        out.append(f"     found after {f.found_after_tds} TDs ({f.found_after_seconds:.1f} s), "
                   f"seen {f.seen} times, the smallest after {f.smallest_after_tds} TDs{again}")
    return out


def render_text(report: FuzzReport) -> str:
    out = [f"kvmtdx fuzz: {verdict_line(report)}"]
    facts = _facts(report)
    width = max(len(k) for k, _ in facts)
    out += [f"  {k:<{width}}  {v}" for k, v in facts]
    for verdict in (Verdict.BREAKS_INVARIANT, Verdict.DIFFERS, Verdict.STRICTER):
        found = [(i, f) for i, f in enumerate(report.findings, 1)
                 if f.discrepancy.verdict is verdict]
        if not found:
            continue
        heading = HEADINGS[verdict]
        if verdict is Verdict.STRICTER and not report.stricter_fails:
            heading += f" ({NOT_A_FAILURE})"
        out += ["", heading + ":"]
        for i, f in found:
            out += _finding_text(i, f, report)
    return "\n".join(out) + "\n"


def render(report: FuzzReport, fmt: str, identity: HostIdentity) -> str:
    return render_json(report, identity) if fmt == "json" else render_text(report)
