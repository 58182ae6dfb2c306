"""Replaying a request through the model: every fault, who refuses it and why, QEMU's name and
a fix; the fixed request is what the simulated host accepts too."""

from __future__ import annotations

import ast
import errno
import sys
from dataclasses import replace
from pathlib import Path

import pytest
from helpers import host_without

from kvmtdx.explain.diagnose import Diagnosis, diagnose
from kvmtdx.explain.facts import bit_facts, bit_info, qemu_facts
from kvmtdx.explain.reasons import CHECK_REASONS, Category, reason_of
from kvmtdx.model import mirror, mirror_kvm
from kvmtdx.model.mirror_module import MODULE_CHECKS
from kvmtdx.model.policy import Policy, get_policy
from kvmtdx.model.profiles import MAX_HOST, Host, load_profile
from kvmtdx.model.requests import Request
from kvmtdx.model.rules import MODULE_COUPLINGS, gpaw_entry
from kvmtdx.outcome import Decider, Kind, Outcome
from kvmtdx.session import init_vm_once, simulated_backend
from kvmtdx.structs import CpuidEntry, InitVm

diag_module = sys.modules["kvmtdx.explain.diagnose"]
MODULE = load_profile("2.0")
UPSTREAM = get_policy("upstream")
RFC = get_policy("rfc-v2")
# A kernel that filters nothing: what the module alone refuses.
OPEN = replace(UPSTREAM, name="open", denylist=None, allowlist=None)


def request(*entries: CpuidEntry, xfam: int = 0x3, attributes: int = 0x10000000) -> Request:
    return Request(init_vm=InitVm(attributes=attributes, xfam=xfam,
                                  entries=(*entries, gpaw_entry(48))))


def leaf7(ebx: int = 0, ecx: int = 0, edx: int = 0) -> CpuidEntry:
    return CpuidEntry(7, 0, 1, ebx=ebx, ecx=ecx, edx=edx)


def accepted_by_the_simulated_host(d: Diagnosis, policy: Policy, host: Host = MAX_HOST) -> bool:
    backend = simulated_backend(MODULE, host, policy)
    return init_vm_once(backend, d.fixed).outcome.kind == Kind.ACCEPTED


def test_readme_request_lists_three_faults_in_order_with_deciders_and_qemu_names() -> None:
    req = request(leaf7(ecx=1 << 5, edx=1 << 23), CpuidEntry(0x14, 0, 1, ebx=1))
    d = diagnose(MODULE, MAX_HOST, UPSTREAM, req)
    assert d.outcome.check == "denylist" and d.final.kind == Kind.ACCEPTED and d.stopped is None
    assert [f.category for f in d.faults] == [Category.HIDDEN_BY_POLICY, Category.UNLISTED_LEAF,
                                              Category.NOT_CONFIGURABLE]
    assert [f.decider for f in d.faults] == [Decider.KVM, Decider.KVM, Decider.MODULE]
    assert [b.qemu for f in d.faults for b in f.bits] == ["waitpkg", "avx512-fp16"]
    assert d.faults[0].fix == "drop +waitpkg"
    assert d.faults[1].entry is not None and d.faults[1].entry.function == 0x14
    fp16 = d.faults[2]
    assert fp16.outcome.hw_error == 0xC000010000000045
    assert fp16.fix.startswith("drop +avx512-fp16; a TD has it with XFAM bits 5-7")
    assert "+avx512f" in fp16.fix
    assert d.replays == 4
    assert accepted_by_the_simulated_host(d, UPSTREAM)


def test_every_faulty_bit_of_a_register_is_listed_not_only_the_first() -> None:
    row = MODULE.rows[MODULE.row_index(7, 0) or 0]
    bad = ~row.module_allows()[3] & 0xFFFFFFFF
    d = diagnose(MODULE, MAX_HOST, OPEN, request(leaf7(edx=bad)))
    listed = [b.bit for f in d.faults for b in f.bits]
    assert sorted(listed) == [b for b in range(32) if bad >> b & 1]
    assert all(f.category == Category.NOT_CONFIGURABLE for f in d.faults)
    assert d.final.kind == Kind.ACCEPTED
    assert d.replays == len(d.faults) + 1


def test_the_allowlist_refuses_what_it_hides_and_says_the_module_would_take_it() -> None:
    d = diagnose(MODULE, MAX_HOST, RFC, request(CpuidEntry(1, 0, 0, ecx=1 << 3)))
    [f] = d.faults
    assert (f.category, f.check, f.decider) == (Category.HIDDEN_BY_POLICY, "allowlist",
                                                 Decider.KVM)
    assert f.bits[0].qemu == "monitor"
    assert any("hides it" in x for x in f.facts)
    assert any("allows it where the host has it" in x for x in f.facts)
    assert accepted_by_the_simulated_host(d, RFC)


def test_tsx_coupling_names_both_bits() -> None:
    d = diagnose(MODULE, MAX_HOST, OPEN, request(leaf7(ebx=1 << 4)))
    [f] = d.faults
    assert (f.category, f.check) == (Category.COUPLING, "module_hle_rtm")
    assert [b.qemu for b in f.bits] == ["hle"]
    assert d.final.kind == Kind.ACCEPTED


def test_tsx_without_tsx_ctrl_is_eio_and_both_bits_go() -> None:
    host = replace(MAX_HOST, name="no-tsx-ctrl", tsx_ctrl=False)
    d = diagnose(MODULE, host, OPEN, request(leaf7(ebx=1 << 4 | 1 << 11)))
    [f] = d.faults
    assert f.check == "module_tsx_ctrl" and f.outcome.errno == errno.EIO
    assert [b.qemu for b in f.bits] == ["hle", "rtm"]
    assert "TSX_CTRL" in f.why
    assert accepted_by_the_simulated_host(d, OPEN, host)


def test_an_avx512_feature_without_its_xfam_state_is_accepted_and_named_as_dropped() -> None:
    # The module drops it without refusing (its XFAM gate); the answer names the XFAM bits.
    d = diagnose(MODULE, MAX_HOST, UPSTREAM, request(leaf7(ebx=1 << 16)))
    assert not d.faults and d.final.kind == Kind.ACCEPTED
    [s] = d.silent
    assert s.bit.qemu == "avx512f" and "XFAM lacks bits 5, 6, 7" in s.why


def test_an_attribute_kvm_does_not_support_is_dropped_from_the_request() -> None:
    d = diagnose(MODULE, MAX_HOST, UPSTREAM, request(attributes=0x10000000 | 1 << 30))
    [f] = d.faults
    assert (f.category, f.check, f.attribute_bits) == (Category.ATTRIBUTES,
                                                        "attributes_unsupported", 1 << 30)
    assert d.fixed.init_vm.attributes == 0x10000000 and d.final.kind == Kind.ACCEPTED


def test_a_second_entry_for_a_taken_row_and_a_wrong_nent_are_entry_faults() -> None:
    d = diagnose(MODULE, MAX_HOST, OPEN, request(leaf7(), leaf7()))
    [f] = d.faults
    assert f.facts == ("an earlier entry already took the row of CPUID 0x7 index 0",)
    assert len(d.fixed.init_vm.entries) == 2 and d.final.kind == Kind.ACCEPTED
    wrong = request(leaf7())
    d = diagnose(MODULE, MAX_HOST, UPSTREAM, replace(wrong, init_vm=replace(wrong.init_vm,
                                                                              nent=3)))
    [f] = d.faults
    assert (f.category, f.fix) == (Category.UNLISTED_LEAF, "send the true nent")
    assert f.facts == ("cpuid.nent says 3 but 2 entries follow",)
    assert d.fixed.init_vm.nent is None and d.final.kind == Kind.ACCEPTED


def test_xfam_outside_what_kvm_supports() -> None:
    d = diagnose(MODULE, MAX_HOST, UPSTREAM, request(xfam=0x3 | 1 << 3))
    [f] = d.faults
    assert (f.category, f.check, f.xfam_bits) == (Category.XFAM_RULE, "xfam_unsupported", 1 << 3)
    assert "MPX_BNDREGS" in f.fix
    assert d.fixed.init_vm.xfam == 0x3


def test_xfam_the_module_refuses_is_an_xfam_rule_and_the_bit_is_dropped() -> None:
    # KVM offers AVX-512 state, but the module wants bits 5-7 together.
    d = diagnose(MODULE, MAX_HOST, UPSTREAM, request(xfam=0x7 | 1 << 5))
    [f] = d.faults
    assert (f.category, f.check, f.decider, f.xfam_bits) == (Category.XFAM_RULE, "module_xfam",
                                                              Decider.MODULE, 1 << 5)
    assert f.fix.startswith("drop XFAM bit 5 (AVX512_OPMASK; QEMU: +avx512f)")
    assert d.fixed.init_vm.xfam == 0x7 and d.final.kind == Kind.ACCEPTED


def test_gpaw_52_without_5_level_ept_is_fixed_with_48() -> None:
    host = replace(MAX_HOST, name="no-5-level-ept", ept_5level=False)
    d = diagnose(MODULE, host, UPSTREAM, Request(init_vm=InitVm(
        attributes=0x10000000, xfam=0x3, entries=(gpaw_entry(52),))))
    [f] = d.faults
    assert (f.category, f.check, f.fix) == (Category.GPAW, "gpaw_5level", "use a GPAW of 48")
    assert d.fixed.init_vm.entries[0].eax == 48 << 16 and d.final.kind == Kind.ACCEPTED


def test_gpaw_missing_and_invalid_are_fixed_with_48() -> None:
    no_gpaw = Request(init_vm=InitVm(attributes=0x10000000, xfam=0x3))
    d = diagnose(MODULE, MAX_HOST, UPSTREAM, no_gpaw)
    assert [f.check for f in d.faults] == ["gpaw_missing"] and d.final.kind == Kind.ACCEPTED
    counted = Request(init_vm=InitVm(attributes=0x10000000, xfam=0x3, entries=(leaf7(),), nent=1))
    d = diagnose(MODULE, MAX_HOST, UPSTREAM, counted)
    assert [f.check for f in d.faults] == ["gpaw_missing"] and d.final.kind == Kind.ACCEPTED
    assert d.fixed.init_vm.nent == 2
    d = diagnose(MODULE, MAX_HOST, UPSTREAM, Request(init_vm=InitVm(
        attributes=0x10000000, xfam=0x3, entries=(gpaw_entry(50),))))
    assert [f.category for f in d.faults] == [Category.GPAW] and d.final.kind == Kind.ACCEPTED


def test_family_model_stepping_other_than_the_hosts_is_a_value_rule() -> None:
    d = diagnose(MODULE, MAX_HOST, UPSTREAM, request(CpuidEntry(1, 0, 0, eax=0x50654)))
    [f] = d.faults
    assert f.category == Category.VALUE_RULE and "leaf 1 EAX" in f.fix
    assert d.fixed.init_vm.entries[0].eax == 0


def test_an_unflagged_entry_counted_on_three_rows_gets_the_flag() -> None:
    d = diagnose(MODULE, MAX_HOST, UPSTREAM, request(CpuidEntry(7, 0, 0)))
    [f] = d.faults
    assert f.category == Category.UNLISTED_LEAF and "counted 3 times" in f.facts[0]
    assert d.fixed.init_vm.entries[0].flags == 1 and d.final.kind == Kind.ACCEPTED


def test_structure_faults_are_fixed_and_a_second_init_cannot_be() -> None:
    bad = replace(request(), flags=1, hw_error=5)
    bad = replace(bad, init_vm=replace(bad.init_vm, reserved=(1,) + (0,) * 11, cpuid_padding=1))
    d = diagnose(MODULE, MAX_HOST, UPSTREAM, bad)
    assert [f.check for f in d.faults] == ["cmd_hw_error", "cmd_flags", "reserved_nonzero",
                                           "cpuid_padding"]
    assert d.final.kind == Kind.ACCEPTED


def test_an_unknown_check_stops_the_replay_and_says_so(monkeypatch: pytest.MonkeyPatch) -> None:
    refused = Outcome.classify(errno.EIO, 0, check="module_something_new",
                               decider=Decider.MODULE)
    monkeypatch.setattr(mirror, "predict_init_vm", lambda *a, **k: refused)
    d = diagnose(MODULE, MAX_HOST, UPSTREAM, request())
    [f] = d.faults
    assert f.category == Category.UNKNOWN and "the TDX module refused it" in f.why
    assert d.stopped is not None and d.stopped.startswith("cannot replay past")


def test_reasons_of_checks_without_a_row_come_from_status_or_leaf() -> None:
    xfam = Outcome.classify(errno.EINVAL, 0xC000010000000041, check="module_new_xfam_rule",
                            decider=Decider.MODULE)
    assert reason_of(xfam).category == Category.XFAM_RULE
    topo = Outcome.classify(errno.EIO, 0, check="module_new_topology", decider=Decider.MODULE,
                            leaf=0x1F)
    assert reason_of(topo).category == Category.TOPOLOGY_RULE
    leaf_1f_status = Outcome.classify(errno.EIO, 0xC000090400000000, check="module_new_1f",
                                      decider=Decider.MODULE)
    assert reason_of(leaf_1f_status).category == Category.TOPOLOGY_RULE
    cpuid_config = Outcome.classify(errno.EINVAL, 0xC000010000000045, check="module_new_bit",
                                    decider=Decider.MODULE)
    assert reason_of(cpuid_config).category == Category.NOT_CONFIGURABLE
    assert reason_of(cpuid_config).why == "the TDX module refused it (module_new_bit)"
    assert reason_of(Outcome.classify(errno.EINVAL, 0, check="denylist")) is \
        CHECK_REASONS["denylist"]


def _mirror_check_names() -> set[str]:
    """Every check name the mirror can put in an Outcome (string arguments to its _kvm,
    _module and check= sites, in mirror.py and its KVM half, and the couplings' checks)."""
    trees = [ast.parse(Path(str(m.__file__)).read_text()) for m in (mirror, mirror_kvm)]
    names: set[str] = set()
    for node in (n for tree in trees for n in ast.walk(tree)):
        if not isinstance(node, ast.Call):
            continue
        func = node.func.id if isinstance(node.func, ast.Name) else ""
        args = node.args[1:2] if func in ("_kvm", "_module") else []
        args += [k.value for k in node.keywords if k.arg == "check"]
        names |= {a.value for a in args
                  if isinstance(a, ast.Constant) and isinstance(a.value, str)}
    return names | {c.check for c in MODULE_COUPLINGS} | MODULE_CHECKS


def test_every_check_the_mirror_names_has_a_reason_row() -> None:
    names = _mirror_check_names()
    assert {"denylist", "module_cpuid_config", "gpaw_value"} <= names
    assert names - {"accepted"} <= set(CHECK_REASONS), names - set(CHECK_REASONS)


def test_an_accepted_request_reports_what_the_host_lacks_as_silently_dropped() -> None:
    row = MODULE.rows[MODULE.row_index(7, 0) or 0]
    allow_only = row.allow_direct[2] & ~row.config_direct[2] & ~(1 << 5)  # not WAITPKG
    bit = (allow_only & -allow_only).bit_length() - 1
    host = host_without("lacking", {(7, 0): {"ecx": 1 << bit}})
    d = diagnose(MODULE, host, OPEN, request(leaf7(ecx=1 << bit)))
    assert d.final.kind == Kind.ACCEPTED and not d.faults
    assert [(s.bit.bit, "lacks" in s.why) for s in d.silent] == [(bit, True)]


def test_a_replay_that_runs_out_of_turns_says_so(monkeypatch: pytest.MonkeyPatch) -> None:
    row = MODULE.rows[MODULE.row_index(7, 0) or 0]
    bad = ~row.module_allows()[3] & 0xFFFFFFFF
    monkeypatch.setattr(diag_module, "MAX_REPLAYS", 3)
    d = diagnose(MODULE, MAX_HOST, OPEN, request(leaf7(edx=bad)))
    assert len(d.faults) == 2 and d.final.kind != Kind.ACCEPTED
    assert d.stopped == "gave up after 3 replays"


def test_a_topology_check_the_table_lacks_is_replayed_past_by_zeroing_leaf_1f(
        monkeypatch: pytest.MonkeyPatch) -> None:
    refused = Outcome.classify(errno.EIO, 0, check="module_future_1f_rule",
                               decider=Decider.MODULE, leaf=0x1F, subleaf=2)

    def model(module: object, host: object, policy: object, req: Request) -> Outcome:
        topology = [e for e in req.init_vm.entries if e.function == 0x1F]
        return refused if any(any(e.regs()) for e in topology) else Outcome.classify(0, 0)

    monkeypatch.setattr(mirror, "predict_init_vm", model)
    req = request(CpuidEntry(0x1F, 0, 1, ecx=0x100), CpuidEntry(0x1F, 2, 1, eax=1, ecx=0x502))
    d = diagnose(MODULE, MAX_HOST, UPSTREAM, req)
    [f] = d.faults
    assert f.category == Category.TOPOLOGY_RULE and f.decider == Decider.MODULE
    assert "zero CPUID 0x1f" in f.fix
    assert all(not any(e.regs()) for e in d.fixed.init_vm.entries if e.function == 0x1F)
    assert d.final.kind == Kind.ACCEPTED


def test_bit_facts_say_how_the_module_takes_each_bit() -> None:
    # Leaf 1 has a row without sub-leaves; index 0 finds it.
    facts, _ = bit_facts(MODULE, MAX_HOST, UPSTREAM, request(), (bit_info(1, 0, "ebx", 16),))
    assert facts == ("module 2.0 lets a VMM set it directly (config_direct)",)
    row = MODULE.rows[MODULE.row_index(7, 0) or 0]
    allow_only = row.allow_direct[2] & ~row.config_direct[2] & ~(1 << 5)
    bit = (allow_only & -allow_only).bit_length() - 1
    host = host_without("lacking", {(7, 0): {"ecx": 1 << bit}})
    facts, _ = bit_facts(MODULE, host, UPSTREAM, request(), (bit_info(7, 0, "ecx", bit),))
    assert facts == ("module 2.0 allows it only where the host has it (allow_direct); host "
                     "lacking lacks it, so the module would drop it silently",)


def test_qemu_facts_alone_name_what_every_module_sets_and_what_an_attribute_sets() -> None:
    assert qemu_facts(bit_info(1, None, "edx", 0)) == ("every TDX module sets it for a TD",)
    assert qemu_facts(bit_info(7, 0, "ecx", 31)) == ("the module sets it from TD attribute PKS",)
