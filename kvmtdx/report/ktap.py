"""KTAP v1 (the kernel's Documentation/dev-tools/ktap.rst), for any kvmtdx run.

verify, probe and fuzz hand this module their results as plain cases; it owns
the format: the version line, the plan, `ok`/`not ok` lines with `# SKIP`
directives, diagnostics as `# ` lines before a failing result, the kselftest
totals line, and `Bail out!` for a run that was cut short.  An informational result is
`ok` (it counts as a pass) with its detail as a `# ` line before it, so a runner that
reads only results sees a pass and a person reading the log sees what was recorded.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from kvmtdx.verdict import Status


@dataclass(frozen=True, slots=True)
class Case:
    name: str  # stable, [a-z0-9_]+
    status: Status
    detail: str = ""  # the skip reason, a failure's first diagnostic, what an info recorded
    diagnostics: tuple[str, ...] = ()  # further lines printed before a failure


def text(value: str) -> str:
    """One line of KTAP-safe text: a '#' would start a directive inside a result line."""
    return " ".join(value.split()).replace("#", "no.")


def skip_all(reason: str) -> str:
    """The whole run skipped (KTAP's `1..0 # SKIP`), as kselftest reports a missing feature."""
    return f"KTAP version 1\n1..0 # SKIP {text(reason)}\n"


def render(header: Sequence[str], cases: Sequence[Case], *, bail_out: str | None = None,
           plan: int | None = None) -> str:
    """A KTAP document: `header` lines go out as `# ` comments before the plan.

    A run cut short gives `bail_out` (why) and `plan`, the cases it meant to run, so
    a runner sees both that it stopped and what is missing.
    """
    planned = len(cases) if plan is None else plan
    out = ["KTAP version 1", *(f"# {text(h)}" for h in header), f"1..{planned}"]
    for n, c in enumerate(cases, 1):
        if c.status == Status.FAIL:
            out.append(f"# {c.name}: {text(c.detail)}")
            out += [f"# {text(d)}" for d in c.diagnostics]
            out.append(f"not ok {n} {c.name}")
        elif c.status == Status.SKIP:
            out.append(f"ok {n} {c.name} # SKIP {text(c.detail)}")
        elif c.status == Status.INFO:
            out.append(f"# {c.name}: {text(c.detail)}")
            out.append(f"ok {n} {c.name}")
        else:
            out.append(f"ok {n} {c.name}")
    if bail_out is not None:
        out.append(f"Bail out! {text(bail_out)}")
    counts = {s: sum(c.status == s for c in cases) for s in Status}
    passed = counts[Status.PASS] + counts[Status.INFO]
    out.append(f"# Totals: pass:{passed} fail:{counts[Status.FAIL]} xfail:0 "
               f"xpass:0 skip:{counts[Status.SKIP]} error:0")
    return "\n".join(out) + "\n"
