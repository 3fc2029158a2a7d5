"""Runs a Mount on the event loop's behalf: breaker, bulkhead, thread, deadline.

The gRPC server answers on an asyncio event loop that never blocks. For each Mount:

1. the endpoint's breaker: if Vault is known to be down, answer now, no thread taken;
2. admission: wait (on the loop, for free) for a thread the class and endpoint may use;
3. a warm Mount whose plan remembers its last one may be answered on the loop, its reads
   sent and read there without waiting for anything else (Mounter.mount_on_loop); what
   it could not answer goes on, with the replies it read;
4. the Mount itself (parse, login, reads) on that thread, bounded by the deadline;
5. a backstop: if the thread has not answered shortly after the deadline, the caller
   still gets a final answer in time; the thread finishes on its own and frees its slot.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from provider import replymemory
from provider.admission import Admission, Lane, ParseGate, Ticket
from provider.breaker import Breaker, Breakers, EndpointKey, Verdict
from provider.config import Route, VaultSettings, peek_route, template_weight
from provider.errors import MountRejected, VaultCircuitOpen, VaultUnreachable
from provider.lru import WeightedLRU
from provider.metrics import Metrics
from provider.mount import Mounter, MountPlan, MountRequest, MountResult, SecretRequest
from provider.replymemory import ReplyMemory
from provider.tenant import TENANT
from provider.threads import Closed
from provider.transport import Reply
from provider.vault import NameNotLookedUp, VaultClient

logger = logging.getLogger(__name__)

STOPPING = "the Vault provider on this node is restarting; the driver retries the Mount"
# The Mount's own deadline already leaves the caller a margin; the backstop answers
# this long after it, still before the caller gives up.
BACKSTOP_SECONDS = 0.25
# Parsed Mount requests kept (see ParsedMounts): at most this many, weighing at most this
# many bytes in all (a real one weighs 2 to 4 KiB), none weighing more than the last.
PARSED_ENTRIES = 512
PARSED_TOTAL_BYTES = 2 * 1024 * 1024
PARSED_MAX_BYTES = 32 * 1024
# What a kept plan holds per distinct request beside the parse (its read, the pod's lease
# key, their dict entries): about 380 bytes, measured; the read's escaped URL and the
# requests made around the token (vault.AroundToken) are weighed as they are.
PLAN_BYTES_PER_REQUEST = 400


@dataclass(frozen=True, kw_only=True)
class Dispatched:
    """What the log line says about a Mount, known before it is parsed; with `plan`, the
    parse of the very same request, kept from an earlier Mount, as Mounts use it."""

    route: Route
    endpoint: EndpointKey
    plan: MountPlan | None = None

    @functools.cached_property
    def lane(self) -> Lane:
        """What its Mounts count against (admission): made once per kept parse."""
        return Lane(tenant=self.route.tenant, endpoint=self.endpoint, namespace=self.route.tenant[0])


class ParsedMounts:
    """The parse of each recent Mount request, keyed by the request itself.

    Kubelet sends a pod's volume the very same request on every republish (about once a
    minute with rotation), so a warm Mount neither decodes nor validates its attributes
    again, and finds its requests and keys made (mount.MountPlan). The key is the whole
    request, the pod's uid and service-account token included: an entry serves only a
    byte-identical request, never another pod's. Only parses that succeeded are kept (an
    error is found again, and said again). An entry weighs its request's bytes, its
    plan's requests and its templates' trees (the objects cache's measure: a parse too
    heavy for that cache would otherwise be kept once per pod here); bounded by count,
    by each entry's weight and by their sum, least recently used dropped first.
    Thread-safe."""

    def __init__(
        self, *, entries: int = PARSED_ENTRIES, total_bytes: int = PARSED_TOTAL_BYTES, max_bytes: int = PARSED_MAX_BYTES
    ) -> None:
        self._kept: WeightedLRU[MountRequest, Dispatched] = WeightedLRU(
            entries=entries, total_weight=total_bytes, max_weight=max_bytes
        )
        self._max_bytes = max_bytes

    def get(self, request: MountRequest) -> Dispatched | None:
        return self._kept.get(request)

    def put(self, request: MountRequest, dispatched: Dispatched, plan: MountPlan) -> None:
        if len(request.attributes) > self._max_bytes:  # at least that many bytes: not even encoded
            return
        weight = weight_of(request, plan)
        # The decoded attributes were only the parse's input: not kept.
        self._kept.put(
            request, Dispatched(route=dispatched.route.undecoded(), endpoint=dispatched.endpoint, plan=plan), weight
        )

    def pods(self) -> set[tuple[str, str, str]]:
        """(uid, namespace, name) of each pod with a kept parse (the revocation sweep's)."""
        pods = (kept.plan.config.pod for kept in self._kept.values() if kept.plan is not None)
        return {(pod.uid, pod.namespace, pod.name) for pod in pods if pod.uid and pod.namespace and pod.name}

    def forget_pod(self, uid: str) -> int:
        """Drop the pod's kept parses, and with them its service-account token and the files
        its plans remember: the revocation sweep found it gone. How many were dropped."""
        return self._kept.drop_where(lambda kept: kept.plan is not None and kept.plan.config.pod.uid == uid)

    def __len__(self) -> int:
        return len(self._kept)


def weight_of(request: MountRequest, plan: MountPlan) -> int:
    """What a kept parse weighs (ParsedMounts): its request's bytes, its templates' trees,
    its plan's requests; an escaped URL (% is three bytes of it) and the requests made
    around the token are weighed as they are, whatever the class wrote."""
    return (
        len(request.attributes.encode("utf-8", "surrogatepass"))
        + template_weight(plan.config.objects)
        + len(plan.distinct) * PLAN_BYTES_PER_REQUEST
        + sum(len(read.url) for read in plan.reads.values())
        + (plan.around_token.size() if plan.around_token is not None else 0)
    )


class MountDispatcher:
    def __init__(
        self,
        *,
        mounter: Mounter,
        admission: Admission,
        breakers: Breakers,
        vault: VaultClient,
        metrics: Metrics,
        defaults: VaultSettings,
        parse_gate: ParseGate | None = None,
        reply_memory: ReplyMemory,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        """`reply_memory` is the node's, shared by its dispatchers."""
        self._parse_gate = parse_gate or ParseGate()
        self._reply_memory = reply_memory
        self.parsed = ParsedMounts()
        self._answers: set[asyncio.Future[Any]] = set()  # what stop_answering ends
        self._stopping = False
        self._mounter = mounter
        self._admission = admission
        self._breakers = breakers
        self._vault = vault
        self._metrics = metrics
        self._defaults = defaults
        self._clock = clock

    @property
    def mounter(self) -> Mounter:
        return self._mounter

    @property
    def flavour(self) -> str:
        """The contract of the socket this dispatcher answers for (a metrics label)."""
        return self._mounter.flavour.name

    def route(self, request: MountRequest) -> Dispatched:
        kept = self.parsed.get(request)
        if kept is not None:
            return kept
        route = peek_route(request.attributes, self._defaults, self._mounter.flavour)
        try:
            endpoint = EndpointKey.of(route.vault_address, route.vault_namespace)
        except ValueError:  # the parse will say what is wrong; meanwhile it counts as no endpoint
            endpoint = EndpointKey(address="(invalid)")
        return Dispatched(route=route, endpoint=endpoint)

    async def mount(self, request: MountRequest, dispatched: Dispatched, *, deadline: float) -> MountResult:
        if self._stopping:
            raise MountRejected(STOPPING)
        endpoint = dispatched.endpoint
        breaker = self._breakers.peek(endpoint, tenant=dispatched.route.tenant[0])  # none until it has failed
        try:
            verdict = breaker.check() if breaker is not None else Verdict.ALLOW
        except VaultCircuitOpen:
            self._count_refusal(endpoint)
            raise
        probe = verdict is Verdict.PROBE
        try:
            ticket = await self._admission.enter(
                dispatched.lane,
                deadline=deadline,
                refusal=(lambda: None) if probe else self._refusal(endpoint),
            )
        except (MountRejected, VaultCircuitOpen) as e:
            if isinstance(e, VaultCircuitOpen):
                self._count_refusal(endpoint)
            else:  # not by address: any class can make a bulkhead full, and labels must stay few
                self._metrics.mounts_refused.labels("", "busy").inc()
            raise
        read_ahead = None
        if dispatched.plan is not None and dispatched.plan.memory.last is not None and not probe:
            on_loop = await self._on_loop(dispatched.plan, deadline, ticket)
            if isinstance(on_loop, MountResult):
                return on_loop
            read_ahead = on_loop
        if self._stopping:  # stop_answering ran while this Mount was admitted or on the loop
            ticket.release()
            raise MountRejected(STOPPING)
        # The caller waits on a future of its own, answered by the thread when it is done
        # or by the backstop timer: the job goes on when the caller stops waiting
        # (deadline, shutdown) and frees its thread when its own deadline ends. One
        # future and one timer: each further hop between thread and loop costs CPU.
        loop = asyncio.get_running_loop()
        answer: asyncio.Future[MountResult] = loop.create_future()
        job = functools.partial(
            self._run, request, dispatched, deadline, ticket, breaker if probe else None, read_ahead
        )
        try:
            self._admission.threads.submit(functools.partial(_answering, loop, answer, job))
        except Closed:  # shutting down
            ticket.release()
            raise MountRejected(STOPPING) from None
        except Exception as e:  # the system refused a thread (memory, its thread limit)
            ticket.release()
            logger.error("could not start a thread for a Mount: %s", e)
            raise MountRejected(f"the Vault provider could not start a thread for the Mount ({e})") from None
        backstop = loop.call_at(
            loop.time() + max(deadline + BACKSTOP_SECONDS - self._clock(), 0), _too_late, answer, endpoint
        )
        self._answers.add(answer)
        try:
            return await answer
        finally:
            backstop.cancel()
            self._answers.discard(answer)

    async def _on_loop(
        self, plan: MountPlan, deadline: float, ticket: Ticket
    ) -> MountResult | Mapping[SecretRequest, Reply | None] | None:
        """The Mount answered on the loop if it can be (the ticket is then released), else
        the replies read there for the thread (None: none)."""
        done: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        self._answers.add(done)
        try:
            if self._stopping:  # stop_answering ran while this Mount was being admitted
                raise MountRejected(STOPPING)
            tenant = TENANT.set(plan.config.pod.namespace)  # this task's: whose share a new breaker takes
            try:
                on_loop = await self._mounter.mount_on_loop(plan, deadline=deadline, done=done)
            finally:
                TENANT.reset(tenant)
        except MountRejected:  # shutting down
            ticket.release()
            raise
        except Exception:  # a defect of ours: the thread does it the usual way
            logger.exception("answering a Mount on the event loop failed; it goes to a thread")
            return None
        except BaseException:  # the call was cancelled: nobody waits for it
            ticket.release()
            raise
        finally:
            self._answers.discard(done)
        if isinstance(on_loop, MountResult):
            ticket.release()
        return on_loop

    def stop_answering(self) -> None:
        """On the loop, shortly before the server's stop grace ends: answer every Mount still
        waiting with a final error now, rather than leave gRPC to cancel it (UNAVAILABLE)."""
        self._stopping = True
        stopping = MountRejected(STOPPING)
        self._admission.refuse_waiting(stopping)
        for answer in list(self._answers):
            if not answer.done():
                answer.set_exception(stopping)

    def _count_refusal(self, endpoint: EndpointKey) -> None:
        """A Mount refused by its endpoint's open breaker, in the metrics: by address, and
        only while a breaker for it is kept (one forgotten meanwhile took its series along,
        and a class chooses addresses without end)."""
        self._metrics.mounts_refused.labels(endpoint.address, "vault_unreachable").inc()
        if not self._breakers.has_address(endpoint.address):
            with contextlib.suppress(KeyError):
                self._metrics.mounts_refused.remove(endpoint.address, "vault_unreachable")

    def _refusal(self, endpoint: EndpointKey) -> Callable[[], VaultCircuitOpen | None]:
        """For a waiting Mount: the breaker's refusal, should its endpoint go down meanwhile."""

        def refusal() -> VaultCircuitOpen | None:
            breaker = self._breakers.peek(endpoint)
            return breaker.refusal() if breaker is not None else None

        return refusal

    def _run(
        self,
        request: MountRequest,
        dispatched: Dispatched,
        deadline: float,
        ticket: Ticket,
        probe: Breaker | None,
        read_ahead: Mapping[SecretRequest, Reply | None] | None,
    ) -> MountResult:
        memory = self._reply_memory.mount(dispatched.route.tenant[0])
        counting = replymemory.CURRENT.set(memory)
        tenant = TENANT.set(dispatched.route.tenant[0])  # whose share a new breaker takes
        try:
            plan = dispatched.plan
            if plan is None:
                route = dispatched.route
                config = self._mounter.parse(
                    request, gate=lambda: self._parse_gate.slot(route.tenant[0], deadline), decoded=route.decoded
                )
                plan = MountPlan.of(config)
                self.parsed.put(request, dispatched, plan)
            if probe is not None:
                self._probe(plan, probe, deadline)
            return self._mounter.mount_plan(plan, deadline=deadline, lanes=ticket, read_ahead=read_ahead)
        finally:
            TENANT.reset(tenant)
            replymemory.CURRENT.reset(counting)
            memory.close()
            ticket.release()

    def _probe(self, plan: MountPlan, breaker: Breaker, deadline: float) -> None:
        try:
            self._vault.probe(plan.endpoint, deadline=deadline)
        except VaultUnreachable as e:
            plan.memory.last = None  # the Mount fails: it forgets, as any failed Mount does
            if isinstance(e, NameNotLookedUp):  # its namespace's stalled lookups: say so, not the breaker's word
                raise
            raise breaker.refusal() or e from None


def _answering(
    loop: asyncio.AbstractEventLoop, answer: asyncio.Future[MountResult], job: Callable[[], MountResult]
) -> None:
    """On a Mount thread: run the job, then hand its outcome to the loop."""
    try:
        outcome: MountResult | BaseException = job()
    except BaseException as e:  # handed over, never lost: the caller's answer is this error
        outcome = e
    with contextlib.suppress(RuntimeError):  # the loop is closed: nobody waits any more
        loop.call_soon_threadsafe(_settle, answer, outcome)


def _settle(answer: asyncio.Future[MountResult], outcome: MountResult | BaseException) -> None:
    """Hand a job's outcome to its caller, if the caller still waits."""
    if answer.done():
        return
    if isinstance(outcome, StopIteration):  # a future refuses it: keep the caller answered
        outcome = RuntimeError(f"the Mount raised {outcome!r}")
    if isinstance(outcome, BaseException):
        answer.set_exception(outcome)
    else:
        answer.set_result(outcome)


def _too_late(answer: asyncio.Future[MountResult], endpoint: EndpointKey) -> None:
    """The backstop: a Mount's requests are cut at its deadline, so a Mount still running
    past it is held by something else (a starved node, a defect). Said so, not blamed on
    Vault, and logged for the operator."""
    if not answer.done():
        logger.warning(
            "a Mount for Vault at %s was still running %.2fs past its deadline; answered it with an error",
            endpoint.describe(),
            BACKSTOP_SECONDS,
        )
        answer.set_exception(
            VaultUnreachable(
                f"the Mount did not finish before its deadline (its requests to Vault at {endpoint.describe()} are "
                "cut at the deadline; something else held it, such as an overloaded node)"
            )
        )
