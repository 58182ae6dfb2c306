"""The one schema of kvmtdx's JSON reports: the envelope every report carries, and its reader.

Every JSON document kvmtdx writes begins with the same three fields, then the
kind's own:

    "schema": SCHEMA         an integer, bumped on any incompatible change of any kind
    "kind": ReportKind       what the document is ("verify", "probe", "caps", ...)
    "tool_version": "x.y.z"  the kvmtdx that wrote it

A reader asks `kind_of` (or `read_report`) and dispatches on the answer; nothing
guesses what a file is from the keys it happens to have.  Adding a report is one
`ReportKind` member and a renderer that calls `document`.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from enum import Enum
from typing import Any

from kvmtdx import __version__
from kvmtdx.errors import DataError
from kvmtdx.jsonfile import load as load_json
from kvmtdx.report import to_json

SCHEMA = 1


class ReportKind(str, Enum):
    INFO = "info"
    CAPS = "caps"
    PREDICT = "predict"
    INIT_VM = "init-vm"
    TD_CPUID = "td-cpuid"
    REQUEST = "request"  # a KVM_TDX_INIT_VM request (verify --save-failures)
    VERIFY = "verify"
    CHECK_LIST = "check-list"  # verify --list-checks
    PROBE = "probe"
    DIFF = "diff"
    POLICY_DIFF = "policy-diff"
    SIMULATE_LIST = "simulate-list"
    ALLOWLIST = "allowlist"
    MODULE_PROFILE = "module-profile"
    MATRIX = "matrix"
    FUZZ = "fuzz"
    FUZZ_CASE = "fuzz-case"  # a fuzz finding that involves KVM_TDX_CAPABILITIES (fuzz --save)
    EXPLAIN = "explain"

    def __str__(self) -> str:
        return self.value


ENVELOPE: tuple[str, ...] = ("schema", "kind", "tool_version")

# The reports of a run on a host (a device, a plug-in or the simulated host): each
# carries "host_identity" (report.encode.host_identity_json) right after the envelope,
# so reports from many machines and kernels can be told apart and merged.  predict
# (the mirror alone), diff and the data documents describe no host.
RUN_KINDS = frozenset({ReportKind.INFO, ReportKind.CAPS, ReportKind.INIT_VM,
                       ReportKind.TD_CPUID, ReportKind.VERIFY, ReportKind.PROBE,
                       ReportKind.FUZZ})
HOST_IDENTITY = "host_identity"


def envelope(kind: ReportKind, body: Mapping[str, Any],
             host_identity: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """`body` behind the envelope (and, for a run, its host identity); envelope fields
    `body` carries itself are replaced."""
    if (host_identity is not None) != (kind in RUN_KINDS):
        raise ValueError(f"a {kind.value} report {'needs' if kind in RUN_KINDS else 'has no'} "
                         "host identity")
    doc: dict[str, Any] = {"schema": SCHEMA, "kind": kind.value, "tool_version": __version__}
    if host_identity is not None:
        doc[HOST_IDENTITY] = dict(host_identity)
    doc.update((k, v) for k, v in body.items() if k not in ENVELOPE and k != HOST_IDENTITY)
    return doc


def document(kind: ReportKind, body: Mapping[str, Any],
             host_identity: Mapping[str, Any] | None = None) -> str:
    """The report as JSON text, envelope first."""
    return to_json(envelope(kind, body, host_identity))


def kind_of(doc: Any, origin: str) -> ReportKind:
    """The kind of a kvmtdx JSON report; DataError naming `origin` for anything else."""
    if not isinstance(doc, dict):
        raise DataError(f"{origin}: expected a JSON object (a kvmtdx JSON report)")
    kind = doc.get("kind")
    if kind is None:
        raise DataError(f"{origin}: not a kvmtdx report (it has no 'kind' field)")
    try:
        known = ReportKind(kind)
    except ValueError:
        raise DataError(f"{origin}: unknown report kind {kind!r} (kvmtdx writes "
                        f"{', '.join(k.value for k in ReportKind)})") from None
    schema = doc.get("schema")
    if isinstance(schema, bool) or not isinstance(schema, int) or schema < 1:
        raise DataError(f"{origin}: field 'schema' must be a positive integer")
    if schema > SCHEMA:
        raise DataError(f"{origin}: schema {schema}, from kvmtdx {doc.get('tool_version')}; "
                        f"this kvmtdx {__version__} reads schema {SCHEMA}")
    return known


def expect(doc: Any, origin: str, accept: Collection[ReportKind], purpose: str) -> ReportKind:
    """`kind_of`, refusing a report of a kind `purpose` (who reads it) does not take."""
    kind = kind_of(doc, origin)
    if kind not in accept:
        names = [k.value for k in accept]
        either = names[0] if len(names) == 1 else ", ".join(names[:-1]) + " or " + names[-1]
        raise DataError(f"{origin}: a kvmtdx {kind.value} report; {purpose} reads {either} "
                        "reports")
    return kind


def read_report(path: str, accept: Collection[ReportKind], purpose: str
                ) -> tuple[ReportKind, dict[str, Any]]:
    """Load `path` as a report of one of the `accept`ed kinds."""
    doc = load_json(path)
    return expect(doc, path, accept, purpose), doc
