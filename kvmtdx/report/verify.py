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
from kvmtdx.checks import GROUPS, CheckResult, Summary, VerifyReport
from kvmtdx.errors import ExitCode
from kvmtdx.report import junit, ktap
from kvmtdx.report.encode import bitref_json
from kvmtdx.report.schema import ReportKind, document
from kvmtdx.verdict import Status

PASS, FAIL, SKIP = Status.PASS, Status.FAIL, Status.SKIP


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
    return f"{s.passed} passed, {s.failed} failed, {s.skipped} skipped of {s.total} checks"


def verdict_line(report: VerifyReport) -> str:
    """The outcome in one line: "FAIL (35 passed, 3 failed, 3 skipped of 41 checks)"."""
    if report.skip_reason is not None:
        return f"SKIP ({_one_line(report.skip_reason)})"
    return f"{report.verdict.upper()} ({_counts(report)})"


# ---------------------------------------------------------------------------
# text


def render_text(report: VerifyReport) -> str:
    if report.skip_reason is not None:
        return (f"kvmtdx verify: SKIP: {report.skip_reason}\n"
                f"backend: {report.backend}\n")
    out = [f"kvmtdx verify: {report.verdict.upper()} ({_counts(report)})"]
    width = max(len(k) for k, _ in _facts(report))
    out += [f"  {k:<{width}}  {v}" for k, v in _facts(report)]
    per_group = []
    for g in GROUPS:
        cs = [c for c in report.checks if c.group == g]
        if cs:
            ok = sum(c.status == PASS for c in cs)
            bad = sum(c.status == FAIL for c in cs)
            per_group.append(f"{g} {ok}/{len(cs)}" + (f" ({bad} FAILED)" if bad else ""))
    out.append(f"  {'groups':<{width}}  " + ", ".join(per_group))
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
    skips = [c for c in report.checks if c.status == SKIP]
    if skips:
        out += ["", "Skipped:"]
        out += [f"  {c.id}: {c.detail}" for c in skips]
    return "\n".join(out) + "\n"


# ---------------------------------------------------------------------------
# KTAP v1 (written by kvmtdx.report.ktap)


def render_ktap(report: VerifyReport) -> str:
    if report.skip_reason is not None:
        return ktap.skip_all(report.skip_reason)
    header = [f"kvmtdx {__version__} verify: {_counts(report)}"]
    header += [f"{k}: {v}" for k, v in _facts(report)]
    return ktap.render(header, [_ktap_case(c) for c in report.checks])


def _ktap_case(c: CheckResult) -> ktap.Case:
    return ktap.Case(c.id, c.status, c.detail,
                     (f"expected: {c.expected}", f"actual: {c.actual}")
                     if c.expected or c.actual else ())


def interrupted_ktap(done: Sequence[CheckResult], planned: int, backend: str, why: str) -> str:
    """The checks done before the run was stopped (`why`: interrupted, terminated), the plan
    it had, and `Bail out!`, so a KTAP runner records the run as cut short."""
    stopped = f"{why} after {len(done)} of {planned} checks"
    return ktap.render([f"kvmtdx {__version__} verify: {stopped}", f"backend: {backend}"],
                       [_ktap_case(c) for c in done], bail_out=stopped, plan=planned)


# ---------------------------------------------------------------------------
# JSON (schema documented in README.md, "kvmtdx verify")


def check_json(c: CheckResult) -> dict[str, Any]:
    return {"id": c.id, "group": c.group, "status": c.status, "detail": c.detail,
            "expected": c.expected, "actual": c.actual, "bits": [bitref_json(b) for b in c.bits]}


def summary_json(s: Summary) -> dict[str, Any]:
    return {"verdict": s.verdict, "total": s.total, "passed": s.passed, "failed": s.failed,
            "skipped": s.skipped, "tds_created": s.tds_created, "ioctls": s.ioctls,
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


def render_json(report: VerifyReport) -> str:
    return document(ReportKind.VERIFY, report_to_json(report))


# ---------------------------------------------------------------------------
# JUnit XML (written by kvmtdx.report.junit): one suite per check group


def _junit_case(c: CheckResult) -> junit.Case:
    text = c.detail
    if c.status == FAIL:
        lines = [c.detail, f"expected: {c.expected}", f"actual: {c.actual}"]
        text = "\n".join(lines + [f"bit: {b.label()}" for b in c.bits])
    return junit.Case(c.id, f"kvmtdx.verify.{c.group}", c.status, c.detail, text)


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


RENDERERS = {"text": render_text, "ktap": render_ktap, "json": render_json,
             "junit": render_junit}


def render(report: VerifyReport, fmt: str) -> str:
    return RENDERERS[fmt](report)
