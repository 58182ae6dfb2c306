"""JUnit XML in the dialect Jenkins and GitLab read (testsuites > testsuite > testcase).

verify, probe and fuzz hand this module their results grouped into suites;
it owns the XML: counts on every level, `<failure>` with the full text,
`<skipped>` with the reason, `<properties>` with the run's facts.  An informational result
is a passing case whose `<system-out>` says what was recorded.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from collections.abc import Sequence
from dataclasses import dataclass

from kvmtdx.verdict import Status


@dataclass(frozen=True, slots=True)
class Case:
    name: str
    classname: str
    status: Status
    message: str = ""  # one line: the failure or skip message
    text: str = ""  # a failure's full text, or a passing case's output
    seconds: float | None = None


@dataclass(frozen=True, slots=True)
class Suite:
    name: str
    cases: tuple[Case, ...]
    properties: tuple[tuple[str, str], ...] = ()


def _one_line(value: str) -> str:
    return " ".join(value.split())


def _count(cases: Sequence[Case], status: Status) -> str:
    return str(sum(c.status == status for c in cases))


def _case(parent: ET.Element, c: Case) -> None:
    tc = ET.SubElement(parent, "testcase", name=c.name, classname=c.classname)
    if c.seconds is not None:
        tc.set("time", f"{c.seconds:.3f}")
    if c.status == Status.FAIL:
        f = ET.SubElement(tc, "failure", message=_one_line(c.message), type="mismatch")
        f.text = c.text
    elif c.status == Status.SKIP:
        ET.SubElement(tc, "skipped", message=_one_line(c.message))
    elif c.text or c.status == Status.INFO:
        ET.SubElement(tc, "system-out").text = c.text or c.message


def render(name: str, suites: Sequence[Suite]) -> str:
    root = ET.Element("testsuites", name=name)
    every = [c for s in suites for c in s.cases]
    root.set("tests", str(len(every)))
    root.set("failures", _count(every, Status.FAIL))
    root.set("skipped", _count(every, Status.SKIP))
    for s in suites:
        suite = ET.SubElement(root, "testsuite", name=s.name, tests=str(len(s.cases)),
                              failures=_count(s.cases, Status.FAIL), errors="0",
                              skipped=_count(s.cases, Status.SKIP))
        if s.properties:
            props = ET.SubElement(suite, "properties")
            for key, value in s.properties:
                ET.SubElement(props, "property", name=key, value=value)
        for c in s.cases:
            _case(suite, c)
    ET.indent(root)
    return ET.tostring(root, encoding="unicode", xml_declaration=True) + "\n"
