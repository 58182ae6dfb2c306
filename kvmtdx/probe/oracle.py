"""Oracles: a batch of INIT_VM requests in, outcomes out (None: not run, the budget is spent).

The classification asks an oracle, so the same algorithm classifies a live
kernel (DeviceOracle: fresh TDs through the device layer) and the mirror's
prediction (mirror_oracle: the expected classes a report compares against).
"""

from __future__ import annotations

import errno
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor

from kvmtdx import uapi
from kvmtdx.device import Kvm, Seam, TdCpuidRead, TdxVm
from kvmtdx.errors import ProbeError
from kvmtdx.model import mirror
from kvmtdx.model.policy import Policy
from kvmtdx.model.profiles import Host, ModuleProfile
from kvmtdx.outcome import Kind, Outcome
from kvmtdx.probe.units import Model
from kvmtdx.structs import Capabilities, InitVm

Oracle = Callable[[Sequence[InitVm]], list[Outcome | None]]

# KVM_CREATE_VM or INIT_VM fails this way, and the probe is not the one holding them.
_EXHAUSTED = ("TDX key IDs exhausted: KVM_TDX_INIT_VM failed with ENOSPC while the probe "
              "held no other TD (another TD holds them, or the kernel leaks them); "
              "{tds} TDs were created and all are closed")
_RETRY = "retry"  # ENOSPC while our own TDs may hold the key IDs
# EAGAIN: the module ran out of entropy; a fresh TD usually gets some.
_EAGAIN_TRIES = 3


class SerialSeam:
    """A seam not known to be thread-safe, driven one call at a time by --jobs threads."""

    def __init__(self, inner: Seam) -> None:
        self._inner = inner
        self._lock = threading.Lock()

    def open(self, path: str, flags: int) -> int:
        with self._lock:
            return self._inner.open(path, flags)

    def ioctl(self, fd: int, request: int, arg: int) -> int:
        with self._lock:
            return self._inner.ioctl(fd, request, arg)

    def close(self, fd: int) -> None:
        with self._lock:
            self._inner.close(fd)


class DeviceOracle:
    """INIT_VM on fresh TDs through the device layer; every TD is closed before the next.

    With jobs > 1 up to `jobs` TDs live at once; an ENOSPC while others of
    ours are live is retried after them, so the probe never starves itself.
    """

    def __init__(self, kvm: Kvm, *, jobs: int = 1, max_tds: int | None = None,
                 progress: Callable[[int], None] | None = None) -> None:
        self._kvm = kvm
        self._jobs = max(1, jobs)
        self._max = max_tds
        self._progress = progress
        self._lock = threading.Lock()
        self._live = 0
        self._reserved = 0
        self.budget_spent = False
        self.cache: dict[InitVm, Outcome] = {}

    @property
    def tds(self) -> int:
        """TDs actually created (the device's count)."""
        return self._kvm.counters.tds_created

    def reserve(self) -> bool:
        """Claim one TD of the --max-tds budget (claimed in request order, for determinism)."""
        with self._lock:
            if self._max is not None and self._reserved >= self._max:
                self.budget_spent = True
                return False
            self._reserved += 1
            return True

    def capabilities(self) -> Capabilities:
        if not self.reserve():
            raise ProbeError("--max-tds leaves no TD for KVM_TDX_CAPABILITIES")
        try:
            td = self._create()
            with td:
                return td.capabilities()
        except OSError as e:
            raise ProbeError(f"KVM_TDX_CAPABILITIES failed: {e.strerror or e}") from None

    def _create(self) -> TdxVm:
        try:
            vm = self._kvm.create_vm(uapi.VmType.KVM_X86_TDX_VM)
        except OSError as e:
            if e.errno == errno.ENOSPC:
                raise ProbeError(_EXHAUSTED.format(tds=self.tds)) from None
            raise ProbeError(f"KVM_CREATE_VM (TDX) failed: {e.strerror or e}") from None
        assert isinstance(vm, TdxVm)
        return vm

    def _init_vm(self, request: InitVm) -> Outcome:
        for _ in range(_EAGAIN_TRIES):
            td = self._create()
            with td:
                out = td.init_vm(request)
            if not (out.kind is Kind.ERROR and out.errno == errno.EAGAIN):
                break
        return out

    def _one(self, request: InitVm) -> Outcome | str:
        """The outcome, or _RETRY when our own live TDs may hold the key IDs."""
        with self._lock:
            self._live += 1
        try:
            out = self._init_vm(request)
            if out.kind is Kind.ERROR and out.errno == errno.ENOSPC:
                with self._lock:
                    others = self._live - 1
                if others > 0:
                    return _RETRY
                raise ProbeError(_EXHAUSTED.format(tds=self.tds))
            return out
        finally:
            with self._lock:
                self._live -= 1
            if self._progress is not None:
                self._progress(self.tds)

    def td_cpuid(self, request: InitVm) -> tuple[Outcome, TdCpuidRead | None] | None:
        """INIT_VM on a fresh TD and, ACCEPTED, its CPUID read back (None: --max-tds spent)."""
        if not self.reserve():
            return None
        with self._create() as td:
            out = td.init_vm(request)
            read = td.read_cpuid() if out.kind is Kind.ACCEPTED else None
        if self._progress is not None:
            self._progress(self.tds)
        return out, read

    def __call__(self, requests: Sequence[InitVm]) -> list[Outcome | None]:
        todo: list[InitVm] = []
        for r in requests:
            if r not in self.cache and r not in todo:
                todo.append(r)
        runnable = [r for r in todo if self.reserve()]
        if self._jobs > 1 and len(runnable) > 1:
            with ThreadPoolExecutor(max_workers=self._jobs) as pool:
                results = list(pool.map(self._one, runnable))
        else:
            results = [self._one(r) for r in runnable]
        for r, res in zip(runnable, results, strict=True):
            if isinstance(res, str):  # ENOSPC behind our own TDs: once more, alone
                res = self._one(r)
                if isinstance(res, str):
                    raise ProbeError(_EXHAUSTED.format(tds=self.tds))
            self.cache[r] = res
        return [self.cache.get(r) for r in requests]


def mirror_oracle(module: ModuleProfile, host: Host, policy: Policy) -> Oracle:
    def run(requests: Sequence[InitVm]) -> list[Outcome | None]:
        return [mirror.predict_init_vm(module, host, policy, r) for r in requests]
    return run


def native_fms(kvm: Kvm, model: Model | None) -> int | None:
    """The host's family/model/stepping (leaf 1 EAX), which the module takes as the only
    non-zero FMS: from the host profile, else KVM_GET_SUPPORTED_CPUID."""
    if model is not None and model.host is not None:
        return model.host.native_fms() or None
    try:
        for e in kvm.supported_cpuid():
            if e.function == 1:
                return e.eax or None
    except OSError:
        return None
    return None
