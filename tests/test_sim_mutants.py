"""Every seeded kernel bug changes at least one answer the simulated host gives.

Each mutant has a witness: an observation made through the device layer
(capabilities bytes, an INIT_VM outcome, a run of TDs) under the policy the
mutant affects.  The correct kernel and the mutant must answer it
differently.  A mutant added to kvmtdx.sim.MUTANTS without a witness here
fails `test_every_mutant_has_a_witness`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace

import pytest
from helpers import bypass

from kvmtdx import layout
from kvmtdx.device import Kvm
from kvmtdx.model import builders, mirror, rules
from kvmtdx.model.policy import get_policy
from kvmtdx.model.profiles import MAX_HOST, Host, load_profile
from kvmtdx.model.requests import Request
from kvmtdx.sim import MUTANTS, SimulatedHost
from kvmtdx.structs import REGISTERS, Capabilities, CpuidEntry, InitVm

MODULE = load_profile("2.0")
HLE, RTM, WAITPKG = 1 << 4, 1 << 11, 1 << 5


def full(policy: str) -> InitVm:
    return mirror.full_request(MODULE, MAX_HOST, get_policy(policy)).init_vm


def with_bit(iv: InitVm, leaf: int, index: int, register: str, bit: int) -> InitVm:
    entries = tuple(
        e.with_reg(register, e.reg(register) | 1 << bit) if (e.function, e.index) == (leaf, index)
        else e for e in iv.entries
    )
    return replace(iv, entries=entries)


Observation = object
Probe = Callable[[SimulatedHost], Observation]


def caps(nent: int = 28, fill: bytes | None = None, flags: int = 0) -> Probe:
    def probe(sim: SimulatedHost) -> Observation:
        with Kvm(sim) as kvm, kvm.create_td() as td:
            res = td.capabilities_raw(nent, flags=flags, fill=fill)
        return res.errno, res.data

    return probe


def init_vm(request: InitVm | bytes, flags: int = 0) -> Probe:
    def probe(sim: SimulatedHost) -> Observation:
        with Kvm(sim) as kvm, kvm.create_td() as td:
            res = td.init_vm_raw(request, flags=flags)
        return res.errno, res.cmd.hw_error

    return probe


def bad_fms(policy: str) -> InitVm:
    base = full(policy)
    return replace(base, entries=tuple(
        replace(e, eax=0x12345) if e.function == 1 else e for e in base.entries))


def leak_then_init(sim: SimulatedHost) -> Observation:
    """One TDH.MNG.INIT failure, then as many valid TDs as there are key IDs."""
    with Kvm(sim) as kvm:
        with kvm.create_td() as td:
            td.init_vm(bad_fms("upstream"))
        tds = [kvm.create_td() for _ in range(sim.key_ids)]
        try:
            return [td.init_vm(full("upstream")).kind.value for td in tds]
        finally:
            for td in tds:
                td.close()


def nent_256(sim: SimulatedHost) -> Observation:
    iv = replace(full("upstream"), nent=256)
    data = layout.pack_init_vm(iv) + bytes((256 - len(iv.entries)) * layout.SIZEOF_CPUID_ENTRY2)
    return init_vm(data)(sim)


def garbage_header(nent: int = 28) -> bytes:
    return layout.pack_capabilities(Capabilities(
        kernel_tdvmcallinfo_1_r11=0x1111, user_tdvmcallinfo_1_r12=0x2222, reserved=(7,) * 250,
        nent=nent, cpuid_padding=0x33), nent_room=nent)


def request(policy: str) -> Request:
    return Request(init_vm=full(policy))


def reported(policy: str) -> tuple[CpuidEntry, ...]:
    return mirror.reported_entries(MODULE, MAX_HOST, get_policy(policy))


def steered_7(policy: str, index: int, register: str = "eax", bit: int | None = None
              ) -> InitVm:
    """Row 7.`index` reached by an unflagged entry at an unlisted index (with `bit` added)."""
    req = request(policy)
    e = next(x for x in req.init_vm.entries if (x.function, x.index) == (7, index))
    if bit is not None:
        e = e.with_reg(register, e.reg(register) | 1 << bit)
    return builders.steered(req, reported(policy), 7, index, e.regs()).init_vm


def one_td(*steps: InitVm | str) -> Probe:
    """Calls on one TD: an INIT_VM request, or "caps", "keys" (free key IDs) or "nent257"."""
    def probe(sim: SimulatedHost) -> Observation:
        out: list[object] = []
        with Kvm(sim) as kvm, kvm.create_td() as td:
            for s in steps:
                if s == "caps":
                    out.append(td.capabilities_raw(64).errno)
                elif s == "keys":
                    out.append(sim.free_key_ids)
                elif s == "nent257":
                    out.append(td.init_vm(replace(full("rfc-v2"), nent=257)).errno)
                else:
                    assert isinstance(s, InitVm)
                    out.append(td.init_vm(s).describe())
        return out

    return probe


@dataclass(frozen=True)
class Witness:
    policy: str
    probe: Probe
    key_ids: int = 16
    host: Host = MAX_HOST


# Virtual TSX on a host without IA32_ARCH_CAPABILITIES.TSX_CTRL: TDH.MNG.INIT fails with
# TDX_INCORRECT_MSR_VALUE, not an operand error.
NO_TSX_CTRL = replace(MAX_HOST, name="no-tsx-ctrl", tsx_ctrl=False)


WITNESSES: dict[str, Witness] = {
    "caps_allowlist_unapplied": Witness("rfc-v2", caps()),
    # 7.0 EBX bit 12 (RDT-M): the module takes it, the allowlist does not.
    "init_vm_allowlist_unenforced": Witness(
        "rfc-v2", init_vm(with_bit(full("rfc-v2"), 7, 0, "ebx", 12))),
    # 7.1 EAX bit 3 (RAO-INT), hidden by the allowlist.
    "allowlist_skips_row_7_1": Witness(
        "rfc-v2", init_vm(with_bit(full("rfc-v2"), 7, 1, "eax", 3))),
    # 7.0 EDX bit 18 (PCONFIG), hidden by the allowlist.
    "allowlist_skips_7_0_edx": Witness(
        "rfc-v2", init_vm(with_bit(full("rfc-v2"), 7, 0, "edx", 18))),
    "value_registers_filtered": Witness("rfc-v2", caps()),
    "core_capabilities_forgotten": Witness("rfc-v2", caps()),
    "denylist_hle_not_rtm": Witness("upstream", caps()),
    "subleaf_ffffffff_unmapped": Witness("upstream", caps()),
    "gpaw_not_forced": Witness("upstream", caps()),
    "e2big_writes_buffer": Witness("upstream", caps(nent=6)),
    "flags_unchecked": Witness("upstream", caps(flags=1)),
    "reserved_unchecked": Witness(
        "upstream", init_vm(replace(full("upstream"), reserved=(0,) * 11 + (1,)))),
    "padding_unchecked": Witness("upstream", init_vm(replace(full("upstream"), cpuid_padding=1))),
    "hw_error_not_copied": Witness("upstream", init_vm(bad_fms("upstream"))),
    "allowlist_reject_eio": Witness(
        "rfc-v2", init_vm(with_bit(full("rfc-v2"), 7, 0, "edx", 18))),
    "key_id_leak_on_failure": Witness("upstream", leak_then_init, key_ids=2),
    "module_status_always_einval": Witness(
        "upstream", init_vm(bypass(full("upstream"), ebx=HLE | RTM, ecx=0)), host=NO_TSX_CTRL),
    "denylist_checks_row_index": Witness("upstream", init_vm(bypass(full("upstream")))),
    "count_check_missing": Witness("upstream", init_vm(replace(
        full("upstream"), entries=(*full("upstream").entries, CpuidEntry(function=0xD))))),
    "nent_limit_off_by_one": Witness("upstream", nent_256),
    "caps_header_not_echoed": Witness("upstream-6.16", caps(fill=garbage_header())),
    "lookup_resumes_after_flagged_match": Witness(
        "rfc-v2", init_vm(builders.reversed_order(request("rfc-v2")).init_vm)),
    "flags_compared_whole": Witness(
        "rfc-v2", init_vm(builders.with_flag_bits(request("rfc-v2")).init_vm)),
    "no_subleaf_index_checked": Witness(
        "rfc-v2", init_vm(builders.with_ignored_indexes(request("rfc-v2")).init_vm)),
    "steered_entry_refused": Witness("rfc-v2", init_vm(steered_7("rfc-v2", 0))),
    "init_vm_value_registers_filtered": Witness("rfc-v2", init_vm(builders.realistic_values(
        request("rfc-v2"), reported("rfc-v2"), fms=MAX_HOST.native_fms()).init_vm)),
    "reserved_check_covers_mrownerconfig": Witness(
        "upstream", init_vm(builders.with_measurements(request("upstream")).init_vm)),
    # PERFMON (63): not supported by KVM, taken by the module.
    "attributes_checked_32_bits": Witness(
        "upstream", init_vm(replace(full("upstream"), attributes=1 << 63))),
    "xfam_checked_32_bits": Witness(
        "upstream", init_vm(replace(full("upstream"), xfam=full("upstream").xfam | 1 << 40))),
    "gpaw_range_check": Witness("upstream", init_vm(replace(full("upstream"), entries=tuple(
        replace(e, eax=50 << 16) if e.function == 0x80000008 else e
        for e in full("upstream").entries)))),
    "nent_signed_compare": Witness(
        "upstream", init_vm(replace(full("upstream"), nent=0x80000000))),
    "reserved_low_halves_only": Witness(
        "upstream", init_vm(replace(full("upstream"), reserved=(0,) * 3 + (1 << 63,) + (0,) * 8))),
    # 7.1 EAX bit 3 (RAO-INT), hidden by the allowlist, steered onto row 7.1.
    "allowlist_steered_by_entry_index": Witness(
        "rfc-v2", init_vm(steered_7("rfc-v2", 1, "eax", 3))),
    "td_state_set_before_checks": Witness(
        "upstream", one_td(replace(full("upstream"), attributes=1), full("upstream"))),
    "module_refusal_leaves_td_initialized": Witness(
        "upstream", one_td(bad_fms("upstream"), full("upstream"))),
    "key_id_held_after_refusal": Witness("upstream", one_td("keys", bad_fms("upstream"), "keys")),
    "caps_refused_after_init_vm": Witness("upstream", one_td(full("upstream"), "caps")),
    "td_state_checked_after_copy": Witness("upstream", one_td(full("upstream"), "nent257")),
}


def test_every_mutant_has_a_witness() -> None:
    assert sorted(WITNESSES) == sorted(MUTANTS)


@pytest.mark.parametrize("mutant", sorted(MUTANTS))
def test_each_mutant_changes_an_observable_answer(mutant: str, no_fd_leak: object) -> None:
    w = WITNESSES.get(mutant)
    assert w is not None, f"mutant {mutant!r} has no witness: add one to WITNESSES"
    correct = SimulatedHost(MODULE, w.host, get_policy(w.policy), key_ids=w.key_ids)
    buggy = SimulatedHost(MODULE, w.host, get_policy(w.policy), mutant=mutant,
                          key_ids=w.key_ids)
    assert w.probe(correct) != w.probe(buggy)
    assert correct.open_fds == () and buggy.open_fds == ()


@pytest.mark.parametrize("mutant", sorted(MUTANTS))
def test_each_mutant_leaves_a_valid_request_alone_elsewhere(mutant: str) -> None:
    """A bug is local: a valid request built from what the buggy kernel itself reports is
    still ACCEPTED, so a verifier catches each mutant with the check meant for it rather
    than through a broken baseline."""
    for policy in ("upstream-6.16", "upstream", "rfc-v2"):
        sim = SimulatedHost(MODULE, MAX_HOST, get_policy(policy), mutant=mutant)
        with Kvm(sim) as kvm, kvm.create_td() as td:
            caps_now = td.capabilities()
        # The request built from what this (possibly buggy) kernel reports.
        request = mirror.full_request(MODULE, MAX_HOST, get_policy(policy)).init_vm
        reported = {(e.function, e.index): e for e in caps_now.entries}
        entries = []
        for e in request.entries:
            r = reported.get((e.function, e.index), e)
            keep = tuple(v & m if not rules.is_value_register(e.function, e.index, reg)
                         else v for v, m, reg in zip(e.regs(), r.regs(), REGISTERS, strict=True))
            entries.append(replace(e, eax=keep[0], ebx=keep[1], ecx=keep[2], edx=keep[3]))
        out = init_vm(replace(request, entries=tuple(entries)))(sim)
        assert out == (0, 0), f"{mutant} under {policy}: {out}"
