"""`kvmtdx explain`: a failing TD launch, explained down to the bit.

- a TDX module status or KVM errno, alone or found in pasted log text
  (statuses, logs): its fields, meaning, causes, how KVM hands it to userspace
  and the source that produces it;
- with a request and a model (module, host, policy, or a simulated backend):
  every bit at fault, who refuses it and why, with QEMU's name for it and a
  fix (diagnose, facts, qemu);
- `host_check`: what a `-cpu host` TD cannot get on a host, before a launch.

`explain()` is what the command line calls; `render` turns its answer into
text or JSON.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from kvmtdx.errors import DataError
from kvmtdx.explain import qemu
from kvmtdx.explain.diagnose import Diagnosis, Fault
from kvmtdx.explain.diagnose import diagnose as replay
from kvmtdx.explain.facts import BitInfo, bit_facts, bit_info, qemu_facts
from kvmtdx.explain.logs import Finding, Input, Kind, read_input
from kvmtdx.explain.statuses import (
    ErrnoExplanation,
    StatusExplanation,
    explain_errno,
    explain_status,
)
from kvmtdx.model.policy import Policy
from kvmtdx.model.profiles import MAX_HOST, Host, ModuleProfile
from kvmtdx.model.requests import Request
from kvmtdx.outcome import Outcome
from kvmtdx.session import Backend, init_vm_once
from kvmtdx.structs import InitVm

__all__ = [
    "Diagnosis", "Explanation", "Fault", "Finding", "Input", "Item", "Model", "explain",
    "model_of", "read_input",
]


@dataclass(frozen=True, slots=True)
class Model:
    """The module, host and policy a request is replayed against, and where they came from."""

    module: ModuleProfile
    host: Host
    policy: Policy
    source: str


@dataclass(frozen=True, slots=True)
class Item:
    """One finding and what it means."""

    finding: Finding
    status: StatusExplanation | None = None
    errno: ErrnoExplanation | None = None
    bit: BitInfo | None = None  # a VMM's feature warning, resolved to its bit
    facts: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class Explanation:
    items: tuple[Item, ...]
    silent_inputs: tuple[str, ...]  # inputs in which nothing was recognised
    model: Model | None
    diagnosis: Diagnosis | None
    observed: Outcome | None  # the request as the backend answered it
    backend: str | None

    @property
    def found(self) -> bool:
        return bool(self.items) or self.diagnosis is not None


def model_of(backend: Backend | None, module: ModuleProfile | None, host: Host | None,
             policy: Policy | None) -> Model | None:
    """The model to replay against: given pieces first, then the simulated backend's."""
    sim = backend.simulation if backend is not None else None
    the_module = module or (sim.module if sim else None)
    the_policy = policy or (sim.policy if sim else None)
    if the_module is None or the_policy is None:
        return None
    the_host = host or (sim.host if sim else None) or MAX_HOST
    source = "the simulated host" if sim and module is None and policy is None else "given"
    return Model(the_module, the_host, the_policy, source)


def _item(f: Finding, model: Model | None) -> Item:
    if f.kind == Kind.STATUS:
        return Item(f, status=explain_status(f.value, seamcall=f.seamcall, rcx=f.rcx))
    if f.kind == Kind.ERRNO:
        return Item(f, errno=explain_errno(f.value, ioctl=f.ioctl, hw_error=f.hw_error))
    if f.kind == Kind.FEATURE and f.leaf is not None and f.register is not None:
        leaf, sub, reg, bit = qemu.resolve_warning(f.leaf, f.register, f.value, f.name)
        b = bit_info(leaf, sub, reg, bit)
        facts = qemu_facts(b)
        if model is not None:
            facts, _ = bit_facts(model.module, model.host, model.policy,
                                 Request(init_vm=InitVm()), (b,))
        return Item(f, bit=b, facts=facts)
    return Item(f)


def explain(inputs: Sequence[Input], *, request: Request | None = None,
            module: ModuleProfile | None = None, host: Host | None = None,
            policy: Policy | None = None, backend: Backend | None = None) -> Explanation:
    """Explain what `inputs` hold, and with `request` every fault of it.

    A request needs a model: `module` and `policy` (host default 'max'), or a
    simulated `backend`, which also runs the request once to show its answer.
    Raises DataError when a request comes without a model.
    """
    model = model_of(backend, module, host, policy)
    items: list[Item] = []
    silent: list[str] = []
    for i in inputs:
        found = i.findings()
        if not found:
            silent.append(i.origin)
        items += [_item(f, model) for f in found]
    diagnosis = observed = None
    if request is not None:
        if model is None:
            raise DataError("--request needs a model to replay it against: --simulate "
                            "MODULE[:POLICY], or --module and --policy (with --host)")
        diagnosis = replay(model.module, model.host, model.policy, request)
        if backend is not None:
            observed = init_vm_once(backend, request).outcome
    return Explanation(tuple(items), tuple(silent), model, diagnosis, observed,
                       backend.label if backend is not None else None)
