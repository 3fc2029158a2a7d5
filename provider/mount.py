"""The domain: a Mount request in, files and versions out.

Parse and validate the class, log in to Vault as the pod (token cache first), send each
distinct request once (concurrently when there are several), render each object's
file, and version it with the cluster's HMAC key.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import re
import sys
import threading
import time
import weakref
from collections import deque
from collections.abc import Callable, Collection, Mapping
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, NamedTuple, Protocol, TypeVar
from urllib.parse import parse_qsl

from provider import render
from provider.cache import HmacKeySource, TokenCache, TokenGrant
from provider.config import (
    MountConfig,
    ObjectList,
    SecretObject,
    Settings,
    TLSConfig,
    VaultSettings,
    keep_shared,
    parse_mount,
)
from provider.errors import (
    ConfigError,
    KubernetesError,
    ObjectError,
    ProviderError,
    VaultLoginDenied,
    VaultPermissionDenied,
    VaultUnreachable,
    quote,
)
from provider.flavour import VAULT, Flavour
from provider.kube import KubeClient
from provider.leases import LeaseCache, LeaseKey, Liveness
from provider.metrics import Metrics
from provider.transport import Reply
from provider.vault import AroundToken, Endpoint, Login, Read, Secret, VaultClient, settles
from provider.versions import object_version

logger = logging.getLogger(__name__)

T = TypeVar("T")

# Kubernetes Secrets hold at most 1 MiB: larger files mount but cannot be synced.
SECRET_SYNC_LIMIT = 1024 * 1024
# Endpoints kept built (a few hundred bytes each): more than a node's Vaults and namespaces.
ENDPOINTS_KEPT = 256
# Plain reads of one Mount sent together at most, each on its own connection.
MAX_PREFETCH_PER_BATCH = 16
# Requests a Mount answered on the event loop may have at most (Mounter.mount_on_loop):
# it saves a warm Mount the thread hand-off, but each reply waited for on the loop costs
# more CPU than a thread's blocking receive of it.
LOOP_MAX_READS = 2
# What a class plan (_ClassPlan) holds per distinct request beside its URL and query: the
# request and its path, its Read, the entries of its maps (about 510 bytes, measured),
# rounded up.
CLASS_PLAN_BYTES_PER_REQUEST = 640
# Per object (its entry in the map of requests: about 110 bytes, measured), and per query
# value beside its name and value (the pair in its request, its place in its read's
# parameters: about 140 bytes, measured), rounded up.
CLASS_PLAN_BYTES_PER_OBJECT = 128
CLASS_PLAN_BYTES_PER_QUERY_VALUE = 192
# Concurrent Vault requests one Mount may have in flight: enough to hide round trips,
# few enough that one pod with many objects cannot starve the others.
MAX_FETCH_PER_MOUNT = 8
# A Mount waits this long past its deadline for a thread it borrowed, at most.
HELPER_GRACE_SECONDS = 1.0
# Bytes of memory a plan's remembered last Mount may hold (MountPlan.memory): ten KV
# secrets, their files and the reply encoded from them take about 7.5 KiB. The parse
# cache keeps at most 512 plans a socket (dispatch.PARSED_ENTRIES): 5 MiB at worst.
REMEMBERED_BYTES = 10 * 1024
# What each remembered reply holds beside its bytes: its record and the tuple slot.
REPLY_OVERHEAD_BYTES = 120
# What each file adds to the encoded reply beside its path (twice: File.path and
# ObjectVersion.id), contents and version: the tags and lengths of its File and
# ObjectVersion, at most 42 bytes; and what the encoding's bytes object and list hold.
ENCODED_FILE_OVERHEAD_BYTES = 48
ENCODED_OVERHEAD_BYTES = 160


class Lanes(Protocol):
    """Extra threads a Mount may borrow for parallel fetches (admission.Ticket)."""

    def try_submit(self, fn: Callable[[], T]) -> Future[T] | None:
        """Run fn on another thread if one is free; None means: do it yourself."""


class NoLanes:
    """Fetch sequentially on the calling thread."""

    def try_submit(self, fn: Callable[[], T]) -> Future[T] | None:
        return None


@dataclass(frozen=True, kw_only=True)
class MountRequest:
    """The fields of the driver's MountRequest that the domain uses."""

    attributes: str = field(repr=False)
    target_path: str
    permission: str


@dataclass(frozen=True, kw_only=True, slots=True)
class MountedFile:
    path: str
    mode: int
    contents: bytes = field(repr=False)
    version: str


@dataclass(frozen=True, kw_only=True)
class MountResult:
    config: MountConfig
    files: tuple[MountedFile, ...]
    # The reply's bytes, kept by the server (at most one entry) when it first answers a
    # result that is answered again: a plan's remembered Mount (_LastMount.result).
    encoded: list[bytes] = field(default_factory=list, compare=False, repr=False)


@dataclass(frozen=True, kw_only=True, slots=True)
class SecretRequest:
    """One distinct Vault request; objects that share it share one reply."""

    method: str
    path: str
    query: tuple[tuple[str, str], ...]
    body: bytes | None
    # Computed once: a Mount looks its requests up in several maps (replies, reads,
    # lease keys), and a dataclass hashes all its fields on every lookup.
    _hash: int = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_hash", hash((self.method, self.path, self.query, self.body)))

    def __hash__(self) -> int:
        return self._hash

    @classmethod
    def of(cls, obj: SecretObject) -> SecretRequest:
        """The object's request: made once per parsed object, which every Mount of its class shares."""
        made = _REQUESTS.get(obj)
        if made is None:
            made = _REQUESTS[obj] = cls._of(obj)
        return made

    @classmethod
    def _of(cls, obj: SecretObject) -> SecretRequest:
        path, _, query = obj.secret_path.partition("?")
        path = path.lstrip("/")
        if path.startswith("v1/"):
            path = path[3:]
        return cls(
            method=obj.http_method,
            path=path,
            # Go's url.ParseQuery: blank values are kept, order of a key's values too.
            query=tuple(parse_qsl(query, keep_blank_values=True)),
            body=obj.request_body,
        )

    def params(self) -> dict[str, list[str]]:
        values: dict[str, list[str]] = {}
        for key, value in self.query:
            values.setdefault(key, []).append(value)
        return values


# Each parsed object's request, dropped with the object (the parse cache decides how long
# objects live).
_REQUESTS: weakref.WeakKeyDictionary[SecretObject, SecretRequest] = weakref.WeakKeyDictionary()


@dataclass(frozen=True, kw_only=True, eq=False)
class MountPlan:
    """What every Mount of one parse does alike, worked out once: where its requests go,
    the pod's identity, each object's request and the pod's lease key for each. Kept
    with the parse (dispatch.ParsedMounts), so a warm Mount does none of it again. Beside
    the parse (which holds the pod's service-account token, as a kept parse did) it holds
    no Vault token; it remembers its last Mount's plain-read replies and files (`memory`,
    at most REMEMBERED_BYTES, forgotten when a Mount fails), so those secret values stay in
    memory as long as the parse is kept, as its service-account token does."""

    config: MountConfig
    endpoint: Endpoint
    identity: IdentityKey | None  # None without a pod uid: nothing is cached for it
    requests: Mapping[SecretObject, SecretRequest]  # the objects that read Vault
    distinct: tuple[SecretRequest, ...]  # each request once, in the objects' order
    reads: Mapping[SecretRequest, Read]  # the plain reads (GET or LIST, no body), as sent together
    lease_keys: Mapping[SecretRequest, LeaseKey]  # empty without an identity
    # Whether the files can be remembered (memory): none is a whole reply, whose file
    # holds the request_id Vault makes anew for every request.
    rememberable: bool = True
    # Requests whose last reply the lease cache did not keep (a KV secret): a lone one is
    # read ahead (Mounter._prefetch). Set and cleared by Mounts of this parse; at first,
    # those the class's other pods found so (`plain`).
    unkept: set[SecretRequest] = field(default_factory=set)
    # The class's requests whose last reply, to any of its pods, was not kept (its
    # _ClassPlan's, shared): what the engine at the path answers, not what a pod read.
    plain: set[SecretRequest] = field(default_factory=set)
    # The last Mount's replies and files, when every reply was a plain read (Mounter.mount_plan).
    memory: _Memory = field(default_factory=lambda: _Memory())
    # Its reads' requests made around the pod's token, for its warm Mounts on the loop
    # (Mounter.mount_on_loop); None when they cannot go there (too many, not plain reads).
    around_token: AroundToken | None = None

    @classmethod
    def of(cls, config: MountConfig) -> MountPlan:
        endpoint = endpoint_of(config)
        shared = _ClassPlan.of(config.objects, endpoint)
        pod = config.pod
        identity = (
            IdentityKey(
                pod_uid=pod.uid,
                pod_namespace=pod.namespace,
                pod_name=pod.name,
                service_account=pod.service_account,
                role=config.role_name,
                auth_mount=config.auth_mount,
                audience=config.audience,
                flavour=config.flavour.name,  # the default audience, and the HMAC key, differ
                endpoint=endpoint,
            )
            if pod.uid
            else None
        )
        return cls(
            config=config,
            endpoint=endpoint,
            identity=identity,
            requests=shared.requests,
            distinct=shared.distinct,
            rememberable=shared.rememberable,
            reads=shared.reads,
            unkept=set(shared.plain),
            plain=shared.plain,
            around_token=shared.around_token if identity is not None else None,
            lease_keys={
                request: LeaseKey(
                    pod_uid=identity.pod_uid,
                    pod_namespace=identity.pod_namespace,
                    pod_name=identity.pod_name,
                    target_path=config.target_path,
                    identity=identity,
                    request=request,
                )
                for request in shared.distinct
            }
            if identity is not None
            else {},
        )


@dataclass(frozen=True, kw_only=True)
class _ClassPlan:
    """What a plan works out from its class's objects and endpoint alone, the same for
    every pod: made once per parsed objects list and endpoint (config.ObjectList keeps
    it), so a new pod's first Mount does not make it again. Request shapes only: no
    token, no reply. Its maps are read-only, shared by many pods' plans."""

    requests: Mapping[SecretObject, SecretRequest]
    distinct: tuple[SecretRequest, ...]
    reads: Mapping[SecretRequest, Read]
    rememberable: bool
    around_token: AroundToken | None  # for a pod's plan (one with an identity) only
    # Its requests whose last reply, to any pod of the class, was not kept (a KV secret):
    # a new pod's first Mount reads those ahead, as its later Mounts would (MountPlan.plain).
    plain: set[SecretRequest] = field(default_factory=set)

    @classmethod
    def of(cls, objects: tuple[SecretObject, ...], endpoint: Endpoint) -> _ClassPlan:
        made = objects.shared.get(endpoint) if isinstance(objects, ObjectList) else None
        if isinstance(made, _ClassPlan):
            return made
        made = cls._of(objects, endpoint)
        keep_shared(objects, endpoint, made, made.weight())
        return made

    def weight(self) -> int:
        """What keeping it costs, in bytes (as dispatch.weight_of counts a plan's requests):
        per object and per request, each path and URL, each query value with its name and
        value, the requests made around the token."""
        return (
            len(self.requests) * CLASS_PLAN_BYTES_PER_OBJECT
            + len(self.distinct) * CLASS_PLAN_BYTES_PER_REQUEST
            + sum(sys.getsizeof(request.path) for request in self.distinct)
            + sum(len(read.url) for read in self.reads.values())
            + sum(
                CLASS_PLAN_BYTES_PER_QUERY_VALUE + sys.getsizeof(name) + sys.getsizeof(value)
                for request in self.distinct
                for name, value in request.query
            )
            + (self.around_token.size() if self.around_token is not None else 0)
        )

    @classmethod
    def _of(cls, objects: tuple[SecretObject, ...], endpoint: Endpoint) -> _ClassPlan:
        requests: dict[SecretObject, SecretRequest] = {}
        shapes: dict[tuple[str, str, bytes | None], SecretRequest] = {}
        for obj in objects:
            if obj.fetches:  # objects of one shape (aliases of one path, say) share one request
                shape = (obj.http_method, obj.secret_path, obj.request_body)
                made = shapes.get(shape)
                if made is None:
                    made = shapes[shape] = SecretRequest.of(obj)
                requests[obj] = made
        distinct = tuple(dict.fromkeys(requests.values()))
        reads = {
            request: Read(request.method, request.path, request.params() or None)
            for request in distinct
            if request.method in ("GET", "LIST") and request.body is None
        }
        on_loop = [reads[request] for request in distinct if request in reads]
        return cls(
            requests=MappingProxyType(requests),
            distinct=distinct,
            reads=MappingProxyType(reads),
            rememberable=not any(render.writes_whole_reply(obj) for obj in requests),
            around_token=AroundToken.of(endpoint, on_loop)
            if 0 < len(on_loop) == len(distinct) <= LOOP_MAX_READS and len({read.method for read in on_loop}) == 1
            else None,
        )


class _Reply(NamedTuple):
    """What of a reply decides the files made from it."""

    status: int
    json_typed: bool  # its Content-Type names JSON: then a body that is not JSON fails the read
    json: bool  # it decoded as JSON: its leading request_id (new for every request) is left out
    cut: bool  # a leading request_id was left out (a JSON body without one is compared whole)
    rest: bytes  # the body, without that request_id


@dataclass(frozen=True, slots=True)
class _LastMount:
    """What a plan's last Mount answered, kept when every reply was a plain read (a KV
    secret) and all is small: each reply as _Reply, the HMAC key, the result (its files,
    and the reply the server encoded from them). A warm Mount whose replies are the same
    answers the same result without decoding, rendering, hashing or encoding it again.
    The pod's own reads are still sent each time, with its own token (a revoked token, a
    changed policy or secret all show at once); a plan is one pod's parse. Nothing here is
    printed: its replies and files hold secret values."""

    replies: tuple[_Reply, ...] = field(repr=False)
    key: bytes | None = field(repr=False)
    result: MountResult = field(repr=False)  # the one answered each time, and its encoding with it

    def answers(self, replies: Mapping[SecretRequest, Reply], plan: MountPlan, key: bytes | None) -> bool:
        """Whether these replies (every one of the plan's requests') are the remembered ones."""
        if key != self.key or len(replies) != len(self.replies):
            return False
        for request, remembered in zip(plan.distinct, self.replies, strict=True):
            reply = replies.get(request)
            if reply is None or reply.status != remembered.status:
                return False
            body, rest = reply.body, remembered.rest
            start = _request_id_end(body) if remembered.json else 0
            if (
                (start > 0) != remembered.cut
                or len(body) - start != len(rest)
                or not body.endswith(rest)  # compared in place: a large body is not copied
                or ("json" in reply.content_type.lower()) != remembered.json_typed
            ):
                return False
        return True


class _Memory:
    """A plan's last Mount (None: nothing to answer from), replaced whole: concurrent
    Mounts of the plan each see one consistent _LastMount."""

    __slots__ = ("last",)

    def __init__(self) -> None:
        self.last: _LastMount | None = None


def _remembered(
    plan: MountPlan,
    replies: Mapping[SecretRequest, Reply],
    secrets: Mapping[SecretRequest, Secret | ProviderError],
    key: bytes | None,
    result: MountResult,
) -> _LastMount | None:
    """The plan's last Mount as kept; None when what it holds in memory (the replies, the
    files and their paths and versions, as Python objects, and the reply encoded from them)
    is over REMEMBERED_BYTES: ten thousand empty files of an expandKeys object are
    megabytes of objects for no bytes."""
    size = 0
    for request in plan.distinct:  # sized before anything is copied: a reply may be megabytes
        size += len(replies[request].body) + REPLY_OVERHEAD_BYTES
        if size > REMEMBERED_BYTES:
            return None
    kept = tuple(_remembered_reply(replies[request], json=_decoded_json(secrets[request])) for request in plan.distinct)
    size = sum(sys.getsizeof(reply.rest) + REPLY_OVERHEAD_BYTES for reply in kept) + ENCODED_OVERHEAD_BYTES
    for file in result.files:
        size += sum(map(sys.getsizeof, (file, file.path, file.contents, file.version))) + encoded_size(file)
        if size > REMEMBERED_BYTES:
            return None
    return _LastMount(replies=kept, key=key, result=result) if size <= REMEMBERED_BYTES else None


def encoded_size(file: MountedFile) -> int:
    """At least the bytes a file adds to the encoded MountResponse (server.encoded)."""
    path = len(file.path.encode("utf-8", "surrogatepass"))
    return (
        2 * path + len(file.contents) + len(file.version.encode("utf-8", "surrogatepass")) + ENCODED_FILE_OVERHEAD_BYTES
    )


def _decoded_json(outcome: Secret | ProviderError) -> bool:
    return isinstance(outcome, Secret) and outcome.raw is None


# Vault's reply starts with the request's own id: {"request_id":"<uuid>", then the rest.
_REQUEST_ID = re.compile(rb'\{"request_id":"[0-9a-fA-F-]{1,64}",')


def _remembered_reply(reply: Reply, *, json: bool) -> _Reply:
    """What of a reply decides the files; a JSON one without its leading request_id (a
    body that is not JSON goes into files as it is, every byte of it)."""
    body = reply.body
    start = _request_id_end(body) if json else 0
    return _Reply(
        status=reply.status,
        json_typed="json" in reply.content_type.lower(),
        json=json,
        cut=start > 0,
        rest=body[start:] if start else body,
    )


def _request_id_end(body: bytes) -> int:
    """Where a body's leading request_id ends (0: it has none)."""
    start = _REQUEST_ID.match(body)
    return start.end() if start is not None else 0


class Mounter:
    """Answers Mounts; one per process, shared by every gRPC worker thread."""

    def __init__(
        self,
        *,
        settings: Settings,
        vault: VaultClient,
        kube: KubeClient,
        tokens: TokenCache,
        hmac_keys: HmacKeySource,
        metrics: Metrics,
        leases: LeaseCache | None = None,
        flavour: Flavour = VAULT,
        defaults: VaultSettings | None = None,
    ) -> None:
        """`flavour` is the contract of the socket this Mounter answers on; `defaults` its
        default address, auth mount, namespace and TLS (settings.vault by default)."""
        self.flavour = flavour
        self.defaults = defaults or settings.vault
        self._settings = settings
        self._vault = vault
        self._kube = kube
        self._tokens = tokens
        self._hmac_keys = hmac_keys
        self._metrics = metrics
        self._token_counts = {
            cached: metrics.token_cache.labels("hit" if cached else "miss") for cached in (True, False)
        }
        self._leases = leases

    def parse(
        self,
        request: MountRequest,
        *,
        gate: Callable[[], AbstractContextManager[object]] | None = None,
        decoded: Any = None,
    ) -> MountConfig:
        return parse_mount(
            attributes=request.attributes,
            target_path=request.target_path,
            permission=request.permission,
            defaults=self.defaults,
            flavour=self.flavour,
            gate=gate,
            decoded=decoded,
        )

    def mount(self, request: MountRequest, *, deadline: float, lanes: Lanes | None = None) -> MountResult:
        config = self.parse(request)
        return self.mount_config(config, deadline=deadline, lanes=lanes)

    def mount_config(self, config: MountConfig, *, deadline: float, lanes: Lanes | None = None) -> MountResult:
        return self.mount_plan(MountPlan.of(config), deadline=deadline, lanes=lanes)

    def mount_plan(
        self,
        plan: MountPlan,
        *,
        deadline: float,
        lanes: Lanes | None = None,
        read_ahead: Mapping[SecretRequest, Reply | None] | None = None,
    ) -> MountResult:
        """`read_ahead`: what mount_on_loop read for this Mount: replies not to be sent
        again, and None for reads to send again (read ahead here)."""
        try:
            return self._mount(plan, deadline=deadline, lanes=lanes, from_loop=read_ahead)
        except BaseException:
            plan.memory.last = None  # a revoked token or policy, a missing secret, a defect: forget its values
            raise

    async def mount_on_loop(
        self, plan: MountPlan, *, deadline: float, done: asyncio.Future[bool]
    ) -> MountResult | dict[SecretRequest, Reply | None] | None:
        """A warm Mount answered on the event loop, without a thread (provider.loopio),
        when its plan remembers its last Mount (every request a plain read of a KV secret)
        and nothing is missing that would have to be waited for: the pod's token and the
        HMAC key cached, a kept-alive connection for each read. The reads are sent with the
        pod's own token, as on a thread; when every reply is the remembered one, the
        remembered files are the answer. Otherwise, for mount_plan on a thread: each reply
        read (not sent again), None for each read the loop gave up on (read ahead again
        there), no entry for one that did not settle (it goes the usual way); or None when
        the loop read nothing (the thread does it all).
        `done` set from outside (shutdown) ends the wait with its exception."""
        last, around = plan.memory.last, plan.around_token
        if last is None or around is None or plan.identity is None:
            return None
        key = self._hmac_keys.peek()  # None also when it must be fetched: a thread does that
        token = self._tokens.peek(plan.identity) if key is not None and key == last.key else None
        if token is None:
            return None
        for request in plan.distinct:
            if self._kept_key(plan.lease_keys.get(request), wait=False):
                return None
        answers = await self._vault.send_reads_on_loop(
            plan.endpoint, token=token, around=around, deadline=deadline, done=done
        )
        if answers is None or answers.count(None) == len(answers):  # nothing read: a thread reads it all
            return None
        replies: dict[SecretRequest, Reply | None] = {}
        for request, answer in zip(plan.distinct, answers, strict=True):
            if answer is None or (settles(answer) and answer.status != 403):  # 403: a new login may help
                replies[request] = answer
            else:  # as _prefetch: it goes the usual way, and a lone one keeps to it until that succeeds
                plan.unkept.discard(request)
        whole = {request: reply for request, reply in replies.items() if reply is not None}
        if len(whole) == len(plan.distinct) and last.answers(whole, plan, key):
            self._token_counts[True].inc()  # else counted where the Mount goes on
            return last.result
        return replies

    def _mount(
        self,
        plan: MountPlan,
        *,
        deadline: float,
        lanes: Lanes | None,
        from_loop: Mapping[SecretRequest, Reply | None] | None = None,
    ) -> MountResult:
        config, endpoint = plan.config, plan.endpoint
        identity = _Identity(self, plan, deadline)
        identity.token()  # a refused login fails the whole Mount, not each object
        read_ahead = self._read_ahead(identity, plan, deadline, from_loop)
        last = plan.memory.last
        if last is not None and len(read_ahead) == len(plan.distinct):
            key = self._hmac_keys.get(deadline=deadline)
            if last.answers(read_ahead, plan, key):
                return last.result
        # Objects that share a request share its one reply: a username and its password, a
        # certificate and its key, and any template over them are cut from the same call.
        outcomes, plain = self._fetch_all(identity, plan, deadline, lanes or NoLanes(), read_ahead)
        replies: dict[SecretObject, render.ObjectData] = {}
        failures: list[tuple[str, ProviderError]] = []
        for obj, request in plan.requests.items():
            outcome = outcomes[request]
            if isinstance(outcome, ProviderError):
                failures.append((obj.object_name, outcome))
            else:
                replies[obj] = render.ObjectData(path=request.path, body=outcome.body, raw=outcome.raw)
        # With a read failed, templates are not rendered: their input is incomplete, and the
        # failed read is what to fix. The other objects are, to report all their errors at once.
        rendered_objects = [obj for obj in config.objects if obj in replies] if failures else config.objects
        rendered, render_failures = render.mount_files(
            rendered_objects,
            replies,
            namespace=config.pod.namespace,
            deadline=deadline,
            tenant=(config.pod.namespace, endpoint, config.role_name),
            max_bytes=self._settings.max_response_bytes,
        )
        failures += render_failures
        if failures:
            order = {obj.object_name: index for index, obj in enumerate(config.objects)}
            raise ObjectError(sorted(failures, key=lambda failure: order.get(failure[0], 0)))
        key = self._hmac_keys.get(deadline=deadline)
        files = [
            MountedFile(
                path=file.path,
                mode=file.obj.file_permission or config.permission,
                contents=file.contents,
                version=object_version(key, file.obj, file.version_input) if key is not None else "",
            )
            for file in rendered
        ]
        self._check_size(files)
        result = MountResult(config=config, files=tuple(files))
        if plan.rememberable:
            plan.memory.last = _remembered(plan, read_ahead, outcomes, key, result) if plain else None
        return result

    def _fetch_all(
        self,
        identity: _Identity,
        plan: MountPlan,
        deadline: float,
        lanes: Lanes,
        read_ahead: Mapping[SecretRequest, Reply],
    ) -> tuple[dict[SecretRequest, Secret | ProviderError], bool]:
        """Each distinct request once, and whether every one was a plain read. The replies
        read ahead (sent together from this thread: one round trip for all, no hand-offs)
        are decoded; what they leave, this thread and any it may borrow take from one
        queue until it is empty, so borrowed threads are never idle."""
        replies: dict[SecretRequest, Secret | ProviderError] = {}
        plain = len(read_ahead) == len(plan.distinct)
        for request, reply in read_ahead.items():
            answer = self._vault.answer(plan.reads[request], reply)
            if isinstance(answer, Secret) and not answer.lease_id and not self._would_keep(answer):
                # No lease and nothing to keep (a KV secret): no bookkeeping, and nothing to
                # revoke should a racing Mount of this pod have kept a reply meanwhile.
                replies[request] = answer
            else:  # through the lease cache
                plain = False
                replies[request] = self._fetch_outcome(identity, request, deadline, answer)
        if replies and self._leases is not None:
            self._leases.purge_if_due()
        pending: deque[SecretRequest] = deque()
        if len(replies) < len(plan.distinct):  # some were not read ahead, or not settled
            pending.extend(request for request in plan.distinct if request not in replies)

        def drain() -> None:
            while True:
                try:
                    request = pending.popleft()
                except IndexError:
                    return
                replies[request] = self._fetch_outcome(identity, request, deadline)

        helpers: list[Future[None]] = []
        for _ in range(min(len(pending), MAX_FETCH_PER_MOUNT) - 1):
            helper = lanes.try_submit(drain)
            if helper is None:
                break
            helpers.append(helper)
        drain()
        for helper in helpers:
            try:  # every request inside is bounded by the deadline; this wait is too
                helper.result(timeout=max(deadline - time.monotonic(), 0.0) + HELPER_GRACE_SECONDS)
            except FutureTimeout:
                break
        for request in plan.distinct:
            if request not in replies:  # a helper that never ran (the threads shut down meanwhile)
                replies[request] = VaultUnreachable("the request did not finish before the Mount's deadline")
        return replies, plain

    def _read_ahead(
        self,
        identity: _Identity,
        plan: MountPlan,
        deadline: float,
        from_loop: Mapping[SecretRequest, Reply | None] | None,
    ) -> dict[SecretRequest, Reply]:
        """The plain reads' replies: read ahead here, or what the loop read (what it gave up
        on read ahead again, together)."""
        if from_loop is None:
            return self._prefetch(identity, plan, deadline)
        replies = {request: reply for request, reply in from_loop.items() if reply is not None}
        again = [request for request, reply in from_loop.items() if reply is None]
        return (replies | self._prefetch(identity, plan, deadline, only=again)) if again else replies

    def _prefetch(
        self, identity: _Identity, plan: MountPlan, deadline: float, *, only: Collection[SecretRequest] | None = None
    ) -> dict[SecretRequest, Reply]:
        """Replies to the Mount's plain reads (GET or LIST, no body, nothing kept for
        this pod), sent together in batches; a read that attempt did not settle is left
        out, and goes the usual way (retries, a new login after a 403, redirects). A
        reply the lease cache would not keep (a KV secret) then skips its bookkeeping.
        A lone read goes this way too once its last reply was not kept: its one attempt
        costs less than the usual way's, which alone makes a pod's concurrent first Mounts
        share one call (one set of credentials, not one each). `only`: these reads alone."""
        reads = [
            (request, read)
            for request, read in plan.reads.items()
            if (only is None or request in only) and not self._kept(identity, request)
        ]
        if not reads or (len(reads) == 1 and reads[0][0] not in plan.unkept):
            return {}
        try:
            token = identity.token()
        except ProviderError:
            return {}  # the usual way reports it, once per Mount
        settled: dict[SecretRequest, Reply] = {}
        for start in range(0, len(reads), MAX_PREFETCH_PER_BATCH):
            batch = reads[start : start + MAX_PREFETCH_PER_BATCH]
            try:
                answers = self._vault.send_reads(
                    identity.endpoint, token=token, reads=[read for _, read in batch], deadline=deadline
                )
            except ProviderError:
                plan.unkept.difference_update(request for request, _ in batch)
                return settled
            for (request, _), answer in zip(batch, answers, strict=True):
                if isinstance(answer, VaultUnreachable):  # cut at the deadline: the usual way says so
                    identity.cut[request] = answer
                    plan.unkept.discard(request)
                elif answer is not None and answer.status != 403:  # permission denied: a new login may help
                    settled[request] = answer
                else:  # it goes the usual way, and a lone one keeps to it until that succeeds
                    plan.unkept.discard(request)
        return settled

    def _would_keep(self, reply: Secret) -> bool:
        return self._leases is not None and self._leases.would_keep(reply)

    def _kept(self, identity: _Identity, request: SecretRequest) -> bool:
        """Whether the lease cache holds (or is fetching) this pod's reply to request:
        then it is not read ahead, which for dynamic secrets would issue credentials."""
        return self._kept_key(identity.lease_key(request))

    def _kept_key(self, key: LeaseKey | None, *, wait: bool = True) -> bool:
        return key is not None and self._leases is not None and self._leases.holds(key, wait=wait)

    def _fetch_outcome(
        self,
        identity: _Identity,
        request: SecretRequest,
        deadline: float,
        prefetched: Secret | ProviderError | None = None,
    ) -> Secret | ProviderError:
        try:
            return self._fetch(identity, request, deadline, prefetched)
        except ProviderError as e:
            return e

    def _fetch(
        self,
        identity: _Identity,
        request: SecretRequest,
        deadline: float,
        prefetched: Secret | ProviderError | None = None,
    ) -> Secret:
        if self._leases is None or (key := identity.lease_key(request)) is None:
            return self._fetch_from_vault(identity, request, deadline, prefetched)
        identity.token()
        issued = False

        def issue() -> Secret:
            nonlocal issued
            issued = True
            return self._fetch_from_vault(identity, request, deadline, prefetched)

        try:
            secret = self._leases.fetch(
                key,
                issue=issue,
                renew=lambda lease_id, increment: self._vault.renew_lease(
                    identity.endpoint, token=identity.token(), lease_id=lease_id, increment=increment, deadline=deadline
                ),
                deadline=deadline,
                not_after=identity.expires_at,
                issuer=identity.issuer,
                check=lambda lease_id, issuer: self._lease_liveness(identity, lease_id, issuer, deadline),
            )
            if secret.lease_id or self._leases.would_keep(secret):
                identity.plan.unkept.discard(request)
                identity.plan.plain.discard(request)
            else:
                identity.plan.unkept.add(request)
                identity.plan.plain.add(request)
            return secret
        finally:
            if not issued and isinstance(prefetched, Secret) and prefetched.lease_id:
                # A concurrent Mount of this pod kept its own reply meanwhile: the one read
                # ahead is used by nobody, so it is revoked now rather than left to expire.
                self._revoke_unused(identity, prefetched.lease_id, deadline)

    def _lease_liveness(self, identity: _Identity, lease_id: str, issuer: Issuer | None, deadline: float) -> Liveness:
        """Whether a kept lease is still alive in Vault. Refused with the pod's token, it is
        looked up again after a new login: refused again, the role's policies may not look
        leases up (they leave out the default one), and it is served as kept; answered, the
        last token was no longer valid, and a lease it issued is gone (Vault revokes a token's
        leases in the background: a lookup may still find them for a while)."""

        def look_up(token: str) -> Liveness:
            alive = self._vault.lease_alive(identity.endpoint, token=token, lease_id=lease_id, deadline=deadline)
            return Liveness.ALIVE if alive else Liveness.GONE

        token = identity.token()
        try:
            try:
                return look_up(token)
            except VaultPermissionDenied:
                fresh = identity.refresh(token)
                if fresh is None:
                    return Liveness.UNKNOWN
                logger.info("vault refused a cached token for %s; logged in again", identity.describe())
                try:
                    liveness = look_up(fresh)
                except VaultPermissionDenied:
                    return Liveness.UNCHECKABLE
                return Liveness.GONE if issuer is not None and issuer.login.token == token else liveness
        except ProviderError as e:  # Vault did not answer: served as kept, asked again next time
            logger.debug("could not look up a kept lease for %s: %s", identity.describe(), e)
            return Liveness.UNKNOWN

    def _revoke_unused(self, identity: _Identity, lease_id: str, deadline: float) -> None:
        try:
            self._vault.revoke_lease(identity.endpoint, token=identity.token(), lease_id=lease_id, deadline=deadline)
        except ProviderError as e:
            logger.warning("could not revoke a lease read ahead and not used for %s: %s", identity.describe(), e)

    def _fetch_from_vault(
        self,
        identity: _Identity,
        request: SecretRequest,
        deadline: float,
        prefetched: Secret | ProviderError | None = None,
    ) -> Secret:
        token = identity.token()
        try:
            if isinstance(prefetched, Secret):
                return prefetched
            if prefetched is not None:
                raise prefetched
            cut = identity.cut.get(request)
            if cut is not None:  # read ahead, Vault did not answer, and no time is left to ask again
                raise cut
            return self._read(identity.endpoint, token, request, deadline)
        except VaultPermissionDenied:
            fresh = identity.refresh(token)
            if fresh is None:
                raise
            logger.info("vault refused a cached token for %s; logged in again", identity.describe())
            return self._read(identity.endpoint, fresh, request, deadline)

    def _read(self, endpoint: Endpoint, token: str, request: SecretRequest, deadline: float) -> Secret:
        return self._vault.read(
            endpoint,
            token=token,
            method=request.method,
            path=request.path,
            params=request.params() or None,
            json_body=request.body,
            deadline=deadline,
        )

    def _check_size(self, files: list[MountedFile]) -> None:
        total = sum(render.response_size(f.path, f.contents) for f in files)
        if total > self._settings.max_response_bytes:
            raise render.too_large(files, total, self._settings.max_response_bytes)
        big = [f.path for f in files if len(f.contents) > SECRET_SYNC_LIMIT]
        if big:
            logger.warning("objects over 1 MiB cannot be synced to a Kubernetes Secret: %s", ", ".join(map(repr, big)))

    # Used by _Identity.
    def _login(self, config: MountConfig, endpoint: Endpoint, deadline: float) -> Login:
        jwt = self._jwt(config)
        try:
            login = self._vault.login(
                endpoint, mount=config.auth_mount, role=config.role_name, jwt=jwt, deadline=deadline
            )
        except VaultLoginDenied as e:
            self._metrics.logins.labels("denied").inc()
            raise VaultLoginDenied(
                f"{config.flavour.name} login failed for role {quote(config.role_name)} at auth/{config.auth_mount} "
                "as service "
                f"account {config.pod.namespace}/{config.pod.service_account}: {e}",
                status=e.status,
            ) from None
        except ProviderError:
            self._metrics.logins.labels("error").inc()
            raise
        self._metrics.logins.labels("ok").inc()
        return login

    def _jwt(self, config: MountConfig) -> str:
        if config.pod.token:
            return config.pod.token
        pod = config.pod
        audience = config.audience or config.flavour.default_audience
        missing = [
            name
            for name, value in (
                ("pod.namespace", pod.namespace),
                ("serviceAccount.name", pod.service_account),
                ("pod.name", pod.name),
                ("pod.uid", pod.uid),
            )
            if not value
        ]
        if missing:
            raise ConfigError(
                f"no service account token for audience {quote(audience)} in the Mount request, and cannot request "
                f"one: missing csi.storage.k8s.io/{', csi.storage.k8s.io/'.join(missing)} "
                "(enable podInfoOnMount and tokenRequests on the CSIDriver)"
            )
        try:
            return self._kube.create_token(
                namespace=pod.namespace,
                service_account=pod.service_account,
                audience=config.audience,
                pod_name=pod.name,
                pod_uid=pod.uid,
            )
        except KubernetesError as e:
            raise KubernetesError(
                f"no service account token for audience {quote(audience)} in the Mount request "
                f"(add it to the CSIDriver's tokenRequests) and {e}"
            ) from None


@dataclass(frozen=True, kw_only=True, slots=True)
class Issuer:
    """Where and with which token a leased reply was issued: what revokes it."""

    endpoint: Endpoint
    login: Login


def endpoint_of(config: MountConfig) -> Endpoint:
    """Where a class's requests go: one shared Endpoint per address, TLS and namespace,
    so its parsed address and keys are worked out once, not per Mount, and a token or
    lease kept per pod does not hold a copy of its own."""
    return _endpoint(config.vault_address, config.tls, config.vault_namespace)


@functools.lru_cache(maxsize=ENDPOINTS_KEPT)
def _endpoint(address: str, tls: TLSConfig, namespace: str) -> Endpoint:
    return Endpoint(address=address, tls=tls, namespace=namespace)


@dataclass(frozen=True, kw_only=True, slots=True)
class IdentityKey:
    """Everything that makes a Vault identity: a token is cached under this, per pod."""

    pod_uid: str
    pod_namespace: str
    pod_name: str
    service_account: str
    role: str
    auth_mount: str
    audience: str
    endpoint: Endpoint
    flavour: str = "vault"
    # Computed once: a cold Mount looks its key up six times (token cache, lease keys).
    _hash: int = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        fields = (self.pod_uid, self.pod_namespace, self.pod_name, self.service_account, self.role)
        object.__setattr__(self, "_hash", hash((*fields, self.auth_mount, self.audience, self.endpoint, self.flavour)))

    def __hash__(self) -> int:
        return self._hash


class _Identity:
    """The pod's Vault token for one Mount: from the cache, refreshed at most once."""

    def __init__(self, mounter: Mounter, plan: MountPlan, deadline: float) -> None:
        self._mounter = mounter
        self.plan = plan
        self._config = plan.config
        self.endpoint = plan.endpoint
        self.key = plan.identity
        self._lease_keys = plan.lease_keys
        self._deadline = deadline
        self._lock = threading.Lock()
        self._grant: TokenGrant | None = None
        self._refreshed = False
        # Reads this Mount read ahead that Vault did not answer (or connect) before the
        # deadline (Mounter._prefetch): no time is left to ask again, their error is the Mount's.
        self.cut: dict[SecretRequest, VaultUnreachable] = {}

    def describe(self) -> str:
        return f"pod {self._config.pod.describe()} (role {quote(self._config.role_name)})"

    def lease_key(self, request: SecretRequest) -> LeaseKey | None:
        """The lease cache's key for this pod's request; None without a pod uid."""
        return self._lease_keys.get(request)

    def _fresh_login(self) -> Login:
        return self._mounter._login(self._config, self.endpoint, self._deadline)

    def _obtain(self) -> TokenGrant:
        if self.key is None:
            return TokenGrant(login=self._fresh_login(), cached=False, expires_at=float("inf"))
        return self._mounter._tokens.get(self.key, self._fresh_login)

    def token(self) -> str:
        with self._lock:
            if self._grant is None:
                self._grant = self._obtain()
                self._mounter._token_counts[self._grant.cached].inc()
            return self._grant.login.token

    def issuer(self) -> Issuer | None:
        """The login now in use: after a read, the one that issued its reply."""
        with self._lock:
            return Issuer(endpoint=self.endpoint, login=self._grant.login) if self._grant is not None else None

    @property
    def expires_at(self) -> float:
        with self._lock:
            return self._grant.expires_at if self._grant is not None else float("inf")

    def refresh(self, stale: str) -> str | None:
        """A new token after Vault refused `stale`; None when a retry is not allowed."""
        with self._lock:
            assert self._grant is not None
            if self._grant.login.token != stale:
                return self._grant.login.token
            if not self._grant.cached or self._refreshed or self.key is None:
                return None
            self._refreshed = True
            self._mounter._tokens.invalidate(self.key, stale)
            self._grant = self._obtain()
            return self._grant.login.token


__all__ = ["IdentityKey", "Issuer", "Lanes", "MountRequest", "MountResult", "MountedFile", "Mounter", "SecretRequest"]
