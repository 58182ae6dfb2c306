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
    through; the bits never tried listed apart (untried_bits) and counted in the
    provenance, which every report that judges by the table shows."""
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
    untried = untried_bits(result)
    n = _count(untried)
    provenance = f"probed from {result.backend} on {date}"
    if n:
        provenance += (f"; {n} bits never tried (listed under 'untried': left out of "
                       "'allowed' without evidence that KVM blocks them)")
    return Allowlist(name="probed", provenance=provenance, allowed=allowed,
                     passthrough=passthrough, names=names, untried=untried)


def note_untried(result: ProbeResult, file: str) -> None:
    """Say in the result's notes that the allowlist written to `file` lists bits apart."""
    n = _count(untried_bits(result))
    if n:
        result.notes.append(f"{file}: {n} bits never tried are listed under 'untried', not in "
                            "'allowed' (no evidence KVM blocks them)")


def _count(masks: dict[tuple[int, int, str], int]) -> int:
    return sum(bin(m).count("1") for m in masks.values())


def untried_bits(result: ProbeResult) -> dict[tuple[int, int, str], int]:
    """The feature bits of listed rows the probe never classified, per register: a run cut
    short, or targeted mode's hidden bits the module profile says the module cannot take."""
    tried = {b.key for b in result.bits}
    layout = read_layout(result.caps, None)
    out: dict[tuple[int, int, str], int] = {}
    for row, register in layout.feature_regs():
        e = layout.rows[row]
        mask = sum(1 << b for b in range(32) if (e.function, e.index, register, b) not in tried)
        if mask:
            out[(e.function, e.index, register)] = mask
    return out
