"""A C reader just deep enough to cut named definitions out of kernel sources.

It does not parse C.  It tokenises a file (comments, strings and
preprocessor lines kept apart), splits it into top-level items at brace
depth 0 (a function ends at the brace closing its body, anything else at
its semicolon), and names each item: a function, a variable, a struct,
union or enum tag (plus an enum's constants), a typedef, a macro, or the
first-argument names of a top-level macro call such as DEFINE_MUTEX(x).
Each item keeps its exact source text and line, and the identifiers it
uses, so `extract` can take a function with everything it needs.

Limits, by design: conditional compilation at top level is not evaluated
(every branch is read, and the first definition of a name wins, which in
kernel headers is the CONFIG-enabled branch); a top-level macro call
without a semicolon merges with the item after it.
"""

from __future__ import annotations

import bisect
import re
from dataclasses import dataclass, field
from enum import Enum

_TOKEN = re.compile(
    r"""(?P<comment>/\*.*?\*/|//[^\n]*)
      | (?P<pp>^[ \t]*\#(?:[^\n\\]|\\.|\\\n)*)
      | (?P<string>"(?:[^"\\\n]|\\.)*"|'(?:[^'\\\n]|\\.)*')
      | (?P<ident>[A-Za-z_]\w*)
      | (?P<number>\.?\d(?:[\w.]|[eEpP][+-])*)
      | (?P<punct>->|\+\+|--|<<=|>>=|<<|>>|<=|>=|==|!=|&&|\|\||\.\.\.|[-+*/%&|^!~<>=?:;,.(){}\[\]#])
      | (?P<space>\s+)
      | (?P<other>.)""",
    re.S | re.M | re.X,
)

# Words that decorate a declaration without naming it.
_DECORATIONS = frozenset({
    "__ro_after_init", "__read_mostly", "__initdata", "__initconst", "__maybe_unused",
    "__percpu", "__used", "__packed", "__aligned", "__attribute__", "__section",
    "__always_unused", "__must_check", "__init", "__exit", "__cold", "__printf",
    "__acquires", "__releases", "__must_hold", "__cacheline_aligned",
})
_TAGS = ("struct", "union", "enum")
_TYPE_WORDS = frozenset({"void", "int", "char", "long", "short", "unsigned", "signed", "bool",
                         "u8", "u16", "u32", "u64", "s8", "s16", "s32", "s64", "const"})
# Top-level macro calls that define nothing another item can use.
_IGNORED_CALLS = re.compile(r"^(EXPORT_SYMBOL\w*|MODULE_\w+|module_param\w*|"
                            r"static_assert|_Static_assert|BUILD_BUG_ON\w*)$")


class Kind(str, Enum):
    FUNCTION = "function"
    VARIABLE = "variable"
    TYPE = "type"  # struct, union, enum, typedef
    MACRO = "macro"
    CALL = "call"  # a top-level macro call: DEFINE_MUTEX(x); DEFINE_CLASS(x, ...);
    PROTOTYPE = "prototype"


@dataclass
class Item:
    """One top-level definition: its names, its exact text and what it uses."""

    kind: Kind
    names: tuple[str, ...]
    path: str
    line: int
    text: str
    uses: frozenset[str]
    # For a function: its text up to the body, which makes its prototype.
    head: str = ""
    # For a macro: the prefixes it pastes a parameter onto (X86_FEATURE_##name), so
    # an item calling it also uses every prefix + identifier it mentions.
    pastes: frozenset[str] = frozenset()

    @property
    def name(self) -> str:
        return self.names[0] if self.names else "?"


@dataclass
class _Tok:
    kind: str
    text: str
    start: int
    end: int


@dataclass
class Source:
    path: str
    text: str
    items: list[Item] = field(default_factory=list)


def _tokens(text: str) -> list[_Tok]:
    out = []
    for m in _TOKEN.finditer(text):
        kind = m.lastgroup or "other"
        if kind in ("space", "comment"):
            continue
        out.append(_Tok(kind, m.group(), m.start(), m.end()))
    return out


def _line_of(offset: int, newlines: list[int]) -> int:
    return bisect.bisect_right(newlines, offset) + 1


def _newlines(text: str) -> list[int]:
    return [m.start() for m in re.finditer("\n", text)]


def uses_of(toks: list[_Tok]) -> set[str]:
    """Identifiers and struct/union/enum tags a run of tokens refers to (not member names)."""
    used: set[str] = set()
    prev = ""
    for t in toks:
        if t.kind == "ident":
            if prev in (".", "->"):
                pass
            elif prev in _TAGS:
                used.add(f"{prev} {t.text}")
            elif t.text not in _TAGS:
                used.add(t.text)
        elif t.kind == "pp":
            used |= _idents(_pp_body(t.text))
        prev = t.text
    return used


def _pp_body(text: str) -> str:
    return text.replace("\\\n", " ")


def _idents(text: str) -> set[str]:
    return uses_of([t for t in _tokens(text) if t.kind != "pp"])


_DEFINE = re.compile(r"\s*#\s*define\s+([A-Za-z_]\w*)(\([^)]*\))?(.*)", re.S)
_PASTE = re.compile(r"([A-Za-z_]\w*)\s*##\s*([A-Za-z_]\w*)")


def _macro(tok: _Tok, path: str, line: int) -> Item | None:
    m = _DEFINE.match(_pp_body(tok.text))
    if m is None:
        return None
    name, params, body = m.group(1), m.group(2), m.group(3)
    uses = _idents(body)
    names = {p.strip() for p in params[1:-1].split(",")} if params else set()
    uses -= names
    uses.discard(name)
    pastes = frozenset(m.group(1) for m in _PASTE.finditer(body) if m.group(2) in names)
    return Item(Kind.MACRO, (name,), path, line, tok.text, frozenset(uses), pastes=pastes)


def _depth0(toks: list[_Tok]) -> list[tuple[int, _Tok]]:
    out, depth = [], 0
    for i, t in enumerate(toks):
        if t.text in ("(", "[", "{"):
            if depth == 0:
                out.append((i, t))
            depth += 1
        elif t.text in (")", "]", "}"):
            depth -= 1
        elif depth == 0:
            out.append((i, t))
    return out


def _function_name(head: list[_Tok]) -> str | None:
    for i, t in _depth0(head):
        if t.text == "(" and i > 0 and head[i - 1].kind == "ident" and (
                head[i - 1].text not in _DECORATIONS):
            return head[i - 1].text
    return None


def _enumerators(body: list[_Tok]) -> list[str]:
    names, depth, expect = [], 0, True
    for t in body[1:-1]:
        if t.text in ("(", "[", "{"):
            depth += 1
        elif t.text in (")", "]", "}"):
            depth -= 1
        elif depth == 0 and t.text == ",":
            expect = True
        elif depth == 0 and expect and t.kind == "ident":
            names.append(t.text)
            expect = False
    return names


def _declaration_names(toks: list[_Tok]) -> tuple[Kind, list[str]] | None:
    """What a ';'-ended top-level item defines, or None for a forward declaration."""
    top = _depth0(toks)
    words = [t.text for _, t in top]
    if not words:
        return None
    if words[0] == "typedef":
        name = _last_ident(toks)
        return (Kind.TYPE, [name]) if name else None
    if words[0] in _TAGS and len(toks) > 2 and toks[1].kind == "ident" and toks[2].text == "{":
        names = [f"{words[0]} {toks[1].text}"]
        if words[0] == "enum":
            close = _matching(toks, 2)
            names += _enumerators(toks[2:close + 1])
        return Kind.TYPE, names
    if words[0] == "enum" and len(toks) > 1 and toks[1].text == "{":
        return Kind.TYPE, _enumerators(toks[1:_matching(toks, 1) + 1])
    first_paren = next((i for i, t in top if t.text == "("), None)
    assign = next((i for i, t in top if t.text == "="), len(toks))
    if (first_paren is not None and 0 < first_paren < assign
            and toks[first_paren - 1].kind == "ident"):
        callee = toks[first_paren - 1].text
        if _IGNORED_CALLS.match(callee):
            return None
        if callee.isupper() or callee.startswith(("DEFINE_", "DECLARE_")):
            return Kind.CALL, _call_args(toks, first_paren)
        if callee not in _TYPE_WORDS:
            return Kind.PROTOTYPE, [callee]
    if words[0] in _TAGS and len(words) == 3:
        return None  # struct foo;
    name = _last_ident(toks)
    return (Kind.VARIABLE, [name]) if name else None


def _matching(toks: list[_Tok], open_at: int) -> int:
    depth = 0
    for i in range(open_at, len(toks)):
        if toks[i].text in ("(", "[", "{"):
            depth += 1
        elif toks[i].text in (")", "]", "}"):
            depth -= 1
            if depth == 0:
                return i
    return len(toks) - 1


def _last_ident(toks: list[_Tok]) -> str | None:
    """The declared name: the last identifier at depth 0 before '=', '[' or the end."""
    name = None
    for _, t in _depth0(toks):
        if t.text in ("=", "["):
            break
        if t.kind == "ident" and t.text not in _DECORATIONS and t.text not in _TAGS:
            name = t.text
    return name


def _call_args(toks: list[_Tok], open_at: int) -> list[str]:
    close = _matching(toks, open_at)
    args: list[list[_Tok]] = [[]]
    depth = 0
    for t in toks[open_at + 1:close]:
        if t.text in ("(", "[", "{"):
            depth += 1
        elif t.text in (")", "]", "}"):
            depth -= 1
        if depth == 0 and t.text == ",":
            args.append([])
        else:
            args[-1].append(t)
    return [a[0].text for a in args if len(a) == 1 and a[0].kind == "ident"]


def parse(path: str, text: str) -> Source:
    """Every top-level item of one file, in file order."""
    src = Source(path, text)
    toks = _tokens(text)
    nl = _newlines(text)
    start = 0
    i = 0
    depth = 0
    while i < len(toks):
        t = toks[i]
        if t.kind == "pp" and depth == 0:
            if i == start:
                item = _macro(t, path, _line_of(t.start, nl))
                if item is not None:
                    src.items.append(item)
                start = i + 1
            i += 1
            continue
        if t.text == "{":
            if (depth == 0 and i > start and toks[i - 1].text == ")"
                    and _is_function(toks, start, i)):
                end = _matching(toks, i)
                _add_function(src, toks, start, i, end, nl)
                i = start = end + 1
                continue
            depth += 1
        elif t.text == "}":
            depth -= 1
        elif t.text == ";" and depth == 0:
            _add_declaration(src, toks, start, i, nl)
            start = i + 1
        i += 1
    return src


def _is_function(toks: list[_Tok], start: int, brace: int) -> bool:
    head = toks[start:brace]
    if any(t.text == "=" for _, t in _depth0(head)):
        return False  # an initialiser: int x[] = (..) { is not C, but be safe
    return _function_name(head) is not None


def _add_function(src: Source, toks: list[_Tok], start: int, brace: int, end: int,
                  nl: list[int]) -> None:
    head = toks[start:brace]
    name = _function_name(head)
    assert name is not None
    body = toks[start:end + 1]
    uses = uses_of(body) - {name}
    text = src.text[toks[start].start:toks[end].end]
    head_text = src.text[toks[start].start:toks[brace].start].rstrip()
    src.items.append(Item(Kind.FUNCTION, (name,), src.path, _line_of(toks[start].start, nl),
                          text, frozenset(uses), head=head_text))


def _add_declaration(src: Source, toks: list[_Tok], start: int, semi: int,
                     nl: list[int]) -> None:
    part = [t for t in toks[start:semi] if t.kind != "pp"]
    if not part:
        return
    found = _declaration_names(part)
    if found is None:
        return
    kind, names = found
    if not names:
        return
    text = src.text[toks[start].start:toks[semi].end]
    uses = uses_of(part) - set(names)
    src.items.append(Item(kind, tuple(names), src.path, _line_of(toks[start].start, nl),
                          text, frozenset(uses)))
