"""The pure pieces of the suite's breadth: legal requests in unusual encodings (builders),
and what a TD keeps between INIT_VM calls (kvmtdx.model.lifecycle)."""

from __future__ import annotations

import errno
from dataclasses import replace

import pytest

from kvmtdx.model import builders, lifecycle, mirror
from kvmtdx.model.policy import POLICY_NAMES, get_policy
from kvmtdx.model.profiles import BUNDLED_MODULES, MAX_HOST, Host, load_profile
from kvmtdx.model.requests import Request
from kvmtdx.model.rules import GPAW_FIELD, GPAW_LEAF, is_value_register
from kvmtdx.outcome import Decider, Kind, Outcome
from kvmtdx.structs import FLAG_SIGNIFICANT_INDEX, REGISTERS, CpuidEntry


def setup(module: str, policy: str) -> tuple[Request, tuple[CpuidEntry, ...]]:
    m, p = load_profile(module), get_policy(policy)
    return mirror.full_request(m, MAX_HOST, p), mirror.reported_entries(m, MAX_HOST, p)


def predict(module: str, policy: str, req: Request) -> Outcome:
    return mirror.predict_init_vm(load_profile(module), MAX_HOST, get_policy(policy), req)


def unusual_encodings(module: str, policy: str) -> dict[str, Request]:
    full, rep = setup(module, policy)
    out = {
        "reversed": builders.reversed_order(full),
        "flag bits": builders.with_flag_bits(full),
        "ignored indexes": builders.with_ignored_indexes(full),
        "measurements": builders.with_measurements(full),
        "realistic": builders.realistic_values(full, rep, fms=MAX_HOST.native_fms()),
    }
    full_regs = {(e.function, e.index): e.regs() for e in full.init_vm.entries}
    for leaf, indexes in builders.multi_row_leaves(rep).items():
        for i in indexes:
            out[f"0x{leaf:x}.{i} steered"] = builders.steered(full, rep, leaf, i,
                                                              full_regs[(leaf, i)])
    return out


# ---------------------------------------------------------------------------
# Builders: each encoding is a different request, and as legal as the plain one.


@pytest.mark.parametrize("policy", POLICY_NAMES)
@pytest.mark.parametrize("module", BUNDLED_MODULES)
def test_every_unusual_encoding_of_the_full_request_is_accepted(module: str,
                                                                policy: str) -> None:
    full, _ = setup(module, policy)
    for name, req in unusual_encodings(module, policy).items():
        assert req != full, name
        assert predict(module, policy, req).kind is Kind.ACCEPTED, name


def test_the_encodings_change_what_they_say() -> None:
    full, _ = setup("2.0", "rfc-v2")
    entries = full.init_vm.entries
    assert builders.reversed_order(full).init_vm.entries == entries[::-1]
    assert all(e.flags & 6 == 6 for e in builders.with_flag_bits(full).init_vm.entries)
    ignored = builders.with_ignored_indexes(full).init_vm.entries
    moved = [e for e in ignored if e not in entries]
    # The one-row leaves (1, 0xa, 0x1c, 0x80000008, 0x23, 0x19): unflagged, index ignored.
    assert {e.function for e in moved} == {1, 0xA, 0x1C, GPAW_LEAF, 0x23, 0x19}
    assert all(not e.flags & FLAG_SIGNIFICANT_INDEX and e.index for e in moved)
    mr = builders.with_measurements(full).init_vm
    assert all(any(w) for w in (mr.mrconfigid, mr.mrowner, mr.mrownerconfig))


def test_realistic_values_stay_inside_what_was_reported() -> None:
    full, rep = setup("2.0", "rfc-v2")
    have = {(e.function, e.index): e for e in rep}
    real = builders.realistic_values(full, rep, fms=0x806F8).init_vm.entries
    changed = 0
    for e in real:
        r = have[(e.function, e.index)]
        for reg in REGISTERS:
            if is_value_register(e.function, e.index, reg) and e.reg(reg):
                changed += 1
                assert e.reg(reg) & ~r.reg(reg) == 0, (hex(e.function), e.index, reg)
    assert changed >= 10
    leaf1 = next(e for e in real if e.function == 1)
    gpaw = next(e for e in real if e.function == GPAW_LEAF)
    assert leaf1.eax == 0x806F8 and gpaw.eax & GPAW_FIELD == 48 << 16 and gpaw.eax & 0xFF


def test_a_steered_entry_lands_on_its_row_alone() -> None:
    full, rep = setup("2.0", "upstream")
    req = builders.steered(full, rep, 0x1F, 2, (0, 0, 0, 0))
    last = req.init_vm.entries[-1]
    assert (last.function, last.flags, last.index) == (0x1F, 0, 6)  # 0x1F lists 0-5
    assert all(e.flags & FLAG_SIGNIFICANT_INDEX for e in req.init_vm.entries[:-1]
               if e.function == 0x1F)
    assert mirror.find(req.init_vm.entries, 0x1F, 2) is last
    assert mirror.find(req.init_vm.entries, 0x1F, 1) is not last
    # A row the request lacks gets a flagged, empty filler, or the count would break.
    partial = replace(full, init_vm=replace(full.init_vm, entries=tuple(
        e for e in full.init_vm.entries if (e.function, e.index) != (7, 2))))
    filled = builders.steered(partial, rep, 7, 0, (0, 0, 0, 0)).init_vm.entries
    assert CpuidEntry(7, 2, FLAG_SIGNIFICANT_INDEX) in filled
    assert predict("2.0", "upstream", Request(init_vm=replace(
        partial.init_vm, entries=filled))).kind is Kind.ACCEPTED


def test_a_hidden_bit_steered_onto_row_7_1_is_refused_by_the_allowlist() -> None:
    full, rep = setup("2.0", "rfc-v2")
    regs = list(next(e for e in full.init_vm.entries if (e.function, e.index) == (7, 1)).regs())
    regs[0] |= 1 << 3  # RAO-INT: the module takes it, the allowlist does not
    o = predict("2.0", "rfc-v2", builders.steered(full, rep, 7, 1, regs))
    assert (o.kind, o.check) == (Kind.KVM_REJECTED, "allowlist")


def test_the_fms_entry_is_refused_by_the_module() -> None:
    req = builders.base_request(0x6DBE7, (builders.fms_entry(MAX_HOST.native_fms()),))
    o = predict("2.0", "upstream", req)
    assert (o.kind, o.check) == (Kind.MODULE_REJECTED, "module_fms")


# ---------------------------------------------------------------------------
# Lifecycle.


def sequence(policy: str, *reqs: Request, host: Host = MAX_HOST) -> lifecycle.SequencePrediction:
    return lifecycle.predict_sequence(load_profile("2.0"), host, get_policy(policy), reqs)


VALID = builders.base_request(0x6DBE7)
KVM_REFUSED = builders.base_request(0x6DBE7, attributes=1)
MODULE_REFUSED = builders.base_request(0x6DBE7, (builders.fms_entry(MAX_HOST.native_fms()),))


def test_only_success_initialises_a_td() -> None:
    p = sequence("upstream", KVM_REFUSED, MODULE_REFUSED, VALID, VALID, KVM_REFUSED)
    assert [o.kind for o in p.outcomes] == [Kind.KVM_REJECTED, Kind.MODULE_REJECTED,
                                            Kind.ACCEPTED, Kind.KVM_REJECTED, Kind.KVM_REJECTED]
    assert [o.check for o in p.outcomes[3:]] == ["td_initialized"] * 2
    U, INIT = lifecycle.TdState.UNINITIALIZED, lifecycle.TdState.INITIALIZED
    assert p.states == (U, U, INIT, INIT, INIT) and p.final is INIT
    assert lifecycle.caps_errno_in(p.final) == 0


def test_a_module_error_kills_the_vm_where_the_policy_says() -> None:
    dead = Outcome.classify(errno.EIO, 0, check="module_tsx_ctrl", decider=Decider.MODULE)
    for policy, want in (("upstream", lifecycle.TdState.DEAD),
                         ("rfc-v2", lifecycle.TdState.DEAD),
                         ("upstream-6.16", lifecycle.TdState.UNINITIALIZED)):
        p = get_policy(policy)
        assert lifecycle.after(p, lifecycle.TdState.UNINITIALIZED, dead) is want, policy
    assert get_policy("upstream-6.16").module_error_kills_vm is False
    # An error KVM itself returns (E2BIG) leaves the TD as it was.
    e2big = Outcome.classify(errno.E2BIG, 0, check="nent_too_big", decider=Decider.KVM)
    assert lifecycle.after(get_policy("upstream"), lifecycle.TdState.UNINITIALIZED,
                           e2big) is lifecycle.TdState.UNINITIALIZED
    m, p = load_profile("2.0"), get_policy("upstream")
    on_dead = lifecycle.predict_in(m, MAX_HOST, p, lifecycle.TdState.DEAD, VALID)
    assert (on_dead.errno, on_dead.check) == (errno.EIO, "vm_dead")
    assert lifecycle.caps_errno_in(lifecycle.TdState.DEAD) == errno.EIO
    assert sequence("upstream").final is lifecycle.TdState.UNINITIALIZED
