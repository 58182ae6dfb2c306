"""Native CPUID through the cpuid driver (or a file laid out like its node) as a Host."""

from __future__ import annotations

import os
import struct
from pathlib import Path

import pytest

from kvmtdx.errors import DataError
from kvmtdx.model.mirror import full_request, predict_init_vm
from kvmtdx.model.policy import get_policy
from kvmtdx.model.profiles import MAX_HOST, load_profile
from kvmtdx.model.tdx_host import host_problems
from kvmtdx.native import host_by_name, native_host, native_leaves
from kvmtdx.outcome import Kind

NODE = "/dev/cpu/0/cpuid"


def pattern(seed: int) -> bytes:
    return bytes((i * 37 + seed) & 0xFF for i in range(0x100))


def fake_node(path: Path, blocks: dict[int, bytes]) -> None:
    """A sparse file answering pread(16, leaf | subleaf << 32) as the driver's node does.

    Offsets are keys, not record numbers: leaves 1 and 7 read overlapping bytes, so
    the expected registers are read out of the same image, not assumed.
    """
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        for offset, data in blocks.items():
            os.pwrite(fd, data, offset)
    finally:
        os.close(fd)


def image_regs(blocks: dict[int, bytes], offset: int) -> tuple[int, ...]:
    for base, data in blocks.items():
        if base <= offset and offset + 16 <= base + len(data):
            return struct.unpack_from("<4I", data, offset - base)
    return (0, 0, 0, 0)


def test_absent_node_says_how_to_load_the_driver(tmp_path: Path) -> None:
    missing = tmp_path / "cpuid"
    with pytest.raises(DataError) as e:
        native_host(cpuid_path=str(missing))
    msg = str(e.value)
    assert str(missing) in msg and "modprobe cpuid" in msg and "\n" not in msg


def test_a_cpu_that_does_not_exist(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="/dev/cpu/4095/cpuid"):
        native_host(cpu=4095)


def test_file_laid_out_like_the_node(tmp_path: Path) -> None:
    node = tmp_path / "cpuid"
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nflags\t\t: fpu vme\nvmx flags\t: vnmi ept ept_5level\n")
    # Sub-leaf 0 of the basic and extended ranges, and each sub-leaf's 4 GiB window.
    blocks = {0: pattern(11), 0x80000000: pattern(5)}
    blocks.update({sub << 32: pattern(sub) for sub in range(1, 9)})
    fake_node(node, blocks)
    host = native_host(cpuid_path=str(node), msr_path=None, cpuinfo_path=str(cpuinfo))
    assert host.name == f"native ({node})"
    assert set(host.native) == set(native_leaves())
    for (leaf, sub), regs in host.native.items():
        assert regs == image_regs(blocks, leaf | (sub or 0) << 32), (hex(leaf), sub)
    assert host.native_regs(7, 1) != host.native_regs(7, 2) != host.native_regs(7, 0)
    assert host.native_regs(0x1F, 3) == image_regs(blocks, 0x1F | 3 << 32)
    d0, d1 = image_regs(blocks, 0xD), image_regs(blocks, 0xD | 1 << 32)
    assert host.xfam_supported == d0[0] | d0[3] << 32 | d1[2] | d1[3] << 32
    assert host.ept_5level and not host.tsx_ctrl
    # Past the end of the file reads as zeros, as a hole does.
    small = tmp_path / "small"
    fake_node(small, {0: pattern(1)[:20]})
    h = native_host(cpuid_path=str(small), msr_path=None, cpuinfo_path=None)
    assert h.native_regs(0x80000008, None) == (0, 0, 0, 0)
    assert h.native_regs(1, None) == struct.unpack_from("<4I", pattern(1)[:20] + bytes(16), 1)
    assert not h.ept_5level
    # No TDX module initialises on a CPU of byte patterns: TDH.SYS.INIT's checks say why.
    assert host_problems(load_profile("2.0").tables, h)


def test_native_leaves_cover_every_bundled_row_and_xsave() -> None:
    keys = native_leaves()
    assert (0xD, 0) in keys and (0xD, 1) in keys and (0x80000008, None) in keys
    assert (0x18, 8) in keys and (0x1F, 5) in keys and len(keys) == len(set(keys))


def test_host_by_name() -> None:
    assert host_by_name("max") is MAX_HOST


@pytest.mark.skipif(not os.access(NODE, os.R_OK), reason=f"{NODE} absent or unreadable "
                    "(load the cpuid driver with `modprobe cpuid`, as root)")
def test_this_machine() -> None:
    host = host_by_name("native")
    assert host.name == "native (cpu 0)"
    assert host.xfam_supported & 0x3 == 0x3  # x87 and SSE state on every x86-64
    assert host.native_fms() != 0
    assert host.native_regs(0x80000008, None)[0] & 0xFF >= 32  # physical address bits
    prof = load_profile("2.0")
    if host_problems(prof.tables, host):
        return  # not a CPU module 2.0 initialises on (commands say so: test_mirror_cli)
    for policy in ("upstream", "rfc-v2"):
        pol = get_policy(policy)
        req = full_request(prof, host, pol)
        assert predict_init_vm(prof, host, pol, req).kind is Kind.ACCEPTED
