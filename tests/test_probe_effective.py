"""probe --effective: each accepted bit 'accepted, present' or 'accepted, cleared' as the
TD's CPUID (KVM_TDX_GET_CPUID) shows it, on the simulated host."""

from __future__ import annotations

import json

import pytest
from helpers import host_without, run_cli

from kvmtdx.knowledge import Given
from kvmtdx.model.policy import get_policy
from kvmtdx.model.profiles import MAX_HOST, Host, load_profile
from kvmtdx.probe import BitClass, ProbeOptions, ProbeResult, probe
from kvmtdx.sim import SimulatedHost


def run(policy: str, host: Host = MAX_HOST, mutant: str | None = None,
        effective: bool = True) -> ProbeResult:
    m = load_profile("2.0")
    sim = SimulatedHost(m, host, get_policy(policy), mutant=mutant)
    return probe(sim, ProbeOptions(effective=effective), label="sim",
                 given=Given(module=m, host=host, policy=policy))


def test_every_accepted_bit_is_read_back_and_the_model_agrees() -> None:
    r = run("upstream")
    accepted = [b for b in r.bits if b.cls is BitClass.REPORTED_ACCEPTED]
    assert accepted and all(b.effective in ("present", "cleared") for b in accepted)
    assert all(b.effective is None for b in r.bits if b.cls is not BitClass.REPORTED_ACCEPTED)
    # What the TD lacks is what the module model says it clears (0x23.0's sub-leaf bits:
    # no ATTRIBUTES.PERFMON), and nothing else.
    cleared = {b.key for b in accepted if b.effective == "cleared"}
    assert cleared == {b.key for b in accepted if b.cleared is not None}
    assert cleared == {(0x23, 0, "eax", n) for n in range(4)}
    assert "accepted, cleared" in next(b for b in accepted if b.key in cleared).label


def test_a_silently_cleared_hidden_bit_never_reaches_the_td() -> None:
    # AVX512F without it natively: no policy reports it, the module drops it unasked.
    host = host_without("no-avx512f", {(7, 0): {"ebx": 1 << 16}})
    r = run("upstream", host=host)
    avx512f = next(b for b in r.bits if b.key == (7, 0, "ebx", 16))
    assert avx512f.cls is BitClass.HIDDEN_ACCEPTED and avx512f.effective == "cleared"


def test_a_leaking_kernel_shows_the_hidden_bit_present() -> None:
    r = run("rfc-v2", mutant="allowlist_skips_7_0_edx")
    pconfig = next(b for b in r.bits if b.key == (7, 0, "edx", 18))
    assert pconfig.cls is BitClass.HIDDEN_ACCEPTED and pconfig.effective == "present"


def test_without_the_option_nothing_is_read_back() -> None:
    r = run("upstream", effective=False)
    assert all(b.effective is None for b in r.bits)


def test_the_cli_reports_it(capsys: pytest.CaptureFixture[str]) -> None:
    rc, out, _ = run_cli(capsys, "probe", "--simulate", "2.0:upstream", "--effective",
                         "--format", "json")
    bits = json.loads(out)["bits"]
    assert {b["effective"] for b in bits if b["class"] == "REPORTED_ACCEPTED"} == {
        "present", "cleared"}
    assert rc == 1  # the lookup traps: upstream's bypass
    rc, out, _ = run_cli(capsys, "probe", "--simulate", "2.0:upstream", "--effective")
    assert "in the TD (--effective): 85 accepted, present, 4 accepted, cleared" in out
