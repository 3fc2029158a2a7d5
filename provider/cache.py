"""Caches kept between Mounts: Vault tokens per pod, and the HMAC key.

Both are bounded, locked and driven by an injected monotonic clock, and expire from
what the server said (a token's lease_duration) or from a fixed time to live.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field

import cachetools

from provider.errors import KubernetesError
from provider.vault import Login

logger = logging.getLogger(__name__)

Clock = Callable[[], float]

# Re-login once this share of a token's TTL has passed, so a Mount never races the
# token's expiry (the 403 retry stays as a safety net).
TOKEN_RENEW_FRACTION = 0.8
# After the Kubernetes API failed to give the HMAC key, wait this long before asking
# again, so an outage does not add an API call to every Mount.
HMAC_RETRY_SECONDS = 5.0
# A Mount waits at most this long for another Mount's fetch of the key (the Kubernetes
# client gives up after 3 s) before going on with empty versions.
HMAC_WAIT_SECONDS = 3.5


@dataclass(frozen=True, kw_only=True, slots=True)
class TokenGrant:
    """A login handed to a Mount: the token, whether it came from the cache, and when
    it expires (monotonic; infinity for a token without a TTL)."""

    login: Login
    cached: bool
    expires_at: float


@dataclass(kw_only=True, slots=True)
class _TokenSlot:
    lock: threading.Lock = field(default_factory=threading.Lock)
    login: Login | None = None
    refresh_at: float = 0.0
    expires_at: float = float("inf")


class TokenCache:
    """Vault tokens per identity key, LRU-bounded; logins for one key are serialised.

    The key must hold everything that makes an identity: the pod's uid, its service
    account, the role, the auth mount, the Vault address and namespace. A size of 0
    disables caching: every Mount logs in.
    """

    def __init__(self, size: int, *, clock: Clock = time.monotonic, on_evict: Callable[[], None] | None = None) -> None:
        self._size = size
        self._clock = clock
        self._slots: cachetools.LRUCache[Hashable, _TokenSlot] = _EvictingLRU(max(size, 1), on_evict)
        self._lock = threading.Lock()

    def __len__(self) -> int:
        with self._lock:
            return len(self._slots)

    def get(self, key: Hashable, login: Callable[[], Login]) -> TokenGrant:
        """The cached login for key, or a fresh one."""
        if self._size <= 0:
            return self._grant(login(), cached=False, slot=_TokenSlot())
        with self._lock:
            slot = self._slots.get(key)
            if slot is None:
                slot = self._slots[key] = _TokenSlot()
        with slot.lock:
            if slot.login is not None and self._clock() < slot.refresh_at:
                return TokenGrant(login=slot.login, cached=True, expires_at=slot.expires_at)
            return self._grant(login(), cached=False, slot=slot)

    def peek(self, key: Hashable) -> str | None:
        """The cached token for key while it needs no refresh; None when it does, or when
        a login for key is under way: this never waits (it is asked on the event loop)."""
        if self._size <= 0:
            return None
        with self._lock:
            slot = self._slots.get(key)
        if slot is None or not slot.lock.acquire(blocking=False):
            return None
        try:
            return slot.login.token if slot.login is not None and self._clock() < slot.refresh_at else None
        finally:
            slot.lock.release()

    def _grant(self, fresh: Login, *, cached: bool, slot: _TokenSlot) -> TokenGrant:
        now = self._clock()
        ttl = fresh.lease_duration
        slot.login = fresh
        slot.refresh_at = now + ttl * TOKEN_RENEW_FRACTION if ttl > 0 else float("inf")
        slot.expires_at = now + ttl if ttl > 0 else float("inf")
        return TokenGrant(login=fresh, cached=cached, expires_at=slot.expires_at)

    def invalidate(self, key: Hashable, token: str) -> None:
        """Forget key's token if it is still `token` (a 403 proved it no longer works)."""
        with self._lock:
            slot = self._slots.get(key)
        if slot is None:
            return
        with slot.lock:
            if slot.login is not None and slot.login.token == token:
                slot.login = None

    def pop_where(self, predicate: Callable[[Hashable], bool]) -> list[tuple[Hashable, Login]]:
        """Remove the entries whose key matches; return their logins (for revocation)."""
        with self._lock:
            keys = [key for key in self._slots if predicate(key)]
            slots = [(key, self._slots.pop(key)) for key in keys]
        return [(key, slot.login) for key, slot in slots if slot.login is not None]

    def identities(self) -> list[Hashable]:
        """The keys of every cached token."""
        with self._lock:
            return list(self._slots.keys())


class _EvictingLRU(cachetools.LRUCache[Hashable, _TokenSlot]):
    def __init__(self, maxsize: int, on_evict: Callable[[], None] | None) -> None:
        super().__init__(maxsize)
        self._on_evict = on_evict

    def popitem(self) -> tuple[Hashable, _TokenSlot]:
        item = super().popitem()
        if self._on_evict is not None:
            self._on_evict()
        return item


class HmacKeySource:
    """The cluster's HMAC key, fetched from Kubernetes and kept for `ttl` seconds.

    The reference reads the Secret on every Mount; keeping it a bounded time saves
    that API call while a deleted Secret still rotates the key on every node within
    `ttl`. One Mount fetches at a time and no lock is held during the call: the others
    keep using the key they have, or wait for the fetch no longer than their own
    deadline. When the API fails, `get` returns None (versions become empty) and the
    next attempt waits HMAC_RETRY_SECONDS.
    """

    def __init__(self, fetch: Callable[[], bytes], *, ttl: float, clock: Clock = time.monotonic) -> None:
        self._fetch = fetch
        self._ttl = ttl
        self._clock = clock
        self._lock = threading.Lock()
        self._key: bytes | None = None
        self._valid_until = 0.0
        self._fetching: threading.Event | None = None

    def peek(self) -> bytes | None:
        """The key while it is fresh, without fetching or waiting; None otherwise."""
        with self._lock:
            return self._key if self._clock() < self._valid_until else None

    def get(self, *, deadline: float = float("inf")) -> bytes | None:
        with self._lock:
            now = self._clock()
            if now < self._valid_until:
                return self._key
            fetching = self._fetching
            if fetching is None:
                fetching = self._fetching = threading.Event()
                owner = True
            else:
                owner = False
                if self._key is not None:
                    return self._key  # expired a moment ago; another Mount is fetching the next
        if not owner:
            fetching.wait(max(0.0, min(deadline - self._clock(), HMAC_WAIT_SECONDS)))
            with self._lock:
                return self._key
        key: bytes | None = None
        valid_for = HMAC_RETRY_SECONDS
        try:
            key = self._fetch()
            valid_for = self._ttl
        except KubernetesError as e:
            logger.warning("object versions will be empty: no HMAC key: %s", e)
        finally:  # whatever happened, the next Mount may fetch again and nobody waits on us
            with self._lock:
                self._key = key
                self._valid_until = self._clock() + valid_for
                self._fetching = None
            fetching.set()
        return key
