"""Before a launch: which features a `-cpu host` TD cannot get on this host, and why.

What `-cpu host` asks for is what KVM_GET_SUPPORTED_CPUID reports (by QEMU's
feature names); what a TD can get is what KVM_TDX_CAPABILITIES reports as
configurable, plus what QEMU knows every TDX module sets or derives from a TD
attribute or from XFAM (qemu-tdx-cpuid.json).  Each feature between the two
is explained from the model: the module does not let a VMM configure it, the
kernel hides it, the host lacks it, or KVM offers no XFAM state or attribute
it needs.  Leaves QEMU does not filter for a TD are left to the module and
not judged.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from enum import Enum

from kvmtdx.device import Kvm
from kvmtdx.explain import qemu
from kvmtdx.explain.facts import BitInfo, bit_info, row_of
from kvmtdx.knowledge import choose_policy
from kvmtdx.model import catalog
from kvmtdx.model.policy import Allowlist, Policy
from kvmtdx.model.profiles import Host, ModuleProfile
from kvmtdx.model.rules import bits_of, is_value_register
from kvmtdx.session import Backend
from kvmtdx.structs import REGISTERS, Capabilities, CpuidEntry

RegKey = qemu.RegKey


class Cause(str, Enum):
    MODULE = "module_does_not_allow"
    KVM = "kvm_hides"
    HOST = "host_lacks"
    XFAM = "xfam_not_offered"
    ATTRIBUTE = "attribute_not_offered"
    QEMU = "qemu_does_not_offer"
    UNEXPLAINED = "unexplained"


@dataclass(frozen=True, slots=True)
class Missing:
    bit: BitInfo
    cause: Cause
    why: str


@dataclass(frozen=True, slots=True)
class Facts:
    """What the check judges by, and where each came from."""

    module: ModuleProfile | None
    policy: Policy | None
    policy_reason: str
    host: Host | None  # the CPU's native CPUID, when known


@dataclass(frozen=True, slots=True)
class HostCheck:
    backend: str
    module: str | None
    policy: str | None
    policy_reason: str
    host: str | None
    supported_attrs: int
    supported_xfam: int
    wanted: int  # named features -cpu host asks for in leaves QEMU filters for a TD
    available: int
    missing: tuple[Missing, ...]
    xfam_missing: tuple[tuple[int, str, str], ...]  # (bit, name, why)
    unjudged: tuple[RegKey, ...]  # leaves QEMU leaves to the module


def _entry(entries: Sequence[CpuidEntry], leaf: int, index: int) -> CpuidEntry | None:
    return next((e for e in entries if e.function == leaf and e.index == index), None)


def _configurable(facts: Facts, key: RegKey, b: BitInfo) -> tuple[Cause, str]:
    """Why a bit of a configurable row is not reported."""
    leaf, sub, reg = key
    on = 1 << b.bit
    r = REGISTERS.index(reg)
    native = None if facts.host is None else facts.host.native_regs(leaf, sub)[r] & on
    hidden = facts.policy is not None and facts.policy.hides(leaf, sub or 0, reg) & on
    pname = facts.policy.name if facts.policy else ""
    if facts.module is not None:
        row = row_of(facts.module, leaf, sub)
        if row is None or not row.module_allows()[r] & on:
            return Cause.MODULE, f"module {facts.module.name} does not let a VMM configure it"
        if row.allow_direct[r] & ~row.config_direct[r] & on and native == 0:
            return Cause.HOST, ("the module allows it only where the CPU has it, and this "
                                "CPU lacks it (KVM emulates it for ordinary VMs)")
        if hidden:
            return Cause.KVM, f"the kernel ({pname}) hides it, though the module would take it"
        return Cause.UNEXPLAINED, ("module, host and policy allow it, yet the kernel does "
                                   "not report it")
    if hidden:
        return Cause.KVM, f"the kernel ({pname}) hides it"
    if native == 0:
        return Cause.HOST, "the CPU lacks it (KVM emulates it for ordinary VMs)"
    return Cause.MODULE, ("not reported, and not a bit the kernel's policy hides: the module "
                          "does not list it as configurable (--module confirms)")


def _judge(caps: Capabilities, facts: Facts, key: RegKey, b: BitInfo,
           row: CpuidEntry | None) -> tuple[Cause, str] | None:
    """None when a TD can have the bit, else why not."""
    t = qemu.tdx_table()
    on = 1 << b.bit
    if row is not None and row.reg(key[2]) & on:
        return None
    if t.fixed1.get(key, 0) & on or t.supported.get(key, (0, ""))[0] & on:
        return None
    attr = t.attributes.get((key, b.bit))
    if attr is not None:
        if caps.supported_attrs >> attr & 1:
            return None
        return Cause.ATTRIBUTE, (f"the module sets it from TD attribute "
                                 f"{catalog.attribute_name(attr)}, which KVM does not offer")
    xfam = t.xfam.get((key, b.bit))
    if xfam is not None:
        if caps.supported_xfam >> xfam & 1:
            return None
        return Cause.XFAM, (f"it needs XFAM bit {xfam} ({catalog.xfam_name(xfam)}), which KVM "
                            "does not offer on this module and host")
    if key in t.supported:
        return Cause.QEMU, t.supported[key][1]
    if row is None:
        return Cause.MODULE, (f"the module makes no configurable row of CPUID 0x{key[0]:x}: "
                              "a TD gets only the bits every module sets there")
    return _configurable(facts, key, b)


def check(caps: Capabilities, wanted: Sequence[CpuidEntry], facts: Facts,
          backend: str = "") -> HostCheck:
    """The comparison itself, on capabilities and supported CPUID already read."""
    t = qemu.tdx_table()
    asked = available = 0
    missing: list[Missing] = []
    unjudged: list[RegKey] = []
    for key in qemu.feature_words():
        leaf, sub, reg = key
        names = qemu.named_bits(key)
        want = _entry(wanted, leaf, sub or 0)
        if not names or want is None or is_value_register(leaf, sub, reg):
            continue
        value = want.reg(reg) & sum(1 << b for b in names)
        row = _entry(caps.entries, leaf, sub or 0)
        if not value or (row is None and key not in t.leaves):
            if value:
                unjudged.append(key)
            continue
        for bit in bits_of(value):
            asked += 1
            b = bit_info(leaf, sub, reg, bit)
            verdict = _judge(caps, facts, key, b, row)
            if verdict is None:
                available += 1
            else:
                missing.append(Missing(b, *verdict))
    return HostCheck(backend=backend, module=facts.module.name if facts.module else None,
                     policy=facts.policy.name if facts.policy else None,
                     policy_reason=facts.policy_reason,
                     host=facts.host.name if facts.host else None,
                     supported_attrs=caps.supported_attrs, supported_xfam=caps.supported_xfam,
                     wanted=asked, available=available, missing=tuple(missing),
                     xfam_missing=_xfam_missing(caps, facts), unjudged=tuple(unjudged))


def _xfam_missing(caps: Capabilities, facts: Facts) -> tuple[tuple[int, str, str], ...]:
    """Named XSAVE state components the CPU has that KVM does not offer a TD."""
    if facts.host is None:
        return ()
    out: list[tuple[int, str, str]] = []
    for bit in bits_of(facts.host.xfam_supported & ~caps.supported_xfam, 64):
        name = catalog.xfam_name(bit)
        if name.startswith("bit"):
            continue
        if facts.module is not None and not facts.module.xfam_fixed0 >> bit & 1:
            why = f"module {facts.module.name} does not allow it (XFAM_FIXED0)"
        else:
            why = "KVM does not offer it"
        out.append((bit, name, why))
    return tuple(out)


def read(backend: Backend) -> tuple[Capabilities, tuple[CpuidEntry, ...]]:
    """KVM_TDX_CAPABILITIES and KVM_GET_SUPPORTED_CPUID through the backend, every fd closed.

    Raises KvmError(skip=True) where the backend offers no TDX (the reason in one line).
    """
    with Kvm(backend.seam, backend.path) as kvm:
        with kvm.create_td() as td:
            caps = td.capabilities()
        return caps, kvm.supported_cpuid()


def facts_of(backend: Backend, caps: Capabilities, *, module: ModuleProfile | None,
             policy: str | None, host: Host | None, allowlist: Allowlist | None) -> Facts:
    """Module, policy and host to judge by: a simulated backend's own; else what was given,
    with `--policy auto` chosen from the capabilities as verify chooses it."""
    sim = backend.simulation
    the_module = module if module is not None else (sim.module if sim else None)
    the_host = sim.host if sim is not None else host
    fallback = sim.policy if sim is not None else None
    chosen: Policy | None
    if fallback is not None and policy in (None, "auto"):
        chosen, why = fallback, "the simulated host's"
    else:
        chosen, why = choose_policy(policy, allowlist, the_module, the_host, caps,
                                    os.uname().release, fallback=fallback)
    return Facts(the_module, chosen, why, the_host)


def auto_policy(backend: Backend, *, module: ModuleProfile | None, host: Host | None,
                allowlist: Allowlist | None) -> Policy | None:
    """`--policy auto` for a backend that brings no policy of its own: chosen from its
    capabilities, as the host check (and verify) chooses it."""
    caps, _ = read(backend)
    return facts_of(backend, caps, module=module, policy="auto", host=host,
                    allowlist=allowlist).policy


def run(backend: Backend, *, module: ModuleProfile | None = None, policy: str | None = "auto",
        host: Host | None = None, allowlist: Allowlist | None = None) -> HostCheck:
    """Read the backend and compare.  A simulated backend brings its own module, host and
    policy.  Raises KvmError(skip=True) where the backend offers no TDX."""
    caps, wanted = read(backend)
    facts = facts_of(backend, caps, module=module, policy=policy, host=host, allowlist=allowlist)
    return check(caps, wanted, facts, backend.label)
