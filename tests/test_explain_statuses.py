"""explain's knowledge of TDX module statuses and KVM errnos: decoded fields, meanings, KVM's
mapping, and what is said of what is not known."""

from __future__ import annotations

import errno

import pytest

from kvmtdx.explain import statuses
from kvmtdx.explain.statuses import explain_errno, explain_status, knowledge
from kvmtdx.status import STATUS_MASK, HwError, Operand, TdxStatus


def test_the_status_of_the_tdx_module_issue_names_cpuid_config_and_its_way_to_userspace() -> None:
    s = explain_status(0xC000010000000045)
    assert s.name == "TDX_OPERAND_INVALID"
    assert s.class_id == 0x01 and s.class_name == "an invalid operand"
    assert s.flags == ("error", "non-recoverable")
    assert s.operand is not None and s.operand.name == "CPUID_CONFIG" and s.operand.id == 69
    assert "config_direct | allow_direct" in s.operand.causes
    assert "KVM does not return RCX" in s.operand.causes
    assert s.kvm is not None
    assert (s.kvm.errno, s.kvm.hw_error, s.kvm.warn) == (errno.EINVAL, True, False)
    assert s.unknown == ()


@pytest.mark.parametrize("raw, operand", [(0xC000010000000040, "ATTRIBUTES"),
                                          (0xC000010000000041, "XFAM"),
                                          (0xC000010000000046, "TSC_FREQUENCY")])
def test_operand_ids_are_read_from_bits_31_0(raw: int, operand: str) -> None:
    s = explain_status(raw)
    assert s.operand is not None and s.operand.name == operand


def test_an_msr_status_names_the_msr_and_is_eio_with_a_warn() -> None:
    s = explain_status(0xC00009210000010A, seamcall="TDH_MNG_INIT", rcx=0)
    assert s.name == "TDX_INCORRECT_MSR_VALUE" and s.operand is None
    assert s.msr is not None and s.msr[:2] == (0x10A, "IA32_ARCH_CAPABILITIES")
    assert s.seamcall == "TDH.MNG.INIT"
    assert s.kvm is not None and (s.kvm.errno, s.kvm.hw_error, s.kvm.warn) == (errno.EIO,
                                                                                False, True)


def test_the_topology_status_is_known_and_blames_leaf_1f() -> None:
    s = explain_status(0xC000090400000000)
    assert s.name == "TDX_CPUID_LEAF_1F_FORMAT_UNRECOGNIZED"
    assert s.info is not None and "0x1F" in s.info.causes
    assert s.kvm is not None and s.kvm.errno == errno.EIO


def test_an_unknown_status_says_its_class_is_known_and_the_rest_is_not() -> None:
    s = explain_status(0xC000099900000003)
    assert s.info is None and s.class_name is not None
    assert "not ones kvmtdx knows" in s.unknown[0] and "is known" in s.unknown[0]
    assert any("bits 31:0 (0x3)" in u for u in s.unknown)
    t = explain_status(0xC000AA0000000000)
    assert t.class_name is None and "not known either" in t.unknown[0]


def test_an_unknown_operand_of_a_known_status_is_said_so() -> None:
    s = explain_status(0xC0000100000000FE)
    assert s.info is not None and s.operand is None
    assert s.unknown == ("operand id 254 (0xfe) is not one kvmtdx knows",)


def test_a_status_of_another_seamcall_says_what_kvm_does_with_that_seamcall() -> None:
    s = explain_status(0x8000020300000000, seamcall="TDH_MNG_CREATE")
    assert s.kvm is None and s.seamcall_kvm is not None and "-EAGAIN" in s.seamcall_kvm


def test_rcx_names_the_cpuid_row_of_a_cpuid_config_refusal() -> None:
    assert explain_status(0xC000010000000045, rcx=7 | 1 << 32).rcx_row() == (7, 1)
    assert explain_status(0xC000010000000045).rcx_row() is None
    assert explain_status(0xC000010000000041, rcx=7).rcx_row() is None


def test_success_and_informational_statuses_have_no_kvm_failure() -> None:
    assert explain_status(0).kvm is None
    assert explain_status(0x0000081500000000).kvm is None  # TDX_KEY_CONFIGURED


def test_the_knowledge_covers_every_status_and_operand_kvmtdx_numbers_with_sources() -> None:
    # The numbers are kvmtdx.status's; the knowledge names them, and must name them all.
    kb = knowledge()
    assert set(kb.statuses) == {int(s) for s in TdxStatus}
    assert set(kb.operands) == {int(o) for o in Operand}
    for code, info in kb.statuses.items():
        assert code & ~STATUS_MASK == 0, info.name
        assert TdxStatus(code).name == info.name
        for key in info.sources:
            assert key in kb.sources, (info.name, key)
    for op in kb.operands.values():
        assert all(key in kb.sources for key in op.sources), op.name
        assert Operand(op.id).name == op.name
    assert int(TdxStatus.TDX_INCORRECT_MSR_VALUE) == 0xC000092100000000


def test_low_level_decode_names_the_new_operands() -> None:
    assert HwError.decode(0xC000010000000046).operand_name == "TSC_FREQUENCY"


def test_einval_reads_one_way_or_the_other_by_hw_error() -> None:
    zero = explain_errno(errno.EINVAL, hw_error=0)
    assert len(zero.causes) == 1 and zero.causes[0].startswith("hw_error 0")
    module = explain_errno(errno.EINVAL, hw_error=0xC000010000000045)
    assert len(module.causes) == 1 and module.causes[0].startswith("hw_error non-zero")
    assert len(explain_errno(errno.EINVAL).causes) == 2


def test_errnos_of_init_vm_and_capabilities() -> None:
    assert any("key ID" in c for c in explain_errno(errno.ENOSPC).causes)
    assert any("misc cgroup" in c for c in explain_errno(errno.EBUSY).causes)
    caps = explain_errno(errno.E2BIG, ioctl="KVM_TDX_CAPABILITIES")
    assert caps.ioctl == "KVM_TDX_CAPABILITIES" and "grow it" in caps.causes[0]
    assert explain_errno(errno.ENOEXEC).causes == ()


def test_seamcall_names_and_leaves() -> None:
    assert statuses.seamcall_name("TDH_MNG_INIT") == "TDH.MNG.INIT"
    assert statuses.seamcall_by_leaf(21) == "TDH.MNG.INIT"
    assert statuses.seamcall_by_leaf(99) is None


def test_a_status_is_64_bits() -> None:
    with pytest.raises(ValueError):
        explain_status(1 << 64)


def test_what_bits_31_0_and_the_flags_say_when_kvmtdx_does_not_know_them() -> None:
    s = explain_status(0xC000092100000999)
    assert s.msr == (0x999, "MSR 0x999", "") and s.unknown == ("MSR 0x999 is not one kvmtdx knows",)
    assert explain_status(0xC000090400000005).unknown == (
        "bits 31:0 (0x5) are not used by this status",)
    assert explain_status(0x9000020000000000).flags == ("error", "host-recoverable")
