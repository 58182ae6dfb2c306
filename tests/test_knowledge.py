"""What verify and probe know of the kernel: resolved once, the same for both commands."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
from helpers import WARN_CHECK

from kvmtdx import checks, cli, probe
from kvmtdx.errors import DataError
from kvmtdx.knowledge import INFERRED_HOST, SIMULATED_HOST, Given, complete, given
from kvmtdx.model import mirror
from kvmtdx.model.policy import POLICY_NAMES, get_policy
from kvmtdx.model.profiles import MAX_HOST, Host, ModuleProfile, load_profile
from kvmtdx.model.rules import is_value_register
from kvmtdx.probe import TrapResult
from kvmtdx.session import Backend, simulated_backend
from kvmtdx.sim import SimulatedHost
from kvmtdx.structs import REGISTERS, Capabilities


def plugin(policy: str) -> Backend:
    """The simulated host behind --backend: to the tools, a device that says nothing of itself."""
    return Backend(SimulatedHost(load_profile("2.0"), MAX_HOST, get_policy(policy)),
                   label="plug-in")


def plugin_rfc_v2() -> SimulatedHost:
    seam = plugin("rfc-v2").seam
    assert isinstance(seam, SimulatedHost)
    return seam


@pytest.mark.parametrize("policy", POLICY_NAMES)
def test_probe_and_verify_resolve_the_same_policy_and_host(policy: str) -> None:
    # --module 2.0 --policy auto on a real-like device: the policy is chosen from the
    # capabilities and the host inferred from them, by both commands alike.
    v = checks.run_verify(plugin(policy).seam, backend_label="plug-in",
                          given=given(module="2.0", policy="auto"))
    p = probe.probe(plugin(policy).seam, probe.ProbeOptions(), label="plug-in",
                    given=given(module="2.0", policy="auto"))
    assert v.knowledge is not None and p.knowledge is not None
    assert v.knowledge == p.knowledge
    k = p.knowledge
    assert k.policy is not None and k.policy.name == policy
    assert k.host is not None and k.host_source == INFERRED_HOST and not k.host_exact
    assert p.policy == policy and p.module == "2.0" and p.mode == "targeted"
    assert not p.mismatches
    # Only the lookup traps fail, and only where the denylist judges the entry, not the row.
    assert all(isinstance(f, TrapResult) for f in p.failures)
    assert bool(p.failures) == (k.policy.denylist is not None)


def test_the_commands_agree_end_to_end(capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["--backend", "test_knowledge:plugin_rfc_v2", "--module", "2.0", "--policy", "auto",
            "--format", "json"]
    assert cli.main(["verify", *argv]) == 1
    verified = json.loads(capsys.readouterr().out)
    assert {c["id"] for c in verified["checks"] if c["status"] == "fail"} == {WARN_CHECK}
    assert cli.main(["probe", *argv]) == 0
    probed = json.loads(capsys.readouterr().out)
    assert verified["policy"] == probed["policy"] == "rfc-v2"
    assert probed["module"] == "2.0" and probed["mismatches"] == 0


def test_a_simulated_backend_brings_its_module_host_and_policy() -> None:
    b = simulated_backend(load_profile("1.5.01"), MAX_HOST, get_policy("rfc-v2"))
    g = given(b.simulation, host="max")
    assert g.module is not None and g.module.name == "1.5.01"
    assert g.host is MAX_HOST and g.host_source == SIMULATED_HOST
    assert g.fallback is not None and g.fallback.name == "rfc-v2" and g.policy == "auto"
    # --module judges the simulation against another profile; its host stays the simulated one
    other = given(b.simulation, module="2.0")
    assert other.module is not None and other.module.name == "2.0"
    assert other.module_source.startswith("--module 2.0") and other.host is MAX_HOST


def test_a_real_like_device_knows_only_what_it_is_told() -> None:
    g = given(plugin("upstream").simulation)
    assert (g.module, g.host, g.fallback, g.policy) == (None, None, None, "auto")
    told = given(None, host="max", policy="upstream")
    assert told.host is not None and told.host_source == "--host max"


def test_no_policy_means_judged_without_one() -> None:
    m = load_profile("2.0")
    caps = _caps("upstream")
    k = complete(Given(module=m, policy=None), caps)
    assert k.policy is None and "without a policy" in k.policy_reason
    assert k.host is None and not k.exact  # nothing to infer a host by
    k = complete(Given(module=m, policy="upstream"), caps)
    assert k.policy is not None and k.policy_reason == "--policy upstream (given)"
    assert k.host_source == INFERRED_HOST and k.exact


def _caps(policy: str) -> Capabilities:
    m = load_profile("2.0")
    pred = mirror.predict_capabilities(m, MAX_HOST, get_policy(policy), len(m.rows))
    assert pred.caps is not None
    return pred.caps


def test_knowledge_takes_facts_and_never_loads_the_session_layer() -> None:
    # given() is told what a simulated host brings; it does not reach for a Backend.
    code = "import sys, kvmtdx.knowledge; print('kvmtdx.session' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout
    assert out.strip() == "False"


# ---------------------------------------------------------------------------
# --policy auto stops where the evidence cannot tell policies apart.


def test_a_host_file_without_the_leaves_a_module_needs_stops_before_any_guess(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A host file without the leaves the policies treat differently would make upstream and
    rfc-v2 predict the same capabilities; no TDX module initialises on such a CPU, so the
    run stops at the host, in one line, before --policy auto could guess (told the policy,
    it stops there too).  complete() itself stops where predictions tie: the test below."""
    empty = tmp_path / "empty.json"
    empty.write_text("{}")
    for argv in (["verify"], ["probe"], ["verify", "--policy", "rfc-v2"]):
        rc = cli.main([*argv, "--simulate", "2.0:rfc-v2", "--host", str(empty)])
        out, err = capsys.readouterr()
        assert (rc, out) == (2, ""), err
        assert err.count("\n") == 1 and f"--host {empty}: TDX module 2.0.08 would not " \
            "initialise" in err


def _without_what_tells_the_policies_apart(m: ModuleProfile) -> Host:
    """The max host less every configurable bit rfc-v2 hides and upstream reports.

    The module could not initialise on it (2.0 needs HTT and an LBR depth natively), but
    KVM_TDX_CAPABILITIES reads the same under both policies, which is all auto sees.
    """
    up, rfc = get_policy("upstream"), get_policy("rfc-v2")
    native = dict(MAX_HOST.native)
    for row in m.rows:
        regs = list(MAX_HOST.cpuid(row.leaf, row.subleaf))
        for i, r in enumerate(REGISTERS):
            if not is_value_register(row.leaf, row.subleaf, r):
                idx = row.kvm_index
                tells = rfc.hides(row.leaf, idx, r) & ~up.hides(row.leaf, idx, r)
                regs[i] &= ~(row.allow_direct[i] & tells)
        a, b, c, d = regs
        native[(row.leaf, row.subleaf)] = (a, b, c, d)
    return replace(MAX_HOST, name="bare", native=native)


def test_auto_never_picks_among_equal_matches_by_release() -> None:
    m = load_profile("2.0")
    bare = _without_what_tells_the_policies_apart(m)
    pred = mirror.predict_capabilities(m, bare, get_policy("rfc-v2"), len(m.rows))
    assert pred.caps is not None
    with pytest.raises(DataError, match="cannot tell"):
        complete(Given(module=m, host=bare, host_source="--host bare"), pred.caps, "7.3.0")
