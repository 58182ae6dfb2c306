"""The mirror compiled: one (module, host, policy) turned into per-row tables once, so that
`predict_init_vm` answers at the rate a fuzzer sends.

The straightforward mirror (kvmtdx.model.mirror_kvm, then TDH.MNG.INIT by the module model)
recomputes per call what does not depend on the request: every row's allowlist mask, the
module's masks, the sampled native values, and it looks every row's entry up by a scan of
the request.  Here that is done once per (module, host, policy):

- KVM's lookup as tables: the rows of each leaf, the row of each (leaf, index), so one
  pass over the request's entries finds every row's entry (find()'s first match);
- per row one "watched" mask: the bits KVM's denylist or allowlist refuses and the bits the
  module refuses (outside config_direct | allow_direct).  A request none of whose matched
  entries has a watched bit passes both KVM's per-row checks and the module's masks at
  once; only a row that has one goes through the exact checks, in the kernel's order;
- TDH.MNG.INIT apart from its masks is remembered on exactly what each part reads: the TD
  configuration on (attributes, XFAM, GPAW), each refusing leaf rule
  (tdx_cpuid.REFUSING_RULES) on its own row's value, the 0x1F topology on the 0x1F rows.
  A miss runs the module model's own code on a scratch TD, so every remembered answer is
  the model's answer; nothing of TDH.MNG.INIT is restated here.

Only the Outcome comes out: the module's status, the kernel WARN and the TD's effective
CPUID with its changes are the explained path's (mirror.init_vm_prediction), computed only
when asked.  tests/test_compiled.py holds the two paths to the same Outcome.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

from kvmtdx.model import mirror_kvm as kvm
from kvmtdx.model.compiled_lookup import Known, Lookup
from kvmtdx.model.mirror_module import outcome_of, td_params
from kvmtdx.model.policy import Policy
from kvmtdx.model.profiles import Host, ModuleProfile, Regs, enumerated
from kvmtdx.model.requests import Request
from kvmtdx.model.rules import GPAW_FIELD, GPAW_LEAF, lowest_bit
from kvmtdx.model.tdx_cpuid import REFUSING_RULES, Refusal, Rule, Td, configured_row, rule_for
from kvmtdx.model.tdx_host import sampled_native
from kvmtdx.model.tdx_module import (
    MngInitResult,
    TdParams,
    after_cpuid_pass,
    kvm73_row_value,
    td_configuration,
)
from kvmtdx.model.tdx_module_tables import ZERO
from kvmtdx.outcome import Outcome
from kvmtdx.structs import FLAG_SIGNIFICANT_INDEX, REGISTERS, CpuidEntry, InitVm

ACCEPTED = Outcome.classify(0, 0, check="accepted")
_MISSING = object()
_MEMO_SIZE = 8192  # remembered answers per memo; a long fuzzing run starts afresh
_NOWHERE = 1 << 30  # past every lookup position


def _regs(known: Known | None) -> Regs:
    return ZERO if known is None else known[3]


def _remember(memo: dict[object, Outcome | None], key: object, value: Outcome | None
              ) -> Outcome | None:
    if len(memo) >= _MEMO_SIZE:
        memo.clear()
    memo[key] = value
    return value


class _ModuleSide:
    """TDH.MNG.INIT of the TD_PARAMS KVM builds, remembered part by part (see the module
    docstring); each miss runs the module model on a scratch TD."""

    def __init__(self, module: ModuleProfile, host: Host, policy: Policy) -> None:
        self.module, self.host, self.policy = module, host, policy
        tables = module.tables
        self.native = sampled_native(tables, host)
        self.lookup = tables.lookup
        self.rows = len(module.rows)
        self.configurable = tables.configurable
        self.configuration: dict[object, Outcome | None] = {}
        self.rules: dict[object, Outcome | None] = {}
        self.topology: dict[object, Outcome | None] = {}
        self.masks: dict[tuple[int, int, int], Outcome] = {}
        self.params: dict[tuple[int, int, int], TdParams] = {}
        self.mask_refusals: dict[tuple[int, int], Outcome] = {}

    def _params(self, attributes: int, xfam: int, gpaw: int) -> TdParams:
        """TD_PARAMS as KVM builds them for a request without CPUID entries."""
        key = (attributes, xfam, gpaw)
        params = self.params.get(key)
        if params is None:
            params = td_params(self.module, self.host, attributes, xfam, [None] * self.rows,
                               gpaw)
            if len(self.params) >= _MEMO_SIZE:
                self.params.clear()
            self.params[key] = params
        return params

    def _scratch(self, attributes: int, xfam: int, gpaw: int,
                 config: dict[int, Regs]) -> tuple[TdParams, Td]:
        """TD_PARAMS as KVM builds them, and a TD about to run the CPUID pass, with only the
        rows of `config` configured (every other row zero, as KVM leaves a row it found no
        entry for)."""
        params = self._params(attributes, xfam, gpaw)
        values = list(params.cpuid_values)
        for row, cfg in config.items():
            values[row] = kvm73_row_value(self.configurable[row], cfg)
        td = Td(tables=self.module.tables, host=self.host, attributes=params.attributes,
                xfam=params.xfam, config_flags=params.config_flags,
                tsc_frequency=params.tsc_frequency, config=tuple(values), native=self.native,
                log=False)
        td.values = list(self.native)
        return params, td

    def _outcome(self, refusal: Refusal | None, params: TdParams) -> Outcome | None:
        if refusal is None:
            return None
        result = MngInitResult(refusal.status, refusal.rule, refusal.source, refusal.rcx,
                               refusal.leaf, refusal.subleaf, refusal.register, refusal.mask)
        return outcome_of(result, self.module, self.host, self.policy, params)[0]

    def configured(self, attributes: int, xfam: int, gpaw: int) -> Outcome | None:
        """read_and_set_td_configurations: it reads no CPUID value."""
        key = (attributes, xfam, gpaw)
        hit = self.configuration.get(key, _MISSING)
        if hit is not _MISSING:
            return hit  # type: ignore[return-value]
        params, _ = self._scratch(attributes, xfam, gpaw, {})
        refused = self._outcome(td_configuration(self.module.tables, self.host, params), params)
        return _remember(self.configuration, key, refused)

    def rule(self, pos: int, rule: Rule, row: int | None, cfg: Regs, attributes: int,
             xfam: int, gpaw: int) -> Outcome | None:
        """A refusing leaf rule at lookup position `pos`, its row configured as `cfg`."""
        key = (pos, cfg, attributes, xfam, gpaw)
        hit = self.rules.get(key, _MISSING)
        if hit is not _MISSING:
            return hit  # type: ignore[return-value]
        params, td = self._scratch(attributes, xfam, gpaw, {} if row is None else {row: cfg})
        e = self.lookup[pos]
        refusal = configured_row(td, pos, e) or rule(td, pos, e)
        return _remember(self.rules, key, self._outcome(refusal, params))

    def mask(self, pos: int, row: int, register: int, bit: int) -> Outcome:
        """The row's mask check refusing `bit` of `register` (the lowest bit it refuses)."""
        key = (row, register, bit)
        hit = self.masks.get(key)
        if hit is not None:
            return hit
        template = self.mask_refusals.get((row, register))
        if template is None:
            cfg = [0, 0, 0, 0]
            cfg[register] = 1 << bit
            params, td = self._scratch(0, 0, 48, {row: (cfg[0], cfg[1], cfg[2], cfg[3])})
            template = self._outcome(configured_row(td, pos, self.lookup[pos]), params)
            if template is None or template.bit != bit:
                raise AssertionError(f"row {row}: the module's answer to a bit its compiled "
                                     f"mask refuses is {template}")
            self.mask_refusals[row, register] = template
        # One register's refusals differ in the bit they name alone (the lowest refused).
        t = template
        hit = Outcome(t.kind, t.errno, t.hw_error, t.check, t.decider, t.leaf, t.subleaf,
                      t.register, bit)
        self.masks[key] = hit
        return hit

    def after_pass(self, positions: Sequence[tuple[int, int]], cfgs: tuple[Regs, ...],
                   attributes: int, xfam: int, gpaw: int) -> Outcome | None:
        """The topology and the checks after the CPUID pass: they read the 0x1F rows alone
        (`positions`: their (lookup position, row); `cfgs`: their values)."""
        key = (cfgs, attributes, xfam, gpaw)
        hit = self.topology.get(key, _MISSING)
        if hit is not _MISSING:
            return hit  # type: ignore[return-value]
        config = {row: cfg for (_, row), cfg in zip(positions, cfgs, strict=True)}
        params, td = self._scratch(attributes, xfam, gpaw, config)
        for pos, _ in positions:
            if configured_row(td, pos, self.lookup[pos]) is not None:
                raise AssertionError("a 0x1F row the compiled masks pass is refused")
        refusal = after_cpuid_pass(self.module.tables, params, td)
        return _remember(self.topology, key, self._outcome(refusal, params))


class CompiledModel:
    """KVM_TDX_INIT_VM's outcome under one (module, host, policy), from tables built once.

    `outcome` gives exactly what the straightforward mirror gives (the Outcome with its
    check, decider and where); `reported` is what KVM_TDX_CAPABILITIES lists.  `exact` is
    False for a profile with two rows KVM indexes alike, which the mirror answers the
    straightforward way.
    """

    def __init__(self, module: ModuleProfile, host: Host, policy: Policy) -> None:
        self.module, self.host, self.policy = module, host, policy
        self.attrs = kvm.supported_attrs(module)
        self.xfam = kvm.supported_xfam(module, host)
        self.reported = kvm.reported(module, host, policy)
        self.listed = enumerated(module, host)
        denylist = policy.denylist
        self.deny = {} if denylist is None else {
            key: (m.get("eax", 0), m.get("ebx", 0), m.get("ecx", 0), m.get("edx", 0))
            for key, m in denylist.bits.items()}
        self.deny_leaves = frozenset(leaf for leaf, _ in self.deny)
        self._row_masks()
        keys = [(row.leaf, row.kvm_index) for row in module.rows]
        # A denylist judges an entry by its own (leaf, index), which only an entry without
        # the flag can hold apart from its row's; one that judges rows (the hole closed)
        # is all in the rows' watched masks.
        judges_row = denylist is not None and denylist.judges_row
        self.lookup = Lookup(keys, self.watch, {} if judges_row else self.deny)
        self.exact = len(set(keys)) == len(keys)
        self.gpaw_row = self.lookup.row_at.get((GPAW_LEAF, 0))
        self._module_positions()
        self.side = _ModuleSide(module, host, policy)
        self.allowlist_refusals: dict[tuple[int, int, int], Outcome] = {}

    def _row_masks(self) -> None:
        """Per row: what the module refuses, what KVM's allowlist refuses, and what is watched
        (those and the denylist's bits at the row's own index)."""
        self.outside: list[Regs] = []
        self.forbidden: list[Regs] = []
        self.watch: list[Regs] = []
        for i, row in enumerate(self.module.rows):
            gpaw = GPAW_FIELD if row.leaf == GPAW_LEAF else 0  # KVM clears it, nobody judges it
            # Every bit outside the masks, those above bit 31 too (a value a request object
            # may hold, though no wire carries it): the module refuses them all.
            out = [~m for m in row.module_allows()]
            out[0] &= ~gpaw
            a, b, c, d = (kvm.allowlist_refuses(self.policy, row, reg, listed)
                          for reg, listed in zip(REGISTERS, self.listed[i], strict=True))
            forbidden = (a, b, c, d)
            deny = self.deny.get((row.leaf, row.kvm_index), ZERO)
            watched = [o | f | d for o, f, d in zip(out, forbidden, deny, strict=True)]
            self.outside.append((out[0], out[1], out[2], out[3]))
            self.forbidden.append(forbidden)
            self.watch.append((watched[0], watched[1], watched[2], watched[3]))

    def _module_positions(self) -> None:
        """Where TDH.MNG.INIT processes each row; its refusing rules and the 0x1F rows, in
        its order."""
        tables = self.module.tables
        self.pos = [next(p for p, e in enumerate(tables.lookup) if e.index == r.lookup_index)
                    for r in tables.configurable]
        row_of = {p: i for i, p in enumerate(self.pos)}
        rules: list[tuple[int, Rule, int | None]] = []
        for p, e in enumerate(tables.lookup):
            rule = rule_for(e)
            if rule is not None and rule in REFUSING_RULES:
                rules.append((p, rule, row_of.get(p)))
        self.rules = tuple(rules)
        self.topology = tuple(sorted((self.pos[i], i) for i, row in enumerate(self.module.rows)
                                     if row.leaf == 0x1F))

    def outcome(self, request: Request | InitVm, td_initialized: bool = False) -> Outcome:
        """The Outcome of one KVM_TDX_INIT_VM (a free TDX key ID assumed)."""
        if isinstance(request, Request):
            iv, flags, hw_error = request.init_vm, request.flags, request.hw_error
        else:
            iv, flags, hw_error = request, 0, 0
        refused = kvm.header_checks(iv, flags, hw_error, td_initialized, self.attrs, self.xfam)
        if refused is not None:
            return refused
        nent = iv.effective_nent
        entries = iv.entries
        if nent != len(entries):
            # Zeroed room past the entries: one zero entry finds what any number would.
            entries = entries[:nent] if nent < len(entries) else (*entries, _ZERO_ENTRY)
        claimed, hits, count = self.lookup.match(entries)
        if self.gpaw_row is None:
            gpaw_entry = kvm.find(entries, GPAW_LEAF, 0)
        else:
            known = claimed[self.gpaw_row]
            gpaw_entry = None if known is None else known[0]
        gpaw = kvm.gpaw_of(gpaw_entry, self.host.ept_5level)
        if isinstance(gpaw, Outcome):
            return gpaw
        if hits:
            refused = self._kvm_rows(claimed, hits)
            if refused is not None:
                return refused
        if count != nent:
            return kvm.COUNT_MISMATCH
        return self._module(iv.attributes, iv.xfam, gpaw, claimed, hits)

    def _kvm_rows(self, claimed: list[Known | None], hits: list[int]) -> Outcome | None:
        """KVM's per-row checks (denylist, allowlist) on the rows that may fail them, in
        row order."""
        for r in sorted(set(hits)):
            known = claimed[r]
            assert known is not None
            e = known[0]
            if e.function in self.deny_leaves:
                refused = kvm.denied(self.policy, e, self.module.rows[r].kvm_index)
                if refused is not None:
                    return refused
            forbidden = self.forbidden[r]
            for i, bad in enumerate((e.eax & forbidden[0], e.ebx & forbidden[1],
                                     e.ecx & forbidden[2], e.edx & forbidden[3])):
                if bad:
                    return self._disallowed(r, i, lowest_bit(bad))
        return None

    def _disallowed(self, row: int, register: int, bit: int) -> Outcome:
        """The allowlist's refusal of `bit` (the lowest it refuses) of a row's register."""
        key = (row, register, bit)
        hit = self.allowlist_refusals.get(key)
        if hit is None:
            r = self.module.rows[row]
            e = CpuidEntry(r.leaf, r.kvm_index, FLAG_SIGNIFICANT_INDEX).with_reg(
                REGISTERS[register], 1 << bit)
            hit = kvm.disallowed(self.policy, r, self.listed[row], e)
            if hit is None:
                raise AssertionError(f"row {row}: a bit its compiled allowlist mask refuses "
                                     "is allowed")
            self.allowlist_refusals[key] = hit
        return hit

    def _module(self, attributes: int, xfam: int, gpaw: int,
                claimed: list[Known | None], hits: list[int]) -> Outcome:
        """TDH.MNG.INIT: the TD configuration, then the first refusal in lookup order (a row's
        mask before its leaf rule), then the topology."""
        side = self.side
        refused = side.configured(attributes, xfam, gpaw)
        if refused is not None:
            return refused
        first, where = _NOWHERE, (0, 0, 0)
        for r in hits:
            p = self.pos[r]
            if p < first:
                regs = _regs(claimed[r])
                for i, extra in enumerate(v & m for v, m in zip(regs, self.outside[r],
                                                               strict=True)):
                    if extra:
                        first, where = p, (r, i, lowest_bit(extra))
                        break
        for p, rule, row in self.rules:
            if p >= first:
                break
            cfg = _regs(None if row is None else claimed[row])
            refused = side.rule(p, rule, row, cfg, attributes, xfam, gpaw)
            if refused is not None:
                return refused
        if first != _NOWHERE:
            return side.mask(first, *where)
        cfgs = tuple([_regs(claimed[r]) for _, r in self.topology])
        refused = side.after_pass(self.topology, cfgs, attributes, xfam, gpaw)
        return ACCEPTED if refused is None else refused


_ZERO_ENTRY = CpuidEntry(function=0)
_MODELS: OrderedDict[tuple[int, int, int], tuple[ModuleProfile, Host, Policy, CompiledModel]] \
    = OrderedDict()
_MAX_MODELS = 64
# The model asked for last: a run asks for one model many times in a row.
_LAST: list[tuple[ModuleProfile, Host, Policy, CompiledModel] | None] = [None]


def compiled(module: ModuleProfile, host: Host, policy: Policy) -> CompiledModel:
    """The compiled model of (module, host, policy), built on first use.

    Remembered by the objects' identity (kept alive beside the model, so an id is never
    reused while remembered); a policy built anew but equal to one compiled for the same
    module and host (rfc-v2 comes from get_policy afresh each time) shares its model.
    """
    last = _LAST[0]
    if last is not None and last[0] is module and last[1] is host and last[2] is policy:
        return last[3]
    key = (id(module), id(host), id(policy))
    hit = _MODELS.get(key)
    if hit is not None:
        _LAST[0] = hit
        return hit[3]
    model = next((m for (mo, h, p, m) in _MODELS.values()
                  if mo is module and h is host and p == policy), None)
    if model is None:
        model = CompiledModel(module, host, policy)
    _MODELS[key] = _LAST[0] = (module, host, policy, model)
    if len(_MODELS) > _MAX_MODELS:
        _MODELS.popitem(last=False)
    return model
