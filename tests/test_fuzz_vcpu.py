"""`kvmtdx fuzz` on the vCPU path: the TD's CPUID read through a vCPU as a VMM reads it.

The model of the path (kvmtdx.model.vcpu: what each ioctl answers, what KVM_TDX_GET_CPUID
writes where, what KVM_SET_CPUID2 takes), the judge of its answers (an exact host holds the
entries to the mirror's effective CPUID; an inferred one only to their count; a kernel that
refuses a CPUID unlike the TD's is stricter), the run's summary, the replay of a vCPU
finding, the one note of a backend that answers no vCPU ioctl, and the replay files a user
can get wrong.  That each seeded vCPU bug is found in the default budget is
tests/test_fuzz_mutants.py.
"""

from __future__ import annotations

import errno
import json
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from helpers import run_cli
from kernelsrc_support import linux_tree

from kvmtdx import layout
from kvmtdx.device import Kvm
from kvmtdx.errors import ExitCode
from kvmtdx.fuzz.execute import Tally, run_scenario
from kvmtdx.fuzz.judge import Model, Observed, Verdict, judge
from kvmtdx.fuzz.judgement import SPLIT_IRQCHIP, CpuidRead, VcpuAnswer
from kvmtdx.fuzz.replay import FUZZ_CASE_KIND, case_from_json
from kvmtdx.fuzz.scenario import CapsCall, Lie, VcpuCall
from kvmtdx.model import get_cpuid, invariant, mirror, vcpu
from kvmtdx.model.policy import get_policy
from kvmtdx.model.profiles import MAX_HOST, load_profile
from kvmtdx.model.rules import LEAF7_EBX_HLE
from kvmtdx.outcome import Outcome
from kvmtdx.report.fuzz import calls_json
from kvmtdx.session import open_backend
from kvmtdx.structs import KVM_MAX_CPUID_ENTRIES, CpuidEntry

RFC = Model(load_profile("2.0"), MAX_HOST, get_policy("rfc-v2"),
            mirror.reported_entries(load_profile("2.0"), MAX_HOST, get_policy("rfc-v2")))
FULL = mirror.full_request(RFC.module, MAX_HOST, RFC.policy)
ACCEPTED = Outcome.classify(0, 0)
TD = get_cpuid.predicted(RFC.module.tables, mirror.init_vm_prediction(
    RFC.module, MAX_HOST, RFC.policy, FULL, explain=False))
E2BIG_BUG = "2.0:rfc-v2:get_cpuid_e2big_writes_entries"


def td_entries() -> tuple[CpuidEntry, ...]:
    assert TD is not None and len(TD) > 2
    return TD


def answer(call: VcpuCall, entries: tuple[CpuidEntry, ...] | None = None,
           set_errno: int | None = None) -> VcpuAnswer:
    """What Linux 7.3 answers `call` on an initialised TD whose CPUID is `entries`."""
    entries = td_entries() if entries is None else entries
    reads = [CpuidRead(*vcpu.get_cpuid_answer(entries, call.buffer()))]
    if reads[0].errno == errno.E2BIG:
        reads.append(CpuidRead(*vcpu.get_cpuid_answer(entries, call.buffer(len(entries)))))
    if call.set_cpuid2 and set_errno is None:
        set_errno = vcpu.set_cpuid2_errno(call.told(entries))
    return VcpuAnswer(0 if call.split_irqchip else None, 0, tuple(reads),
                      set_errno if call.set_cpuid2 else None)


def judged(call: VcpuCall, got: VcpuAnswer, model: Model = RFC) -> Any:
    """The judgement of INIT_VM(FULL) accepted, then the vCPU path answered `got`."""
    return judge(model, (FULL, call), Observed((ACCEPTED, got), (1, 1), 0, (0, None)))


# ---------------------------------------------------------------------------
# The model of the path.


def test_get_cpuid_with_too_little_room_writes_the_count_and_no_entry() -> None:
    entries = td_entries()
    buffer = VcpuCall(nent=len(entries) - 1, fill=0xA5).buffer()
    err, after = vcpu.get_cpuid_answer(entries, buffer)
    assert err == errno.E2BIG
    assert int.from_bytes(after[:4], "little") == len(entries)
    assert after[4:] == buffer[4:]  # the caller's padding and every entry slot untouched


def test_get_cpuid_with_room_writes_the_entries_and_nothing_past_them() -> None:
    entries = td_entries()
    buffer = VcpuCall(nent=len(entries) + 1, fill=0xA5).buffer()
    err, after = vcpu.get_cpuid_answer(entries, buffer)
    assert err == 0 and layout.unpack_cpuid2(after)[1] == entries
    end = layout.SIZEOF_CPUID2 + len(entries) * layout.SIZEOF_CPUID_ENTRY2
    assert after[4:8] == b"\xa5" * 4 and after[end:] == buffer[end:]
    assert vcpu.get_cpuid_answer(None, buffer) == (errno.EIO, buffer)


def test_create_vcpu_checks_the_td_then_the_irqchip() -> None:
    assert vcpu.create_vcpu_errno(dead=False, initialized=False, split=False) == errno.EIO
    assert vcpu.create_vcpu_errno(dead=False, initialized=True, split=False) == errno.EINVAL
    assert vcpu.create_vcpu_errno(dead=False, initialized=True, split=True) == 0
    assert vcpu.create_vcpu_errno(dead=True, initialized=True, split=True) == errno.EIO
    assert vcpu.split_irqchip_errno(dead=False) == 0


def test_set_cpuid2_takes_any_cpuid_its_generic_checks_let_through() -> None:
    entries = td_entries()
    plain = vcpu.without_dynamic_xsave(entries)
    assert vcpu.set_cpuid2_errno(plain) == 0
    hle = vcpu.with_bit(plain, 7, 0, "ebx", LEAF7_EBX_HLE.bit_length() - 1, True)
    assert hle != plain and vcpu.set_cpuid2_errno(hle) == 0  # the lie taken
    xsave = [e for e in entries if (e.function, e.index) == (0xD, 0)]
    if xsave and xsave[0].eax & vcpu.XTILEDATA:
        assert vcpu.set_cpuid2_errno(entries) == errno.EPERM
    width = [replace(e, eax=e.eax & ~0xFF00 | 40 << 8) if e.function == 0x80000008 else e
             for e in plain]
    assert vcpu.set_cpuid2_errno(width) == errno.EINVAL
    assert vcpu.set_cpuid2_errno((CpuidEntry(1),) * (KVM_MAX_CPUID_ENTRIES + 1)) == errno.E2BIG
    with pytest.raises(ValueError, match="not a CPUID register"):
        vcpu.with_bit(plain, 7, 0, "esp", 1, True)


# ---------------------------------------------------------------------------
# The judge.


def test_linux_7_3s_answers_are_not_departures() -> None:
    n = len(td_entries())
    for call in (VcpuCall(), VcpuCall(nent=n - 1, fill=0xA5), VcpuCall(nent=0),
                 VcpuCall(nent=n), VcpuCall(set_cpuid2=True),
                 VcpuCall(set_cpuid2=True, lie=Lie(7, 0, "ebx", 4, True))):
        j = judged(call, answer(call))
        assert j.departures == () and j.vcpu_refused is None, call
    # Without a split irqchip Linux 7.3 refuses the vCPU, and the path stops there.
    assert judged(VcpuCall(split_irqchip=False),
                  VcpuAnswer(None, errno.EINVAL)).departures == ()


def test_a_vcpu_created_without_a_split_irqchip_differs() -> None:
    (d,) = judged(VcpuCall(split_irqchip=False),
                  answer(VcpuCall(split_irqchip=False))).departures
    assert (d.call.value, d.verdict) == ("vcpu", Verdict.DIFFERS)
    assert "KVM_CREATE_VCPU -EINVAL" in d.expected and "success" in d.actual


def test_entries_written_with_e2big_differ() -> None:
    entries = td_entries()
    call = VcpuCall(nent=len(entries) - 1)
    wrong = layout.pack_cpuid2(entries[:len(entries) - 1])
    wrong = len(entries).to_bytes(4, "little") + wrong[4:]
    got = VcpuAnswer(0, 0, (CpuidRead(errno.E2BIG, wrong),))
    (d,) = judged(call, got).departures
    assert (d.call.value, d.verdict) == ("get_cpuid", Verdict.DIFFERS)
    assert "no entry written" in d.expected and "entries[0] written" in d.actual


def _swapped(entries: tuple[CpuidEntry, ...]) -> tuple[CpuidEntry, ...]:
    return (entries[1], entries[0], *entries[2:])


def _padded(entries: tuple[CpuidEntry, ...]) -> tuple[CpuidEntry, ...]:
    return (replace(entries[0], padding=(1, 0, 0)), *entries[1:])


def _short_call() -> VcpuCall:
    return VcpuCall(nent=len(td_entries()) - 1, fill=0xA5)


def _header_padding_lost() -> VcpuAnswer:
    """E2BIG with the count right but the caller's padding overwritten."""
    good = answer(_short_call())
    first = good.reads[0]
    return replace(good, reads=(CpuidRead(first.errno, first.buffer[:4] + bytes(4)
                                          + first.buffer[8:]), *good.reads[1:]))


def _second_read_refused() -> VcpuAnswer:
    """The read again with the room KVM asked for, refused all the same."""
    good = answer(_short_call())
    return replace(good, reads=(good.reads[0], CpuidRead(errno.E2BIG, good.reads[1].buffer)))


@pytest.mark.parametrize(("call", "got", "where", "says"), [
    (VcpuCall(), lambda: VcpuAnswer(errno.EINVAL, None), "vcpu",
     "KVM_ENABLE_CAP(KVM_CAP_SPLIT_IRQCHIP) -EINVAL"),
    (_short_call(), _header_padding_lost, "get_cpuid", "padding 0x00000000"),
    (_short_call(), _second_read_refused, "get_cpuid", "-E2BIG"),
    (VcpuCall(), lambda: answer(VcpuCall(), _swapped(td_entries())), "td_cpuid",
     "0x1 where 0x0 belongs"),
    (VcpuCall(), lambda: answer(VcpuCall(), _padded(td_entries())), "td_cpuid",
     "0x0 padding (1, 0, 0)"),
], ids=["split_irqchip", "header_padding", "second_read", "entry_order", "entry_padding"])
def test_each_part_of_the_path_is_judged(call: VcpuCall, got: Any, where: str,
                                         says: str) -> None:
    (d,) = judged(call, got()).departures
    assert (d.call.value, d.verdict) == (where, Verdict.DIFFERS)
    assert says in d.actual, d.actual


def test_a_td_cpuid_bit_off_the_mirror_differs_on_an_exact_host_only() -> None:
    entries = td_entries()
    k = next(i for i, e in enumerate(entries) if (e.function, e.index) == (7, 0))
    bent = (*entries[:k], entries[k].with_reg("ecx", entries[k].ecx ^ 1 << 5), *entries[k + 1:])
    got = answer(VcpuCall(), bent)
    (d,) = judged(VcpuCall(), got).departures
    assert (d.call.value, d.verdict) == ("td_cpuid", Verdict.DIFFERS)
    assert "0x7.0 ECX" in d.actual and d.predicted is not None
    assert d.predicted.kind is ACCEPTED.kind
    # A host inferred from the capabilities cannot say what the CPU gives the TD.
    assert judged(VcpuCall(), got, replace(RFC, host_exact=False)).departures == ()


def test_an_inferred_host_still_holds_the_read_to_its_own_count() -> None:
    entries = td_entries()
    call = VcpuCall(nent=len(entries) - 2)
    full = layout.pack_cpuid2(entries)
    # E2BIG, yet the count written back is the room, not what the TD has.
    short = (call.nent.to_bytes(4, "little") + full[4:])[:len(call.buffer())]
    got = VcpuAnswer(0, 0, (CpuidRead(errno.E2BIG, short),))
    (d,) = judged(call, got, replace(RFC, host_exact=False)).departures
    assert d.call.value == "get_cpuid"


def test_set_cpuid2_refusing_a_lie_is_stricter_and_any_other_refusal_differs() -> None:
    lie = VcpuCall(set_cpuid2=True, lie=Lie(7, 0, "ebx", 4, True))
    (d,) = judged(lie, answer(lie, set_errno=errno.EINVAL)).departures
    assert (d.call.value, d.verdict) == ("set_cpuid2", Verdict.STRICTER)
    assert d.note == invariant.SET_CPUID2_VALIDATED_NOTE
    (d,) = judged(lie, answer(lie, set_errno=errno.EPERM)).departures
    assert d.verdict is Verdict.DIFFERS
    # The TD's own CPUID refused is no closed question: it differs.  (A TD without AMX
    # tile data, whose CPUID goes to KVM_SET_CPUID2 unchanged; an inferred host does not
    # hold the entries to the mirror's.)
    own, plain = VcpuCall(set_cpuid2=True), vcpu.without_dynamic_xsave(td_entries())
    (d,) = judged(own, answer(own, plain, set_errno=errno.EINVAL),
                  replace(RFC, host_exact=False)).departures
    assert d.verdict is Verdict.DIFFERS


def test_a_backend_without_vcpu_ioctls_is_said_once_not_judged() -> None:
    for got, ioctl in ((VcpuAnswer(errno.ENOTTY, None), SPLIT_IRQCHIP),
                       (VcpuAnswer(0, errno.ENOTTY), "KVM_CREATE_VCPU")):
        j = judged(VcpuCall(), got)
        assert j.departures == () and j.vcpu_refused == f"{ioctl}: ENOTTY"


# ---------------------------------------------------------------------------
# Runs: the summary, a vCPU finding replayed, a backend without vCPU ioctls.


def test_a_read_with_too_little_room_is_sent_again_with_the_count_kvm_told() -> None:
    """As a VMM does: the second KVM_TDX_GET_CPUID gets the TD's CPUID, which then goes to
    KVM_SET_CPUID2."""
    backend = open_backend(simulate="2.0:rfc-v2")
    tally = Tally()
    scenario = (FULL, VcpuCall(nent=1, set_cpuid2=True))
    with Kvm(backend.seam, backend.path) as kvm:
        observed = run_scenario(kvm, backend.seam, scenario, tally)
    got = observed.answers[-1]
    assert isinstance(got, VcpuAnswer)
    assert [r.errno for r in got.reads] == [errno.E2BIG, 0] and got.set_cpuid2 == 0
    assert layout.unpack_cpuid2(got.reads[1].buffer)[1] == td_entries()
    assert (tally.vcpu_steps, tally.get_cpuid_calls, tally.set_cpuid2_calls) == (1, 2, 1)
    assert judge(RFC, scenario, observed).departures == ()


def test_a_correct_kernel_drives_the_vcpu_path_and_says_how_often(
        capsys: pytest.CaptureFixture[str]) -> None:
    r = run_cli(capsys, "fuzz", "--simulate", "2.0:rfc-v2", "--seed", "2", "--no-db",
                "--max-tds", "400", "--format", "json")
    s = r.json()["summary"]
    assert r.rc == ExitCode.PASS and r.json()["findings"] == []
    assert s["vcpu_steps"] > 0 and s["get_cpuid_calls"] >= s["vcpu_steps"] // 2
    assert s["set_cpuid2_calls"] > 0 and s["vcpu_refused"] is None
    text = run_cli(capsys, "fuzz", "--simulate", "2.0:rfc-v2", "--seed", "2", "--no-db",
                   "--max-tds", "400").out
    assert f"{s['vcpu_steps']} TDs ended with the vCPU path" in text
    assert f"{s['get_cpuid_calls']} KVM_TDX_GET_CPUID" in text


def test_a_vcpu_finding_is_a_fuzz_case_replayed_until_fixed(
        capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    r = run_cli(capsys, "fuzz", "--simulate", E2BIG_BUG, "--seed", "1", "--first", "--no-db",
                "--format", "json", "--save", str(tmp_path))
    assert r.rc == ExitCode.FAIL
    (f, *_) = [f for f in r.json()["findings"] if f["call"] == "get_cpuid"]
    case = json.loads((tmp_path / f["replay"]).read_text())
    assert case["kind"] == "fuzz-case" and "vcpu" in case["calls"][-1]
    assert case["calls"][-1]["vcpu"]["nent"] < KVM_MAX_CPUID_ENTRIES
    again = run_cli(capsys, "fuzz", "--simulate", E2BIG_BUG, "--replay",
                    str(tmp_path / f["replay"]), "--format", "json")
    assert again.rc == ExitCode.FAIL
    assert f["actual"] in [g["actual"] for g in again.json()["findings"]]
    fixed = run_cli(capsys, "fuzz", "--simulate", "2.0:rfc-v2", "--replay",
                    str(tmp_path / f["replay"]), "--format", "json")
    assert fixed.rc == ExitCode.PASS and fixed.json()["findings"] == []


def test_the_kernel_source_host_says_once_it_has_no_vcpu_path_and_goes_on(
        capsys: pytest.CaptureFixture[str]) -> None:
    tree = str(linux_tree())
    r = run_cli(capsys, "fuzz", "--kernel-source", tree, "--seed", "1", "--no-db",
                "--max-tds", "300", "--format", "json")
    s = r.json()["summary"]
    assert r.rc == ExitCode.PASS and (s["end"], s["tds"]) == ("tds", 300)
    assert s["vcpu_steps"] > 0 and s["get_cpuid_calls"] == 0
    assert s["vcpu_refused"] and s["vcpu_refused"].endswith(": ENOTTY")
    text = run_cli(capsys, "fuzz", "--kernel-source", tree, "--seed", "1", "--no-db",
                   "--max-tds", "300").out
    assert text.count("answers no vCPU ioctl") == 1


@pytest.mark.parametrize("last", [
    VcpuCall(False, 7, 0xA5, True, Lie(0x80000001, None, "edx", 31, False)),
    VcpuCall(True, KVM_MAX_CPUID_ENTRIES, 0, True, Lie(7, 0, "ebx", 4, True)),
    VcpuCall(nent=0),
])
def test_a_fuzz_case_reads_back_as_the_calls_written(last: VcpuCall) -> None:
    caps = CapsCall(3, 1, 2, (1, 2, 3, 4, 5, 2**64 - 1), 0xA5)
    scenario = (FULL, caps, last)
    doc = json.loads(json.dumps({"kind": FUZZ_CASE_KIND, "calls": calls_json(scenario)}))
    assert case_from_json(doc, "case.json") == scenario


@pytest.mark.parametrize(("call", "says"), [
    ({"vcpu": {"nent": 257}}, "calls[1].vcpu.nent: 257: room for at most 256"),
    ({"vcpu": {"lie": {"leaf": 7, "subleaf": 0, "register": "esp", "bit": 1, "set": True}}},
     "calls[1].vcpu.lie.register: 'esp'"),
    ({"vcpu": {"lie": {"leaf": 7, "subleaf": 0, "register": "ebx", "bit": 32, "set": True}}},
     "calls[1].vcpu.lie.bit: 32"),
    ({"vcpu": {"lie": {"leaf": 7, "subleaf": None, "register": "ebx", "bit": 1, "set": 1}}},
     "calls[1].vcpu.lie.set: expected true or false"),
    ({"vcpu": {"split_irqchip": 1}}, "calls[1].vcpu.split_irqchip: expected true or false"),
    ({"vcpu": {"cpus": 2}}, "calls[1].vcpu"),
    ({"capabilities": {"nent": 257}}, "calls[1].capabilities.nent: 257: room for at most 256"),
    ({"capabilities": {}}, "calls[1].capabilities.nent: missing"),
    ({"capabilities": {"nent": 1, "header": [0]}},
     "calls[1].capabilities.header: expected a list of 6 integers"),
])
def test_a_wrong_call_in_a_replay_file_is_one_line(
        capsys: pytest.CaptureFixture[str], tmp_path: Path, call: dict[str, Any],
        says: str) -> None:
    path = tmp_path / "case.json"
    path.write_text(json.dumps({"kind": "fuzz-case", "calls": [
        {"init_vm": {"attributes": "0x0", "xfam": "0x3", "cpuid": []}}, call]}))
    r = run_cli(capsys, "fuzz", "--simulate", "2.0:rfc-v2", "--replay", str(path))
    assert r.rc == ExitCode.USAGE and r.out == ""
    assert len(r.err.strip().splitlines()) == 1 and says in r.err and str(path) in r.err


def test_the_vcpu_path_must_end_a_replayed_case(
        capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    path = tmp_path / "case.json"
    path.write_text(json.dumps({"kind": "fuzz-case", "calls": [
        {"vcpu": {}}, {"init_vm": {"attributes": "0x0", "xfam": "0x3", "cpuid": []}}]}))
    r = run_cli(capsys, "fuzz", "--simulate", "2.0:rfc-v2", "--replay", str(path))
    assert r.rc == ExitCode.USAGE and "the vCPU path must be the last call" in r.err
