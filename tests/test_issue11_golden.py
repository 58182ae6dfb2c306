"""Issue 11's cases, end to end: what `kvmtdx predict --request` and `kvmtdx init-vm --simulate`
answer, as the real TDX module does behind Linux 7.3 (with the source each comes from).

Paths are in intel/tdx-module (MNG = src/vmm_dispatcher/api_calls/tdh_mng_init.c, HLP =
src/common/helpers/helpers.c), line numbers of the 1.5.05 tree (commit e98d9639) unless a
version is named; KVM is Linux 7.3 arch/x86/kvm/vmx/tdx.c.  Every request goes through KVM
first, so a case the module would decide but KVM refuses (MIGRATABLE) says so.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from helpers import GPAW48, host_without, run_cli, with_bypass, write_request

from kvmtdx.model.host_files import host_to_json
from kvmtdx.model.profiles import load_profile, profile_to_json
from kvmtdx.model.requests import Request
from kvmtdx.structs import FLAG_SIGNIFICANT_INDEX, CpuidEntry, InitVm

SIG = FLAG_SIGNIFICANT_INDEX
SEPT_VE_DISABLE = 1 << 28
HLE, RTM, PKS, AVX, AVX512F = 1 << 4, 1 << 11, 1 << 31, 1 << 28, 1 << 16
CPUID_CONFIG, XFAM = 0xC000010000000045, 0xC000010000000041
FORMAT_1F, MSR_10A = 0xC000090400000000, 0xC00009210000010A

HOSTS = {
    "no-tsx-ctrl": host_without("no-tsx-ctrl", tsx_ctrl=False),
    "no-tsx": host_without("no-tsx", {(7, 0): {"ebx": HLE | RTM}}, tsx_ctrl=False),
    "rtm-only": host_without("rtm-only", {(7, 0): {"ebx": HLE}}),
}
MALFORMED_1F = (CpuidEntry(0x1F, 0, SIG), CpuidEntry(0x1F, 1, SIG, eax=7, ebx=0x70, ecx=0x201))


@dataclass(frozen=True)
class Case:
    name: str
    source: str
    entries: tuple[CpuidEntry, ...]
    outcome: str
    errno: str | None = None
    hw_error: int = 0
    check: str = "accepted"
    status: int | None = None  # TDH.MNG.INIT's, where it was called
    warn: bool = False
    changes: tuple[tuple[str, str], ...] = ()  # (kind, bit name) the TD does not get as asked
    xfam: int = 0x6DBE7
    attributes: int = SEPT_VE_DISABLE
    module: str = "2.0"
    host: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def request(self) -> Request:
        return Request(init_vm=InitVm(attributes=self.attributes, xfam=self.xfam,
                                      entries=(*self.entries, GPAW48)))


def steer(ebx: int, *more: CpuidEntry) -> tuple[CpuidEntry, ...]:
    """Leaf-7 bits carried onto row 7.0 past Linux 7.3's denylist (spec section 4)."""
    return with_bypass(more, ebx=ebx, ecx=0)


CASES = (
    *(Case(f"xfam_0x3_clears_avx_{m}", "MNG:340 apply_cpuid_xfam_masks, MNG:315 leaf 1 under "
           "XFAM[2]", (CpuidEntry(7, 0, SIG, ebx=AVX512F), CpuidEntry(1, 0, 0, ecx=AVX)),
           "ACCEPTED", status=0, xfam=0x3, module=m,
           changes=(("cleared", "AVX512F"), ("cleared", "AVX")))
      for m in ("1.5-late", "2.0")),
    *(Case(f"check_xfam_{xfam:#x}", "HLP:1421 check_xfam", (), "MODULE_REJECTED", "EINVAL",
           XFAM, "module_xfam", XFAM, xfam=xfam)
      for xfam in (0x23, 0xE3, 0x20003, 0x803)),
    *(Case(f"malformed_1f_{m}", "HLP:2691 check_cpuid_1f (2.0.08: check_cpuid_1f_and_"
           "compute_cpuid_0b); KVM 7.3 __tdx_td_init TDX_BUG_ON_1", MALFORMED_1F, "ERROR",
           "EIO", 0, "module_topology", FORMAT_1F, warn=True, module=m)
      for m in ("1.5-late", "2.0")),
    Case("hle_rtm_the_host_lacks_are_cleared", "MNG:333 allow_direct needs the native bit",
         steer(HLE | RTM), "ACCEPTED", status=0, host="no-tsx",
         changes=(("cleared", "HLE"), ("cleared", "RTM"))),
    Case("hle_without_rtm_on_final_values", "MNG:345 HLE != RTM on the final 7.0 EBX",
         steer(HLE), "MODULE_REJECTED", "EINVAL", CPUID_CONFIG, "module_hle_rtm", CPUID_CONFIG),
    Case("hle_asked_on_an_rtm_only_host_ends_equal", "MNG:345 on final values: both end 0",
         steer(HLE), "ACCEPTED", status=0, host="rtm-only", changes=(("cleared", "HLE"),)),
    Case("tsx_without_tsx_ctrl", "MNG:352 TDX_INCORRECT_MSR_VALUE + IA32_ARCH_CAPABILITIES "
         "(0x10A); KVM 7.3 TDX_BUG_ON_1", steer(HLE | RTM), "ERROR", "EIO", 0,
         "module_tsx_ctrl", MSR_10A, warn=True, host="no-tsx-ctrl"),
    Case("tsx_with_tsx_ctrl", "MNG:345-352", steer(HLE | RTM), "ACCEPTED", status=0),
    Case("pks_is_not_configurable", "cpuid_configurations.c: 7.0 ECX[31] outside allow_direct; "
         "MNG:362 would overwrite it", (CpuidEntry(7, 0, SIG, ecx=PKS),), "MODULE_REJECTED",
         "EINVAL", CPUID_CONFIG, "module_cpuid_config", CPUID_CONFIG),
    Case("pks_is_overwritten_with_attributes_pks", "MNG:362 ECX.PKS = ATTRIBUTES.PKS",
         (CpuidEntry(7, 0, SIG, ecx=PKS),), "ACCEPTED", status=0, module="pks-profile",
         changes=(("overridden", "PKS"),)),
    Case("migratable_never_reaches_the_module", "KVM 7.3 supports only SEPT_VE_DISABLE "
         "(HLP:1381 verify_td_attributes is behind it)", (), "KVM_REJECTED", "EINVAL", 0,
         "attributes_unsupported", attributes=SEPT_VE_DISABLE | 1 << 29),
    Case("first_row_in_lookup_order_decides", "MNG:222 cpuid_lookup[] order: 0x1F.0 (46) "
         "before 0x23.0 (59)", (CpuidEntry(0x23, 0, SIG, ebx=1), CpuidEntry(0x1F, 0, SIG, edx=1)),
         "MODULE_REJECTED", "EINVAL", CPUID_CONFIG, "module_cpuid_config", CPUID_CONFIG,
         extra={"leaf": 0x1F, "subleaf": 0}),
    Case("row_7_0_decides_before_the_topology_check", "MNG:345 in the CPUID pass, HLP:2691 "
         "after it", steer(HLE, *MALFORMED_1F), "MODULE_REJECTED", "EINVAL", CPUID_CONFIG,
         "module_hle_rtm", CPUID_CONFIG),
)


def _module_arg(case: Case, tmp_path: Path) -> str:
    if case.module != "pks-profile":
        return case.module
    # A module build that lets a VMM configure PKS: a profile file on module 2.0's rules.
    doc = profile_to_json(load_profile("2.0"))
    for row in doc["rows"]:
        if (row["leaf"], row["subleaf"]) == ("0x7", 0):
            row["allow_direct"][2] = f"0x{int(row['allow_direct'][2], 16) | PKS:08x}"
    path = tmp_path / "pks-profile.json"
    path.write_text(json.dumps({**doc, "name": "pks-profile"}))
    return str(path)


def _args(case: Case, tmp_path: Path) -> list[str]:
    args = ["--request", write_request(tmp_path, case.request())]
    if case.host is not None:
        path = tmp_path / f"{case.host}.json"
        path.write_text(json.dumps(host_to_json(HOSTS[case.host])))
        args += ["--host", str(path)]
    return args


def _expected(case: Case) -> dict[str, Any]:
    return {"outcome": case.outcome, "errno": case.errno, "hw_error": f"0x{case.hw_error:016x}"}


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_predict(case: Case, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    r = run_cli(capsys, "predict", "--module", _module_arg(case, tmp_path), "--policy",
                "upstream", "--format", "json", *_args(case, tmp_path))
    assert r.rc == 0, r.err
    doc = r.json()
    got = doc["init_vm"]
    assert {k: got[k] for k in ("outcome", "errno", "hw_error")} == _expected(case), case.source
    assert got["check"] == case.check
    for key, value in case.extra.items():
        assert got[key] == value
    module = got["module"]
    if case.status is None:
        assert module is None
    else:
        assert int(module["status"], 16) == case.status
        assert (module["kernel_warn"], module["vm_bugged"]) == (case.warn, case.warn)
    changes = {(c["kind"], name) for c in doc["cpuid_changes"] for name in c["bits"]}
    assert set(case.changes) <= changes
    assert (doc["effective_cpuid"] is not None) == (case.outcome == "ACCEPTED")


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_init_vm_on_the_simulated_host(case: Case, tmp_path: Path,
                                       capsys: pytest.CaptureFixture[str]) -> None:
    r = run_cli(capsys, "init-vm", "--simulate", f"{_module_arg(case, tmp_path)}:upstream",
                *_args(case, tmp_path))
    assert r.rc == 0, r.err
    doc = r.json()
    assert {k: doc[k] for k in ("outcome", "errno", "hw_error")} == _expected(case), case.source
    assert doc["kernel_warn"] is case.warn
    assert doc["vm_bugged"] is (True if case.warn else None)


def test_predict_text_names_what_the_td_does_not_get(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    case = CASES[1]  # XFAM 0x3 on module 2.0
    r = run_cli(capsys, "predict", "--module", "2.0", *_args(case, tmp_path))
    assert r.rc == 0
    assert "KVM_TDX_INIT_VM: ACCEPTED" in r.out
    assert "0x7.0 EBX[16] AVX512F: cleared silently (the TD's XFAM lacks bits 5, 6, 7" in r.out
    assert "0x1 ECX[28] AVX: cleared silently (XFAM[2] (AVX) is 0" in r.out
    assert "0x1 EAX 0x00000000 -> 0x000806f8: overridden (F/M/S 0 means the native F/M/S)" \
        in r.out
    warn = next(c for c in CASES if c.name == "tsx_without_tsx_ctrl")
    r = run_cli(capsys, "predict", "--module", "2.0", *_args(warn, tmp_path))
    assert "ERROR -EIO (module_tsx_ctrl at leaf 0x7.0 EBX bit 4)" in r.out
    assert "module: TDX_INCORRECT_MSR_VALUE(0x10a) 0xc00009210000010a" in r.out
    assert "WARN_ON_ONCE splat" in r.out and "the VM marked bugged" in r.out
