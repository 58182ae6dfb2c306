"""Cut KVM's TDX ioctl code out of a kernel tree, with everything it uses, as one C file.

From the entry points (tdx_vm_ioctl in arch/x86/kvm/vmx/tdx.c, and what the
glue calls) the extractor follows every identifier and struct tag a
definition uses to the definition of that name in the tree, and takes it:
static helpers, macros, structs, enums, typedefs, globals.  Names the shim
defines (kernel primitives, the TDX module's SEAMCALLs) are never taken
from the tree.  The result is emitted in an order C accepts: macros, types,
prototypes of every function taken, variables, the functions, then the
glue; each kernel piece under a #line directive naming its file and line,
so a compiler error points into the kernel tree and can be traced back to
the function it is in.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from kvmtdx.kernelsrc.cparse import Item, Kind, parse
from kvmtdx.kernelsrc.errors import KernelSourceError

# Files read, in the order a name is looked up: the first definition wins.
SOURCE_FILES: tuple[str, ...] = (
    "arch/x86/kvm/vmx/tdx.c",
    "arch/x86/kvm/cpuid.c",
    "arch/x86/kvm/vmx/tdx.h",
    "arch/x86/kvm/vmx/tdx_arch.h",
    "arch/x86/kvm/vmx/tdx_errno.h",
    "arch/x86/kvm/cpuid.h",
    "arch/x86/kvm/reverse_cpuid.h",
    "arch/x86/include/asm/tdx.h",
    "arch/x86/include/asm/tdx_global_metadata.h",
    "arch/x86/include/asm/shared/tdx.h",
    "arch/x86/include/asm/shared/tdx_errno.h",
    "arch/x86/include/asm/cpuid/api.h",
    "arch/x86/include/asm/vmx.h",
    "arch/x86/include/asm/msr-index.h",
    "arch/x86/include/asm/cpufeatures.h",
    "arch/x86/include/asm/kvm_host.h",
    "arch/x86/include/uapi/asm/kvm.h",
)
TDX_C = "arch/x86/kvm/vmx/tdx.c"
CPUID_C = "arch/x86/kvm/cpuid.c"
# Entry points and where each must be defined.
REQUIRED: dict[str, str] = {
    "tdx_vm_ioctl": TDX_C,
    "tdx_sysinfo": TDX_C,
    "kvm_find_cpuid_entry2": CPUID_C,
}
# The functions the backend is about (issue 14); named in errors when missing.
KEY_FUNCTIONS = ("tdx_get_capabilities", "tdx_td_init", "tdx_get_cmd")
SHIM_FILES = ("kshim.h", "kglue.c")
# Bumped whenever the extractor changes what it emits for the same input.
EXTRACTOR_VERSION = "2"


@dataclass(frozen=True)
class Extraction:
    """The C source to compile, and how to trace a compiler's line back to a function."""

    source: str
    functions: tuple[Item, ...]
    items: tuple[Item, ...]

    def item_at(self, path: str, line: int) -> Item | None:
        """The definition the source line `path:line` belongs to."""
        for item in self.items:
            if item.path == path and item.line <= line <= item.line + item.text.count("\n"):
                return item
        return None


def shim_text(name: str) -> str:
    return resources.files("kvmtdx.kernelsrc").joinpath("shim").joinpath(name).read_text()


def read_sources(tree: Path) -> dict[str, str]:
    """The files of SOURCE_FILES the tree has (older trees lack some headers)."""
    out: dict[str, str] = {}
    for rel in SOURCE_FILES:
        path = tree / rel
        if path.is_file():
            out[rel] = path.read_text(errors="replace")
    return out


def cache_key(sources: dict[str, str], flags: tuple[str, ...]) -> str:
    """What the built library depends on: the tree's files, the shim, the extractor, the flags."""
    h = hashlib.sha256()
    h.update(f"kvmtdx-kernelsrc {EXTRACTOR_VERSION} {' '.join(flags)}\n".encode())
    for name in SHIM_FILES:
        h.update(name.encode() + b"\0" + shim_text(name).encode() + b"\0")
    for rel in sorted(sources):
        h.update(rel.encode() + b"\0" + sources[rel].encode() + b"\0")
    return h.hexdigest()[:32]


def _index(sources: dict[str, str]) -> dict[str, Item]:
    index: dict[str, Item] = {}
    calls: list[Item] = []
    for rel in SOURCE_FILES:
        if rel not in sources:
            continue
        for item in parse(rel, sources[rel]).items:
            if item.kind == Kind.PROTOTYPE:
                continue
            if item.kind == Kind.CALL:
                calls.append(item)
                continue
            for name in item.names:
                index.setdefault(name, item)
    # A macro call names what it defines only where nothing else does.
    for item in calls:
        for name in item.names:
            index.setdefault(name, item)
    return index


def _provided() -> tuple[dict[str, Item], set[str]]:
    """What the shim defines, by name, and the names the glue uses (more entry points)."""
    provided: dict[str, Item] = {}
    for name in SHIM_FILES:
        for item in parse(name, shim_text(name)).items:
            for n in item.names:
                provided.setdefault(n, item)
    glue_uses: set[str] = set()
    for item in parse("kglue.c", shim_text("kglue.c")).items:
        glue_uses |= item.uses
    return provided, glue_uses


def _needs(item: Item, index: dict[str, Item], provided: dict[str, Item]) -> list[str]:
    """What an item uses, with the names its calls of pasting macros make."""
    needs = set(item.uses)
    for used in item.uses:
        macro = provided.get(used) or index.get(used)
        if macro is not None and macro.pastes:
            needs |= {p + u for p in macro.pastes for u in item.uses}
    return sorted(needs)


def _check_required(index: dict[str, Item], sources: dict[str, str]) -> None:
    for rel in (TDX_C, CPUID_C):
        if rel not in sources:
            raise KernelSourceError(f"the tree has no {rel}: not a Linux tree with KVM TDX "
                                    "(6.16 or later)", missing=True)
    for name, rel in REQUIRED.items():
        item = index.get(name)
        if item is None or item.path != rel:
            raise KernelSourceError(f"{name} is not defined in {rel}: the tree's TDX code "
                                    "differs from what the backend drives (renamed?)")


def _closure(index: dict[str, Item], roots: set[str], provided: dict[str, Item]) -> list[Item]:
    order: list[Item] = []
    seen: set[int] = set()
    stack: list[tuple[Item, list[str]]] = []

    def enter(name: str) -> None:
        if name in provided:
            return
        item = index.get(name)
        if item is None or id(item) in seen:
            return
        seen.add(id(item))
        stack.append((item, _needs(item, index, provided)))

    for root in sorted(roots):
        enter(root)
        while stack:
            item, todo = stack[-1]
            if todo:
                enter(todo.pop())
            else:
                stack.pop()
                order.append(item)
    return order


def _at(item: Item, text: str) -> str:
    return f'#line {item.line} "{item.path}"\n{text}\n'


def _emit(items: list[Item]) -> str:
    by_kind = {k: [i for i in items if i.kind == k] for k in Kind}
    funcs = sorted(by_kind[Kind.FUNCTION],
                   key=lambda i: (SOURCE_FILES.index(i.path), i.line))
    parts = ["/* Generated by kvmtdx from a Linux tree: not to be edited. */\n",
             '#line 1 "kshim.h"\n', shim_text("kshim.h"), "\n"]
    parts += [_at(i, i.text) for i in by_kind[Kind.MACRO]]
    parts += [_at(i, i.text) for i in by_kind[Kind.TYPE]]
    parts += [_at(i, i.head + ";") for i in funcs]
    parts += [_at(i, i.text) for i in by_kind[Kind.VARIABLE] + by_kind[Kind.CALL]]
    parts += [_at(i, i.text) for i in funcs]
    # The glue calls what this tree has (bring-up checks differ between versions).
    parts += [f"#define KT_HAVE_{i.name} 1\n" for i in funcs]
    parts += ['#line 1 "kglue.c"\n', shim_text("kglue.c")]
    return "".join(parts)


def extract(sources: dict[str, str]) -> Extraction:
    """The compilable C file for one tree's sources (see read_sources)."""
    index = _index(sources)
    _check_required(index, sources)
    provided, glue_uses = _provided()
    items = _closure(index, set(REQUIRED) | glue_uses, provided)
    funcs = tuple(i for i in items if i.kind == Kind.FUNCTION)
    return Extraction(_emit(items), funcs, tuple(items))
