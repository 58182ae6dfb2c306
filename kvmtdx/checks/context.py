"""The run context every check is handed: the open KVM handle, what the kernel reported,
what is known of it, and the few ways a check talks to a TD.

Every TD a check creates goes through `td()` or `attempt()`, so it is closed on every path
and counted for the progress line; every INIT_VM goes through `send()`, so the hygiene
checks see each ENOSPC.
"""

from __future__ import annotations

import errno
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

from kvmtdx.device import Kvm, Seam, TdCpuidRead, TdxVm
from kvmtdx.kmsg import KernelLog
from kvmtdx.knowledge import Knowledge
from kvmtdx.model import builders, invariant, lifecycle, mirror
from kvmtdx.model.builders import Trap
from kvmtdx.model.catalog import BitRef
from kvmtdx.model.lifecycle import SequencePrediction
from kvmtdx.model.mirror import CapsPrediction, InitVmPrediction
from kvmtdx.model.policy import Policy
from kvmtdx.model.profiles import Host, ModuleProfile
from kvmtdx.model.requests import Request
from kvmtdx.outcome import Kind, Outcome
from kvmtdx.session import free_key_ids
from kvmtdx.structs import Capabilities, CpuidEntry
from kvmtdx.td_cpuid import default_request

NEEDS_MODULE = ("needs a TDX module profile: give --module NAME|FILE "
                "(kvmtdx caps --save-module FILE writes one)")
PROFILE_SET_ASIDE = ("the module profile given does not match this kernel "
                     "(module_profile_matches says why)")


@dataclass
class ProcessNumbers:
    """The process's open fds and RSS before the run and after the KVM handle closed."""

    fds_before: int = 0
    fds_after: int = 0
    rss_before: int = 0
    rss_after: int = 0


@dataclass
class Context:
    kvm: Kvm
    seam: Seam
    know: Knowledge
    caps: Capabilities
    enospc: int = 0
    key_ids_before: int | None = None
    on_td: Callable[[], None] = field(default=lambda: None)
    # Every trap request sent, with its answer, for adversarial_matches_prediction.
    trap_log: list[tuple[str, Request, Outcome]] = field(default_factory=list)
    proc: ProcessNumbers = field(default_factory=ProcessNumbers)
    # On a real kernel, may a check provoke a kernel WARN (--allow-kernel-warn)?  Its log,
    # the newest record when the run started, or why it could not be read.
    allow_kernel_warn: bool = False
    kernel_log: KernelLog = field(default_factory=KernelLog)
    log_start: int | None = None
    log_unreadable: str | None = None
    # Every distinct request a check saw ACCEPTED, in order: the effective group reads what
    # each gives the TD.  --strict: a question a series leaves open is judged, not recorded.
    accepted: dict[Request, None] = field(default_factory=dict)
    strict: bool = False
    _fms: int | None = None

    # What is known.

    @property
    def exact(self) -> bool:
        return self.know.exact

    @property
    def needs_module(self) -> str:
        """Why a check that needs the module profile skips."""
        return NEEDS_MODULE if self.know.module_mismatch is None else PROFILE_SET_ASIDE

    def model(self) -> tuple[ModuleProfile, Host, Policy] | None:
        """Module, host and policy when all three are known: the mirror can predict."""
        k = self.know
        if k.module is None or k.host is None or k.policy is None:
            return None
        return k.module, k.host, k.policy

    def predict(self, req: Request, *, td_initialized: bool = False) -> Outcome | None:
        m = self.model()
        if m is None:
            return None
        return mirror.predict_init_vm(*m, req, td_initialized=td_initialized)

    def predict_detail(self, req: Request) -> InitVmPrediction | None:
        """The mirror's whole answer: the module's status, the WARN, the TD's CPUID."""
        m = self.model()
        return None if m is None else mirror.init_vm_prediction(*m, req)

    def predict_sequence(self, reqs: Sequence[Request]) -> SequencePrediction | None:
        """INIT_VM calls on one TD, in order (kvmtdx.model.lifecycle)."""
        m = self.model()
        if m is None:
            return None
        return lifecycle.predict_sequence(*m, reqs)

    def native_fms(self) -> int:
        """The host's family/model/stepping (CPUID 1 EAX), which a TD's leaf 1 EAX must equal
        when not 0: the known host's, else what KVM_GET_SUPPORTED_CPUID says of the CPU."""
        if self.know.host_exact and self.know.host is not None:
            return self.know.host.native_fms()
        if self._fms is None:
            leaf1 = [e for e in self.kvm.supported_cpuid() if e.function == 1]
            self._fms = leaf1[0].eax if leaf1 else 0
        return self._fms

    def free_key_ids(self) -> int | None:
        """The backend's free TDX key IDs, where it says (the simulated host does)."""
        return free_key_ids(self.seam)

    def agreement(self, req: Request, pred: Outcome, actual: Outcome) -> invariant.Agreement:
        """The answer against the exact prediction, as the invariant judges a departure
        (kvmtdx.model.invariant.against_prediction)."""
        return invariant.against_prediction(self.caps.entries, req, pred, actual,
                                            module=self.know.module, host=self.know.host)

    def predict_caps(self, nent: int, *, flags: int = 0, hw_error: int = 0,
                     caller: bytes | None = None) -> CapsPrediction | None:
        m = self.model()
        if m is None:
            return None
        return mirror.predict_capabilities(*m, nent, flags=flags, hw_error=hw_error,
                                           caller=caller)

    # Talking to TDs.

    @contextmanager
    def td(self) -> Iterator[TdxVm]:
        vm = self.kvm.create_td()
        with vm:
            self.on_td()
            yield vm

    def send(self, td: TdxVm, req: Request) -> Outcome:
        outcome = td.init_vm(req.init_vm, flags=req.flags, hw_error=req.hw_error)
        if outcome.errno == errno.ENOSPC:
            self.enospc += 1
        if outcome.kind is Kind.ACCEPTED:
            self.accepted.setdefault(req)
        return outcome

    def td_cpuid(self, req: Request) -> tuple[Outcome, TdCpuidRead | None]:
        """INIT_VM on a fresh TD, then (accepted) the TD's CPUID as KVM_TDX_GET_CPUID reads it
        through a vCPU; every fd closed before this returns."""
        with self.td() as td:
            outcome = self.send(td, req)
            return outcome, td.read_cpuid() if outcome.kind is Kind.ACCEPTED else None

    def attempt(self, req: Request) -> Outcome:
        """One INIT_VM on a fresh TD, closed before this returns."""
        with self.td() as td:
            return self.send(td, req)

    # Requests (kvmtdx.model.builders, fed what this kernel reported).

    def base(self, entries: Sequence[CpuidEntry] = (), *,
             gpaw: int | None = builders.DEFAULT_GPAW,
             attributes: int = 0, xfam: int | None = None,
             reserved: tuple[int, ...] | None = None, cpuid_padding: int = 0,
             nent: int | None = None, flags: int = 0, hw_error: int = 0) -> Request:
        """The minimal request with every reported XFAM bit (see builders.base_request)."""
        return builders.base_request(
            self.caps.supported_xfam if xfam is None else xfam, entries, gpaw=gpaw,
            attributes=attributes, reserved=reserved, cpuid_padding=cpuid_padding, nent=nent,
            flags=flags, hw_error=hw_error)

    def full_request(self) -> Request:
        """Every reported feature bit at once: the mirror's, or without a profile one built
        from the capabilities (attributes 0; the host's TSX_CTRL taken as present)."""
        return default_request(self.know, self.caps)

    def trap(self, trap: Trap, *, ebx: int, ecx: int) -> Request:
        return builders.trap_request(trap, self.base(), self.caps.entries, ebx=ebx, ecx=ecx)

    # Naming what was reported.

    def row_of(self, e: CpuidEntry) -> int | None:
        """The module row a reported entry stands for (None without a profile)."""
        m = self.know.module
        if m is None:
            return None
        for i, r in enumerate(m.rows):
            if r.leaf == e.function and r.kvm_index == e.index:
                return i
        return None

    def subleaf_of(self, leaf: int, index: int) -> int | None:
        """A row's sub-leaf as reports name it (None: the module lists none); without a
        profile, KVM's index."""
        m = self.know.module
        if m is not None:
            for r in m.rows:
                if r.leaf == leaf and r.kvm_index == index:
                    return r.subleaf
        return index

    def ref(self, leaf: int, index: int, register: str, bit: int) -> BitRef:
        """A bit of a reported row (KVM's index), named by the row's sub-leaf."""
        return BitRef(leaf, self.subleaf_of(leaf, index), register, bit)

    def leaf7(self) -> CpuidEntry | None:
        return next((e for e in self.caps.entries if e.function == 7 and e.index == 0), None)
