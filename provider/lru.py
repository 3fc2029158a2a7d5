"""A map that keeps its most recently used entries, bounded by count and by weight.

The parse caches (config's objects lists, dispatch's Mount requests) keep what costs
memory in proportion to what a class wrote: each entry weighs what keeping it costs, and
one too heavy is not kept at all, so no class can make either cache hold more than its
bound; an owner told of what is dropped lets go of what it kept beside it.
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable
from typing import Generic, TypeVar

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")

logger = logging.getLogger(__name__)


class WeightedLRU(Generic[K, V]):
    """At most `entries` values weighing at most `total_weight` in all, none weighing more
    than `max_weight`; the least recently used go first. Thread-safe."""

    def __init__(
        self, *, entries: int, total_weight: int, max_weight: int, on_drop: Callable[[V], None] | None = None
    ) -> None:
        """`on_drop` is told of each value dropped to make room (after the lock is let go)."""
        self._entries, self._total_weight, self._max_weight = entries, total_weight, max_weight
        self._kept: OrderedDict[K, tuple[V, int]] = OrderedDict()
        self._weight = 0
        self._lock = threading.Lock()
        self._on_drop = on_drop

    def get(self, key: K) -> V | None:
        with self._lock:
            found = self._kept.get(key)
            if found is None:
                return None
            self._kept.move_to_end(key)
            return found[0]

    def put(self, key: K, value: V, weight: int) -> None:
        """Keep value for key, unless it weighs too much or key is kept already (the first
        value stays: callers share it by identity)."""
        if weight > self._max_weight:
            return
        with self._lock:
            if key in self._kept:
                return
            self._kept[key] = (value, weight)
            self._weight += weight
            dropped = self._make_room()
        self._dropped(dropped)

    def add_weight(self, key: K, extra: int, *, value: V, then: Callable[[], None] = lambda: None) -> bool:
        """Weigh key's entry `extra` more, for what `then` adds to its value (called under
        the lock, so the value is not dropped in between), the least recently used others
        dropped to make room; False, nothing changed or called, when key is not kept with
        this very value (another parse of it may be) or would weigh too much."""
        with self._lock:
            found = self._kept.get(key)
            if found is None or found[0] is not value or found[1] + extra > self._max_weight:
                return False
            then()
            self._kept[key] = (value, found[1] + extra)
            self._kept.move_to_end(key)
            self._weight += extra
            dropped = self._make_room()
            kept = key in self._kept
        self._dropped(dropped)
        return kept

    def _make_room(self) -> list[V]:
        """Drop the least recently used until within bounds (the lock held); what went."""
        dropped = []
        while len(self._kept) > self._entries or self._weight > self._total_weight:
            value, weight = self._kept.popitem(last=False)[1]
            self._weight -= weight
            dropped.append(value)
        return dropped

    def _dropped(self, values: list[V]) -> None:
        if self._on_drop is not None:
            for value in values:
                try:
                    self._on_drop(value)
                except Exception:  # a defect of the owner's: the cache and the other values go on
                    logger.exception("a dropped cache entry's owner failed")

    def values(self) -> list[V]:
        with self._lock:
            return [value for value, _ in self._kept.values()]

    def drop_where(self, matches: Callable[[V], bool]) -> int:
        """Drop every value that `matches`; how many were dropped."""
        with self._lock:
            keys = [key for key, (value, _) in self._kept.items() if matches(value)]
            dropped = []
            for key in keys:
                value, weight = self._kept.pop(key)
                self._weight -= weight
                dropped.append(value)
        self._dropped(dropped)
        return len(dropped)

    def total(self) -> int:
        """What the kept entries weigh in all."""
        with self._lock:
            return self._weight

    def __len__(self) -> int:
        with self._lock:
            return len(self._kept)
