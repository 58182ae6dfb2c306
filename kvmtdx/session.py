"""Choosing what a command talks to: the real device, the simulated host, or a plug-in seam.

Every command goes through `open_backend`, so `--simulate` and `--backend`
mean the same everywhere.  The simulated host is imported only when asked
for, keeping the real path free of it.
"""

from __future__ import annotations

import errno
import importlib
from dataclasses import dataclass

from kvmtdx.device import DEFAULT_KVM_PATH, Counters, Kvm, RealSeam, Seam, TdxVm
from kvmtdx.errors import DataError
from kvmtdx.model.policy import POLICY_NAMES, Allowlist, Policy, get_policy
from kvmtdx.model.profiles import BUNDLED_MODULES, MAX_HOST, Host, ModuleProfile, load_profile
from kvmtdx.model.requests import Request
from kvmtdx.outcome import Outcome

DEFAULT_SIM_POLICY = "upstream"


@dataclass(frozen=True, slots=True)
class Simulation:
    """What a simulated host is built from (the facts `knowledge.given` takes from it)."""

    module: ModuleProfile
    host: Host
    policy: Policy | None  # None: the kernel's own code decides (the kernel-source host)
    mutant: str | None = None


@dataclass
class Backend:
    seam: Seam
    label: str
    # The simulated host's make-up; None for the real device and plug-ins, which say
    # nothing of themselves.
    simulation: Simulation | None = None
    path: str = DEFAULT_KVM_PATH

    @property
    def simulated(self) -> bool:
        return self.simulation is not None


@dataclass(frozen=True)
class SimSpec:
    module: str
    policy: str
    mutant: str | None


def parse_simulate(spec: str) -> SimSpec:
    """MODULE[:POLICY[:MUTANT]]; MODULE may be a bundled name or a profile JSON file."""
    parts = spec.split(":")
    if not parts[0] or len(parts) > 3:
        raise DataError(
            f"--simulate {spec!r}: expected MODULE[:POLICY[:MUTANT]], e.g. 2.0:rfc-v2 "
            f"(modules: {', '.join(BUNDLED_MODULES)}; policies: {', '.join(POLICY_NAMES)})"
        )
    policy = parts[1] if len(parts) > 1 and parts[1] else DEFAULT_SIM_POLICY
    mutant = parts[2] if len(parts) > 2 and parts[2] else None
    return SimSpec(parts[0], policy, mutant)


def load_plugin(target: str) -> Seam:
    """`package.module:factory` -> the seam the factory returns."""
    mod_name, sep, attr = target.partition(":")
    if not sep or not mod_name or not attr:
        raise DataError(f"--backend {target!r}: expected package.module:factory")
    # A plug-in is someone else's code: whatever it raises is a bad --backend, in one line.
    try:
        mod = importlib.import_module(mod_name)
    except ImportError as e:
        raise DataError(f"--backend {target!r}: cannot import {mod_name}: {e}") from None
    except Exception as e:
        raise DataError(f"--backend {target!r}: cannot import {mod_name}: "
                        f"{type(e).__name__}: {e}") from None
    factory = getattr(mod, attr, None)
    if not callable(factory):
        raise DataError(f"--backend {target!r}: {mod_name} has no callable {attr!r}")
    try:
        seam = factory()
    except Exception as e:
        raise DataError(f"--backend {target!r}: {attr}() failed: {type(e).__name__}: {e}"
                        ) from None
    if not isinstance(seam, Seam):
        raise DataError(
            f"--backend {target!r}: the factory must return an object with "
            "open(path, flags), ioctl(fd, request, arg) and close(fd)"
        )
    return seam


def open_backend(
    simulate: str | None = None,
    backend: str | None = None,
    host: Host | None = None,
    allowlist: Allowlist | None = None,
    key_ids: int | None = None,
    *,
    kernel_source: str | None = None,
    patches: tuple[str, ...] = (),
    module: str | None = None,
) -> Backend:
    chosen = [o for o, v in (("--simulate", simulate), ("--backend", backend),
                             ("--kernel-source", kernel_source)) if v is not None]
    if len(chosen) > 1:
        raise DataError(f"{' and '.join(chosen)} exclude each other")
    for option, value in (("--simulate", simulate), ("--backend", backend),
                          ("--kernel-source", kernel_source)):
        if value is not None and not value.strip():
            raise DataError(f"{option} is empty: leave it out to use the real {DEFAULT_KVM_PATH}")
    if patches and kernel_source is None:
        raise DataError("--patch needs --kernel-source (it patches a kernel tree)")
    if kernel_source is not None:
        return kernel_source_backend(kernel_source, patches, load_profile(module or "2.0"),
                                     host if host is not None else MAX_HOST, key_ids=key_ids)
    if backend is not None:
        return Backend(seam=load_plugin(backend), label=f"backend {backend}")
    if simulate is not None:
        spec = parse_simulate(simulate)
        _check_mutant(spec)
        return simulated_backend(load_profile(spec.module), host if host is not None else MAX_HOST,
                                 get_policy(spec.policy, allowlist), mutant=spec.mutant,
                                 key_ids=key_ids)
    return Backend(seam=RealSeam(), label=f"real {DEFAULT_KVM_PATH}")


def _check_mutant(spec: SimSpec) -> None:
    """A mutant switched on under a policy whose answers it does not change makes a run that
    passes while saying nothing of the mutant: refuse it, naming the policies it needs."""
    if spec.mutant is None:
        return
    from kvmtdx.sim.mutants import BY_NAME  # only simulated runs need it

    m = BY_NAME.get(spec.mutant)
    if m is None:
        raise DataError(f"--simulate: unknown mutant {spec.mutant!r}: see "
                        "'kvmtdx verify --simulate list'")
    if spec.policy not in m.policies:
        raise DataError(
            f"--simulate {spec.module}:{spec.policy}:{m.name}: mutant {m.name} changes only "
            f"what {', '.join(m.policies)} answer{'s' if len(m.policies) == 1 else ''}, "
            f"nothing under {spec.policy}; use e.g. --simulate "
            f"{spec.module}:{m.policies[0]}:{m.name}")


def simulated_backend(module: ModuleProfile, host: Host, policy: Policy, *,
                      mutant: str | None = None, key_ids: int | None = None) -> Backend:
    """The simulated host running `module` on `host` under `policy`, as a backend."""
    from kvmtdx import sim  # only simulated runs need it

    if mutant is not None and mutant not in sim.MUTANTS:
        raise DataError(f"unknown mutant {mutant!r}: see 'kvmtdx verify --simulate list'")
    kwargs = {} if key_ids is None else {"key_ids": key_ids}
    seam = sim.SimulatedHost(module, host, policy, mutant=mutant, **kwargs)
    label = f"simulated TDX host (module {module.name}, policy {policy.name}"
    label += f", host {host.name}" + (f", mutant {mutant})" if mutant else ")")
    return Backend(seam=seam, label=label,
                   simulation=Simulation(module=module, host=host, policy=policy, mutant=mutant))


def kernel_source_backend(tree: str, patches: tuple[str, ...], module: ModuleProfile,
                          host: Host, *, key_ids: int | None = None) -> Backend:
    """A kernel tree's own KVM TDX code, compiled behind the seam, as a backend.

    The policy is not given: the kernel's code is what is under test, so
    `--policy auto` reads it off the capabilities like on a real host.
    """
    from kvmtdx.errors import KvmError
    from kvmtdx.kernelsrc import open_backend as open_kernel_source

    ks = open_kernel_source(tree, patches, module, host,
                            key_ids=16 if key_ids is None else key_ids)
    failure = ks.seam.bringup_failure
    if failure is not None:
        if not module.enumerates_topology:
            failure += (f" (module {module.name} has no topology enumeration, "
                        "TDX_FEATURES0.TOPOLOGY_ENUM, which Linux 6.16 and later require)")
        raise KvmError(failure, skip=True)
    return Backend(seam=ks.seam, label=ks.label,
                   simulation=Simulation(module=ks.module, host=ks.host, policy=None))


@dataclass(frozen=True)
class KeyIdCount:
    """The backend's free TDX key IDs around a replay (where it counts them: the simulated
    and kernel-source hosts do), so a key ID a TD keeps or leaks shows."""

    before: int  # before the TD was created
    after_calls: int  # after the last INIT_VM, the TD still open
    after_close: int  # once the TD was closed


@dataclass(frozen=True)
class InitVmRun:
    """One KVM_TDX_INIT_VM as `kvmtdx init-vm` sent it (after the request's `before` calls
    on the same TD, whose answers are `before`).

    `kernel_warnings`: WARN splats the kernel hit during the call, where the backend counts
    them (the simulated and kernel-source hosts), else None.  `vm_bugged`: whether KVM then
    refused every ioctl on the VM, asked only after an -EIO (None: not asked).
    """

    outcome: Outcome
    backend: str
    counters: Counters
    kernel_warnings: int | None = None
    vm_bugged: bool | None = None
    before: tuple[Outcome, ...] = ()
    key_ids: KeyIdCount | None = None


def kernel_warnings(seam: Seam) -> int | None:
    """The WARN splats a backend that counts them has seen so far (None: it does not say)."""
    count = getattr(seam, "kernel_warnings", None)
    return count if isinstance(count, int) and not isinstance(count, bool) else None


def free_key_ids(seam: Seam) -> int | None:
    """The seam's free TDX key IDs, where it says (an int attribute `free_key_ids`)."""
    free = getattr(seam, "free_key_ids", None)
    return free if isinstance(free, int) and not isinstance(free, bool) else None


@dataclass(frozen=True, slots=True)
class Sent:
    """One KVM_TDX_INIT_VM's answer, the kernel WARNs it provoked where the backend counts
    them, and after an -EIO whether KVM then refuses every ioctl on the VM (None: not
    asked)."""

    outcome: Outcome
    warned: int | None
    bugged: bool | None


def send_init_vm(seam: Seam, td: TdxVm, request: Request, *, ask_bugged: bool = True) -> Sent:
    """The request's INIT_VM (its cmd.flags and hw_error) on `td`, whose kernel is `seam`."""
    before = kernel_warnings(seam)
    outcome = td.init_vm(request.init_vm, flags=request.flags, hw_error=request.hw_error)
    after = kernel_warnings(seam)
    bugged = td.is_dead() if ask_bugged and outcome.errno == errno.EIO else None
    return Sent(outcome, None if before is None or after is None else after - before, bugged)


def init_vm_once(backend: Backend, request: Request) -> InitVmRun:
    """KVM_TDX_INIT_VM on a fresh TD with the request's cmd.flags and hw_error (its `before`
    calls sent to the same TD first); all fds closed.

    Raises KvmError(skip=True) when the seam offers no TDX.
    """
    seam = backend.seam
    free0 = free_key_ids(seam)
    with Kvm(seam, backend.path) as kvm:
        with kvm.create_td() as td:
            outcomes = [td.init_vm(r.init_vm, flags=r.flags,
                                   hw_error=r.hw_error) for r in request.before]
            sent = send_init_vm(seam, td, request)
            free1 = free_key_ids(seam)
        free2 = free_key_ids(seam)
    count = None if free0 is None or free1 is None or free2 is None else \
        KeyIdCount(free0, free1, free2)
    return InitVmRun(outcome=sent.outcome, backend=backend.label, counters=kvm.counters,
                     kernel_warnings=sent.warned, vm_bugged=sent.bugged,
                     before=tuple(outcomes), key_ids=count)
