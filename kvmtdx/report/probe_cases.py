"""`kvmtdx probe` as test cases, for KTAP (kvmtdx.report.ktap) and JUnit (kvmtdx.report.junit).

One case per register of every row KVM_TDX_CAPABILITIES lists (cpuid_7_0_ecx): it fails
when a bit or value field in it breaks the rule a kernel keeps (a reported bit refused, a
hidden one accepted), and skips when the run tried none of its bits; one case per lookup
trap (lookup_trap_7_0_ecx_waitpkg); and probe_complete, which fails when the run was cut
short, so a run that decided only part of the bits never reads as a pass.
"""

from __future__ import annotations

from collections import Counter

from kvmtdx import __version__
from kvmtdx.probe import BitResult, FieldResult, ProbeResult
from kvmtdx.probe.traps import case_name
from kvmtdx.probe.units import read_layout
from kvmtdx.report import junit, ktap
from kvmtdx.verdict import Status

Case = tuple[str, Status, str, tuple[str, ...]]  # name, status, detail, diagnostics


def _register_case(leaf: int, index: int, register: str, bits: list[BitResult],
                   fields: list[FieldResult]) -> Case:
    name = f"cpuid_{leaf:x}_{index}_{register}"
    if not bits and not fields:
        return name, Status.SKIP, "no bit of it tried", ()
    counts = Counter(b.cls.value for b in bits) + Counter(f.cls.value for f in fields)
    detail = ", ".join(f"{k} {v}" for k, v in sorted(counts.items()))
    bad = [f"bit {b.bit} {b.name}: {b.cls.value}"
           + (f" ({b.outcome.describe()})" if b.outcome is not None else "")
           for b in bits if b.failed]
    bad += [f"bits {f.hi}:{f.lo} {f.name} = 0x{f.value:x}: {f.cls.value}"
            for f in fields if f.failed]
    if bad:
        return name, Status.FAIL, f"{len(bad)} of {len(bits) + len(fields)} break the rule " \
            "(a reported bit accepted, a hidden one refused)", tuple(bad)
    return name, Status.PASS, detail, ()


def cases(r: ProbeResult) -> list[Case]:
    layout = read_layout(r.caps, None)
    out: list[Case] = []
    for i, e in enumerate(layout.rows):
        for register in ("eax", "ebx", "ecx", "edx"):
            bits = [b for b in r.bits
                    if (b.leaf, b.subleaf, b.register) == (e.function, e.index, register)]
            fields = [f for f in r.fields
                      if (f.leaf, f.subleaf, f.register) == (e.function, e.index, register)]
            if bits or fields or (i, register) not in layout.value_regs:
                out.append(_register_case(e.function, e.index, register, bits, fields))
    for t in r.traps:
        what = f"{', '.join(t.names)} steered onto row 0x{t.leaf:x}.{t.subleaf}"
        if t.outcome is None:
            out.append((case_name(t), Status.SKIP, f"{what}: not sent (--max-tds)", ()))
        elif t.failed:
            out.append((case_name(t), Status.FAIL,
                        f"{what}: {t.outcome.describe()}, expected KVM_REJECTED: past KVM's "
                        "check", ()))
        else:
            out.append((case_name(t), Status.PASS, f"{what}: {t.outcome.describe()}", ()))
    done = f"mode {r.mode}, {r.tds} TDs"
    out.append(("probe_complete", Status.PASS, done, ()) if r.complete else
               ("probe_complete", Status.FAIL,
                f"INCOMPLETE: {r.untested} bits not classified ({done})", ()))
    return out


def _header(r: ProbeResult) -> list[str]:
    counts = Counter(c[1] for c in cases(r))
    return [f"kvmtdx {__version__} probe: {r.verdict.upper()}: {counts[Status.PASS]} passed, "
            f"{counts[Status.FAIL]} failed, {counts[Status.SKIP]} skipped",
            f"backend: {r.backend}",
            f"module: {r.module or 'none'}, policy: {r.policy or 'none'}",
            f"work: mode {r.mode}, {r.tds} TDs, {r.ioctls} ioctls"]


def render_ktap(r: ProbeResult) -> str:
    return ktap.render(_header(r), [ktap.Case(n, s, d, diag) for n, s, d, diag in cases(r)])


def render_junit(r: ProbeResult) -> str:
    facts = tuple(line.split(": ", 1) for line in _header(r)[1:])
    suite = junit.Suite("kvmtdx.probe", tuple(
        junit.Case(n, "kvmtdx.probe", s, d, "\n".join([d, *diag]))
        for n, s, d, diag in cases(r)), tuple((k, v) for k, v in facts))
    return junit.render("kvmtdx probe", [suite])
