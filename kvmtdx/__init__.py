"""kvmtdx: does this kernel handle Intel TDX configurable CPUID exactly right?"""

__version__ = "0.1.0"
