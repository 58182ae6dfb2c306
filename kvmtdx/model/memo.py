"""Caching what depends on a module and a host only, by object identity.

Module tables and hosts are frozen but hold dicts, so they cannot be hashed; a
prediction asks for the same few (module, host) pairs thousands of times.  The
cache keys on the objects' ids and keeps the objects themselves alive beside the
value, so an id is never reused while its entry exists.  It is bounded: verify,
probe and the tests use a handful of pairs, a long fuzzing run many more.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from functools import wraps
from typing import Any, TypeVar

A = TypeVar("A")
B = TypeVar("B")
R = TypeVar("R")

MAX_ENTRIES = 256


def per_pair(fn: Callable[[A, B], R]) -> Callable[[A, B], R]:
    """`fn(a, b)`, computed once per (a, b) pair of objects."""
    cache: OrderedDict[tuple[int, int], tuple[Any, Any, R]] = OrderedDict()

    @wraps(fn)
    def cached(a: A, b: B) -> R:
        key = (id(a), id(b))
        hit = cache.get(key)
        if hit is not None:
            return hit[2]
        value = fn(a, b)
        cache[key] = (a, b, value)
        if len(cache) > MAX_ENTRIES:
            cache.popitem(last=False)
        return value

    return cached


def per_object(fn: Callable[[A], R]) -> Callable[[A], R]:
    """`fn(a)`, computed once per object `a`."""
    cache: OrderedDict[int, tuple[Any, R]] = OrderedDict()

    @wraps(fn)
    def cached(a: A) -> R:
        hit = cache.get(id(a))
        if hit is not None:
            return hit[1]
        value = fn(a)
        cache[id(a)] = (a, value)
        if len(cache) > MAX_ENTRIES:
            cache.popitem(last=False)
        return value

    return cached
