"""`kvmtdx verify` reports: text for people, KTAP v1 for kselftest runners, JSON, JUnit XML.

Every format carries the same facts: the verdict, the counts, what the run
judged by (policy, module, allowlist, each with where it came from), the
backend, how many TDs and ioctls it took, and per check its id, status, one
line of detail, expected versus actual and the bits by name.  A run that found
no TDX is a skip in every format, with the reason.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from kvmtdx import __version__, verdict
from kvmtdx.checks import GROUPS, CheckResult, CheckSpec, Summary, VerifyReport
from kvmtdx.errors import ExitCode
from kvmtdx.identity import HostIdentity
from kvmtdx.model.requests import Request, request_to_json
from kvmtdx.report import junit, ktap
from kvmtdx.report.encode import bitref_json, host_identity_json
from kvmtdx.report.schema import ReportKind, document
from kvmtdx.structs import FLAG_SIGNIFICANT_INDEX, REGISTERS, CpuidEntry
from kvmtdx.verdict import Status

PASS, FAIL, SKIP, INFO = Status.PASS, Status.FAIL, Status.SKIP, Status.INFO


def exit_code(report: VerifyReport) -> ExitCode:
    return verdict.exit_code(Status(report.verdict))


def _one_line(text: str) -> str:
    return " ".join(text.split())


def _first_sentence(text: str) -> str:
    """Provenance can run to a paragraph; reports keep its first sentence (JSON keeps it all)."""
    head, dot, _rest = text.partition(". ")
    return head + ("...)" if dot and head.count("(") > head.count(")") else "")


def _facts(report: VerifyReport) -> list[tuple[str, str]]:
    k = report.knowledge
    s = report.summary
    rows = [("backend", report.backend)]
    if k is not None:
        rows += [
            ("policy", f"{k.policy.name if k.policy else 'unknown'} ({k.policy_reason})"),
            ("module", k.module_source),
            ("host", f"{k.host.name} ({k.host_source})" if k.host else k.host_source),
            ("allowlist", _first_sentence(k.allowlist_source)),
        ]
    rows.append(("work", f"{s.tds_created} TDs created, {s.ioctls} ioctls, "
                         f"{s.init_vm_calls} INIT_VM calls"))
    return rows


def _counts(report: VerifyReport) -> str:
    s = report.summary
    info = f", {s.info} informational" if s.info else ""
    return f"{s.passed} passed, {s.failed} failed, {s.skipped} skipped{info} of {s.total} checks"


def verdict_line(report: VerifyReport) -> str:
    """The outcome in one line: "FAIL (35 passed, 3 failed, 3 skipped of 41 checks)"."""
    if report.skip_reason is not None:
        return f"SKIP ({_one_line(report.skip_reason)})"
    return f"{report.verdict.upper()} ({_counts(report)})"


# ---------------------------------------------------------------------------
# text


def _entry_short(e: CpuidEntry) -> str:
    regs = [f"{r}=0x{v:x}" for r, v in zip(REGISTERS, e.regs(), strict=True) if v]
    flag = "" if e.flags == FLAG_SIGNIFICANT_INDEX else (
        " unflagged" if not e.flags else f" flags=0x{e.flags:x}")
    return " ".join([f"0x{e.function:x}.{e.index}{flag}", *regs])


def request_line(req: Request, limit: int = 6) -> str:
    """A request in one line: the words a check set, then its entries (flagged unless said)."""
    iv = req.init_vm
    words = [f"attributes 0x{iv.attributes:x}", f"xfam 0x{iv.xfam:x}"]
    words += [f"{name} 0x{v:x}" for name, v in (("flags", req.flags),
                                                 ("hw_error", req.hw_error),
                                                 ("padding", iv.cpuid_padding)) if v]
    if iv.nent is not None:
        words.append(f"nent {iv.nent}")
    words += [f"reserved[{i}] 0x{w:x}" for i, w in enumerate(iv.reserved) if w]
    shown = [_entry_short(e) for e in iv.entries[:limit]]
    more = f", +{len(iv.entries) - limit} more" if len(iv.entries) > limit else ""
    return (", ".join(words) + f"; {len(iv.entries)} entries: " + ", ".join(shown) + more)


def _groups(results: Sequence[CheckResult]) -> str:
    """Passed of total per group, failures and skips named apart: `adversarial 0/6` alone
    would read as six failures when all six skipped."""
    per_group = []
    for g in GROUPS:
        cs = [c for c in results if c.group == g]
        if not cs:
            continue
        bad = sum(c.status == FAIL for c in cs)
        skipped = sum(c.status == SKIP for c in cs)
        info = sum(c.status == INFO for c in cs)
        notes = ([f"{bad} FAILED"] if bad else []) + ([f"{skipped} skipped"] if skipped else []) \
            + ([f"{info} informational"] if info else [])
        per_group.append(f"{g} {sum(c.status in (PASS, INFO) for c in cs)}/{len(cs)}"
                         + (f" ({', '.join(notes)})" if notes else ""))
    return ", ".join(per_group)


def render_text(report: VerifyReport) -> str:
    if report.skip_reason is not None:
        return (f"kvmtdx verify: SKIP: {report.skip_reason}\n"
                f"backend: {report.backend}\n")
    out = [f"kvmtdx verify: {report.verdict.upper()} ({_counts(report)})"]
    width = max(len(k) for k, _ in _facts(report))
    out += [f"  {k:<{width}}  {v}" for k, v in _facts(report)]
    out.append(f"  {'groups':<{width}}  " + _groups(report.checks))
    fails = report.failures()
    if fails:
        out += ["", "Failures:"]
        for c in fails:
            out.append(f"  FAIL {c.id} [{c.group}]")
            out.append(f"    {c.detail}")
            if c.expected or c.actual:
                out.append(f"    expected: {c.expected}")
                out.append(f"    actual:   {c.actual}")
            if c.bits:
                shown = ", ".join(b.label() for b in c.bits[:8])
                more = f" (+{len(c.bits) - 8} more)" if len(c.bits) > 8 else ""
                out.append(f"    bits:     {shown}{more}")
            if c.request is not None:
                out.append(f"    request:  {request_line(c.request)}")
                if c.request_note:
                    out.append(f"              ({c.request_note})")
    infos = [c for c in report.checks if c.status == INFO]
    if infos:
        out += ["", "Informational (recorded, judged by no rule):"]
        out += [f"  {c.id}: {c.detail}" for c in infos]
    skips = [c for c in report.checks if c.status == SKIP]
    if skips:
        out += ["", "Skipped:"]
        out += [f"  {c.id}: {c.detail}" for c in skips]
    return "\n".join(out) + "\n"


# ---------------------------------------------------------------------------
# KTAP v1 (written by kvmtdx.report.ktap)


def _diagnostics(c: CheckResult) -> tuple[str, ...]:
    out = [f"expected: {c.expected}", f"actual: {c.actual}"] if c.expected or c.actual else []
    if c.request is not None:
        out.append(f"request: {request_line(c.request)}")
    return tuple(out)


def render_ktap(report: VerifyReport) -> str:
    if report.skip_reason is not None:
        return ktap.skip_all(report.skip_reason)
    header = [f"kvmtdx {__version__} verify: {_counts(report)}"]
    header += [f"{k}: {v}" for k, v in _facts(report)]
    return ktap.render(header, [_ktap_case(c) for c in report.checks])


def _ktap_case(c: CheckResult) -> ktap.Case:
    return ktap.Case(c.id, c.status, c.detail, _diagnostics(c))


def interrupted_ktap(done: Sequence[CheckResult], planned: int, backend: str, why: str) -> str:
    """The checks done before the run was stopped (`why`: interrupted, terminated), the plan
    it had, and `Bail out!`, so a KTAP runner records the run as cut short."""
    stopped = f"{why} after {len(done)} of {planned} checks"
    return ktap.render([f"kvmtdx {__version__} verify: {stopped}", f"backend: {backend}"],
                       [_ktap_case(c) for c in done], bail_out=stopped, plan=planned)


# ---------------------------------------------------------------------------
# JSON (schema documented in README.md, "kvmtdx verify")


def request_json(c: CheckResult) -> dict[str, Any] | None:
    """A failing check's request in the `kvmtdx init-vm --request` format (a note, where one
    fresh TD does not replay it, in its "about")."""
    if c.request is None:
        return None
    note = {"about": c.request_note} if c.request_note else {}
    return {**note, **request_to_json(c.request)}


def check_json(c: CheckResult) -> dict[str, Any]:
    return {"id": c.id, "group": c.group, "status": c.status, "detail": c.detail,
            "expected": c.expected, "actual": c.actual, "bits": [bitref_json(b) for b in c.bits],
            "request": request_json(c),
            "seconds": round(c.seconds, 6) if c.seconds is not None else None}


def failure_requests(report: VerifyReport) -> dict[str, str]:
    """check id -> its failing request as a JSON document `kvmtdx init-vm --request` reads
    (verify --save-failures writes one file per entry)."""
    out: dict[str, str] = {}
    for c in report.failures():
        body = request_json(c)
        if body is None:
            continue
        about = (f"kvmtdx verify {c.id} on {report.backend}: expected {c.expected}, got "
                 f"{c.actual}" + (f"; {c.request_note}" if c.request_note else ""))
        body.pop("about", None)
        out[c.id] = document(ReportKind.REQUEST, {"about": _one_line(about), **body})
    return out


def summary_json(s: Summary) -> dict[str, Any]:
    return {"verdict": s.verdict, "total": s.total, "passed": s.passed, "failed": s.failed,
            "skipped": s.skipped, "info": s.info, "tds_created": s.tds_created, "ioctls": s.ioctls,
            "init_vm_calls": s.init_vm_calls, "fds_before": s.fds_before,
            "fds_after": s.fds_after, "rss_before": s.rss_before, "rss_after": s.rss_after}


def report_to_json(report: VerifyReport) -> dict[str, Any]:
    """The body of a "verify" report.  "kvmtdx" (the version again) stays from before the
    envelope, so readers of the documented schema 1 keep working."""
    k = report.knowledge
    out: dict[str, Any] = {
        "kvmtdx": __version__,
        "verdict": report.verdict,
        "backend": report.backend,
        "policy": k.policy.name if k is not None and k.policy is not None else None,
        "policy_reason": k.policy_reason if k is not None else None,
        "module": k.module.name if k is not None and k.module is not None else None,
        "module_source": k.module_source if k is not None else None,
        "host": k.host.name if k is not None and k.host is not None else None,
        "host_source": k.host_source if k is not None else None,
        "allowlist": (k.policy.allowlist.name if k is not None and k.policy is not None
                      and k.policy.allowlist is not None else None),
        "allowlist_source": k.allowlist_source if k is not None else None,
        "summary": summary_json(report.summary),
        "checks": [check_json(c) for c in report.checks],
    }
    if report.skip_reason is not None:
        out["summary"]["verdict"] = SKIP
        out["skip"] = {"reason": report.skip_reason}
    return out


def render_json(report: VerifyReport, identity: HostIdentity) -> str:
    return document(ReportKind.VERIFY, report_to_json(report), host_identity_json(identity))


# ---------------------------------------------------------------------------
# JUnit XML (written by kvmtdx.report.junit): one suite per check group


def _junit_case(c: CheckResult) -> junit.Case:
    text = c.detail
    if c.status == FAIL:
        lines = [c.detail, f"expected: {c.expected}", f"actual: {c.actual}"]
        lines += [f"bit: {b.label()}" for b in c.bits]
        if c.request is not None:
            lines.append(f"request: {request_line(c.request)}")
        text = "\n".join(lines)
    return junit.Case(c.id, f"kvmtdx.verify.{c.group}", c.status, c.detail, text, c.seconds)


def render_junit(report: VerifyReport) -> str:
    if report.skip_reason is not None:
        skipped = junit.Case("tdx_available", "kvmtdx.verify.availability", SKIP,
                             report.skip_reason)
        return junit.render("kvmtdx verify",
                            [junit.Suite("kvmtdx.verify.availability", (skipped,))])
    facts = tuple(_facts(report))
    suites = [junit.Suite(f"kvmtdx.verify.{g}",
                          tuple(_junit_case(c) for c in report.checks if c.group == g), facts)
              for g in GROUPS]
    return junit.render("kvmtdx verify", [s for s in suites if s.cases])


def render_check_list(specs: Sequence[CheckSpec], fmt: str) -> str:
    """`verify --list-checks`: id, group and one-line description of each check."""
    if fmt == "json":
        return document(ReportKind.CHECK_LIST, {
            "groups": list(GROUPS),
            "checks": [{"id": s.id, "group": s.group, "description": s.about} for s in specs]})
    idw = max((len(s.id) for s in specs), default=0)
    gw = max((len(s.group) for s in specs), default=0)
    return "".join(f"{s.id:<{idw}}  {s.group:<{gw}}  {s.about}\n" for s in specs)


def render(report: VerifyReport, fmt: str, identity: HostIdentity) -> str:
    """`report` in `fmt`; only JSON carries the host identity (text, KTAP and JUnit stay
    byte-for-byte the same on every machine)."""
    if fmt == "json":
        return render_json(report, identity)
    return {"text": render_text, "ktap": render_ktap, "junit": render_junit}[fmt](report)
