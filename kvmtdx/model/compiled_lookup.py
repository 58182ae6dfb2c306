"""KVM's CPUID lookup for the compiled mirror: which entry each row of a request finds, and
which rows' entries carry a bit someone refuses, in one pass over the entries.

find() gives a row the first entry of its leaf that either lacks the significant-index
flag or has the row's index.  So a flagged entry can only ever be its own (leaf, index)
row's, and an unflagged one is every row of its leaf not yet taken.  What an entry is to
the lookup (its row, and whether it carries a watched bit) depends on the entry alone,
except for an unflagged entry of a leaf with several rows; entries are frozen values, so
that is remembered per entry object.  A request derived from another (a fuzzer's, a
prober's) shares most of its entries with it, and those cost one dictionary look-up each.

"Watched" bits of a row are those KVM's denylist or allowlist refuses and those the
module refuses (outside config_direct | allow_direct): a row without one passes both.
"""

from __future__ import annotations

from collections.abc import Sequence

from kvmtdx.model.profiles import Regs
from kvmtdx.structs import FLAG_SIGNIFICANT_INDEX, CpuidEntry

NO_ROW = -1  # the entry is no row's (its leaf is no row's, or its flagged index none)
SPREAD = -2  # unflagged, of a leaf with several rows: it takes each it reaches first
_REMEMBERED = 4096  # entries remembered per model; past that it starts afresh

# The entry (kept alive: its id stays its own), its row (or NO_ROW, SPREAD), whether it has
# a bit its row watches, and its registers.
Known = tuple[CpuidEntry, int, bool, Regs]


class Lookup:
    """The lookup tables of one module's rows, with what each row watches."""

    def __init__(self, keys: Sequence[tuple[int, int]], watch: Sequence[Regs],
                 deny: dict[tuple[int, int], Regs]) -> None:
        leaves: dict[int, list[int]] = {}
        self.row_at: dict[tuple[int, int], int] = {}
        for i, (leaf, index) in enumerate(keys):
            leaves.setdefault(leaf, []).append(i)
            self.row_at.setdefault((leaf, index), i)
        self.leaves = {leaf: tuple(rows) for leaf, rows in leaves.items()}
        self.rows = len(keys)
        self.watch = tuple(watch)
        self.deny = deny
        # Entries by id, kept alive with what they are to the lookup (so an id here is the
        # entry's own for as long as it is here).
        self.known: dict[int, Known] = {}

    def _hit(self, e: CpuidEntry, row: int) -> bool:
        w = self.watch[row]
        return bool(e.eax & w[0] or e.ebx & w[1] or e.ecx & w[2] or e.edx & w[3])

    def denied(self, e: CpuidEntry) -> bool:
        """Whether the entry has bits the denylist refuses at its own (leaf, index)."""
        mask = self.deny.get((e.function, e.index))
        return mask is not None and bool(e.eax & mask[0] or e.ebx & mask[1]
                                         or e.ecx & mask[2] or e.edx & mask[3])

    def learn(self, e: CpuidEntry) -> Known:
        """What the entry is to the lookup, remembered."""
        if e.flags & FLAG_SIGNIFICANT_INDEX:
            # A flagged entry's own (leaf, index) is its row's: the denylist is watched there.
            row = self.row_at.get((e.function, e.index), NO_ROW)
            hit = row != NO_ROW and self._hit(e, row)
        else:
            rows = self.leaves.get(e.function, ())
            if len(rows) == 1:
                row, hit = rows[0], self._hit(e, rows[0]) or self.denied(e)
            else:
                row, hit = SPREAD if rows else NO_ROW, self.denied(e)
        known = (e, row, hit, (e.eax, e.ebx, e.ecx, e.edx))
        if len(self.known) >= _REMEMBERED:
            self.known.clear()
        self.known[id(e)] = known
        return known

    def match(self, entries: Sequence[CpuidEntry]) -> tuple[list[Known | None], list[int], int]:
        """What each row finds (None: no entry), the rows whose entry has a watched bit (a row
        may be named twice), and how many rows found an entry."""
        claimed: list[Known | None] = [None] * self.rows
        hits: list[int] = []
        count = 0
        for e, known in zip(entries, map(self.known.get, map(id, entries)), strict=True):
            if known is None:
                known = self.learn(e)
            r = known[1]
            if r >= 0:
                if claimed[r] is None:
                    claimed[r] = known
                    count += 1
                    if known[2]:
                        hits.append(r)
            elif r == SPREAD:
                for r in self.leaves[e.function]:
                    if claimed[r] is None:
                        claimed[r] = known
                        count += 1
                        if known[2] or self._hit(e, r):
                            hits.append(r)
        return claimed, hits, count
