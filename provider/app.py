"""The one place real clients are built and wired; start, signals, graceful stop."""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import functools
import gc
import logging
import os
import secrets
import signal
import socket
import stat
import threading
from collections.abc import Coroutine
from http.server import ThreadingHTTPServer
from types import FrameType
from typing import Any, TypeVar

import grpc

from provider import kube as kube_module
from provider._proto import service_pb2, service_pb2_grpc
from provider.admission import Admission, ParseGate
from provider.breaker import Breakers, EndpointKey, State
from provider.cache import HmacKeySource, TokenCache
from provider.config import Settings
from provider.dispatch import MountDispatcher
from provider.flavour import of_endpoint
from provider.health import ReadinessCheck, create_health_server
from provider.kube import KubeConfig
from provider.leases import LeaseCache
from provider.metrics import Metrics
from provider.mount import Mounter
from provider.replymemory import ReplyMemory
from provider.revocation import PodSweeper
from provider.server import ProviderServicer, create_server
from provider.vault import MAX_BODY_BYTES, VaultClient

logger = logging.getLogger(__name__)

# In-flight Mounts get this long to finish after SIGTERM (kubelet's grace is 30 s).
STOP_GRACE_SECONDS = 10.0
# Mounts still running this long before the stop grace ends are answered "restarting".
STOP_ANSWER_MARGIN_SECONDS = 1.0
# The socket: owner and group may connect (the driver runs as root), nobody else.
SOCKET_UMASK = 0o117

_UNSET = object()
# glibc's mallopt parameters (malloc.h).
_M_MMAP_THRESHOLD = -3
_M_ARENA_MAX = -8
T = TypeVar("T")


class App:
    """The running provider: gRPC server on the socket plus the health server."""

    def __init__(
        self,
        settings: Settings,
        *,
        kube_config: KubeConfig | object | None = _UNSET,
        metrics: Metrics | None = None,
        admission: Admission | None = None,
    ) -> None:
        self.settings = settings
        self.metrics = metrics or Metrics()
        config = kube_module.load_config() if kube_config is _UNSET else kube_config
        assert config is None or isinstance(config, KubeConfig)
        self.kube = kube_module.KubeClient(config)
        namespace = kube_module.own_namespace(config)
        self.admission = admission or Admission()
        self.breakers = Breakers(on_change=self._breaker_changed, on_forget=self._breaker_forgotten)
        self.metrics.mount_threads.set_function(lambda: self.admission.running)
        self.metrics.mounts_waiting.set_function(lambda: self.admission.waiting)
        self.vault = VaultClient(
            metrics=self.metrics,
            max_body_bytes=max(2 * settings.max_response_bytes, MAX_BODY_BYTES),
            breakers=self.breakers,
        )
        self.tokens = TokenCache(
            settings.cache_size, on_evict=lambda: self.metrics.token_cache.labels("eviction").inc()
        )
        self.leases = LeaseCache(
            metrics=self.metrics,
            max_entries=settings.lease_cache_size,
            namespace_share=settings.lease_cache_namespace_share,
            renew_fraction=settings.lease_renew_fraction,
        )
        # Per contract (flavour.py): its defaults, HMAC key Secret, Mounter and dispatcher.
        # Everything else (tokens, leases, bulkheads, breakers, connections) is shared: its
        # keys hold whatever tells one pod, class or Vault from another.
        parse_gate = ParseGate()
        self.reply_memory = ReplyMemory.for_responses(settings.max_response_bytes)
        self.dispatchers: dict[str, MountDispatcher] = {}
        for endpoint in settings.endpoints:
            flavour = of_endpoint(endpoint)
            if flavour.name in self.dispatchers:
                continue
            hmac_keys = HmacKeySource(
                functools.partial(
                    self.kube.get_or_create_hmac_key, namespace=namespace, name=settings.hmac_secret_for(flavour)
                ),
                ttl=settings.hmac_key_ttl,
            )
            mounter = Mounter(
                settings=settings,
                vault=self.vault,
                kube=self.kube,
                tokens=self.tokens,
                hmac_keys=hmac_keys,
                metrics=self.metrics,
                leases=self.leases if settings.lease_cache_size > 0 else None,
                flavour=flavour,
                defaults=settings.defaults_for(flavour),
            )
            self.dispatchers[flavour.name] = MountDispatcher(
                mounter=mounter,
                admission=self.admission,
                breakers=self.breakers,
                vault=self.vault,
                metrics=self.metrics,
                defaults=mounter.defaults,
                parse_gate=parse_gate,
                reply_memory=self.reply_memory,
            )
        self.sweeper = PodSweeper(
            kube=self.kube,
            vault=self.vault,
            tokens=self.tokens,
            leases=self.leases,
            metrics=self.metrics,
            parsed=[dispatcher.parsed for dispatcher in self.dispatchers.values()],
        )
        # The first socket's, for callers that serve one (tests, check).
        self.dispatcher = self.dispatchers[of_endpoint(settings.endpoint).name]
        self.mounter = self.dispatcher.mounter
        self._loop = _LoopThread()
        self._servers: list[grpc.aio.Server] = []
        self._health: ThreadingHTTPServer | None = None
        self._stopped = threading.Event()
        self._socket_identities: dict[str, tuple[int, int, int]] = {}

    def start(self) -> None:
        endpoints = self.settings.endpoints
        # The health port first: if it cannot be had, no socket is left behind.
        try:
            self._health = create_health_server(
                self.settings.health_addr, ready=ReadinessCheck(self._probe), metrics=self.metrics, live=self._live
            )
        except (OSError, ValueError) as e:
            raise SystemExit(f"-health-addr {self.settings.health_addr}: cannot listen: {_reason(e)}") from None
        try:
            for endpoint in endpoints:
                _check_endpoint_directory(endpoint)
            self._loop.start()
            self.admission.bind(self._loop.loop)
            for endpoint in endpoints:
                # gRPC binds a path of its own, and unlinks that path when it stops; the
                # socket is then linked into place (a stale one removed just before, a live
                # one refused), so the driver finds no socket for microseconds only, and
                # stopping removes nothing another instance made at -endpoint meanwhile.
                staging = _staging_path(endpoint)
                dispatcher = self.dispatchers[of_endpoint(endpoint).name]
                self._servers.append(self._loop.run(self._start_grpc(staging, dispatcher), timeout=30))
                os.chmod(staging, 0o660)
                _place_socket(staging, endpoint)
                self._socket_identities[endpoint] = _identity(os.stat(endpoint))
        except BaseException:  # leave nothing running: no health port, no server, no socket, no loop
            self._health.server_close()
            self._health = None
            for server in self._servers:
                with contextlib.suppress(Exception):
                    self._loop.run(server.stop(0), timeout=5)
            self._servers = []
            self._remove_own_sockets()
            self._loop.stop()
            raise
        threading.Thread(target=self._health.serve_forever, name="health", daemon=True).start()
        if self.settings.revoke_deleted_pods:
            self.sweeper.start(self.settings.revocation_interval)
        for endpoint in endpoints:
            logger.info("serving on unix:%s (the %s provider contract)", endpoint, of_endpoint(endpoint).product)
        logger.info("health on %s", self.health_address)

    def _socket_is_ours(self, endpoint: str) -> bool:
        try:
            st = os.stat(endpoint)
        except OSError:
            return False
        return stat.S_ISSOCK(st.st_mode) and _identity(st) == self._socket_identities.get(endpoint)

    def _remove_own_sockets(self) -> None:
        for endpoint in self.settings.endpoints:
            if self._socket_is_ours(endpoint):  # never another instance's socket that replaced ours
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(endpoint)

    def _live(self) -> bool:
        return all(self._socket_is_ours(endpoint) for endpoint in self.settings.endpoints)

    async def _start_grpc(self, endpoint: str, dispatcher: MountDispatcher) -> grpc.aio.Server:
        server = create_server(
            ProviderServicer(dispatcher, self.metrics),
            endpoint=endpoint,
            max_message_bytes=self.settings.max_response_bytes,
        )
        old_umask = os.umask(SOCKET_UMASK)
        try:
            await server.start()
        finally:
            os.umask(old_umask)
        return server

    def _breaker_changed(self, key: EndpointKey, state: State) -> None:
        self.metrics.breaker_state.labels(key.address, key.namespace).set(int(state))
        if not self.breakers.has(key):  # forgotten meanwhile: its series is not brought back
            with contextlib.suppress(KeyError):
                self.metrics.breaker_state.remove(key.address, key.namespace)
        self.admission.wake()  # Mounts waiting for that endpoint may now be answered at once

    def _breaker_forgotten(self, key: EndpointKey) -> None:
        with contextlib.suppress(KeyError):
            self.metrics.breaker_state.remove(key.address, key.namespace)
        if not self.breakers.has_address(key.address):  # the count is by address; another namespace's may be open
            with contextlib.suppress(KeyError):
                self.metrics.mounts_refused.remove(key.address, "vault_unreachable")

    @property
    def health_address(self) -> str:
        assert self._health is not None
        host, port = self._health.server_address[:2]
        return f"{host!s}:{port}"

    def _probe(self) -> bool:
        """A fresh connection to each path the driver dials, answered by this process."""
        for endpoint in self.settings.endpoints:
            if not self._socket_is_ours(endpoint):
                return False
            with grpc.insecure_channel(f"unix:{endpoint}") as channel:
                stub = service_pb2_grpc.CSIDriverProviderStub(channel)  # type: ignore[no-untyped-call]
                stub.Version(service_pb2.VersionRequest(version="v1alpha1"), timeout=1.0)
        return True

    def stop(self, grace: float = STOP_GRACE_SECONDS) -> None:
        if self._stopped.is_set():
            return
        self._stopped.set()
        logger.info("stopping: letting in-flight Mounts finish (up to %.0fs)", grace)
        self.sweeper.stop()
        if self._servers:
            # Mounts still running near the end of the grace get a final answer from us;
            # gRPC would cancel them at the end (UNAVAILABLE: "uncertain" for kubelet).
            loop = self._loop.loop
            for dispatcher in self.dispatchers.values():
                loop.call_soon_threadsafe(
                    loop.call_later, max(grace - STOP_ANSWER_MARGIN_SECONDS, 0.0), dispatcher.stop_answering
                )
            with contextlib.suppress(Exception):
                self._loop.run(_stop_all(self._servers, grace), timeout=grace + 2)
        self._loop.stop()
        if self._health is not None:
            self._health.shutdown()
            self._health.server_close()
        self.admission.close()
        self.vault.close()
        self.kube.close()
        self._remove_own_sockets()
        logger.info("stopped")

    def wait(self) -> None:
        self._stopped.wait()


async def _stop_all(servers: list[grpc.aio.Server], grace: float) -> None:
    await asyncio.gather(*(server.stop(grace) for server in servers))


class _LoopThread:
    """The asyncio event loop the gRPC server answers on, in a thread of its own."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._serve, name="grpc-loop", daemon=True)

    def _serve(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.run_forever()

    def start(self) -> None:
        self._thread.start()

    def run(self, coroutine: Coroutine[Any, Any, T], *, timeout: float) -> T:
        """Run a coroutine on the loop from another thread and return its result."""
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(timeout)

    def stop(self) -> None:
        if not self._thread.is_alive():
            return
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(5)
        if not self._thread.is_alive():
            self.loop.close()


def _check_endpoint_directory(path: str) -> None:
    parent = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(parent):
        raise SystemExit(f"-endpoint {path}: directory {parent} does not exist")
    if os.path.lexists(path) and not stat.S_ISSOCK(os.lstat(path).st_mode):
        raise SystemExit(f"-endpoint {path} exists and is not a socket; refusing to replace it")


def _claim_socket(path: str) -> None:
    """Make way for our socket: remove one left by a dead process, never a live one."""
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(mode):
        raise SystemExit(f"-endpoint {path} exists and is not a socket; refusing to replace it")
    if not _answers(path):
        logger.info("removing stale socket %s (nothing answers on it)", path)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        return
    raise SystemExit(
        f"-endpoint {path}: another process is serving on this socket (a second provider on this node, or the "
        "one being replaced); refusing to take it over. Stop it first, or give this one another -endpoint"
    )


_STAGING_SUFFIX = ".vault-csi-staging"


def _staging_path(endpoint: str) -> str:
    """Where gRPC binds before the socket is put in place; short (unix socket paths are
    limited to 107 bytes) and, after a crash, recognisable as ours to clean up."""
    parent = os.path.dirname(os.path.abspath(endpoint))
    for name in os.listdir(parent):  # left behind by a killed instance: nothing answers there
        if name.endswith(_STAGING_SUFFIX) and not _answers(os.path.join(parent, name)):
            with contextlib.suppress(OSError):
                os.unlink(os.path.join(parent, name))
    return os.path.join(parent, f".{os.getpid()}-{secrets.token_hex(4)}{_STAGING_SUFFIX}")


def _place_socket(staging: str, endpoint: str) -> None:
    """Give the bound socket its name, atomically: link() fails if the name exists, so two
    instances starting together cannot both take it (rename would silently replace)."""
    try:
        for _attempt in range(2):
            try:
                os.link(staging, endpoint)
                return
            except FileExistsError:
                _claim_socket(endpoint)  # gone stale meanwhile: removed; alive: SystemExit
        raise SystemExit(f"-endpoint {endpoint}: another instance keeps creating this socket; refusing to race it")
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(staging)


def _answers(path: str) -> bool:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        probe.settimeout(1.0)
        try:
            probe.connect(path)
        except OSError:
            return False
    return True


def _identity(st: os.stat_result) -> tuple[int, int, int]:
    """What tells our socket file from another made at the same path later: an inode
    number alone may be reused at once, so its change time is part of it."""
    return st.st_dev, st.st_ino, st.st_ctime_ns


def _reason(error: BaseException) -> str:
    return error.strerror if isinstance(error, OSError) and error.strerror else str(error)


def _set_aside_start_up_objects() -> None:
    """What start-up made (modules, grpcio, protobuf, the App) lives as long as the process:
    set aside (gc.freeze), a full garbage collection, which holds the GIL and so every
    Mount, walks only what was made since. Measured after 300 cold Mounts: 41,000 objects and
    11 to 15 ms per full collection, against 7,000 and 1.4 to 2.4 ms with them set aside."""
    gc.collect()
    gc.freeze()
    logger.info("set aside %d objects made at start-up: full garbage collections skip them", gc.get_freeze_count())


def _bound_the_allocator() -> None:
    """glibc's malloc keeps what threads free in up to eight arenas per core, and raises its
    mmap threshold to the largest block freed, so that later large blocks come from an arena
    and stay there once freed: replies of a few MiB read by several Mount threads left the
    process tens of MiB above what it held (peak 40 to 44 MiB over its start for 20 MiB
    held, replymemory). Two arenas and a fixed 128 KiB threshold: a large block goes back to
    the system when freed (24 to 31 MiB). Done before any thread starts; elsewhere than
    glibc, nothing."""
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return
    mallopt(_M_ARENA_MAX, 2)
    mallopt(_M_MMAP_THRESHOLD, 128 * 1024)


def run(settings: Settings) -> int:
    """Serve until SIGTERM or SIGINT; return the process exit code."""
    _bound_the_allocator()
    requested = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        logger.info("received %s", signal.Signals(signum).name)
        requested.set()

    # Installed before anything starts, so a signal during start-up still stops cleanly.
    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    app = App(settings)
    app.start()
    _set_aside_start_up_objects()
    requested.wait()
    app.stop()
    return 0
