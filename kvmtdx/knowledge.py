"""What a run knows about the kernel under test, and where each fact came from.

`verify` and `probe` judge a kernel against what is known of it: the TDX
module profile, the host's native CPUID and the kernel policy.  Both resolve
that knowledge here, in two steps, so the same command line means the same
thing to both:

1. `given` — before the kernel is asked anything: the module (--module, else
   the simulated host's), the host (the simulated host's, else --host), the
   requested policy (a name, or "auto") and the allowlist.
2. `complete` — once KVM_TDX_CAPABILITIES has been read: a module profile the
   capabilities contradict set aside (kvmtdx.model.fit), `--policy auto` chosen
   from the capabilities (`choose_policy`, with its reason), and a host inferred
   from them when none was given (`infer_host`).

Nothing here talks to a kernel; `given` reads only the files it is named.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, replace
from typing import Protocol

from kvmtdx.errors import DataError
from kvmtdx.model import mirror
from kvmtdx.model.fit import profile_mismatch
from kvmtdx.model.policy import POLICY_NAMES, Allowlist, Policy, get_policy, load_allowlist
from kvmtdx.model.profiles import MAX_HOST, Host, ModuleProfile, Regs, load_profile
from kvmtdx.model.rules import is_value_register
from kvmtdx.structs import REGISTERS, Capabilities

NO_MODULE = "none: checks that need exact predictions skip"
INFERRED_HOST = "inferred from the reported capabilities"
SIMULATED_HOST = "the simulated host's"


@dataclass(frozen=True, slots=True)
class Given:
    """What a run knows before it reads the kernel's capabilities.

    `policy` is a policy name, "auto" (chosen from the capabilities), or None:
    judge without a policy and do not guess one.  `fallback` is the simulated
    host's policy, which "auto" takes only when no prediction matches.
    """

    module: ModuleProfile | None = None
    module_source: str = NO_MODULE
    host: Host | None = None
    host_source: str = "none"
    policy: str | None = "auto"
    allowlist: Allowlist | None = None
    allowlist_given: str | None = None  # the --allowlist path, for provenance
    fallback: Policy | None = None


@dataclass(frozen=True, slots=True)
class Knowledge:
    """What the run knows about the kernel under test, and where each fact came from."""

    module: ModuleProfile | None
    module_source: str
    host: Host | None
    host_source: str
    host_exact: bool  # a real --host file or the simulated host, not inferred
    policy: Policy | None
    policy_reason: str
    allowlist_source: str
    # Why the module profile given cannot be this kernel's module (kvmtdx.model.fit); the
    # run then knows no module, and `module_source` says which profile was set aside.
    module_mismatch: str | None = None

    @property
    def exact(self) -> bool:
        return self.module is not None and self.host is not None and self.policy is not None


class Simulated(Protocol):
    """What a simulated host is built from (session.Simulation is one): the facts it brings."""

    @property
    def module(self) -> ModuleProfile: ...

    @property
    def host(self) -> Host: ...

    @property
    def policy(self) -> Policy | None: ...


def given(simulated: Simulated | None = None, *, module: str | None = None,
          host: str | None = None, policy: str | None = "auto",
          allowlist: str | None = None) -> Given:
    """What `--module`, `--host`, `--policy` and `--allowlist` say, with what a simulated
    host brings (`simulated`; None for a real device or a plug-in).

    A simulated host brings its own module, host and policy: --module overrides
    its module (to judge it against another profile), never its host, which is
    what the simulation runs on.  A real device or a plug-in knows nothing of
    itself.
    """
    from kvmtdx.native import host_by_name  # reads this machine only for --host native

    profile = load_profile(module) if module else (simulated.module if simulated else None)
    if module and profile is not None:
        msrc = f"--module {module} ({profile.source})"
    elif profile is not None:
        msrc = f"the simulated host's module {profile.name}"
    else:
        msrc = NO_MODULE
    the_host: Host | None
    if simulated is not None:
        the_host, hsrc = simulated.host, SIMULATED_HOST
    elif host:
        the_host, hsrc = host_by_name(host), f"--host {host}"
    else:
        the_host, hsrc = None, "none"
    return Given(module=profile, module_source=msrc, host=the_host, host_source=hsrc,
                 policy=policy, allowlist=load_allowlist(allowlist) if allowlist else None,
                 allowlist_given=allowlist,
                 fallback=simulated.policy if simulated is not None else None)


def complete(known: Given, caps: Capabilities, release: str | None = None) -> Knowledge:
    """`known` with the policy chosen and the host inferred, now that `caps` is read.

    `release` is the kernel release "auto" may fall back on (default: this one).
    """
    rel = release if release is not None else os.uname().release
    mismatch = profile_mismatch(known.module, caps) if known.module is not None else []
    if mismatch:
        # Every prediction from it would be wrong, and each check holding the kernel to one
        # would blame the kernel: judge as if no profile were given, and say why.
        known = replace(known, module=None,
                        module_source=f"{known.module_source}: does not match this kernel "
                                      f"({mismatch[0]}); judged without a module profile")
    chosen, reason = choose_policy(known.policy, known.allowlist, known.module, known.host,
                                   caps, rel, fallback=known.fallback)
    host, hsrc, exact = known.host, known.host_source, known.host is not None
    if host is None and known.module is not None and chosen is not None:
        host, hsrc, exact = infer_host(known.module, caps, chosen), INFERRED_HOST, False
    if chosen is None or chosen.allowlist is None:
        asrc = "none (the policy has no allowlist)" if chosen is not None else "unknown"
    else:
        asrc = (f"--allowlist {known.allowlist_given}" if known.allowlist_given
                else "bundled") + f": {chosen.allowlist.name} ({chosen.allowlist.provenance})"
    return Knowledge(known.module, known.module_source, host, hsrc, exact, chosen, reason, asrc,
                     "; ".join(mismatch) or None)


# ---------------------------------------------------------------------------
# The host, inferred.


def infer_host(module: ModuleProfile, caps: Capabilities, policy: Policy) -> Host:
    """The host a real run predicts against when no --host is given.

    It is the max host (valid values wherever the module reads values) with the feature
    registers of the module's rows read off the report: a reported allow_direct bit
    proves the CPU has it; a bit the policy hides is assumed present (the public TDX
    hosts have HLE, RTM and WAITPKG).  XFAM is what KVM reported.
    """
    native: dict[tuple[int, int | None], Regs] = dict(MAX_HOST.native)
    for row, e in zip(module.rows, caps.entries, strict=False):
        regs = list(MAX_HOST.cpuid(row.leaf, row.subleaf))
        for i, r in enumerate(REGISTERS):
            if is_value_register(row.leaf, row.subleaf, r):
                continue
            hidden = row.allow_direct[i] & policy.hides(row.leaf, row.kvm_index, r)
            regs[i] = e.reg(r) | hidden
        a, b, c, d = regs
        native[(row.leaf, row.subleaf)] = (a, b, c, d)
    return Host(name="inferred from KVM_TDX_CAPABILITIES", native=native,
                kvm_xfam=caps.supported_xfam, ept_5level=False, tsx_ctrl=True)


def _missing_features(module: ModuleProfile, caps: Capabilities, policy: Policy) -> int:
    """How many allow_direct bits the CPU would lack if `policy` produced `caps`."""
    host = infer_host(module, caps, policy)
    n = 0
    for row in module.rows:
        native = host.native_regs(row.leaf, row.subleaf)
        n += sum(bin(ad & ~nat & ~cd).count("1") for ad, nat, cd in
                 zip(row.allow_direct, native, row.config_direct, strict=True))
    return n


# ---------------------------------------------------------------------------
# The policy, chosen.


def _policy_by_release(release: str) -> str | None:
    m = re.match(r"(\d+)\.(\d+)", release)
    if not m:
        return None
    major, minor = int(m.group(1)), int(m.group(2))
    if (major, minor) == (6, 16):
        return "upstream-6.16"
    if (major == 6 and minor >= 19) or major == 7:
        return "upstream"
    return None


def caps_equal(a: Capabilities, b: Capabilities, *, entry_flags: bool) -> bool:
    """Equal capabilities; without `entry_flags`, entry flags and padding (which Linux
    6.16 leaves undefined) are not compared."""
    if not entry_flags:
        a = replace(a, entries=tuple(replace(e, flags=0, padding=(0, 0, 0)) for e in a.entries))
        b = replace(b, entries=tuple(replace(e, flags=0, padding=(0, 0, 0)) for e in b.entries))
    return a == b


def choose_policy(requested: str | None, allowlist: Allowlist | None,
                  module: ModuleProfile | None, host: Host | None, caps: Capabilities,
                  release: str, fallback: Policy | None = None) -> tuple[Policy | None, str]:
    """The policy to judge by, and why (`--policy auto` picks; a name is given; None: none).

    Raises DataError when "auto" finds several policies that explain the capabilities
    equally well: any pick would be a guess, and a wrong guess fails a correct kernel.
    """
    if requested is None:
        return None, "none given: judged without a policy"
    if requested != "auto":
        return get_policy(requested, allowlist), f"--policy {requested} (given)"
    if module is not None:
        matches = _matching(module, host, caps, allowlist)
        if matches:
            return _one_of(matches, module, host, caps, allowlist)
        why = "auto: no policy's predicted capabilities match the kernel's"
    else:
        why = "auto: no module profile to compare predictions with"
    if caps.user_tdvmcallinfo_1_r11 == 0x3:
        return (get_policy("upstream-6.16", allowlist),
                f"{why}; upstream-6.16: user_tdvmcallinfo_1_r11 = 3, as only Linux 6.16 reports")
    if fallback is not None:
        return fallback, f"{why}; {fallback.name}, the simulated host's policy"
    by_release = _policy_by_release(release)
    if by_release is not None:
        return get_policy(by_release, allowlist), f"{why}; {by_release} by kernel release {release}"
    return None, (f"{why}, and kernel release {release} is not a known TDX kernel; "
                  "checks that need a policy skip (give --policy)")


def _matching(module: ModuleProfile, host: Host | None, caps: Capabilities,
              allowlist: Allowlist | None) -> list[str]:
    """The policies whose predicted capabilities are the kernel's (with the host inferred
    for each when none is known)."""
    matches: list[str] = []
    for name in POLICY_NAMES:
        p = get_policy(name, allowlist)
        h = host if host is not None else infer_host(module, caps, p)
        pred = mirror.predict_capabilities(module, h, p, len(module.rows))
        if pred.caps is not None and caps_equal(
                pred.caps, caps, entry_flags=not p.caps_echoes_caller):
            matches.append(name)
    return matches


def _one_of(matches: list[str], module: ModuleProfile, host: Host | None, caps: Capabilities,
            allowlist: Allowlist | None) -> tuple[Policy, str]:
    if len(matches) == 1:
        return (get_policy(matches[0], allowlist),
                f"auto: {matches[0]}, the only policy whose predicted capabilities match "
                f"the kernel's (module {module.name})")
    if host is None:
        # With the host inferred, every policy can explain the report by a CPU that lacks
        # what the policy would not hide; the likeliest reading is the one whose CPU lacks
        # the fewest features the module allows.
        missing = {n: _missing_features(module, caps, get_policy(n, allowlist))
                   for n in matches}
        fewest = min(missing.values())
        best = [n for n in matches if missing[n] == fewest]
        if len(best) == 1:
            return (get_policy(best[0], allowlist),
                    f"auto: {best[0]}: of the policies whose predictions match "
                    f"({', '.join(matches)}), it needs the fewest features missing from "
                    f"the CPU ({fewest}) to explain the kernel's capabilities")
        matches = best
    where = f"host {host.name}" if host is not None else "the host inferred from them"
    raise DataError(
        f"--policy auto cannot tell {' from '.join(matches)}: each predicts exactly the "
        f"kernel's capabilities for module {module.name} on {where} (the host lacks every bit "
        f"they treat differently); give --policy {' or --policy '.join(matches)}")
