"""Circuit breakers: fail fast while a Vault endpoint is known to be down.

A Vault address that refuses connections (or cannot be resolved, or does not accept
them in time) costs every Mount to it about 20 s of retries. After
FAILURES_TO_OPEN consecutive connection failures with no answer in between, the
endpoint's breaker opens: further Mounts to it are answered at once, without a thread
or a Vault call, with a message saying since when it has been unreachable and what
the last error was. After a jittered pause (doubling while Vault stays down, so 5,000
nodes do not probe in step) the next Mount becomes the one probe (half-open): a single
cheap request with a short timeout. Any HTTP answer closes the breaker and that Mount
goes on; another failure opens it again. Mounts already in flight are never cut short:
they ride out a blip with their own retries, and their first answer closes it too.

Only connection failures count. An HTTP error (403, 503 sealed, 500) proves Vault is
reachable, and a TLS verification failure belongs to the class that configured TLS,
so neither can open a breaker that other classes share. Read timeouts on an
established connection do not count either: one class's slow path (a database engine
whose database hangs) must not fail another class's reads on the same Vault; the
bulkheads in admission.py contain slowness instead.

Breakers are keyed by endpoint (address and namespace), kept in a bounded registry,
and thread-safe: Vault requests report from worker threads, admission reads them on
the event loop. A class chooses its address, so the registry is shared fairly: each
breaker counts against the pod namespace whose Mount made it (TENANT), and one namespace
keeps at most MAX_BREAKERS_PER_NAMESPACE. Past that share one of its own is forgotten,
never one another namespace uses too; past MAX_BREAKERS, one of the namespaces holding
the most. Least recently used first (looking at a breaker counts as using it), of those
first that hold nothing; never the breaker just made.
"""

from __future__ import annotations

import enum
import logging
import random
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field

from provider.address import Target
from provider.errors import VaultCircuitOpen, truncate
from provider.tenant import TENANT

logger = logging.getLogger(__name__)

Clock = Callable[[], float]

# Consecutive connection failures (attempts, across Mounts) that open a breaker: a
# dead address reaches it in about a second of one Mount's retries, a single dropped
# connection never does.
FAILURES_TO_OPEN = 5
# First pause before a probe, and its ceiling while Vault stays down. Short enough
# that a Vault back from a restart is used again within seconds, long enough that a
# dead one costs one connection attempt per pause per node.
OPEN_BASE_SECONDS = 2.0
OPEN_MAX_SECONDS = 30.0
# Each pause is scaled by a random factor in this range, so nodes drift apart.
JITTER = (0.5, 1.5)
# The probe's own time limit; a probe that never reports back frees the slot after
# twice this.
PROBE_TIMEOUT_SECONDS = 2.0
# Endpoints remembered at most (which one is forgotten past that: module docstring).
MAX_BREAKERS = 1024
# Breakers one pod namespace's Mounts may make: a class naming a thousand dead addresses
# fills its own share, not the node's registry.
MAX_BREAKERS_PER_NAMESPACE = 64


class State(enum.IntEnum):
    """Exported as a number: 0 closed, 1 half-open (probing), 2 open."""

    CLOSED = 0
    HALF_OPEN = 1
    OPEN = 2


class Verdict(enum.Enum):
    ALLOW = "allow"  # go ahead
    PROBE = "probe"  # go ahead, and probe first: you are the one half-open try


@dataclass(frozen=True, kw_only=True)
class EndpointKey:
    """What a breaker and a bulkhead are per: the Vault address (without credentials) and namespace."""

    address: str
    namespace: str = ""
    # Computed once: a Mount looks its endpoint up in several maps (breakers, bulkheads).
    _hash: int = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_hash", hash((self.address, self.namespace)))

    def __hash__(self) -> int:
        return self._hash

    @classmethod
    def of(cls, address: str, namespace: str = "") -> EndpointKey:
        """The key for a Vault address as a class wrote it: its canonical form (no
        credentials, explicit port), the same one its connections are made from.
        Raises ValueError for an address that does not parse."""
        return cls(address=Target.parse(address).key(), namespace=namespace)

    def describe(self) -> str:
        return self.address + (f" (namespace {self.namespace})" if self.namespace else "")


StateListener = Callable[[EndpointKey, State], None]


class Breaker:
    """One endpoint's breaker."""

    def __init__(
        self,
        key: EndpointKey,
        *,
        clock: Clock = time.monotonic,
        wall_clock: Clock = time.time,
        rng: random.Random | None = None,
        on_change: StateListener | None = None,
    ) -> None:
        self.key = key
        self.tenant = TENANT.get()  # whose Mount made it: its registry share counts it
        self.shared = False  # another namespace's Mounts used it too (Breakers.get and peek)
        self._clock = clock
        self._wall_clock = wall_clock
        self._rng = rng or random.Random()
        self._on_change = on_change
        self._lock = threading.Lock()
        self.state = State.CLOSED
        self._failures = 0
        self._opens = 0
        self._down_since_wall = 0.0
        self._down_since = 0.0
        self._last_error = ""
        self._probe_at = 0.0
        self._probe_started = 0.0

    @property
    def idle(self) -> bool:
        """Closed and counting no failure: it holds nothing worth keeping."""
        return self.state is State.CLOSED and self._failures == 0

    def check(self) -> Verdict:
        """Whether a new Mount may go to this endpoint; raises VaultCircuitOpen if not."""
        with self._lock:
            if self.state is State.CLOSED:
                return Verdict.ALLOW
            now = self._clock()
            if self.state is State.HALF_OPEN and now - self._probe_started > 2 * PROBE_TIMEOUT_SECONDS:
                self.state = State.OPEN  # the probe never reported back: let another try
            if not (self.state is State.OPEN and now >= self._probe_at):
                raise self._refusal(now)
            self._probe_started = now
            self.state = State.HALF_OPEN
        self._notify(State.HALF_OPEN)
        return Verdict.PROBE

    def give_back_probe(self) -> None:
        """The probing Mount did not probe (no time left for it): open again, with the
        probe due at once, for the next Mount."""
        with self._lock:
            if self.state is not State.HALF_OPEN:
                return
            self.state = State.OPEN
        self._notify(State.OPEN)

    def refusal(self) -> VaultCircuitOpen | None:
        """The error for a Mount waiting to start, if the breaker opened meanwhile."""
        with self._lock:
            if self.state is State.CLOSED:
                return None
            return self._refusal(self._clock())

    def record_success(self) -> None:
        with self._lock:
            self._failures = 0
            if self.state is State.CLOSED:
                return
            down_for = self._clock() - self._down_since
            self._opens = 0
            self.state = State.CLOSED
        self._notify(State.CLOSED)
        logger.warning(
            "Vault at %s is reachable again after %.0fs; Mounts to it go ahead", self.key.describe(), down_for
        )

    def record_failure(self, error: str) -> None:
        with self._lock:
            now = self._clock()
            if self._failures == 0:
                self._down_since, self._down_since_wall = now, self._wall_clock()
            self._failures += 1
            self._last_error = truncate(error)
            if self.state is State.OPEN or (self.state is State.CLOSED and self._failures < FAILURES_TO_OPEN):
                return
            probing = self.state is State.HALF_OPEN
            self._opens += 1
            pause = min(OPEN_MAX_SECONDS, OPEN_BASE_SECONDS * 2.0 ** (self._opens - 1)) * self._rng.uniform(*JITTER)
            self._probe_at = now + pause
            self.state = State.OPEN
            last_error = self._last_error
        self._notify(State.OPEN)
        if not probing:
            logger.warning(
                "Vault at %s is unreachable (%d connection failures in a row; last: %s); Mounts to it fail at once "
                "until a probe in %.1fs reaches it",
                self.key.describe(),
                FAILURES_TO_OPEN,
                last_error,
                pause,
            )

    def _refusal(self, now: float) -> VaultCircuitOpen:
        since = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(self._down_since_wall))
        wait = max(self._probe_at - now, 0.0)
        next_try = "a probe is under way" if self.state is State.HALF_OPEN else f"next probe in {wait:.1f}s"
        return VaultCircuitOpen(
            f"Vault at {self.key.describe()} has been unreachable since {since} ({now - self._down_since:.0f}s); "
            f"last error: {self._last_error}; Mounts to it fail at once until it answers again ({next_try})"
        )

    def _notify(self, state: State) -> None:
        # Called with no lock held: listeners may look at this breaker again.
        if self._on_change is not None:
            self._on_change(self.key, state)


class Breakers:
    """A breaker per endpoint, created on first use; bounded, thread-safe, and shared
    fairly between pod namespaces (module docstring)."""

    def __init__(
        self,
        *,
        clock: Clock = time.monotonic,
        rng: random.Random | None = None,
        on_change: StateListener | None = None,
        on_forget: Callable[[EndpointKey], None] | None = None,
        max_breakers: int = MAX_BREAKERS,
        max_per_namespace: int = MAX_BREAKERS_PER_NAMESPACE,
    ) -> None:
        self._clock = clock
        self._rng = rng or random.Random()
        self._on_change = on_change
        self._on_forget = on_forget
        self._max = max_breakers
        self._max_per_namespace = max_per_namespace
        self._breakers: OrderedDict[EndpointKey, Breaker] = OrderedDict()  # least recently used first
        self._made: dict[str, int] = {}  # breakers kept, by the namespace charged for them
        self._addresses: dict[str, int] = {}  # breakers kept, by address (Vault namespaces aside)
        self._lock = threading.Lock()

    def peek(self, key: EndpointKey, *, tenant: str | None = None) -> Breaker | None:
        """The endpoint's breaker if it ever saw a failure; none is made for looking. A
        breaker looked at is in use (an open one refusing Mounts most of all): it is the
        last to be forgotten. `tenant`: the pod namespace of the Mount that looks."""
        with self._lock:
            breaker = self._breakers.get(key)
            if breaker is not None:
                self._breakers.move_to_end(key)
                if tenant is not None and tenant != breaker.tenant:
                    breaker.shared = True
            return breaker

    def get(self, key: EndpointKey) -> Breaker:
        """The endpoint's breaker, made (and charged to TENANT) if there is none."""
        tenant = TENANT.get()
        forgotten: list[EndpointKey] = []
        with self._lock:
            breaker = self._breakers.get(key)
            if breaker is not None:
                self._breakers.move_to_end(key)
                if tenant != breaker.tenant:
                    breaker.shared = True
                return breaker
            breaker = self._breakers[key] = Breaker(key, clock=self._clock, rng=self._rng, on_change=self._changed)
            self._made[tenant] = self._made.get(tenant, 0) + 1
            self._addresses[key.address] = self._addresses.get(key.address, 0) + 1
            # Never the one just made: with the registry full of open breakers, each new one
            # was forgotten before it could count a second failure. Past its namespace's
            # share, one of that namespace's own goes, never one another namespace uses too;
            # past the node's, one of the namespace holding the most.
            if self._made[tenant] > self._max_per_namespace:
                victim = self._victim(breaker, tenant, shared_too=False)
                if victim is not None:
                    forgotten.append(self._drop(victim))
            while len(self._breakers) > self._max:
                forgotten.append(self._drop(self._biggest_holders_victim(breaker)))
        for old in forgotten:
            if self._on_forget is not None:
                self._on_forget(old)
        return breaker

    def _victim(self, new: Breaker, tenant: str, *, shared_too: bool) -> Breaker | None:
        """The namespace's breaker to forget: least recently used, of those first that
        hold nothing, then that no other namespace uses, then (shared_too) any; never `new`."""
        return _pick([b for b in self._breakers.values() if b.tenant == tenant and b is not new], shared_too)

    def _biggest_holders_victim(self, new: Breaker) -> Breaker:
        """A breaker of the namespaces charged with the most (a flood of dead addresses costs
        its makers, not the namespace counting its first failures), as _victim picks."""
        most = max(self._made.values())
        theirs = [b for b in self._breakers.values() if self._made[b.tenant] == most and b is not new]
        victim = _pick(theirs or [b for b in self._breakers.values() if b is not new], True)
        assert victim is not None  # over the bound, the registry holds more than the new one
        return victim

    def _drop(self, victim: Breaker) -> EndpointKey:
        """Forget `victim`, with the lock held; its key, for on_forget."""
        key = victim.key
        del self._breakers[key]
        for counts, name in ((self._made, victim.tenant), (self._addresses, key.address)):
            counts[name] -= 1
            if not counts[name]:
                del counts[name]
        return key

    def __len__(self) -> int:
        with self._lock:
            return len(self._breakers)

    def has(self, key: EndpointKey) -> bool:
        with self._lock:
            return key in self._breakers

    def has_address(self, address: str) -> bool:
        """Whether a breaker is kept for the address, in any Vault namespace."""
        with self._lock:
            return address in self._addresses

    def _changed(self, key: EndpointKey, state: State) -> None:
        """A breaker's change, told on while it is still the registry's: one forgotten
        while a Mount held it would otherwise bring back the series dropped with it."""
        with self._lock:
            known = key in self._breakers
        if known and self._on_change is not None:
            self._on_change(key, state)


# Which breakers a namespace's share gives up first, in order: holding nothing and used by
# no other namespace; holding nothing; used by no other namespace.
_FORGET_FIRST: tuple[Callable[[Breaker], bool], ...] = (
    lambda b: b.idle and not b.shared,
    lambda b: b.idle,
    lambda b: not b.shared,
)


def _pick(candidates: list[Breaker], shared_too: bool) -> Breaker | None:
    """The first of `candidates` (least recently used first) that _FORGET_FIRST allows, in
    its order; else the first of them if shared_too."""
    for allowed in _FORGET_FIRST:
        victim = next((b for b in candidates if allowed(b)), None)
        if victim is not None:
            return victim
    return candidates[0] if shared_too and candidates else None
