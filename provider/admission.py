"""Bulkheads: who may use a Mount thread now, so one tenant's slow Vault cannot starve another.

Mounts are answered on the gRPC event loop, which never blocks; the blocking work
(a login, the reads) runs on a bounded set of threads. A Mount waits for a thread *on
the event loop*, costing nothing, and takes one only when three limits allow it:

- its class (the pod's namespace and the class's parameters) runs fewer than
  PER_CLASS threads,
- its pod's namespace (a team) fewer than PER_NAMESPACE, however many classes and
  spellings of Vault addresses the team writes,
- its Vault endpoint (address and namespace) fewer than PER_ENDPOINT,
- the node fewer than TOTAL.

A Vault that hangs therefore holds at most PER_CLASS threads per class, PER_NAMESPACE
per team and PER_ENDPOINT per endpoint; every other class keeps its share. When several Mounts
wait, the next free thread goes to the one whose namespace, then class, runs the fewest (fair share),
then to the oldest. A Mount that cannot start before its deadline is answered with
a final error naming the limit it waited on, and one whose endpoint's breaker opens
while it waits is answered at once; no reply is ever left to the caller's deadline.

A Mount with several distinct requests may borrow more threads to fetch them in
parallel (Ticket.try_submit), but only threads nobody is waiting for: under load a
Mount fetches sequentially rather than queue in front of others.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import itertools
import logging
import threading
import time
from collections.abc import Callable, Hashable, Iterator
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import TypeVar

from provider.breaker import EndpointKey
from provider.errors import MountRejected, ProviderError
from provider.threads import Threads

logger = logging.getLogger(__name__)

T = TypeVar("T")

# Threads for Mount work on the whole node. An idle Python thread costs about 16 KiB of
# memory (measured here), a busy one little more: 128 fit the 100Mi budget easily, and
# are more than a node's pods need at once when Vault answers in milliseconds.
TOTAL = 128
# Threads one Vault endpoint may hold: a hung Vault takes at most a quarter of the node.
PER_ENDPOINT = 32
# Threads the pods of one namespace may hold, whatever classes they use: a team that
# writes many classes still leaves 7/8 of the node, and half of any one endpoint's share.
PER_NAMESPACE = 16
# Threads one class may hold: a burst of one class's pods is served 8 at a time (tens of
# Mounts per second on a healthy Vault) and a hung one holds 8 threads, not the node.
PER_CLASS = 8
# A Mount is not started with less time than this left: it could not finish anyway.
MIN_START_SECONDS = 0.2


@dataclass(frozen=True, kw_only=True)
class Lane:
    """What a Mount counts against: its class, its pod's namespace and its Vault endpoint."""

    tenant: Hashable  # the class
    endpoint: EndpointKey
    namespace: str = ""

    @property
    def team(self) -> tuple[str, str]:
        return ("namespace", self.namespace)


@dataclass(eq=False, kw_only=True)
class _Waiter:
    lane: Lane
    future: asyncio.Future[Ticket]
    seq: int
    refusal: Callable[[], ProviderError | None]


@dataclass(eq=False, kw_only=True)
class Ticket:
    """A Mount's admission: one thread, plus any it borrows for parallel fetches."""

    admission: Admission
    lane: Lane
    released: bool = field(default=False)

    def try_submit(self, fn: Callable[[], T]) -> Future[T] | None:
        """Run fn on another thread if one is free for this Mount's lane; None if not."""
        return self.admission.borrow(self.lane, fn)

    def release(self) -> None:
        if not self.released:
            self.released = True
            self.admission.release(self.lane)


class Admission:
    """The bulkheads and the threads they guard. Thread-safe; waiting happens on one event loop."""

    def __init__(
        self,
        *,
        total: int = TOTAL,
        per_endpoint: int = PER_ENDPOINT,
        per_class: int = PER_CLASS,
        per_namespace: int = PER_NAMESPACE,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.total, self.per_endpoint, self.per_class = total, per_endpoint, per_class
        self.per_namespace = per_namespace
        self._clock = clock
        self._lock = threading.Lock()
        self._running = 0
        self._by_key: dict[Hashable, int] = {}
        self._waiters: list[_Waiter] = []
        self._seq = itertools.count()
        self._loop: asyncio.AbstractEventLoop | None = None
        self.threads = Threads(total, name="mount")

    def bind(self, loop: asyncio.AbstractEventLoop) -> None:
        """The loop Mounts wait on; wake() schedules work there from any thread."""
        self._loop = loop

    def close(self) -> None:
        self.threads.close()

    @property
    def running(self) -> int:
        with self._lock:
            return self._running

    @property
    def waiting(self) -> int:
        with self._lock:
            return len(self._waiters)

    async def enter(
        self, lane: Lane, *, deadline: float, refusal: Callable[[], ProviderError | None] = lambda: None
    ) -> Ticket:
        """Wait on the event loop until the lane may run a thread, or fail before `deadline`."""
        started = self._clock()
        loop = asyncio.get_running_loop()
        with self._lock:
            if not self._waiters and self._fits(lane):
                self._take(lane)
                return Ticket(admission=self, lane=lane)
            waiter = _Waiter(lane=lane, future=loop.create_future(), seq=next(self._seq), refusal=refusal)
            self._waiters.append(waiter)
        self._dispatch()
        try:
            ticket = await asyncio.wait_for(
                asyncio.shield(waiter.future), timeout=max(deadline - MIN_START_SECONDS - self._clock(), 0.0)
            )
        except TimeoutError:
            with self._lock:
                if waiter in self._waiters:
                    self._waiters.remove(waiter)
                message = self._why_full(lane, self._clock() - started)
            refused = _abandon(waiter)
            raise refused or MountRejected(message) from None
        except asyncio.CancelledError:
            with self._lock:
                if waiter in self._waiters:
                    self._waiters.remove(waiter)
            _abandon(waiter)
            raise
        return ticket

    def borrow(self, lane: Lane, fn: Callable[[], T]) -> Future[T] | None:
        with self._lock:
            if self._waiters or not self._fits(lane):
                return None
            self._take(lane)

        borrowed: Future[T] = Future()
        context = contextvars.copy_context()  # what the Mount counts (replymemory) goes with its work

        def run() -> None:
            try:
                borrowed.set_result(context.run(fn))
            except BaseException as e:
                borrowed.set_exception(e)
            finally:
                self.release(lane)

        try:
            self.threads.submit(run)
        except Exception:  # shut down, or no thread could start: the caller does the work itself
            self.release(lane)
            return None
        return borrowed

    def release(self, lane: Lane) -> None:
        with self._lock:
            self._running -= 1
            for key in (lane.tenant, lane.team, lane.endpoint):
                left = self._by_key[key] - 1
                if left:
                    self._by_key[key] = left
                else:
                    del self._by_key[key]
            wake = bool(self._waiters)
        if wake:
            self.wake()

    def wake(self) -> None:
        """Re-examine waiters (a thread freed, a breaker changed); callable from any thread,
        also with other locks held: the work is always scheduled, never done in the caller."""
        loop = self._loop
        if loop is None:
            return
        with contextlib.suppress(RuntimeError):  # the loop is closed: nobody waits any more
            loop.call_soon_threadsafe(self._dispatch)

    def refuse_waiting(self, error: ProviderError) -> None:
        """On the loop: answer every waiting Mount with `error` (the provider is stopping)."""
        with self._lock:
            waiters, self._waiters = self._waiters, []
        for waiter in waiters:
            if not waiter.future.done():
                waiter.future.set_exception(error)

    def _dispatch(self) -> None:
        """Admit whom the limits allow, fewest-running namespace and class first; refuse whom a
        breaker shut out."""
        verdicts: list[tuple[_Waiter, Ticket | ProviderError]] = []
        with self._lock:
            for waiter in list(self._waiters):
                if waiter.future.done():
                    self._waiters.remove(waiter)
                    continue
                refused = waiter.refusal()
                if refused is not None:
                    self._waiters.remove(waiter)
                    verdicts.append((waiter, refused))
            while self._waiters and self._running < self.total:
                candidates = [w for w in self._waiters if self._fits(w.lane)]
                if not candidates:
                    break
                chosen = min(
                    candidates,
                    key=lambda w: (self._by_key.get(w.lane.team, 0), self._by_key.get(w.lane.tenant, 0), w.seq),
                )
                self._waiters.remove(chosen)
                self._take(chosen.lane)
                verdicts.append((chosen, Ticket(admission=self, lane=chosen.lane)))
        for waiter, verdict in verdicts:
            if waiter.future.done():  # gave up meanwhile
                if isinstance(verdict, Ticket):
                    verdict.release()
                continue
            if isinstance(verdict, Ticket):
                waiter.future.set_result(verdict)
            else:
                waiter.future.set_exception(verdict)

    def _fits(self, lane: Lane) -> bool:
        return (
            self._running < self.total
            and self._by_key.get(lane.tenant, 0) < self.per_class
            and self._by_key.get(lane.team, 0) < self.per_namespace
            and self._by_key.get(lane.endpoint, 0) < self.per_endpoint
        )

    def _take(self, lane: Lane) -> None:
        self._running += 1
        for key in (lane.tenant, lane.team, lane.endpoint):
            self._by_key[key] = self._by_key.get(key, 0) + 1

    def _why_full(self, lane: Lane, waited: float) -> str:
        if self._by_key.get(lane.tenant, 0) >= self.per_class:
            limit = (
                f"this SecretProviderClass already has {self._by_key[lane.tenant]} Mounts in progress "
                f"(at most {self.per_class} per class run at once on a node)"
            )
        elif self._by_key.get(lane.team, 0) >= self.per_namespace:
            limit = (
                f"the pods of namespace {lane.namespace!r} already have {self._by_key[lane.team]} Mounts in progress "
                f"(at most {self.per_namespace} per namespace run at once on a node)"
            )
        elif self._by_key.get(lane.endpoint, 0) >= self.per_endpoint:
            limit = (
                f"Vault at {lane.endpoint.describe()} already has {self._by_key[lane.endpoint]} Mounts in progress "
                f"(at most {self.per_endpoint} per Vault endpoint run at once on a node)"
            )
        else:
            limit = f"all {self.total} Mount threads of this node's provider are busy"
        return (
            f"the Mount could not start within {waited:.1f}s: {limit}; Vault at {lane.endpoint.describe()} "
            "is answering slowly or not at all"
        )


def _abandon(waiter: _Waiter) -> ProviderError | None:
    """Settle a waiter that stopped waiting: give back a ticket it was granted meanwhile,
    or return the refusal it was given."""
    future = waiter.future
    if not future.done() or future.cancelled():
        future.cancel()
        return None
    error = future.exception()
    if error is None:
        future.result().release()
        return None
    return error if isinstance(error, ProviderError) else None


# Parses of objects lists not cached yet, at once on the node, and per namespace. Parsing
# holds the GIL (up to ~0.2 s for the largest class allowed): more at once would starve
# the event loop, and so every other tenant's answers. Cached classes never wait here.
PARSES_AT_ONCE = 2
PARSES_PER_NAMESPACE = 1


class ParseGate:
    """Bounds concurrent uncached parses, node-wide and per namespace; waits up to a deadline."""

    def __init__(self, *, total: int = PARSES_AT_ONCE, per_namespace: int = PARSES_PER_NAMESPACE) -> None:
        self._total, self._per_namespace = total, per_namespace
        self._running = 0
        self._by_namespace: dict[str, int] = {}
        self._cond = threading.Condition()

    @contextlib.contextmanager
    def slot(self, namespace: str, deadline: float) -> Iterator[None]:
        with self._cond:
            while self._running >= self._total or self._by_namespace.get(namespace, 0) >= self._per_namespace:
                left = deadline - time.monotonic()
                if left <= 0 or not self._cond.wait(left):
                    if self._running < self._total and self._by_namespace.get(namespace, 0) < self._per_namespace:
                        break
                    raise MountRejected(
                        "the Mount could not start: too many new SecretProviderClasses are being read on this node "
                        f"(at most {self._total} at once, {self._per_namespace} per namespace); it is retried"
                    )
            self._running += 1
            self._by_namespace[namespace] = self._by_namespace.get(namespace, 0) + 1
        try:
            yield
        finally:
            with self._cond:
                self._running -= 1
                left_in_namespace = self._by_namespace[namespace] - 1
                if left_in_namespace:
                    self._by_namespace[namespace] = left_in_namespace
                else:
                    del self._by_namespace[namespace]
                self._cond.notify_all()
