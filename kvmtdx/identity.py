"""Which host a report ran on: the machine, its kernel and CPU, its TDX module, the policy.

A lab runs kvmtdx on every TDX host model and every kernel build it ships and
merges the reports into one matrix (`kvmtdx report merge`); each report
carries this identity so that its column can be told apart from the others
and grouped with its kin.  It is gathered here, once, for every command that
talks to a backend; report.encode writes it.

What the machine says of itself is read from the machine (kernel release,
/proc/cpuinfo, the TDX module's version where the kernel exposes it); what a
simulated host is made of comes from the simulation, which is the kernel and
module under test in that case.
"""

from __future__ import annotations

import platform
import re
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from kvmtdx.native import CPUINFO

if TYPE_CHECKING:
    from kvmtdx.knowledge import Knowledge
    from kvmtdx.session import Backend

# The tdx_host faux device's attribute: the loaded module as "major.minor.update"
# (Linux 7.3, Documentation/ABI/testing/sysfs-devices-faux-tdx-host).
TDX_MODULE_VERSION = "/sys/devices/faux/tdx_host/version"
SIMULATED = "simulated"
_VERSION = re.compile(r"[0-9]+(\.[0-9]+){1,3}")


@dataclass(frozen=True, slots=True)
class Cpu:
    """The first CPU of /proc/cpuinfo: vendor, family/model/stepping and the marketing name."""

    vendor: str | None
    model_name: str
    family: int | None
    model: int | None
    stepping: int | None

    @property
    def fms(self) -> str | None:
        """Family-model-stepping in hex as microcode files are named ("06-8f-08")."""
        if self.family is None or self.model is None or self.stepping is None:
            return None
        return f"{self.family:02x}-{self.model:02x}-{self.stepping:02x}"


@dataclass(frozen=True, slots=True)
class SimulatedMakeup:
    """What a simulated host is built from: the kernel and module under test in its case."""

    module: str
    policy: str | None  # None: a kernel-source host, whose own code is the policy
    mutant: str | None
    host: str


@dataclass(frozen=True, slots=True)
class HostIdentity:
    hostname: str
    kernel_release: str  # of the machine kvmtdx ran on
    cpu: Cpu
    tdx_module: str | None  # the version tested ("1.5.06"), or the simulated module's name
    tdx_module_source: str  # where it was read, or why it is unknown
    policy: str | None  # the kernel policy the run judged by
    policy_source: str
    backend: str
    simulated: SimulatedMakeup | None


def read_cpu(cpuinfo: str = CPUINFO) -> Cpu:
    """The first processor block of `cpuinfo`; fields it lacks are None (model name: the
    platform's processor string, else the machine type)."""
    try:
        text = Path(cpuinfo).read_text(errors="replace")
    except OSError:
        text = ""
    fields: dict[str, str] = {}
    for line in text.splitlines():
        if not line.strip():
            if fields:
                break  # the first CPU is enough: a host's CPUs are one model
            continue
        key, sep, value = line.partition(":")
        if sep:
            fields.setdefault(key.strip(), value.strip())
    name = fields.get("model name") or platform.processor() or platform.machine() or "unknown"
    return Cpu(vendor=fields.get("vendor_id") or None, model_name=name,
               family=_number(fields.get("cpu family")), model=_number(fields.get("model")),
               stepping=_number(fields.get("stepping")))


def _number(text: str | None) -> int | None:
    return int(text) if text is not None and text.isdigit() else None


def tdx_module_version(path: str = TDX_MODULE_VERSION) -> tuple[str | None, str]:
    """The running TDX module's version and where it came from, or None and why not."""
    try:
        text = Path(path).read_text(errors="replace").strip()
    except FileNotFoundError:
        return None, f"not exposed by this kernel (no {path}, which Linux 7.3 has)"
    except OSError as e:
        return None, f"{path}: {e.strerror or e}"
    if not _VERSION.fullmatch(text):
        return None, f"{path}: unexpected content {text[:40]!r}"
    return text, path


def identify(backend: Backend, knowledge: Knowledge | None = None, *,
             cpuinfo: str = CPUINFO, module_version: str = TDX_MODULE_VERSION) -> HostIdentity:
    """The identity of a run on `backend`, judged by `knowledge` (None: a command that judges
    by no policy, such as info or caps)."""
    sim = backend.simulation
    makeup = None
    module: str | None
    if sim is not None:
        # A kernel-source host has no policy of its own: its tree's code is what is tested.
        makeup = SimulatedMakeup(module=sim.module.name,
                                 policy=sim.policy.name if sim.policy is not None else None,
                                 mutant=sim.mutant, host=sim.host.name)
        module, module_source = sim.module.name, SIMULATED
    else:
        module, module_source = tdx_module_version(module_version)
    if knowledge is not None:
        policy = knowledge.policy.name if knowledge.policy is not None else None
        policy_source = knowledge.policy_reason
    elif sim is not None and sim.policy is not None:
        policy, policy_source = sim.policy.name, "the simulated host's"
    else:
        policy, policy_source = None, "none: this command judges by no policy"
    return HostIdentity(hostname=socket.gethostname(), kernel_release=platform.release(),
                        cpu=read_cpu(cpuinfo), tdx_module=module,
                        tdx_module_source=module_source, policy=policy,
                        policy_source=policy_source, backend=backend.label, simulated=makeup)
