"""Dynamic secrets without churn: per-pod reuse, renewal and re-issue of leased replies.

The driver calls Mount for every pod on every rotation poll and kubelet republish.
Asking Vault again each time would mint a new database user or certificate per pod
per minute. Instead a reply that carries a lease (``lease_id`` with a positive
``lease_duration``) or an expiry (PKI's ``data.expiration``) is kept for that pod and
served again while fresh. Once `renew_fraction` of its life has passed, a renewable
lease is renewed with the pod's own token (same credentials, later expiry); otherwise
new credentials are requested. Nothing is served past its expiry.

Unleased replies (KV) are never kept: they are read on every Mount so changes
propagate. Concurrent Mounts of one pod asking the same request through this cache
share one Vault call (single flight) whether or not the reply is leased; a read that
mount.py reads ahead (a KV read, or one whose last reply was not kept) skips the cache.

Entries are keyed by everything that makes the request and the identity (pod uid,
target path, Vault address and namespace, role, method, path, query, body), so a reply
is never shared between pods.
"""

from __future__ import annotations

import enum
import logging
import sys
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Hashable
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass, field
from typing import Any

from provider import gojson
from provider.errors import ProviderError, VaultUnreachable
from provider.metrics import Metrics
from provider.vault import Secret

logger = logging.getLogger(__name__)

Clock = Callable[[], float]

# A kept lease is looked up in Vault before it is served again, at most this often: one an
# operator revoked (or Vault revoked with its token) is issued anew on the pod's next Mount.
LEASE_CHECK_SECONDS = 30.0
# Renew (or re-issue) once this share of a lease's life has passed: the same 2/3 point
# Vault Agent uses, leaving a third of the TTL to absorb a slow or failed renewal.
DEFAULT_RENEW_FRACTION = 2 / 3
# Entries kept at most: 1,000 pods with five leased objects each, with room to spare;
# a leased reply is a few KiB (a PKI certificate and key is the largest common one).
DEFAULT_MAX_ENTRIES = 5000
# A leased reply kept at most, in bytes of its weight (its JSON, and VALUE_BYTES per
# value): a PKI certificate, its key and a long chain weigh a few KiB. A class may name
# any Vault address, and one answering megabytes per lease would have the cache hold
# gigabytes: a heavier reply is served, not kept.
MAX_KEPT_REPLY_BYTES = 64 * 1024
# What each decoded value (and map key) holds in memory beyond its text: a Python object.
# Counted, a list of 30,000 zeros (60 KiB of JSON, 2 MiB decoded) weighs what it holds.
VALUE_BYTES = 64
# What a number and a map hold beyond that: a number is a gojson.Number and the string of
# its text (about 110 bytes for `1.5`), a map a dict (about 230 bytes for `{"a":1.5}`).
# Weighed at 64, a reply of 900 floats held 1.6 times its weight, and maps of one float 2.1.
NUMBER_BYTES = 64
MAP_BYTES = 128
# All kept replies together at most, in bytes of weight: DEFAULT_MAX_ENTRIES EC certificates
# with their keys and chain weigh about 33 MiB (6.8 KB each, measured by `make bench`), so a
# node keeping 5,000 of them keeps each. At 32 MiB, since replies were weighed more closely,
# the last 66 of the bench's 5,000 were not kept.
DEFAULT_MAX_BYTES = 40 * 1024 * 1024
# A reply is kept at most this long whatever its lease and token say (Vault's default max
# TTL): a lease of 2**63 seconds from a token without a TTL was kept for good.
MAX_KEPT_SECONDS = 32 * 24 * 3600.0
# One namespace keeps at most this share of the entries and of the bytes: a class may hold
# a thousand leased objects or name a Vault of its own answering leases, and one team
# filling the cache would have every other team's credentials issued on each Mount.
DEFAULT_NAMESPACE_SHARE = 0.25
# How often expired entries are dropped, at most; and, when the cache or a namespace's share
# is full and a purge could make room, how often it is tried (a purge walks every entry).
PURGE_INTERVAL_SECONDS = 30.0
ROOM_PURGE_INTERVAL_SECONDS = 1.0
# A kept reply no Mount asked for this long may be dropped to make room: its pod is most
# likely gone (kubelet remounts a live one every minute or two with rotation on), and
# without -revoke-leases-of-deleted-pods nothing else would drop it before it expires.
IDLE_SECONDS = 15 * 60.0
# The same warning about one namespace is logged at most this often.
WARNING_INTERVAL_SECONDS = 30.0


@dataclass(frozen=True, kw_only=True, slots=True)
class LeaseKey:
    """One pod's one request: the unit of reuse."""

    pod_uid: str
    pod_namespace: str
    pod_name: str
    target_path: str
    identity: Hashable  # the token cache key: role, auth mount, address, namespace, TLS
    request: Hashable  # method, path, query, body
    # Computed once: a key is hashed several times per fetch, and its fields nest
    # dataclasses whose own hashes are not cached.
    _hash: int = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        fields = (self.pod_uid, self.pod_namespace, self.pod_name, self.target_path, self.identity, self.request)
        object.__setattr__(self, "_hash", hash(fields))

    def __hash__(self) -> int:
        return self._hash


@dataclass(kw_only=True, slots=True)
class _Entry:
    secret: Secret = field(repr=False)
    lease_id: str = field(repr=False)
    duration: float  # seconds of life the lease was issued (or last renewed) with
    renewable: bool
    renew_at: float  # monotonic
    expires_at: float  # monotonic
    token_expires_at: float  # monotonic: Vault revokes the lease with the token that issued it
    issuer: Any = field(repr=False)  # what issued it (the pod's Vault login), for revocation
    size: int = 0  # bytes of the reply's JSON, at least
    checked_at: float = 0.0  # monotonic: when Vault last said the lease is alive (or when it was issued)
    uncheckable: bool = False  # the pod's token may not look it up (a policy without sys/leases/lookup)


class Liveness(enum.Enum):
    """What Vault says of a kept lease (LeaseCache.fetch's `check`)."""

    ALIVE = "alive"
    GONE = "gone"  # revoked or expired: issue new credentials
    UNCHECKABLE = "uncheckable"  # the pod's token may not look leases up: served as kept
    UNKNOWN = "unknown"  # no answer now: served as kept, asked again on the next Mount


@dataclass(kw_only=True, slots=True)
class _Slot:
    lock: threading.Lock = field(default_factory=threading.Lock)
    entry: _Entry | None = None
    used_at: float = 0.0  # monotonic: when a Mount last asked for it
    inflight: Future[Secret] | None = None
    dead: bool = False  # removed from the cache: whoever still holds it looks again


@dataclass(frozen=True, kw_only=True, slots=True)
class KeptLease:
    """A lease the cache held for a pod, and the login that issued it."""

    lease_id: str = field(repr=False)
    issuer: Any = field(repr=False)


class LeaseCache:
    """Per-pod reuse of leased replies, with renewal, re-issue and single flight."""

    def __init__(
        self,
        *,
        metrics: Metrics,
        max_entries: int = DEFAULT_MAX_ENTRIES,
        max_bytes: int = DEFAULT_MAX_BYTES,
        namespace_share: float = DEFAULT_NAMESPACE_SHARE,
        renew_fraction: float = DEFAULT_RENEW_FRACTION,
        clock: Clock = time.monotonic,
        wall_clock: Clock = time.time,
    ) -> None:
        if not 0 < renew_fraction < 1:
            raise ValueError(f"renew fraction must be between 0 and 1, got {renew_fraction}")
        if not 0 < namespace_share <= 1:
            raise ValueError(f"namespace share must be more than 0 and at most 1, got {namespace_share}")
        self._metrics = metrics
        self._renew_fraction = renew_fraction
        self._clock = clock
        self._wall_clock = wall_clock
        self._usage = _Usage(max_entries=max(max_entries, 1), max_bytes=max_bytes, namespace_share=namespace_share)
        # Warnings given lately, by namespace and what they say: a class of a thousand leased
        # objects would otherwise log a thousand lines per Mount once it is out of room.
        self._warned: set[tuple[str, str]] = set()
        self._warn_again_at = 0.0
        self._room_purge_at = 0.0
        # No kept reply expires before this, and per namespace, none expires nor was last used
        # before these (lowered as replies are kept or renewed): what tells whether a purge
        # could make room (_could_free). Made exact by each purge.
        self._earliest_expiry = float("inf")
        self._namespace_bounds: dict[str, tuple[float, float]] = {}
        # Slots with an entry (a kept reply) are bounded by max_entries; slots without one
        # exist only while their request is in flight, and are removed when it ends.
        self._slots: OrderedDict[LeaseKey, _Slot] = OrderedDict()
        self._lock = threading.Lock()
        self._next_purge = clock() + PURGE_INTERVAL_SECONDS

    def __len__(self) -> int:
        """Replies kept."""
        return len(self._usage)

    def holds(self, key: LeaseKey, *, wait: bool = True) -> bool:
        """Whether a reply for key is kept, or being fetched. Without `wait` (on the event
        loop) it answers True rather than wait while a purge holds the cache's lock."""
        if not self._lock.acquire(blocking=wait):
            return True
        try:
            return key in self._slots
        finally:
            self._lock.release()

    def would_keep(self, secret: Secret) -> bool:
        """Whether a reply like this one is kept: a lease, or a certificate not yet expired."""
        return self._lifetime(secret)[0] > 0

    def _lifetime(self, secret: Secret) -> tuple[float, str]:
        """How long a reply may be kept (0 or less: not at all), and its lease."""
        if secret.lease_id and secret.lease_duration > 0:
            return secret.lease_duration, secret.lease_id
        if _is_certificate(secret.data):
            return secret.data["expiration"].as_int() - self._wall_clock(), ""
        return 0.0, ""

    def fetch(
        self,
        key: LeaseKey,
        *,
        issue: Callable[[], Secret],
        renew: Callable[[str, int], Secret],
        deadline: float,
        not_after: float = float("inf"),
        issuer: Callable[[], Any] = lambda: None,
        check: Callable[[str, Any], Liveness] = lambda lease_id, issuer: Liveness.UNKNOWN,
    ) -> Secret:
        """The reply for key: kept, renewed, shared with a concurrent call, or issued.

        `not_after` is when the token that issues it expires (monotonic): Vault revokes
        a token's leases with it, so nothing issued with it is kept past that. `issuer`
        tells, after `issue`, which login issued the reply (kept for revocation). `check`
        asks Vault whether a kept lease (its id, and who issued it) is still alive before
        it is served again (at most
        every LEASE_CHECK_SECONDS): one revoked (by an operator, or with its token) is
        issued anew, never served.
        """
        now = self._clock()
        self.purge_if_due(now)
        while True:
            with self._lock:
                slot = self._slots.get(key)
                if slot is None:
                    slot = self._slots[key] = _Slot()
                else:
                    self._slots.move_to_end(key)  # the least recently used first: see _could_free
                slot.used_at = now
            with slot.lock:
                if slot.dead:
                    continue  # emptied or purged since we looked it up: look again
                kept = self._usable(key, slot, renew, check)
                if kept is not None:
                    return kept
                if slot.inflight is not None:
                    shared, owner = slot.inflight, False
                else:
                    shared, owner = Future(), True
                    slot.inflight = shared
            break
        if not owner:
            try:
                return shared.result(timeout=max(deadline - self._clock(), 0.0))
            except FutureTimeout:
                raise VaultUnreachable("timed out waiting for the same request of a concurrent Mount") from None
        try:
            secret = issue()
            entry = self._entry_for(secret, not_after, issuer())
            if entry is not None:
                placed = self._keep(key, slot, entry)
                self._metrics.leases.labels("issued" if placed else "not_kept").inc()
            shared.set_result(secret)
            return secret
        except BaseException as e:
            shared.set_exception(e)
            raise
        finally:
            with slot.lock:
                slot.inflight = None
                empty = slot.entry is None
                slot.dead = slot.dead or empty
            if empty:  # nothing kept (a KV reply, a failure): the slot goes, it holds nothing
                with self._lock:
                    if self._slots.get(key) is slot:
                        del self._slots[key]

    def _keep(self, key: LeaseKey, slot: _Slot, entry: _Entry) -> bool:
        """Keep entry in slot if there is room, by count and bytes, in the cache and in the
        pod's namespace's share; never by evicting a reply in use (its lease would be
        orphaned: still valid in Vault, forgotten here). Expired replies, and replies no
        Mount asked for in IDLE_SECONDS, are dropped to make room."""
        namespace = key.pod_namespace
        if entry.size > MAX_KEPT_REPLY_BYTES:
            self._warn(
                key,
                "too large",
                f"a leased reply weighing more than {MAX_KEPT_REPLY_BYTES} bytes (its JSON and {VALUE_BYTES} bytes "
                "per value) is not kept: its pod gets new credentials on every Mount",
            )
            return False
        full = self._usage.take(namespace, entry.size)
        if full and self._could_free(None if full[0] == "cache full" else namespace):
            # Out of its share, a namespace makes room only among its own replies.
            self._purge(self._clock(), make_room=True, namespace=None if full[0] == "cache full" else namespace)
            full = self._usage.take(namespace, entry.size)
        if full:
            self._warn(key, full[0], f"{full[1]}: new credentials are not kept, and are issued again on every Mount")
            return False
        with slot.lock:
            placed = not slot.dead  # dead: the pod's entries were dropped (drop_pod) while this was issued
            if placed:
                slot.entry = entry
        if not placed:
            self._usage.give_back(namespace, entry.size)
            return False
        with self._lock:  # after the slot's lock, not inside it: _purge takes them the other way
            self._earliest_expiry = min(self._earliest_expiry, entry.expires_at)
            expiry, use = self._namespace_bounds.get(namespace, (float("inf"), float("inf")))
            self._namespace_bounds[namespace] = (min(expiry, entry.expires_at), min(use, slot.used_at))
        return True

    def _could_free(self, namespace: str | None) -> bool:
        """Whether a purge could make room now: a reply expired, or one idle in namespace
        (None: in any). Tried at most every ROOM_PURGE_INTERVAL_SECONDS: a purge walks
        every entry with the cache locked."""
        now = self._clock()
        with self._lock:
            if now < self._room_purge_at:
                return False
            if namespace is None:
                oldest = next(iter(self._slots.values()), None)  # the least recently used
                used = oldest.used_at if oldest is not None else float("inf")
                expiry = self._earliest_expiry
            else:
                expiry, used = self._namespace_bounds.get(namespace, (float("inf"), float("inf")))
                expiry = min(expiry, self._earliest_expiry)
            if now < expiry and now - used < IDLE_SECONDS:
                return False
            self._room_purge_at = now + ROOM_PURGE_INTERVAL_SECONDS
            return True

    def _drop(self, key: LeaseKey, slot: _Slot) -> None:
        """Forget slot's reply (the caller holds slot.lock)."""
        if slot.entry is not None:
            self._usage.give_back(key.pod_namespace, slot.entry.size)
            slot.entry = None

    def _warn(self, key: LeaseKey, kind: str, why: str) -> None:
        """Warn about a namespace's `kind` of trouble at most every WARNING_INTERVAL_SECONDS:
        the metric counts every occurrence."""
        now = self._clock()
        with self._lock:
            if now >= self._warn_again_at:
                self._warned.clear()
                self._warn_again_at = now + WARNING_INTERVAL_SECONDS
            if (key.pod_namespace, kind) in self._warned:
                return
            self._warned.add((key.pod_namespace, kind))
        logger.warning(
            "%s (pod %s/%s; said once per namespace every %.0f s)",
            why,
            key.pod_namespace,
            key.pod_name,
            WARNING_INTERVAL_SECONDS,
        )

    def _usable(
        self, key: LeaseKey, slot: _Slot, renew: Callable[[str, int], Secret], check: Callable[[str, Any], Liveness]
    ) -> Secret | None:
        entry = slot.entry
        if entry is None:
            return None
        now = self._clock()
        if now >= entry.expires_at:
            self._drop(key, slot)
            self._metrics.leases.labels("reissued").inc()
            return None
        if now < entry.renew_at:
            if entry.lease_id and not entry.uncheckable and now - entry.checked_at >= LEASE_CHECK_SECONDS:
                liveness = check(entry.lease_id, entry.issuer)
                if liveness is Liveness.GONE:
                    logger.info(
                        "a kept lease of pod %s/%s was revoked in Vault; new credentials are issued",
                        key.pod_namespace,
                        key.pod_name,
                    )
                    self._drop(key, slot)
                    self._metrics.leases.labels("found_revoked").inc()
                    return None
                entry.uncheckable = liveness is Liveness.UNCHECKABLE
                if liveness is not Liveness.UNKNOWN:  # Vault unreachable: asked again next time
                    entry.checked_at = self._clock()
            self._metrics.leases.labels("reused").inc()
            return entry.secret
        if not (entry.renewable and entry.lease_id):
            self._drop(key, slot)
            self._metrics.leases.labels("reissued").inc()
            return None
        increment = max(int(entry.duration), 1)
        if entry.token_expires_at - now < increment:
            # A renewal would outlive the token that issued the lease, and Vault revokes the
            # lease with that token: issue new credentials under the pod's current token.
            self._drop(key, slot)
            self._metrics.leases.labels("reissued").inc()
            return None
        try:
            renewed = renew(entry.lease_id, increment)
        except ProviderError as e:
            self._warn(key, "renewal failed", f"renewing a lease failed ({e}); new credentials are issued instead")
            self._drop(key, slot)
            self._metrics.leases.labels("reissued").inc()
            return None
        granted = renewed.lease_duration
        if granted <= 0:
            self._drop(key, slot)
            self._metrics.leases.labels("reissued").inc()
            return None
        now = self._clock()
        # A grant shorter than asked for means the max TTL is near: keep these credentials
        # for part of what is left, then issue new ones instead of renewing again.
        entry.renewable = granted >= increment
        entry.duration = granted
        life = min(granted, entry.token_expires_at - now, MAX_KEPT_SECONDS)
        entry.renew_at = now + life * self._renew_fraction
        entry.expires_at = now + life  # sooner than before, if Vault granted less than was left
        entry.checked_at = now  # renewed: alive
        with self._lock:  # the slot's lock is held: _purge only tries slots' locks, never waits
            self._earliest_expiry = min(self._earliest_expiry, entry.expires_at)
            expiry, use = self._namespace_bounds.get(key.pod_namespace, (float("inf"), float("inf")))
            self._namespace_bounds[key.pod_namespace] = (min(expiry, entry.expires_at), use)
        self._metrics.leases.labels("renewed").inc()
        return entry.secret

    def _entry_for(self, secret: Secret, not_after: float, issuer: Any) -> _Entry | None:
        now = self._clock()
        lifetime, lease_id = self._lifetime(secret)
        if lifetime <= 0:
            return None
        lifetime = min(lifetime, MAX_KEPT_SECONDS)
        life = min(lifetime, not_after - now)
        # Both walks stop once past the cap.
        size = gojson.encoded_size(secret.body, MAX_KEPT_REPLY_BYTES)
        size += _values_weight(secret.body, MAX_KEPT_REPLY_BYTES)
        if size <= MAX_KEPT_REPLY_BYTES:  # a larger one is not kept (fetch): nothing to share
            _share_long_strings(secret.body)
        return _Entry(
            secret=secret,
            lease_id=lease_id,
            duration=lifetime,
            renewable=secret.renewable and bool(lease_id),
            renew_at=now + life * self._renew_fraction,
            expires_at=now + life,
            token_expires_at=not_after,
            issuer=issuer,
            size=size,
            checked_at=now,
        )

    def purge_if_due(self, now: float | None = None) -> None:
        """Drop expired entries, at most every PURGE_INTERVAL_SECONDS."""
        now = self._clock() if now is None else now
        if now >= self._next_purge:
            self._purge(now)

    def _purge(self, now: float, *, make_room: bool = False, namespace: str | None = None) -> None:
        """Drop expired entries; with make_room, idle ones too, of namespace (None: of any).
        A slot busy with a fetch is skipped, never raced (its reply still counts in the
        bounds _could_free reads)."""
        idle_before = now - IDLE_SECONDS if make_room else float("-inf")
        idle: list[LeaseKey] = []
        earliest = float("inf")
        bounds: dict[str, tuple[float, float]] = {}
        with self._lock:
            self._next_purge = now + PURGE_INTERVAL_SECONDS
            for key, slot in list(self._slots.items()):
                entry = slot.entry
                if slot.lock.acquire(blocking=False):
                    try:
                        entry = slot.entry
                        idle_here = slot.used_at < idle_before and namespace in (None, key.pod_namespace)
                        if slot.inflight is None and (entry is None or entry.expires_at <= now or idle_here):
                            if entry is not None and entry.expires_at > now:
                                idle.append(key)
                            slot.dead = True
                            self._drop(key, slot)
                            del self._slots[key]
                            continue
                    finally:
                        slot.lock.release()
                if entry is not None:
                    earliest = min(earliest, entry.expires_at)
                    expiry, use = bounds.get(key.pod_namespace, (float("inf"), float("inf")))
                    bounds[key.pod_namespace] = (min(expiry, entry.expires_at), min(use, slot.used_at))
            self._earliest_expiry = earliest
            self._namespace_bounds = bounds
        if idle:
            namespaces = sorted({key.pod_namespace for key in idle})
            logger.warning(
                "dropped %d kept credentials no Mount asked for in %.0f s, to make room (namespaces %s): their "
                "leases are no longer revoked with their pods, and expire in Vault on their own",
                len(idle),
                IDLE_SECONDS,
                ", ".join(namespaces[:10]) + (f" and {len(namespaces) - 10} more" if len(namespaces) > 10 else ""),
            )

    def pods(self) -> set[tuple[str, str, str]]:
        """(uid, namespace, name) of every pod with an entry."""
        with self._lock:
            return {(k.pod_uid, k.pod_namespace, k.pod_name) for k in self._slots}

    def drop_pod(self, pod_uid: str) -> list[KeptLease]:
        """Forget every entry of a pod; return the leases that were kept for it."""
        with self._lock:
            keys = [k for k in self._slots if k.pod_uid == pod_uid]
            slots = [self._slots.pop(k) for k in keys]
        kept: list[KeptLease] = []
        for key, slot in zip(keys, slots, strict=True):
            with slot.lock:
                slot.dead = True
                if slot.entry is not None and slot.entry.lease_id:
                    kept.append(KeptLease(lease_id=slot.entry.lease_id, issuer=slot.entry.issuer))
                self._drop(key, slot)
        return kept


class _Usage:
    """The kept replies' count and bytes, in all and per namespace, against their bounds.
    Its lock is taken last and around nothing else."""

    def __init__(self, *, max_entries: int, max_bytes: int, namespace_share: float) -> None:
        self._max_entries = max_entries
        self._max_bytes = max_bytes
        self._namespace_entries = max(int(max_entries * namespace_share), 1)
        # At least one reply of the largest kept (a tiny share would keep nothing at all).
        self._namespace_bytes = max(int(max_bytes * namespace_share), min(MAX_KEPT_REPLY_BYTES, max_bytes))
        self._entries = 0
        self._bytes = 0
        self._by_namespace: dict[str, list[int]] = {}  # namespace: [entries, bytes], while it keeps any
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return self._entries

    def take(self, namespace: str, size: int) -> tuple[str, str] | None:
        """Count one more reply of `size` bytes for namespace if there is room (None);
        otherwise say what is full: what kind of trouble, and in words."""
        with self._lock:
            entries, used = self._by_namespace.get(namespace, (0, 0))
            if self._entries >= self._max_entries:
                return "cache full", f"the lease cache is full ({self._entries} kept replies, -lease-cache-size)"
            if self._bytes + size > self._max_bytes:
                return "cache full", (
                    f"the lease cache is full by weight ({self._bytes} of {self._max_bytes} bytes; a reply weighs "
                    f"its JSON and {VALUE_BYTES} bytes per value)"
                )
            if entries >= self._namespace_entries:
                return "share full", (
                    f"namespace {namespace} holds its share of the lease cache ({entries} kept replies, "
                    "-lease-cache-namespace-share of -lease-cache-size)"
                )
            if used + size > self._namespace_bytes:
                return "share full", (
                    f"namespace {namespace} holds its share of the lease cache by weight ({used} of "
                    f"{self._namespace_bytes} bytes, -lease-cache-namespace-share)"
                )
            self._entries += 1
            self._bytes += size
            self._by_namespace[namespace] = [entries + 1, used + size]
            return None

    def give_back(self, namespace: str, size: int) -> None:
        with self._lock:
            self._entries -= 1
            self._bytes -= size
            counts = self._by_namespace[namespace]
            counts[0] -= 1
            counts[1] -= size
            if counts[0] == 0:
                del self._by_namespace[namespace]


def _is_certificate(data: Any) -> bool:
    """A PKI issue or sign reply: a certificate, its serial number and its expiry (Unix
    seconds). Only then is `expiration` a certificate's; a KV secret may hold any field."""
    return (
        isinstance(data, dict)
        and isinstance(data.get("certificate"), str)
        and isinstance(data.get("serial_number"), str)
        and isinstance(data.get("expiration"), gojson.Number)
    )


# Strings at least this long in a kept reply are shared with equal ones kept for other
# pods: every certificate of a PKI role carries the same issuing CA and chain (about 2.4
# KiB per pod with a 2048-bit CA), which would otherwise be held once per pod.
SHARED_STRING_CHARS = 256


def _share_long_strings(value: Any) -> None:
    """Replace long strings in a decoded reply, in place, by the interpreter's one copy
    (sys.intern): equal bytes, not a shared answer. The interned copy lives only while a
    reply holds it. Walks at most the reply's own values (bounded when decoded)."""
    pending = [value]
    while pending:
        item = pending.pop()
        if isinstance(item, dict):
            for key, inner in item.items():
                if isinstance(inner, str) and len(inner) >= SHARED_STRING_CHARS:
                    item[key] = sys.intern(inner)
                elif isinstance(inner, dict | list):
                    pending.append(inner)
        elif isinstance(item, list):
            for index, inner in enumerate(item):
                if isinstance(inner, str) and len(inner) >= SHARED_STRING_CHARS:
                    item[index] = sys.intern(inner)
                elif isinstance(inner, dict | list):
                    pending.append(inner)


def _values_weight(value: Any, limit: int) -> int:
    """What a decoded reply's values (map keys too) hold beyond their text, in bytes:
    VALUE_BYTES each, more for numbers and maps; the walk stops past limit."""
    weight = 0
    pending = [value]
    while pending and weight <= limit:
        item = pending.pop()
        weight += VALUE_BYTES
        if isinstance(item, dict):
            weight += MAP_BYTES + VALUE_BYTES * len(item)
            pending.extend(item.values())
        elif isinstance(item, list):
            pending.extend(item)
        elif isinstance(item, gojson.Number):
            weight += NUMBER_BYTES
    return weight
