"""The prober: classify every bit KVM_TDX_CAPABILITIES lists by real KVM_TDX_INIT_VM outcomes.

Each INIT_VM needs a fresh TD, and on real hardware a TD costs a TDX key ID,
pages and several SEAMCALLs, so the prober spends TDs carefully:

- Reported feature bits (and value-register fields, at valid values) go in
  one request, the base.  Spec section 5 says it must be ACCEPTED; when it is
  not, the rejected units are found by binary splitting.  Splitting is sound
  because a rejection has one cause: with the other units known good, a group
  is rejected exactly when one of its units is.
- Hidden bits are tried one per TD on top of what was accepted: a rejected
  group of hidden bits says nothing about each member, and every hidden bit
  is expected to be rejected.
- Couplings the TDX module enforces are respected, so a coupling does not pass
  for a kernel bug: HLE goes with RTM, PKS with ATTRIBUTES.PKS (the mirror's
  MODULE_COUPLINGS), and XFAM-gated bits (the module profile's gates) with
  XFAM = everything KVM supports.  A reported bit whose coupling
  cannot be met is tried alone and its rejection is put down to that coupling.

Value registers (leaf 1 EAX/EBX, leaves 4, 0x18, 0x1F, 0x80000008 EAX) hold
fields, not features: they are tried only with valid values and reported per
field (a contiguous run of reported bits).

The algorithm talks to an oracle (a batch of requests in, outcomes out), so
the same code classifies a live kernel (TDs through the device layer) and the
mirror's prediction (for the expected classes a report compares against).
"""

from __future__ import annotations

import errno
import random
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from enum import Enum

from kvmtdx import uapi
from kvmtdx.device import Kvm, RealSeam, Seam, TdxVm, no_tdx_reason
from kvmtdx.errors import KvmError, ProbeError
from kvmtdx.knowledge import Given, Knowledge, complete
from kvmtdx.model import catalog, mirror, rules
from kvmtdx.model.policy import Allowlist, Policy
from kvmtdx.model.profiles import BUNDLED_MODULES, Host, ModuleProfile, load_profile
from kvmtdx.outcome import Decider, Kind, Outcome
from kvmtdx.structs import FLAG_SIGNIFICANT_INDEX, REGISTERS, Capabilities, CpuidEntry, InitVm

GPAW_LEAF = rules.GPAW_LEAF
GPAW_FIELD = rules.GPAW_FIELD
# Without a module profile its XFAM gates come from this bundled one: every public
# module gates the same AVX/AVX-512/AMX bits on XFAM.
STAND_IN_MODULE = "2.0"
# A deterministic sample of the hidden bits targeted mode would otherwise skip.
SAMPLE_PER_REGISTER = 2


class BitClass(str, Enum):
    REPORTED_ACCEPTED = "REPORTED_ACCEPTED"
    REPORTED_REJECTED = "REPORTED_REJECTED"
    HIDDEN_KVM_REJECTED = "HIDDEN_KVM_REJECTED"
    HIDDEN_MODULE_REJECTED = "HIDDEN_MODULE_REJECTED"
    HIDDEN_ACCEPTED = "HIDDEN_ACCEPTED"


class FieldClass(str, Enum):
    FIELD_ACCEPTED = "FIELD_ACCEPTED"
    FIELD_REJECTED = "FIELD_REJECTED"


BitKey = tuple[int, int, str, int]  # leaf, KVM index, register, bit


@dataclass(frozen=True)
class BitResult:
    leaf: int
    subleaf: int  # the index KVM reports (0 for rows without sub-leaves)
    register: str
    bit: int
    name: str
    cls: BitClass
    outcome: Outcome | None  # the INIT_VM that decided; None when inferred by splitting
    # Why a REPORTED_REJECTED or HIDDEN_ACCEPTED is not a kernel bug (a module rule).
    explained: str | None = None
    expected: BitClass | None = None  # the mirror's class, when the model is known

    @property
    def key(self) -> BitKey:
        return (self.leaf, self.subleaf, self.register, self.bit)

    @property
    def reported(self) -> bool:
        return self.cls in (BitClass.REPORTED_ACCEPTED, BitClass.REPORTED_REJECTED)

    @property
    def failed(self) -> bool:
        bad = self.cls in (BitClass.REPORTED_REJECTED, BitClass.HIDDEN_ACCEPTED)
        return bad and self.explained is None


@dataclass(frozen=True)
class FieldResult:
    leaf: int
    subleaf: int
    register: str
    lo: int
    hi: int
    name: str
    value: int  # the register value tried (field bits only)
    cls: FieldClass
    outcome: Outcome | None
    # Host-dependent tries (GPAW 52 needs 5-level EPT) inform but never fail.
    informational: bool = False

    @property
    def failed(self) -> bool:
        return self.cls is FieldClass.FIELD_REJECTED and not self.informational


@dataclass
class ProbeResult:
    backend: str
    mode: str
    complete: bool
    tds: int
    ioctls: int
    seconds: float
    caps: Capabilities
    bits: list[BitResult]
    fields: list[FieldResult]
    untested: int  # feature bits of listed rows left out (targeted mode, --max-tds)
    module: str | None = None
    policy: str | None = None
    notes: list[str] = field(default_factory=list)
    knowledge: Knowledge | None = None  # what the run was judged by, and why

    @property
    def failures(self) -> list[BitResult | FieldResult]:
        out: list[BitResult | FieldResult] = [b for b in self.bits if b.failed]
        out.extend(f for f in self.fields if f.failed)
        return out

    @property
    def mismatches(self) -> list[BitResult]:
        return [b for b in self.bits if b.expected is not None and b.expected is not b.cls]

    def counts(self) -> dict[str, int]:
        out = {c.value: 0 for c in BitClass}
        for b in self.bits:
            out[b.cls.value] += 1
        return out


# ---------------------------------------------------------------------------
# Names.


def bit_name(leaf: int, subleaf: int, register: str, bit: int) -> str:
    return catalog.bit_name(leaf, subleaf, register, bit)


def _field_spans(leaf: int, subleaf: int, register: str, mask: int) -> list[tuple[int, int, str]]:
    """The catalog's fields that hold reported bits, then runs of reported bits no field names."""
    out: list[tuple[int, int, str]] = []
    covered = 0
    for f in catalog.fields(leaf, subleaf, register):
        if mask & f.mask:
            bits = mask & f.mask
            lo = (bits & -bits).bit_length() - 1
            out.append((lo, bits.bit_length() - 1, f.label()))
            covered |= f.mask
    for lo, hi in _runs(mask & ~covered):
        out.append((lo, hi, f"bits {hi}:{lo}"))
    return sorted(out)


# ---------------------------------------------------------------------------
# What the prober knows beyond the capabilities.


@dataclass(frozen=True)
class Model:
    """A module profile, with the host and the kernel's policy when they are known."""

    module: ModuleProfile
    host: Host | None = None
    policy: Policy | None = None

    @staticmethod
    def of(know: Knowledge) -> Model | None:
        return None if know.module is None else Model(know.module, know.host, know.policy)

    def exact(self) -> tuple[Host, Policy] | None:
        """The host and policy, when both are known: what the mirror needs to predict."""
        return None if self.host is None or self.policy is None else (self.host, self.policy)

    def row_index(self, leaf: int, index: int) -> int | None:
        for i, row in enumerate(self.module.rows):
            if row.leaf == leaf and row.kvm_index == index:
                return i
        return None


@dataclass(frozen=True)
class Unit:
    """Bits that go into a request together: (row, register, value) triples plus attributes."""

    parts: tuple[tuple[int, str, int], ...]
    attributes: int = 0


@dataclass(frozen=True)
class _Field:
    row: int
    register: str
    lo: int
    hi: int
    value: int
    name: str
    informational: bool = False


@dataclass(frozen=True)
class _Layout:
    """The listed rows and what a valid request needs, read off the capabilities."""

    caps: Capabilities
    rows: tuple[CpuidEntry, ...]
    flags: tuple[int, ...]
    value_regs: frozenset[tuple[int, str]]
    gpaw_row: int

    def key(self, row: int, register: str, bit: int) -> BitKey:
        e = self.rows[row]
        return (e.function, e.index, register, bit)

    def position(self, leaf: int, index: int) -> int | None:
        for i, e in enumerate(self.rows):
            if e.function == leaf and e.index == index:
                return i
        return None

    def minimal(self) -> list[list[int]]:
        regs = [[0, 0, 0, 0] for _ in self.rows]
        regs[self.gpaw_row][0] = 48 << rules.GPAW_SHIFT
        return regs

    def request(self, units: Iterable[Unit], *, xfam: int, gpaw: int = 48) -> InitVm:
        regs = self.minimal()
        regs[self.gpaw_row][0] = gpaw << rules.GPAW_SHIFT
        attributes = 0
        for u in units:
            attributes |= u.attributes
            for row, register, value in u.parts:
                regs[row][REGISTERS.index(register)] |= value
        entries = tuple(
            CpuidEntry(function=e.function, index=e.index, flags=f,
                       eax=r[0], ebx=r[1], ecx=r[2], edx=r[3])
            for e, f, r in zip(self.rows, self.flags, regs, strict=True)
        )
        return InitVm(attributes=attributes, xfam=xfam, entries=entries)


def _layout(caps: Capabilities, model: Model | None) -> _Layout:
    rows = caps.entries
    if not rows:
        raise ProbeError("KVM_TDX_CAPABILITIES lists no CPUID rows: nothing to probe")
    gpaw_row = next((i for i, e in enumerate(rows) if e.function == GPAW_LEAF and e.index == 0),
                    None)
    if gpaw_row is None:
        raise ProbeError("KVM_TDX_CAPABILITIES lists no leaf 0x80000008 row at index 0, so "
                         "no INIT_VM request can carry the GPAW KVM requires")
    flags: list[int] = []
    value_regs: set[tuple[int, str]] = set()
    for i, e in enumerate(rows):
        subleaf: int | None = e.index
        if model is not None:
            mi = model.row_index(e.function, e.index)
            if mi is not None:
                subleaf = model.module.rows[mi].subleaf
        # A row without sub-leaves may go unflagged; a row with them must be
        # flagged, or one entry would match every sub-leaf of its leaf.
        flags.append(0 if model is not None and subleaf is None else FLAG_SIGNIFICANT_INDEX)
        for r in REGISTERS:
            if rules.is_value_register(e.function, subleaf, r):
                value_regs.add((i, r))
    return _Layout(caps, rows, tuple(flags), frozenset(value_regs), gpaw_row)


def _coupling(key: BitKey) -> rules.Coupling | None:
    """The module's rule (rules.MODULE_COUPLINGS) that ties this bit to others, if any."""
    for c in rules.MODULE_COUPLINGS:
        if (c.leaf, c.subleaf or 0, c.register) == key[:3] and c.mask >> key[3] & 1:
            return c
    return None


# ---------------------------------------------------------------------------
# Oracles: a batch of requests in, outcomes (None: not run, budget spent) out.


Oracle = Callable[[Sequence[InitVm]], list[Outcome | None]]


class _SerialSeam:
    """A seam not known to be thread-safe, driven one call at a time by --jobs threads."""

    def __init__(self, inner: Seam) -> None:
        self._inner = inner
        self._lock = threading.Lock()

    def open(self, path: str, flags: int) -> int:
        with self._lock:
            return self._inner.open(path, flags)

    def ioctl(self, fd: int, request: int, arg: int) -> int:
        with self._lock:
            return self._inner.ioctl(fd, request, arg)

    def close(self, fd: int) -> None:
        with self._lock:
            self._inner.close(fd)


_EXHAUSTED = ("TDX key IDs exhausted: KVM_TDX_INIT_VM failed with ENOSPC while the probe "
              "held no other TD (another TD holds them, or the kernel leaks them); "
              "{tds} TDs were created and all are closed")


class DeviceOracle:
    """INIT_VM on fresh TDs through the device layer; every TD is closed before the next.

    With jobs > 1 up to `jobs` TDs live at once; an ENOSPC while others of
    ours are live is retried after them, so the probe never starves itself.
    """

    def __init__(self, kvm: Kvm, *, jobs: int = 1, max_tds: int | None = None,
                 progress: Callable[[int], None] | None = None) -> None:
        self._kvm = kvm
        self._jobs = max(1, jobs)
        self._max = max_tds
        self._progress = progress
        self._lock = threading.Lock()
        self._live = 0
        self._reserved = 0
        self.budget_spent = False
        self.cache: dict[InitVm, Outcome] = {}

    @property
    def tds(self) -> int:
        """TDs actually created (the device's count)."""
        return self._kvm.counters.tds_created

    def reserve(self) -> bool:
        """Claim one TD of the --max-tds budget (claimed in request order, for determinism)."""
        with self._lock:
            if self._max is not None and self._reserved >= self._max:
                self.budget_spent = True
                return False
            self._reserved += 1
            return True

    def capabilities(self) -> Capabilities:
        if not self.reserve():
            raise ProbeError("--max-tds leaves no TD for KVM_TDX_CAPABILITIES")
        try:
            td = self._create()
            with td:
                return td.capabilities()
        except OSError as e:
            raise ProbeError(f"KVM_TDX_CAPABILITIES failed: {e.strerror or e}") from None

    def _create(self) -> TdxVm:
        try:
            vm = self._kvm.create_vm(uapi.VmType.KVM_X86_TDX_VM)
        except OSError as e:
            if e.errno == errno.ENOSPC:
                raise ProbeError(_EXHAUSTED.format(tds=self.tds)) from None
            raise ProbeError(f"KVM_CREATE_VM (TDX) failed: {e.strerror or e}") from None
        assert isinstance(vm, TdxVm)
        return vm

    def _one(self, request: InitVm) -> Outcome | str:
        """The outcome, or "retry" when our own live TDs may hold the key IDs."""
        with self._lock:
            self._live += 1
        try:
            for _ in range(3):
                td = self._create()
                with td:
                    out = td.init_vm(request)
                if not (out.kind is Kind.ERROR and out.errno == errno.EAGAIN):
                    break  # EAGAIN: the module ran out of entropy; try again
            if out.kind is Kind.ERROR and out.errno == errno.ENOSPC:
                with self._lock:
                    others = self._live - 1
                if others > 0:
                    return "retry"
                raise ProbeError(_EXHAUSTED.format(tds=self.tds))
            return out
        finally:
            with self._lock:
                self._live -= 1
            if self._progress is not None:
                self._progress(self.tds)

    def __call__(self, requests: Sequence[InitVm]) -> list[Outcome | None]:
        todo: list[InitVm] = []
        for r in requests:
            if r not in self.cache and r not in todo:
                todo.append(r)
        runnable = [r for r in todo if self.reserve()]
        if self._jobs > 1 and len(runnable) > 1:
            with ThreadPoolExecutor(max_workers=self._jobs) as pool:
                results = list(pool.map(self._one, runnable))
        else:
            results = [self._one(r) for r in runnable]
        for r, res in zip(runnable, results, strict=True):
            if isinstance(res, str):  # ENOSPC behind our own TDs: once more, alone
                res = self._one(r)
                if isinstance(res, str):
                    raise ProbeError(_EXHAUSTED.format(tds=self.tds))
            self.cache[r] = res
        return [self.cache.get(r) for r in requests]


def mirror_oracle(module: ModuleProfile, host: Host, policy: Policy) -> Oracle:
    def run(requests: Sequence[InitVm]) -> list[Outcome | None]:
        return [mirror.predict_init_vm(module, host, policy, r) for r in requests]
    return run


# ---------------------------------------------------------------------------
# The algorithm.


@dataclass
class _Classified:
    bits: dict[BitKey, tuple[BitClass, Outcome | None, str | None]]
    fields: list[tuple[_Field, FieldClass, Outcome | None]]
    untested: int
    complete: bool
    notes: list[str]


def _runs(mask: int) -> list[tuple[int, int]]:
    out: list[tuple[int, int]] = []
    bit = 0
    while bit < 32:
        if mask >> bit & 1:
            lo = bit
            while bit < 32 and mask >> bit & 1:
                bit += 1
            out.append((lo, bit - 1))
        else:
            bit += 1
    return out


class _Prober:
    def __init__(self, caps: Capabilities, oracle: Oracle, model: Model | None, *,
                 exhaustive: bool, native_fms: int | None) -> None:
        self.caps = caps
        self.oracle = oracle
        self.model = model
        self.exhaustive = exhaustive
        self.layout = _layout(caps, model)
        self.native_fms = native_fms
        self.xfam = caps.supported_xfam
        self.notes: list[str] = []
        if model is not None:
            self.gates = model.module.xfam_gates
        else:
            self.gates = load_profile(STAND_IN_MODULE).xfam_gates
            self.notes.append(f"no module profile: the module's XFAM couplings are taken from "
                              f"the bundled {STAND_IN_MODULE} profile")
        self.complete = True
        self.suspects = self._suspects()

    def _suspects(self) -> frozenset[BitKey]:
        """Reported bits the mirror says this kernel should hide.  Each is tried alone: a
        likely refusal inside the group would only cost halvings to find again."""
        exact = self.model.exact() if self.model is not None else None
        if self.model is None or exact is None:
            return frozenset()
        predicted = {(e.function, e.index): e
                     for e in mirror.reported_entries(self.model.module, *exact)}
        out: set[BitKey] = set()
        for row, register in self._feature_regs():
            e = self.layout.rows[row]
            p = predicted.get((e.function, e.index))
            extra = self._reported(row, register) & ~(p.reg(register) if p is not None else 0)
            out.update(self.layout.key(row, register, b) for b in range(32) if extra >> b & 1)
        return frozenset(out)

    # -- units ---------------------------------------------------------------

    def _reported(self, row: int, register: str) -> int:
        return self.layout.rows[row].reg(register)

    def _feature_regs(self) -> list[tuple[int, str]]:
        return [(i, r) for i in range(len(self.layout.rows)) for r in REGISTERS
                if (i, r) not in self.layout.value_regs]

    def _coupling_unmet(self, row: int, register: str, bit: int) -> str | None:
        """A module coupling that no request within the capabilities can meet for this bit."""
        key = self.layout.key(row, register, bit)
        c = _coupling(key)
        if c is not None and c.attribute and not self.caps.supported_attrs & c.attribute:
            return f"module coupling: {c.why}, which KVM does not offer"
        for g in self.gates:
            if (g.leaf, g.subleaf or 0, g.register) == key[:3] and g.mask >> bit & 1 \
                    and self.xfam & g.xfam != g.xfam:
                return (f"module coupling: needs XFAM 0x{g.xfam:x}, which KVM does not offer "
                        f"({g.why})")
        if c is not None and not c.attribute:
            partners = c.mask & ~(1 << bit)
            if self._reported(row, register) & partners != partners:
                return f"module coupling: {c.why}, and the other is not reported"
        return None

    def _unit(self, row: int, register: str, bit: int) -> Unit:
        c = _coupling(self.layout.key(row, register, bit))
        # 0 when the coupling is not to an attribute, or KVM does not offer it
        attrs = self.caps.supported_attrs & c.attribute if c is not None else 0
        return Unit(((row, register, 1 << bit),), attrs)

    def _partner(self, row: int, register: str, bit: int) -> Unit | None:
        c = _coupling(self.layout.key(row, register, bit))
        if c is None or c.attribute:
            return None
        return Unit(((row, register, c.mask & ~(1 << bit)),))

    def _fields(self) -> list[_Field]:
        out: list[_Field] = []
        for row, register in sorted(self.layout.value_regs):
            e = self.layout.rows[row]
            mask = e.reg(register)
            if e.function == GPAW_LEAF and register == "eax":
                mask &= ~GPAW_FIELD
            if not mask:
                continue
            if e.function == 1 and register == "eax":
                # Family/model/stepping: the module takes 0 (native) or exactly the native value.
                if self.native_fms:
                    out.append(_Field(row, register, 0, 31, self.native_fms & mask,
                                      "FMS (native)"))
                else:
                    self.notes.append("leaf 1 EAX (FMS) not probed: the native value is unknown")
                continue
            for lo, hi, name in _field_spans(e.function, e.index, register, mask):
                out.append(_Field(row, register, lo, hi, 1 << lo, name))
        return out

    # -- running -------------------------------------------------------------

    def _ask(self, requests: Sequence[InitVm]) -> list[Outcome | None]:
        outs = self.oracle(requests)
        if any(o is None for o in outs):
            self.complete = False
        return outs

    def _split(self, units: list[Unit], build: Callable[[list[Unit]], InitVm],
               first: Outcome) -> tuple[list[Unit], dict[Unit, Outcome | None], list[Unit]]:
        """Binary splitting of a rejected group: (accepted, rejected -> outcome, untested).

        Groups known to hold a rejected unit test their left half only: if it
        is accepted, the rejection lies in the right half, untested.
        """
        accepted: list[Unit] = []
        rejected: dict[Unit, Outcome | None] = {}
        untested: list[Unit] = []
        # (group, the outcome that showed it holds a rejection, or None if not known)
        frontier: list[tuple[list[Unit], Outcome | None]] = [(units, first)]
        while frontier:
            asks: list[tuple[list[Unit], list[Unit], Outcome | None, bool]] = []
            nxt: list[tuple[list[Unit], Outcome | None]] = []
            for group, known in frontier:
                if known is not None and len(group) == 1:
                    rejected[group[0]] = known if known.kind is not Kind.ACCEPTED else None
                    continue
                if known is not None:
                    half = len(group) // 2
                    asks.append((group[:half], group[half:], known, True))
                else:
                    asks.append((group, [], None, False))
            outs = self._ask([build(g) for g, _, _, _ in asks])
            for (g, rest, known, halved), out in zip(asks, outs, strict=True):
                if out is None:
                    untested.extend(g + rest)
                    continue
                if out.kind is Kind.ACCEPTED:
                    accepted.extend(g)
                    if halved:
                        nxt.append((rest, known))
                else:
                    nxt.append((g, out))
                    if halved:
                        nxt.append((rest, None))
            frontier = nxt
        return accepted, rejected, untested

    def run(self) -> _Classified:
        lay = self.layout
        bits: dict[BitKey, tuple[BitClass, Outcome | None, str | None]] = {}
        fields = self._fields()
        field_units = {f: Unit(((f.row, f.register, f.value),)) for f in fields}
        # Reported feature bits, as units that respect the couplings.
        units: list[Unit] = []
        lone: list[tuple[Unit, str | None]] = []
        unit_bits: dict[Unit, list[BitKey]] = {}
        coupled: dict[rules.Coupling, list[tuple[int, str, int]]] = {}
        for row, register in self._feature_regs():
            rep = self._reported(row, register)
            for bit in range(32):
                if not rep >> bit & 1:
                    continue
                key = lay.key(row, register, bit)
                reason = self._coupling_unmet(row, register, bit)
                u = self._unit(row, register, bit)
                c = _coupling(key)
                if reason is not None:
                    lone.append((u, reason))
                    unit_bits[u] = [key]
                elif c is not None and not c.attribute:
                    coupled.setdefault(c, []).append((row, register, bit))
                elif key in self.suspects:
                    lone.append((u, None))
                    unit_bits[u] = [key]
                else:
                    units.append(u)
                    unit_bits[u] = [key]
        for members in coupled.values():
            # Bits the module wants equal go in together, one unit.
            u = Unit(tuple((r, g, 1 << b) for r, g, b in members))
            unit_bits[u] = [lay.key(r, g, b) for r, g, b in members]
            if self.suspects & set(unit_bits[u]):
                lone.append((u, None))
            else:
                units.append(u)
        group = units + list(field_units.values())

        def build(us: Iterable[Unit]) -> InitVm:
            return lay.request(us, xfam=self.xfam)

        base_out = self._ask([build(group)])[0]
        accepted: list[Unit] = []
        rejected: dict[Unit, Outcome | None] = {}
        if base_out is not None and base_out.kind is Kind.ACCEPTED:
            accepted = group
        elif base_out is not None:
            minimal = self._ask([build([])])[0]
            if minimal is not None and minimal.kind is not Kind.ACCEPTED:
                raise ProbeError(
                    "even the minimal INIT_VM request (no feature bits, GPAW 48, XFAM "
                    f"0x{self.xfam:x}) is refused: {minimal.describe()}; nothing can be classified"
                )
            accepted, rejected, _ = self._split(group, build, base_out)
            if accepted and rejected:
                # The union of accepted halves was never sent as one request.
                check = self._ask([build(accepted)])[0]
                if check is not None and check.kind is not Kind.ACCEPTED:
                    self.notes.append("the accepted units together were refused "
                                      f"({check.describe()}); hidden bits tried on the minimal "
                                      "request instead")
                    accepted = []
        base_units = list(accepted)
        # Reported bits tried alone (a coupling cannot be met, or the mirror says the kernel
        # should hide them), on top of what was accepted.
        lone_outs = self._ask([build([*base_units, u]) for u, _ in lone])
        for (u, reason), out in zip(lone, lone_outs, strict=True):
            for key in unit_bits[u]:
                if out is None:
                    continue
                if out.kind is Kind.ACCEPTED:
                    bits[key] = (BitClass.REPORTED_ACCEPTED, out, None)
                else:
                    bits[key] = (BitClass.REPORTED_REJECTED, out,
                                 reason or self._explain_rejected(key, out))
        accepted_out = Outcome.classify(0, 0)
        for u in accepted:
            for key in unit_bits.get(u, []):
                bits[key] = (BitClass.REPORTED_ACCEPTED, accepted_out, None)
        for u, out in rejected.items():
            for key in unit_bits.get(u, []):
                bits[key] = (BitClass.REPORTED_REJECTED, out, self._explain_rejected(key, out))
        field_results: list[tuple[_Field, FieldClass, Outcome | None]] = []
        for f, u in field_units.items():
            if u in rejected:
                field_results.append((f, FieldClass.FIELD_REJECTED, rejected[u]))
            elif u in accepted:
                field_results.append((f, FieldClass.FIELD_ACCEPTED, accepted_out))
        # Hidden bits, one per TD.
        hidden = self._hidden_targets()
        reqs = [build([*base_units, self._unit(row, register, bit)])
                for row, register, bit in hidden]
        gpaw52 = lay.request(base_units, xfam=self.xfam, gpaw=52)
        outs = self._ask([*reqs, gpaw52])
        g52 = outs[-1]
        if g52 is not None:
            f52 = _Field(lay.gpaw_row, "eax", 16, 23, 52 << 16, "GPAW=52 (needs 5-level EPT)",
                         informational=True)
            field_results.append((f52, FieldClass.FIELD_ACCEPTED if g52.kind is Kind.ACCEPTED
                                  else FieldClass.FIELD_REJECTED, g52))
        pair_asks: list[tuple[BitKey, InitVm]] = []
        for (row, register, bit), out in zip(hidden, outs[:-1], strict=True):
            key = lay.key(row, register, bit)
            if out is None:
                continue
            cls = _hidden_class(out)
            partner = self._partner(row, register, bit)
            if cls is BitClass.HIDDEN_MODULE_REJECTED and partner is not None:
                # Alone it trips a rule like HLE == RTM; with its partners the
                # module may take it, and only then is it a hazard.
                pair_asks.append((key, build([*base_units, self._unit(row, register, bit),
                                               partner])))
            bits[key] = (cls, out, None)
        pair_outs = self._ask([r for _, r in pair_asks])
        for (key, _), out in zip(pair_asks, pair_outs, strict=True):
            if out is not None and out.kind is Kind.ACCEPTED:
                bits[key] = (BitClass.HIDDEN_ACCEPTED, out, None)
        total = sum(32 for _ in self._feature_regs())
        return _Classified(bits, field_results, total - len(bits), self.complete, self.notes)

    def _explain_rejected(self, key: BitKey, out: Outcome | None) -> str | None:
        c = _coupling(key)
        if out is not None and out.kind is Kind.ERROR and out.errno == errno.EIO \
                and c is not None and c.tsx_ctrl:
            first = (c.mask & -c.mask).bit_length() - 1
            return (f"module check: {bit_name(key[0], key[1], key[2], first)} needs TSX_CTRL "
                    "on the host (the module refused with EIO)")
        return None

    def _hidden_targets(self) -> list[tuple[int, str, int]]:
        lay = self.layout
        out: list[tuple[int, str, int]] = []
        for row, register in self._feature_regs():
            e = lay.rows[row]
            hidden = ~self._reported(row, register) & 0xFFFFFFFF
            if not self.exhaustive:
                wanted = self._interesting(e.function, e.index, register) & hidden
                rest = [b for b in range(32) if hidden >> b & 1 and not wanted >> b & 1]
                rng = random.Random(f"{e.function:x}.{e.index}.{register}")
                for b in rng.sample(rest, min(SAMPLE_PER_REGISTER, len(rest))):
                    wanted |= 1 << b
                hidden = wanted
            out.extend((row, register, b) for b in range(32) if hidden >> b & 1)
        return out

    def _interesting(self, leaf: int, index: int, register: str) -> int:
        """Bits whose class can differ between policies or between KVM and the module:
        those the module could take (config_direct | allow_direct)."""
        r = REGISTERS.index(register)
        if self.model is not None:
            profiles = [self.model.module]
        else:
            profiles = [load_profile(n) for n in BUNDLED_MODULES]
        mask = 0
        for p in profiles:
            for row in p.rows:
                if row.leaf == leaf and row.kvm_index == index:
                    mask |= row.module_allows()[r]
        return mask


def _hidden_class(out: Outcome) -> BitClass:
    if out.kind is Kind.ACCEPTED:
        return BitClass.HIDDEN_ACCEPTED
    if out.kind is Kind.MODULE_REJECTED:
        return BitClass.HIDDEN_MODULE_REJECTED
    if out.kind is Kind.ERROR and out.errno == errno.EIO:
        return BitClass.HIDDEN_MODULE_REJECTED  # the module failed the call
    return BitClass.HIDDEN_KVM_REJECTED


# ---------------------------------------------------------------------------
# Entry points.


@dataclass(frozen=True)
class ProbeOptions:
    exhaustive: bool = False
    max_tds: int | None = None
    jobs: int = 1
    progress: Callable[[int], None] | None = None


def classify(caps: Capabilities, oracle: Oracle, model: Model | None, *, exhaustive: bool,
             native_fms: int | None) -> _Classified:
    return _Prober(caps, oracle, model, exhaustive=exhaustive, native_fms=native_fms).run()


def expected_classes(module: ModuleProfile, host: Host, policy: Policy, *,
                     exhaustive: bool = True) -> dict[BitKey, BitClass]:
    """The classes the mirror says a kernel of `policy` gives (the same algorithm, the mirror
    as oracle, on the capabilities the mirror predicts)."""
    pred = mirror.predict_capabilities(module, host, policy, len(module.rows))
    if pred.caps is None:
        return {}
    got = classify(pred.caps, mirror_oracle(module, host, policy), Model(module, host, policy),
                   exhaustive=exhaustive, native_fms=host.native_fms())
    return {k: v[0] for k, v in got.bits.items()}


def _native_fms(kvm: Kvm, model: Model | None) -> int | None:
    if model is not None and model.host is not None:
        return model.host.native_fms() or None
    try:
        for e in kvm.supported_cpuid():
            if e.function == 1:
                return e.eax or None
    except OSError:
        return None
    return None


def _explain_hidden(model: Model | None, layout: _Layout, key: BitKey) -> str | None:
    if model is None or model.host is None:
        return None
    mi = model.row_index(key[0], key[1])
    if mi is None:
        return None
    if mirror.silently_cleared(model.module, model.host, mi, key[2]) >> key[3] & 1:
        return "the module drops it silently: an allow_direct bit this host lacks natively"
    return None


def probe(seam: Seam, options: ProbeOptions, *, label: str, given: Given | None = None,
          kernel_release: str | None = None) -> ProbeResult:
    """Probe the kernel behind `seam`, judged by what is `given` (kvmtdx.knowledge.given),
    completed from the capabilities as `verify` does.  Seams other than the real device
    are driven one ioctl at a time: kvmtdx cannot know that they are thread-safe."""
    start = time.monotonic()
    if options.max_tds is not None and options.max_tds < 1:
        raise ProbeError("--max-tds must be at least 1")
    serialize = not isinstance(seam, RealSeam)
    with Kvm(_SerialSeam(seam) if serialize else seam) as kvm:
        if not kvm.has_tdx():
            raise KvmError(no_tdx_reason(kvm.vm_types()), skip=True)
        oracle = DeviceOracle(kvm, jobs=options.jobs, max_tds=options.max_tds,
                              progress=options.progress)
        caps = oracle.capabilities()
        know = complete(given if given is not None else Given(), caps, kernel_release)
        model = Model.of(know)
        # Without a module profile nothing says which hidden bits matter: try them all.
        exhaustive = options.exhaustive or model is None
        got = classify(caps, oracle, model, exhaustive=exhaustive,
                       native_fms=_native_fms(kvm, model))
    exact = model.exact() if model is not None else None
    expected: dict[BitKey, BitClass] = {}
    if model is not None and exact is not None:
        expected = expected_classes(model.module, *exact, exhaustive=True)
    layout = _layout(caps, model)
    bits: list[BitResult] = []
    for key in sorted(got.bits, key=_order(layout)):
        cls, out, why = got.bits[key]
        if cls is BitClass.HIDDEN_ACCEPTED and why is None:
            why = _explain_hidden(model, layout, key)
        if cls is BitClass.REPORTED_REJECTED and model is not None and exact is not None:
            # With the kernel's policy known, only the mirror may excuse a rejection.
            why = _mirror_reason(model.module, *exact, caps, layout, key, out)
        bits.append(BitResult(key[0], key[1], key[2], key[3], bit_name(*key), cls, out, why,
                              expected.get(key)))
    fields = [
        FieldResult(layout.rows[f.row].function, layout.rows[f.row].index, f.register, f.lo, f.hi,
                    f.name, f.value, cls, out, f.informational)
        for f, cls, out in got.fields
    ]
    notes = list(got.notes)
    if serialize and options.jobs > 1:
        notes.append(f"--jobs {options.jobs}: this backend is driven one ioctl at a time "
                     "(a lock around the seam), so jobs overlap but do not speed it up")
    if oracle.budget_spent:
        notes.append(f"--max-tds {options.max_tds} reached: the classification is incomplete")
    return ProbeResult(
        backend=label,
        mode="exhaustive" if exhaustive else "targeted",
        complete=got.complete and not oracle.budget_spent,
        tds=kvm.counters.tds_created,
        ioctls=kvm.counters.ioctls,
        seconds=time.monotonic() - start,
        caps=caps,
        bits=bits,
        fields=fields,
        untested=got.untested,
        module=model.module.name if model is not None else None,
        policy=model.policy.name if model is not None and model.policy is not None else None,
        notes=notes,
        knowledge=know,
    )


def _order(layout: _Layout) -> Callable[[BitKey], tuple[int, int, int, int]]:
    def key(k: BitKey) -> tuple[int, int, int, int]:
        pos = layout.position(k[0], k[1])
        return (pos if pos is not None else 1 << 20, k[1], REGISTERS.index(k[2]), k[3])
    return key


def _mirror_reason(module: ModuleProfile, host: Host, policy: Policy, caps: Capabilities,
                   layout: _Layout, key: BitKey, out: Outcome | None) -> str | None:
    """The module coupling the mirror names for this bit, if the mirror also has the kernel
    report it and the module refuse it alone; else None (a kernel bug)."""
    pos = layout.position(key[0], key[1])
    predicted = {(e.function, e.index): e
                 for e in mirror.reported_entries(module, host, policy)}
    e = predicted.get((key[0], key[1]))
    if pos is None or e is None or not e.reg(key[2]) >> key[3] & 1:
        return None
    iv = layout.request([Unit(((pos, key[2], 1 << key[3]),))], xfam=caps.supported_xfam)
    pred = mirror.predict_init_vm(module, host, policy, iv)
    if pred.kind is Kind.ACCEPTED or pred.decider is not Decider.MODULE:
        return None
    if out is not None and not pred.same_answer(out):
        return None
    return f"module coupling named by the mirror ({pred.check})"


# ---------------------------------------------------------------------------
# The effective allowlist.


def effective_allowlist(result: ProbeResult, *, date: str) -> Allowlist:
    """What the probed kernel lets TDs have, in the form `--allowlist` loads.

    A bit is allowed when KVM does not refuse it: reported and accepted (or
    refused only by the module), or hidden yet accepted.  Bits KVM refuses,
    and hidden bits only the module refuses, stay out: under the series the
    latter are the module's business and say nothing of KVM's table.
    Value registers pass through.
    """
    allowed: dict[tuple[int, int, str], int] = {}
    names: dict[tuple[int, int, str, int], str] = {}
    for b in result.bits:
        kvm_refused = b.outcome is not None and b.outcome.kind is Kind.KVM_REJECTED
        take = (b.cls is BitClass.REPORTED_ACCEPTED
                or (b.cls is BitClass.REPORTED_REJECTED and not kvm_refused)
                or b.cls is BitClass.HIDDEN_ACCEPTED)
        if take:
            k = (b.leaf, b.subleaf, b.register)
            allowed[k] = allowed.get(k, 0) | 1 << b.bit
            if not b.name.startswith("bit"):
                names[(b.leaf, b.subleaf, b.register, b.bit)] = b.name
    layout = _layout(result.caps, None)
    passthrough = frozenset(
        (e.function, e.index, r) for i, e in enumerate(layout.rows) for r in REGISTERS
        if (i, r) in layout.value_regs
    )
    return Allowlist(
        name="probed",
        provenance=f"probed from {result.backend} on {date}",
        allowed=allowed,
        passthrough=passthrough,
        names=names,
    )
