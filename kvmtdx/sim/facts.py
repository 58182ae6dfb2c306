"""The facts the simulated host applies: its own copy, not the model's.

The mirror reads the same facts in `kvmtdx.model.rules`; the simulated host
deliberately keeps its own, so a mistake in one reading shows up as a
disagreement with the other instead of being shared by both.
"""

from __future__ import annotations

Regs = tuple[int, int, int, int]
ZERO: Regs = (0, 0, 0, 0)

# Bits the kernel names (Linux arch/x86/include/asm/cpufeatures.h, word.bit).
HLE = 1 << 4  # 9*32+4, CPUID 7.0 EBX
RTM = 1 << 11  # 9*32+11, CPUID 7.0 EBX
WAITPKG = 1 << 5  # 16*32+5, CPUID 7.0 ECX
CORE_CAPABILITIES = 1 << 30  # 18*32+30, CPUID 7.0 EDX

# TD ATTRIBUTES bits.
ATTR_SEPT_VE_DISABLE = 1 << 28  # what KVM 7.3 supports of TD attributes

# KVM's knob for the guest physical address width: CPUID 0x80000008 EAX[23:16].
GPAW_LEAF = 0x80000008
GPAW_FIELD = 0x00FF0000
GPAW_SHIFT = 16

# The index the TDX module reports for a row without sub-leaves.
NO_SUBLEAF = 0xFFFFFFFF
