"""The effective allowlist: what a probed kernel lets TDs have, in the form --allowlist loads."""

from __future__ import annotations

from kvmtdx.model.policy import Allowlist
from kvmtdx.outcome import Kind
from kvmtdx.probe.result import BitClass, BitResult, ProbeResult
from kvmtdx.probe.units import read_layout


def kvm_allows(b: BitResult) -> bool:
    """Reported and accepted (or refused only by the module), or hidden yet accepted.

    Bits KVM refuses, and hidden bits only the module refuses, stay out: under
    the series the latter are the module's business and say nothing of KVM's
    table.
    """
    kvm_refused = b.outcome is not None and b.outcome.kind is Kind.KVM_REJECTED
    return (b.cls is BitClass.REPORTED_ACCEPTED
            or (b.cls is BitClass.REPORTED_REJECTED and not kvm_refused)
            or b.cls is BitClass.HIDDEN_ACCEPTED)


def effective_allowlist(result: ProbeResult, *, date: str) -> Allowlist:
    """The bits KVM does not refuse (kvm_allows), with their names; value registers pass
    through."""
    allowed: dict[tuple[int, int, str], int] = {}
    names: dict[tuple[int, int, str, int], str] = {}
    for b in result.bits:
        if kvm_allows(b):
            k = (b.leaf, b.subleaf, b.register)
            allowed[k] = allowed.get(k, 0) | 1 << b.bit
            if not b.name.startswith("bit"):
                names[b.key] = b.name
    layout = read_layout(result.caps, None)
    passthrough = frozenset(
        (layout.rows[row].function, layout.rows[row].index, register)
        for row, register in layout.value_regs
    )
    return Allowlist(
        name="probed",
        provenance=f"probed from {result.backend} on {date}",
        allowed=allowed,
        passthrough=passthrough,
        names=names,
    )
