"""--host-check: what a -cpu host TD cannot get, through the seam (the simulated host here; the
real device skips with its reason where there is no TDX)."""

from __future__ import annotations

from dataclasses import replace

import pytest
from helpers import host_without

from kvmtdx.device import tdx_status
from kvmtdx.errors import KvmError
from kvmtdx.explain import host_check, qemu
from kvmtdx.explain.host_check import Cause, Facts, HostCheck, check
from kvmtdx.model import mirror
from kvmtdx.model.policy import get_policy
from kvmtdx.model.profiles import MAX_HOST, load_profile
from kvmtdx.session import open_backend, simulated_backend
from kvmtdx.structs import Capabilities, CpuidEntry

MODULE = load_profile("2.0")


def by_cause(h: HostCheck) -> dict[Cause, set[str]]:
    out: dict[Cause, set[str]] = {}
    for m in h.missing:
        out.setdefault(m.cause, set()).add(m.bit.qemu or m.bit.name)
    return out


def test_simulated_upstream_host_names_what_kvm_hides_and_what_the_module_keeps() -> None:
    h = host_check.run(simulated_backend(MODULE, MAX_HOST, get_policy("upstream")))
    causes = by_cause(h)
    assert causes[Cause.KVM] == {"hle", "rtm", "waitpkg"}
    assert causes[Cause.ATTRIBUTE] == {"pks"}
    assert {"vmx", "smx", "sgx"} <= causes[Cause.MODULE]
    assert Cause.UNEXPLAINED not in causes
    # Bits every module sets, or reported ones, are never listed.
    listed = {n for names in causes.values() for n in names}
    assert not listed & {"fpu", "sse2", "avx", "avx2", "movdir64b", "core-capability"}
    assert h.wanted == h.available + len(h.missing)
    assert h.policy == "upstream" and h.module == "2.0" and h.host == "max"
    # The max host has exactly the XSAVE state a module allows; one whose KVM also has MPX
    # and APX state gets them named as XFAM bits the module does not offer.
    assert h.xfam_missing == ()
    more = replace(MAX_HOST, name="max+mpx+apx", kvm_xfam=MAX_HOST.xfam_supported | 0x18 | 1 << 19)
    h = host_check.run(simulated_backend(MODULE, more, get_policy("upstream")))
    assert {name for _, name, _ in h.xfam_missing} >= {"MPX_BNDREGS", "APX"}
    assert {why for _, _, why in h.xfam_missing} == {"module 2.0 does not allow it (XFAM_FIXED0)"}
    assert h.unjudged == ((0x14, 0, "ecx"),)  # QEMU leaves leaf 0x14 to the module


def test_the_series_hides_more() -> None:
    h = host_check.run(simulated_backend(MODULE, MAX_HOST, get_policy("rfc-v2")))
    assert {"monitor", "ht", "hle", "waitpkg"} <= by_cause(h)[Cause.KVM]


def test_a_kernel_that_hides_more_than_the_policy_it_is_judged_by_is_unexplained() -> None:
    backend = simulated_backend(MODULE, MAX_HOST, get_policy("rfc-v2"))
    h = host_check.run(backend, policy="upstream")
    assert h.policy == "upstream"
    assert {"monitor", "ht"} <= by_cause(h)[Cause.UNEXPLAINED]
    assert by_cause(h)[Cause.KVM] == {"hle", "rtm", "waitpkg"}


def _caps_and_wanted(policy_name: str) -> tuple[Capabilities, list[CpuidEntry]]:
    pred = mirror.predict_capabilities(MODULE, MAX_HOST, get_policy(policy_name),
                                       len(MODULE.rows))
    assert pred.caps is not None
    wanted = [CpuidEntry(e.function, e.index, e.flags, 0xFFFFFFFF, 0xFFFFFFFF, 0xFFFFFFFF,
                         0xFFFFFFFF) for e in pred.caps.entries]
    return pred.caps, wanted


def test_host_lacks_a_feature_kvm_would_emulate() -> None:
    caps, wanted = _caps_and_wanted("upstream")
    row = MODULE.rows[MODULE.row_index(7, 0) or 0]
    allow_only = row.allow_direct[2] & ~row.config_direct[2] & ~(1 << 5)
    bit = next(b for b in range(32) if allow_only >> b & 1 and qemu.feature_name(7, 0, "ecx", b))
    host = host_without("lacking", {(7, 0): {"ecx": 1 << bit}})
    entries = tuple(e.with_reg("ecx", e.ecx & ~(1 << bit)) if (e.function, e.index) == (7, 0)
                    else e for e in caps.entries)
    h = check(replace(caps, entries=entries), wanted,
              Facts(MODULE, get_policy("upstream"), "given", host))
    lacking = [m for m in h.missing if (m.bit.leaf, m.bit.register, m.bit.bit) == (7, "ecx", bit)]
    assert [m.cause for m in lacking] == [Cause.HOST]


def test_leaves_without_a_module_row_are_judged_by_qemus_tdx_tables() -> None:
    caps, wanted = _caps_and_wanted("upstream")
    extra = [CpuidEntry(0x40000001, 0, 0, 0xFFFFFFFF),  # KVM's paravirtual features
             CpuidEntry(0x80000001, 0, 0, 0, 0, 0xFFFFFFFF, 0xFFFFFFFF)]
    h = check(caps, [*wanted, *extra], Facts(MODULE, get_policy("upstream"), "given", MAX_HOST))
    pv = {m.bit.qemu: m for m in h.missing if m.bit.leaf == 0x40000001}
    assert {"kvm-steal-time", "kvm-asyncpf-int"} <= set(pv)
    assert {m.cause for m in pv.values()} == {Cause.QEMU}
    ext = {m.bit.qemu: m for m in h.missing if m.bit.leaf == 0x80000001}
    assert {"svm", "sse4a"} <= set(ext)
    assert all(m.cause == Cause.MODULE and "makes no configurable row" in m.why
               for m in ext.values())


def test_without_a_module_the_policy_still_tells_kvm_hides() -> None:
    caps, wanted = _caps_and_wanted("upstream")
    h = check(caps, wanted, Facts(None, get_policy("upstream"), "given", None))
    causes = by_cause(h)
    assert causes[Cause.KVM] == {"hle", "rtm", "waitpkg"}
    assert all("--module" in m.why for m in h.missing if m.cause == Cause.MODULE)


def test_without_a_module_a_bit_the_host_lacks_is_the_hosts() -> None:
    caps, wanted = _caps_and_wanted("upstream")
    host = host_without("lacking", {(7, 0): {"ecx": 1 << 2}})  # UMIP: allow_direct on 2.0
    entries = tuple(e.with_reg("ecx", e.ecx & ~(1 << 2)) if (e.function, e.index) == (7, 0)
                    else e for e in caps.entries)
    h = check(replace(caps, entries=entries), wanted,
              Facts(None, get_policy("upstream"), "given", host))
    [umip] = [m for m in h.missing if m.bit.qemu == "umip"]
    assert (umip.cause, umip.why) == (Cause.HOST, "the CPU lacks it (KVM emulates it for "
                                                  "ordinary VMs)")


def test_xfam_the_module_does_not_offer_removes_the_features_that_need_it() -> None:
    caps, wanted = _caps_and_wanted("upstream")
    no_amx = replace(caps, supported_xfam=caps.supported_xfam & ~(3 << 17))
    h = check(no_amx, wanted, Facts(MODULE, get_policy("upstream"), "given", MAX_HOST))
    assert {"amx-tile", "amx-int8", "amx-bf16"} <= by_cause(h)[Cause.XFAM]


def test_the_real_device_skips_with_its_reason_where_there_is_no_tdx(no_fd_leak: object) -> None:
    if tdx_status().available:
        pytest.skip("this host offers TDX")
    with pytest.raises(KvmError) as err:
        host_check.run(open_backend())
    assert err.value.skip
    assert "TDX" in err.value.reason or "/dev/kvm" in err.value.reason
