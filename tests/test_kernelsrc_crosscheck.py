"""The kernel's own code against the simulated host, on random requests.

The same request bytes go to the kernel-source backend (Linux 7.3, and 7.3
with the reconstructed rfc-v2 series) and to the simulated host of the
matching policy, for every bundled module and the crosscheck's hosts;
INIT_VM must agree on outcome kind, errno and hw_error, CAPABILITIES on the
caller's whole buffer.  A disagreement is a finding about one of the two.
The requests are the simulated host's crosscheck's (find() traps, lying
nent, bits flipped, malformed headers).  Upstream 6.16 has no tree here.

The same draws find a bug a user puts in the tree: fuzzing is a verdict too.

Finding (about the simulated host and the mirror): on a host that lacks an
XFAM bit the module fixes to 1 ("no-x87"), both answer KVM_TDX_CAPABILITIES
with -EIO, but Linux 7.3's bring-up (__tdx_hardware_setup) refuses such a
host outright: kvm_intel does not load, so there is no /dev/kvm at all.
The random comparison leaves that host to the test that pins the finding.  Likewise a
module without topology enumeration (1.5.01): Linux 7.3 does not enable TDX on it at all,
while the simulated host of any policy answers as if it had.
"""

from __future__ import annotations

import difflib
import errno
import functools
import os
from pathlib import Path

import pytest
import test_sim_crosscheck as sim_cc
from hypothesis import HealthCheck, find, given, settings
from kernelsrc_support import backend, linux_tree

from kvmtdx.device import Kvm
from kvmtdx.kernelsrc import KernelSourceHost
from kvmtdx.kernelsrc.extract import TDX_C
from kvmtdx.model import mirror
from kvmtdx.model.profiles import BUNDLED_MODULES, load_profile
from kvmtdx.outcome import Outcome
from kvmtdx.sim import SimulatedHost

PATCHES = {"upstream": (), "rfc-v2": ("rfc-v2",)}
KEY_IDS = 4
NO_KVM_HOST = "no-x87"
NO_TOPOLOGY_MODULES = frozenset(m for m in BUNDLED_MODULES
                                if not load_profile(m).enumerates_topology)
# A few hundred requests per module and policy (three per example, modules drawn).
SETTINGS = settings(max_examples=300, deadline=None, database=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


@functools.cache
def kernel(module: str, host: str, policy: str, patch: str | None = None) -> KernelSourceHost:
    patches = (*PATCHES[policy], *([patch] if patch else []))
    return backend(linux_tree(), patches, module=module, host=sim_cc.HOSTS[host],
                   key_ids=KEY_IDS).seam


def answer(seam: KernelSourceHost | SimulatedHost, case: sim_cc.Case) -> Outcome:
    module, host, policy, req, data, second = case
    with Kvm(seam) as kvm, kvm.create_td() as td:
        if second:
            first = td.init_vm(sim_cc.base_request(module, host, policy).init_vm)
            assert first.kind.value == "ACCEPTED", first
        return td.init_vm(data, flags=req.flags, hw_error=req.hw_error)


def disagreement(case: sim_cc.Case, patch: str | None = None) -> str | None:
    module, host, policy, *_ = case
    _, _, sim = sim_cc.combo(module, host, policy)
    ks = kernel(module, host, policy, patch)
    if ks.bringup_failure is not None:
        assert host == NO_KVM_HOST or module in NO_TOPOLOGY_MODULES, ks.bringup_failure
        return None
    want, got = answer(sim, case), answer(ks, case)
    assert ks.free_key_ids == KEY_IDS and ks.live_allocations == 0 and ks.live_tds == 0
    if got.same_answer(want):
        return None
    return f"{module}/{host}/{policy}: kernel {got.describe()} but sim {want.describe()}"


def check(cases: list[sim_cc.Case]) -> None:
    for case in cases:
        found = disagreement(case)
        assert found is None, found


@SETTINGS
@given(sim_cc.init_vm_cases("upstream"))
def test_init_vm_agrees_with_the_sim_upstream(cases: list[sim_cc.Case]) -> None:
    check(cases)


@SETTINGS
@given(sim_cc.init_vm_cases("rfc-v2"))
def test_init_vm_agrees_with_the_sim_rfc_v2(cases: list[sim_cc.Case]) -> None:
    check(cases)


def check_caps(case: sim_cc.CapsCase) -> None:
    module, host, policy, buffers = case
    m, h, sim = sim_cc.combo(module, host, policy)
    ks = kernel(module, host, policy)
    if ks.bringup_failure is not None:
        assert host == NO_KVM_HOST or module in NO_TOPOLOGY_MODULES, ks.bringup_failure
        return
    for nent, buf, flags, hw_error in buffers:
        answers = []
        for seam in (sim, ks):
            with Kvm(seam) as kvm, kvm.create_td() as td:
                answers.append(td.capabilities_raw(nent, flags=flags, hw_error=hw_error,
                                                   fill=buf))
        want, got = answers
        where = f"{module}/{host}/{policy} nent {nent} flags {flags} hw_error {hw_error}"
        assert (got.errno, got.data, got.cmd.hw_error) == (want.errno, want.data,
                                                           want.cmd.hw_error), where
        if got.errno == 0:
            pred = mirror.predict_capabilities(m, h, sim_cc.policy_named(policy), nent,
                                               caller=buf)
            assert got.data == pred.buffer, where


@settings(max_examples=60, deadline=None, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(sim_cc.caps_cases("upstream"))
def test_capabilities_agree_with_the_sim_upstream(case: sim_cc.CapsCase) -> None:
    check_caps(case)


@settings(max_examples=60, deadline=None, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(sim_cc.caps_cases("rfc-v2"))
def test_capabilities_agree_with_the_sim_rfc_v2(case: sim_cc.CapsCase) -> None:
    check_caps(case)


def test_fuzzing_finds_a_dropped_count_check(tmp_path: Path) -> None:
    """The random requests against a tree whose INIT_VM lost `copy_cnt != nent`."""
    tree = linux_tree()
    before = (tree / TDX_C).read_text()
    after = before.replace("\tif (copy_cnt != cpuid->nent)\n\t\treturn -EINVAL;\n", "")
    assert after != before
    patch = tmp_path / "no-count-check.patch"
    patch.write_text("".join(difflib.unified_diff(
        before.splitlines(keepends=True), after.splitlines(keepends=True),
        f"a/{TDX_C}", f"b/{TDX_C}")))
    case = find(sim_cc.init_vm_cases("upstream").map(lambda cases: cases[0]),
                lambda c: disagreement(c, str(patch)) is not None,
                settings=settings(max_examples=2000, database=None, derandomize=True,
                                  suppress_health_check=[HealthCheck.too_slow,
                                                         HealthCheck.data_too_large]))
    found = disagreement(case, str(patch))
    # KVM should have refused the request (the count); the buggy kernel let it through.
    assert found is not None and found.endswith("but sim KVM_REJECTED -EINVAL"), found


def test_linux_7_3_does_not_bring_tdx_up_where_the_sim_answers_eio() -> None:
    """The finding the module docstring names, pinned: the sim answers CAPABILITIES -EIO on
    a host lacking an XFAM bit the module fixes to 1; the kernel never offers /dev/kvm."""
    ks = kernel("2.0", NO_KVM_HOST, "upstream")
    assert ks.bringup == errno.EINVAL
    assert ks.bringup_failure is not None and "fails to load kvm_intel" in ks.bringup_failure
    with pytest.raises(OSError) as e:
        ks.open("/dev/kvm", os.O_RDWR)
    assert e.value.errno == errno.ENOENT
    _, _, sim = sim_cc.combo("2.0", NO_KVM_HOST, "upstream")
    with Kvm(sim) as kvm, kvm.create_td() as td:
        assert td.capabilities_raw(28).errno == errno.EIO
    for host in sim_cc.HOSTS:
        if host != NO_KVM_HOST:
            assert kernel("2.0", host, "upstream").bringup == 0
