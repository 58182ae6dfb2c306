"""KVM_TDX_CAPABILITIES as the mirror predicts it: golden cases from the spec (sections 3 and 6)."""

from __future__ import annotations

import errno
import struct
from dataclasses import replace

import pytest

from kvmtdx import layout
from kvmtdx.model.mirror import predict_capabilities, reported_entries
from kvmtdx.model.policy import POLICY_NAMES, get_policy
from kvmtdx.model.profiles import BUNDLED_MODULES, MAX_HOST, enumerated, load_profile
from kvmtdx.model.rules import is_value_register
from kvmtdx.structs import NO_SUBLEAF, REGISTERS, CpuidEntry

HLE, RTM, WAITPKG, MWAIT, CORE_CAPABILITIES = 1 << 4, 1 << 11, 1 << 5, 1 << 3, 1 << 30


def zeroed_caller(nent: int) -> bytes:
    buf = bytearray(2056 + 40 * nent)
    struct.pack_into("<I", buf, 2048, nent)
    return bytes(buf)


def entry(module: str, policy: str, leaf: int, index: int) -> CpuidEntry:
    for e in reported_entries(load_profile(module), MAX_HOST, get_policy(policy)):
        if (e.function, e.index) == (leaf, index):
            return e
    raise AssertionError(f"no entry 0x{leaf:x}.{index}")


@pytest.mark.parametrize("policy", ["upstream", "upstream-6.16"])
def test_upstream_on_2_0_max_clears_the_denylist_and_keeps_mwait(policy: str) -> None:
    e7 = entry("2.0", policy, 7, 0)
    assert e7.ebx & (HLE | RTM) == 0
    assert e7.ecx & WAITPKG == 0
    assert e7.edx & CORE_CAPABILITIES
    assert entry("2.0", policy, 1, 0).ecx & MWAIT


# Spec section 6, written out here on its own (not read from the bundled allowlist):
# what the series hides on a 2.0 module with every feature present.
SPEC_HIDDEN: dict[tuple[int, int, str], set[int]] = {
    (0x1, 0, "ecx"): {3, 7, 8, 10, 11, 14, 18},
    (0x1, 0, "edx"): {18, 22, 28, 29, 31},
    (0x7, 0, "ebx"): {4, 11, 12, 15},
    (0x7, 0, "ecx"): {0, 5, 13},
    (0x7, 0, "edx"): {18},
    (0x7, 1, "eax"): {3, 8},
    (0x7, 1, "edx"): {17},
    (0x1C, 0, "eax"): set(range(8)),
    (0x23, 0, "eax"): set(range(4)),
}


def test_rfc_v2_on_2_0_max_hides_exactly_the_spec_list() -> None:
    module = load_profile("2.0")
    listed = enumerated(module, MAX_HOST)
    got = reported_entries(module, MAX_HOST, get_policy("rfc-v2"))
    hidden: dict[tuple[int, int, str], set[int]] = {}
    for row, masks, e in zip(module.rows, listed, got, strict=True):
        for r, m, v in zip(REGISTERS, masks, e.regs(), strict=True):
            assert v & ~m & ~(0xFF << 16) == 0, "rfc-v2 reports a bit the module does not list"
            gone = {b for b in range(32) if (m & ~v) >> b & 1}
            if gone:
                hidden[(row.leaf, row.kvm_index, r)] = gone
    assert hidden == SPEC_HIDDEN
    assert entry("2.0", "rfc-v2", 7, 0).edx & CORE_CAPABILITIES


@pytest.mark.parametrize("policy", POLICY_NAMES)
def test_core_capabilities_not_configurable_on_1_5_01(policy: str) -> None:
    assert entry("1.5.01", policy, 7, 0).edx & CORE_CAPABILITIES == 0


@pytest.mark.parametrize("module", BUNDLED_MODULES)
@pytest.mark.parametrize("policy", POLICY_NAMES)
def test_gpaw_field_reads_0xff(module: str, policy: str) -> None:
    assert (entry(module, policy, 0x80000008, 0).eax >> 16) & 0xFF == 0xFF


@pytest.mark.parametrize("module", BUNDLED_MODULES)
def test_subleaf_none_reads_index_0_and_rows_keep_module_order(module: str) -> None:
    prof = load_profile(module)
    got = reported_entries(prof, MAX_HOST, get_policy("upstream"))
    assert [(e.function, e.index) for e in got] == [(r.leaf, r.kvm_index) for r in prof.rows]
    no_sub = [r for r in prof.rows if r.subleaf is None]
    assert no_sub and all(r.module_subleaf == NO_SUBLEAF for r in no_sub)
    assert all(e.index == 0 and e.flags == 0 for e, r in zip(got, prof.rows, strict=True)
               if r.subleaf is None)


@pytest.mark.parametrize("policy", POLICY_NAMES)
def test_value_registers_pass_through_every_policy(policy: str) -> None:
    module = load_profile("2.0")
    base = reported_entries(module, MAX_HOST, get_policy("upstream"))
    got = reported_entries(module, MAX_HOST, get_policy(policy))
    for row, a, b in zip(module.rows, base, got, strict=True):
        for r in REGISTERS:
            if is_value_register(row.leaf, row.subleaf, r):
                assert a.reg(r) == b.reg(r)


def test_is_value_register() -> None:
    assert is_value_register(1, None, "eax") and is_value_register(1, None, "ebx")
    assert not is_value_register(1, None, "ecx")
    assert all(is_value_register(leaf, 3, r) for leaf in (4, 0x18, 0x1F) for r in REGISTERS)
    assert is_value_register(0x80000008, None, "eax")
    assert not is_value_register(0x80000008, None, "ebx")
    assert not is_value_register(7, 0, "ebx")


@pytest.mark.parametrize("policy", POLICY_NAMES)
@pytest.mark.parametrize("module", BUNDLED_MODULES)
def test_e2big_below_n_leaves_the_buffer_untouched(module: str, policy: str) -> None:
    prof = load_profile(module)
    n = len(prof.rows)
    for nent in (0, 1, 6, n - 1):
        pred = predict_capabilities(prof, MAX_HOST, get_policy(policy), nent)
        assert pred.errno == errno.E2BIG
        assert pred.caps is None
        assert pred.buffer == zeroed_caller(nent)


def test_upstream_success_layout_independently() -> None:
    prof = load_profile("2.0")
    pred = predict_capabilities(prof, MAX_HOST, get_policy("upstream"), 30)
    assert pred.errno == 0 and not pred.cmd_written_back and pred.buffer is not None
    buf = pred.buffer
    assert len(buf) == 2056 + 30 * 40
    attrs, xfam, k11, u11, k12, u12 = struct.unpack_from("<6Q", buf, 0)
    assert (attrs, xfam, k11, u11, k12, u12) == (1 << 28, 0x6DBE7, 0, 2, 0, 0)
    assert buf[48:2048] == bytes(2000)
    assert struct.unpack_from("<2I", buf, 2048) == (28, 0)
    first = struct.unpack_from("<10I", buf, 2056)
    assert first == (1, 0, 0, 0x0FFF3FFF, 0x00FF0000, 0x31044D88, 0xB8445080, 0, 0, 0)
    assert buf[2056 + 28 * 40:] == bytes(2 * 40)  # room past N stays as the caller had it


def test_upstream_ignores_caller_header_but_6_16_echoes_it() -> None:
    prof = load_profile("1.5.01")
    n = len(prof.rows)
    caller = bytearray(layout.caps_size(n + 1))
    struct.pack_into("<6Q", caller, 0, 11, 22, 33, 44, 55, 66)
    for i in range(250):
        struct.pack_into("<Q", caller, 48 + 8 * i, 0x1000 + i)
    struct.pack_into("<2I", caller, 2048, n + 1, 0xABCD)
    for i in range(n + 1):  # entry bytes the kernel overwrites, and one it must not
        caller[2056 + 40 * i: 2056 + 40 * (i + 1)] = bytes([0xEE]) * 40
    before = bytes(caller)

    up = predict_capabilities(prof, MAX_HOST, get_policy("upstream"), n + 1, caller=before)
    assert up.errno == 0 and up.buffer is not None and not up.cmd_written_back
    assert struct.unpack_from("<6Q", up.buffer, 0) == (1 << 28, 0x6DBE7, 0, 2, 0, 0)
    assert up.buffer[48:2048] == bytes(2000)
    assert struct.unpack_from("<2I", up.buffer, 2048) == (n, 0)
    assert struct.unpack_from("<I", up.buffer, 2056 + 8)[0] == 0  # entry flags written as 0
    assert up.buffer[2056 + 40 * n:] == before[2056 + 40 * n:]

    old = predict_capabilities(prof, MAX_HOST, get_policy("upstream-6.16"), n + 1, caller=before)
    assert old.errno == 0 and old.buffer is not None and old.cmd_written_back
    assert struct.unpack_from("<6Q", old.buffer, 0) == (1 << 28, 0x6DBE7, 33, 3, 55, 66)
    assert old.buffer[48:2048] == before[48:2048]
    assert struct.unpack_from("<2I", old.buffer, 2048) == (n, 0xABCD)
    assert old.buffer[2056:2056 + 40 * n] == up.buffer[2056:2056 + 40 * n]
    assert old.buffer[2056 + 40 * n:] == before[2056 + 40 * n:]


@pytest.mark.parametrize("policy", POLICY_NAMES)
def test_hw_error_and_flags_refused_before_the_buffer(policy: str) -> None:
    prof, pol = load_profile("2.0"), get_policy(policy)
    hw = predict_capabilities(prof, MAX_HOST, pol, 28, hw_error=1)
    assert (hw.errno, hw.buffer, hw.cmd_written_back, hw.caps) == (errno.EINVAL, None, False, None)
    fl = predict_capabilities(prof, MAX_HOST, pol, 28, flags=1)
    assert (fl.errno, fl.buffer) == (errno.EINVAL, None)
    assert fl.cmd_written_back == (policy == "upstream-6.16")


def test_eio_when_the_host_lacks_the_fixed_xfam() -> None:
    host = replace(MAX_HOST, name="no-sse", kvm_xfam=0x1)
    pred = predict_capabilities(load_profile("2.0"), host, get_policy("upstream"), 28)
    assert pred.errno == errno.EIO and pred.caps is None
    assert pred.buffer == zeroed_caller(28)


def test_caller_nent_must_match() -> None:
    with pytest.raises(ValueError):
        predict_capabilities(load_profile("2.0"), MAX_HOST, get_policy("upstream"), 28,
                             caller=layout.caps_size(28) * b"\0")
