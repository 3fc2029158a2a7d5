"""Name lookups held to the caller's deadline.

socket.getaddrinfo takes no timeout: when the DNS servers do not answer, glibc waits 5 s per
try and server (up to 30 s with three), and a lookup made on a Mount's thread held that
thread as long, past the Mount's deadline, and held the revocation sweep's turn past its
budget. So each lookup of a name runs on a thread of its own, and the caller waits for it
only until its deadline; the lookup finishes on its own.

One lookup per name and port runs at a time: every caller of a name whose DNS stalls waits
on that one. A pod namespace (tenant.TENANT) has at most LOOKUPS_PER_NAMESPACE in flight at
once, so a class naming one stalled name after another holds a few threads of its own and
not the node's; its further lookups are refused at once until one ends. The node has at
most LOOKUPS_ON_NODE (threads are the process's to run out of). A refusal is the caller's
limit, not the server's failure: callers count it against no endpoint. An IP address is not
looked up.
"""

from __future__ import annotations

import socket
import threading
from collections import Counter
from collections.abc import Sequence
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from typing import Any

from provider.tenant import TENANT

# Lookups one pod namespace may have in flight at once (each on a thread of its own): a
# healthy lookup takes milliseconds, so these are only ever all busy when DNS stalls.
LOOKUPS_PER_NAMESPACE = 4
# Lookups in flight on the node at most: 16 namespaces' worth, far more than a node whose DNS
# answers ever has, and about 1 MiB of thread stacks when every one is stalled.
LOOKUPS_ON_NODE = 64

# What socket.getaddrinfo gives: (family, type, proto, canonical name, socket address).
Addresses = Sequence[tuple[socket.AddressFamily, socket.SocketKind, int, str, Any]]


class LookupTimedOut(TimeoutError):
    """The name was not resolved by the caller's deadline."""


class LookupRefused(Exception):
    """The name was not looked up: the namespace (or the node) has too many lookups in
    flight, or no thread could be started for it."""


_lock = threading.Lock()
_running: dict[tuple[str, int], Future[Addresses]] = {}
_per_namespace: Counter[str] = Counter()


def addresses(host: str, port: int, timeout: float) -> Addresses:
    """host's TCP addresses, as socket.getaddrinfo gives them, within `timeout` seconds.
    Raises OSError (socket.gaierror) when the lookup fails, LookupTimedOut when it has not
    ended in time, LookupRefused when it is not made."""
    if _is_ip_address(host):
        return socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    key = (host, port)
    namespace = TENANT.get()
    with _lock:
        running = _running.get(key)
        if running is None:
            if _per_namespace[namespace] >= LOOKUPS_PER_NAMESPACE:
                raise LookupRefused(
                    f"{LOOKUPS_PER_NAMESPACE} name lookups for pods of this namespace are still waiting for DNS "
                    f"(its servers do not answer for them); {host} is not looked up until one ends"
                )
            if len(_running) >= LOOKUPS_ON_NODE:
                raise LookupRefused(
                    f"{LOOKUPS_ON_NODE} name lookups are still waiting for DNS on this node (its servers do not "
                    f"answer for them); {host} is not looked up until one ends"
                )
            running = _running[key] = Future()
            _per_namespace[namespace] += 1
            start = True
        else:
            start = False
    if start:
        try:
            threading.Thread(target=_look_up, args=(key, namespace, running), name="lookup", daemon=True).start()
        except BaseException as e:  # no thread: this caller and any that joined get the error
            _finish(key, namespace)
            refused = isinstance(e, RuntimeError)  # the process's thread limit: a refusal like the others
            running.set_exception(
                LookupRefused(f"no thread could be started to look up {host} ({e})") if refused else e
            )
    try:
        return running.result(timeout=max(timeout, 0.0))
    except FutureTimeout:
        raise LookupTimedOut(
            f"the name {host} was not resolved within {timeout:.1f}s (the node's DNS servers did not answer)"
        ) from None


def _look_up(key: tuple[str, int], namespace: str, running: Future[Addresses]) -> None:
    try:
        found = socket.getaddrinfo(key[0], key[1], type=socket.SOCK_STREAM)
    except BaseException as e:  # socket.gaierror mostly; every waiter gets it
        _finish(key, namespace)
        running.set_exception(e)
        return
    _finish(key, namespace)
    running.set_result(found)


def _finish(key: tuple[str, int], namespace: str) -> None:
    """The lookup is no longer in flight: a new one of the name starts anew."""
    with _lock:
        _running.pop(key, None)
        _per_namespace[namespace] -= 1
        if _per_namespace[namespace] <= 0:
            del _per_namespace[namespace]


def _is_ip_address(host: str) -> bool:
    for family in (socket.AF_INET, socket.AF_INET6):
        try:
            socket.inet_pton(family, host)
        except (OSError, ValueError):
            continue
        return True
    return False


def in_flight() -> int:
    """Lookups running now (a metric: metrics.Metrics.name_lookups)."""
    with _lock:
        return len(_running)
