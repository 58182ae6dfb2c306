"""The prober: classify every bit KVM_TDX_CAPABILITIES lists by real KVM_TDX_INIT_VM outcomes.

probe() drives a kernel through the device layer (oracle.DeviceOracle) and
classifies what it answers (classify, whose docstring outlines the algorithm);
units holds the request layout, result the types a report renders, allowlist
the effective allowlist a probe implies.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

from kvmtdx.device import Kvm, RealSeam, Seam, no_tdx_reason
from kvmtdx.errors import DataError, KvmError
from kvmtdx.knowledge import Given, complete
from kvmtdx.probe.allowlist import effective_allowlist
from kvmtdx.probe.classify import bit_results, classify, expected_classes, field_results
from kvmtdx.probe.effective import observe
from kvmtdx.probe.oracle import DeviceOracle, Oracle, SerialSeam, mirror_oracle, native_fms
from kvmtdx.probe.result import (
    BitClass,
    BitKey,
    BitResult,
    FieldClass,
    FieldResult,
    ProbeResult,
    TrapResult,
)
from kvmtdx.probe.traps import lookup_traps
from kvmtdx.probe.units import Model, read_layout

__all__ = [
    "BitClass", "BitKey", "BitResult", "DeviceOracle", "FieldClass", "FieldResult", "Model",
    "Oracle", "ProbeOptions", "ProbeResult", "TrapResult", "classify", "effective_allowlist",
    "expected_classes", "mirror_oracle", "probe",
]


@dataclass(frozen=True)
class ProbeOptions:
    exhaustive: bool = False
    max_tds: int | None = None
    jobs: int = 1
    progress: Callable[[int], None] | None = None
    # Read the TD's CPUID after the accepted bits' requests: 'accepted, present' or
    # 'accepted, cleared' by observation (kvmtdx.probe.effective).
    effective: bool = False


def probe(seam: Seam, options: ProbeOptions, *, label: str, given: Given | None = None,
          kernel_release: str | None = None) -> ProbeResult:
    """Probe the kernel behind `seam`, judged by what is `given` (kvmtdx.knowledge.given),
    completed from the capabilities as `verify` does.  Seams other than the real device
    are driven one ioctl at a time: kvmtdx cannot know that they are thread-safe."""
    start = time.monotonic()
    if options.max_tds is not None and options.max_tds < 1:
        raise DataError("--max-tds must be at least 1")
    serialize = not isinstance(seam, RealSeam)
    with Kvm(SerialSeam(seam) if serialize else seam) as kvm:
        if not kvm.has_tdx():
            raise KvmError(no_tdx_reason(kvm.vm_types()), skip=True)
        oracle = DeviceOracle(kvm, jobs=options.jobs, max_tds=options.max_tds,
                              progress=options.progress)
        caps = oracle.capabilities()
        know = complete(given if given is not None else Given(), caps, kernel_release)
        model = Model.of(know)
        # Without a module profile nothing says which hidden bits matter: try them all.
        exhaustive = options.exhaustive or model is None
        got = classify(caps, oracle, model, exhaustive=exhaustive,
                       native_fms=native_fms(kvm, model))
        traps = lookup_traps(caps, oracle, got.bits)
        layout = read_layout(caps, model)
        bits = bit_results(got, layout, model)  # the mirror's expectations count in `seconds`
        notes = list(got.notes)
        if options.effective:
            bits, seen = observe(oracle, layout, bits)
            notes += seen
    if serialize and options.jobs > 1:
        notes.append(f"--jobs {options.jobs}: this backend is driven one ioctl at a time "
                     "(a lock around the seam), so jobs overlap but do not speed it up")
    if oracle.budget_spent:
        notes.append(f"--max-tds {options.max_tds} reached: the classification is incomplete")
    if know.module_mismatch is not None:
        notes.append(f"{know.module_source}: every listed bit probed, with no expectation")
    return ProbeResult(
        backend=label,
        mode="exhaustive" if exhaustive else "targeted",
        complete=(got.complete and not oracle.budget_spent
                  and all(t.outcome is not None for t in traps)),
        tds=kvm.counters.tds_created,
        ioctls=kvm.counters.ioctls,
        seconds=time.monotonic() - start,
        caps=caps,
        bits=bits,
        fields=field_results(got, layout),
        untested=got.untested,
        module=model.module.name if model is not None else None,
        policy=model.policy.name if model is not None and model.policy is not None else None,
        notes=notes,
        knowledge=know,
        traps=traps,
    )
