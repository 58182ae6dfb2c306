"""What verify and probe know of the kernel: resolved once, the same for both commands."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from helpers import WARN_CHECK

from kvmtdx import checks, cli, probe
from kvmtdx.knowledge import INFERRED_HOST, SIMULATED_HOST, Given, complete, given
from kvmtdx.model import mirror
from kvmtdx.model.policy import POLICY_NAMES, get_policy
from kvmtdx.model.profiles import MAX_HOST, load_profile
from kvmtdx.session import Backend, simulated_backend
from kvmtdx.sim import SimulatedHost
from kvmtdx.structs import Capabilities


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
    assert not p.failures and not p.mismatches


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
