"""What the node's Mounts hold at once of Vault's replies and the files made from them.

A class may name any Vault address, and a Vault of its own answers what it likes: one reply
may take vault.MAX_BODY_BYTES, a Mount may read a thousand, and a namespace runs
admission.PER_NAMESPACE Mounts at once. Each reply and each file was bounded, their sum was
not: twelve 8 MiB replies took one Mount past 300 MiB, and four such Mounts past 1.2 GiB,
before the response-size check refused them at the end.

So each Mount counts what it holds while it runs: a reply's bytes as they are read (three
times: the body, its text while json decodes it, the strings decoded from it), VALUE_BYTES
per value it decodes to (a Python object each: a 1 MB reply of 99,000 keys takes 15 MiB to
decode), and the files it makes. The first FREE_BYTES of a Mount are its own; beyond
them it takes from the node's allowance, which a namespace may hold a share of. A Mount
that finds no room fails at once with a final error naming the limit (it never waits: a
namespace at its share must not hold anyone else's Mounts), and gives back what it took
when it ends, however it ends.

The count is carried to the code that reads replies in a context variable (CURRENT): set
by the Mount's thread for its run, and copied to the threads it borrows for parallel reads.
"""

from __future__ import annotations

import contextvars
import logging
import threading
import time

from provider.errors import ResponseTooLarge

logger = logging.getLogger(__name__)

# Held by one Mount without counting against the node: a Mount's replies are a few KiB,
# so the node's lock is taken only by the rare large one.
FREE_BYTES = 64 * 1024
# What a Mount takes from the node at once, at least: a large reply takes a few, not one per read.
GRAIN_BYTES = 256 * 1024
# What each decoded JSON value holds beyond its text, at the peak of decoding: a Python
# object and its slot in a dict or list, which grows by copies (a 1 MB reply of 99,000 keys
# took 14.7 MiB at its peak and kept 8.8, measured here).
VALUE_BYTES = 160
# The node's allowance and a namespace's share of it, in responses of -max-response-bytes
# (4 MiB by default: 40 and 20 MiB). A response of that size needs its replies (three
# times), their values and its files: a share holds one with room to spare.
NODE_RESPONSES = 10
NAMESPACE_RESPONSES = 5
# A namespace's share at least, whatever -max-response-bytes: a reply of a third of it (the
# largest it may read at once) leaves room for the smallest response limits.
MIN_NAMESPACE_SHARE = 8 * 1024 * 1024
# A namespace out of room is warned about at most this often.
WARNING_INTERVAL_SECONDS = 30.0


class NoRoom(ResponseTooLarge):
    """A Mount would hold more of its replies and files than its namespace, or the node, has
    room for now. Final for this Mount; the driver mounts again later."""


class ReplyMemory:
    """The node's allowance for what Mounts hold beyond FREE_BYTES each; thread-safe."""

    def __init__(self, *, total: int, namespace_share: int) -> None:
        self.total = total
        self.namespace_share = min(namespace_share, total)
        self._used = 0
        self._by_namespace: dict[str, int] = {}
        self._lock = threading.Lock()
        self._warned: dict[str, float] = {}

    @classmethod
    def for_responses(cls, max_response_bytes: int) -> ReplyMemory:
        """The allowance for responses of max_response_bytes (-max-response-bytes)."""
        share = max(NAMESPACE_RESPONSES * max_response_bytes, MIN_NAMESPACE_SHARE)
        return cls(total=max(NODE_RESPONSES * max_response_bytes, 2 * share), namespace_share=share)

    def used(self, namespace: str | None = None) -> int:
        with self._lock:
            return self._used if namespace is None else self._by_namespace.get(namespace, 0)

    def mount(self, namespace: str) -> MountMemory:
        """The count of one Mount by a pod of `namespace`; close() it when the Mount ends."""
        return MountMemory(self, namespace)

    def _take(self, namespace: str, size: int) -> str | None:
        """None when size is taken; else why not, in words."""
        with self._lock:
            held = self._by_namespace.get(namespace, 0)
            if held + size > self.namespace_share:
                why = (
                    f"Mounts of namespace {namespace} (this one included) already hold {held} bytes of Vault's "
                    f"replies and the files made from them, and a namespace may hold {self.namespace_share} at once"
                )
            elif self._used + size > self.total:
                why = (
                    f"the node's Mounts already hold {self._used} bytes of Vault's replies and the files made from "
                    f"them, of {self.total} at most"
                )
            else:
                self._used += size
                self._by_namespace[namespace] = held + size
                return None
            now = time.monotonic()
            warn = now >= self._warned.get(namespace, 0.0)
            if warn:
                if len(self._warned) > 1024:  # a node's namespaces are far fewer; never a leak
                    self._warned.clear()
                self._warned[namespace] = now + WARNING_INTERVAL_SECONDS
        if warn:
            logger.warning(
                "%s: a Mount needing %d more was refused (said once per namespace every %.0f s; "
                "-max-response-bytes sets both)",
                why,
                size,
                WARNING_INTERVAL_SECONDS,
            )
        return why

    def _give(self, namespace: str, size: int) -> None:
        with self._lock:
            self._used -= size
            left = self._by_namespace[namespace] - size
            if left:
                self._by_namespace[namespace] = left
            else:
                del self._by_namespace[namespace]


class MountMemory:
    """What one Mount holds; thread-safe (its parallel reads count on other threads)."""

    __slots__ = ("_closed", "_lock", "_namespace", "_node", "_taken", "used")

    def __init__(self, node: ReplyMemory, namespace: str) -> None:
        self._node = node
        self._namespace = namespace
        self.used = 0
        self._taken = 0  # from the node, beyond FREE_BYTES
        self._closed = False
        self._lock = threading.Lock()

    def count(self, size: int) -> None:
        """Count `size` more bytes held, before they are made; raises NoRoom when there is
        no room for them."""
        with self._lock:
            need = self.used + size - FREE_BYTES - self._taken
            if need > 0:
                if self._closed:
                    raise NoRoom("the Mount has ended")
                want = max(need, GRAIN_BYTES)
                why = self._node._take(self._namespace, want)
                if why is not None and want > need:  # room for what it needs, if not a whole grain
                    want = need
                    why = self._node._take(self._namespace, want)
                if why is not None:
                    raise NoRoom(f"{why} (this Mount would hold {self.used + size})")
                self._taken += want
            self.used += size

    def close(self) -> None:
        """Give back what the Mount took: it holds nothing more."""
        with self._lock:
            taken, self._taken, self._closed = self._taken, 0, True
        if taken:
            self._node._give(self._namespace, taken)


# The count of the Mount the running code works for, if any.
CURRENT: contextvars.ContextVar[MountMemory | None] = contextvars.ContextVar("mount_memory", default=None)


def count(size: int) -> None:
    """Count `size` bytes against the current Mount, if there is one."""
    memory = CURRENT.get()
    if memory is not None:
        memory.count(size)


def values_at_most(raw: bytes) -> int:
    """How many values a JSON text decodes to, at most: its separators and openers (those
    inside strings too), counted in C."""
    return raw.count(b",") + raw.count(b"[") + raw.count(b"{") + 1
