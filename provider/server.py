"""The gRPC servicer: proto in, one call into the domain, proto out (encoded once per result).

It also holds the one table from the provider's errors to gRPC status codes. The status
message is shown verbatim in the pod's FailedMount event, so it is the error's own
text; an unexpected exception is logged with its traceback and answered as INTERNAL
with a generic message (grpcio would otherwise put str(exc) on the wire).

Every code here is final for kubelet: CANCELLED, DEADLINE_EXCEEDED, UNAVAILABLE,
RESOURCE_EXHAUSTED and ABORTED would mark the mount uncertain, and with rotation on a
retry could then skip the provider and leave the pod an empty directory.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import grpc
import grpc.aio
from google.protobuf.message import DecodeError

from provider import __version__
from provider._proto import service_pb2, service_pb2_grpc
from provider.dispatch import MountDispatcher
from provider.errors import (
    ConfigError,
    KubernetesError,
    MountRejected,
    ObjectError,
    ProviderError,
    ResponseTooLarge,
    VaultBadResponse,
    VaultLoginDenied,
    VaultNotFound,
    VaultPermissionDenied,
    VaultUnreachable,
)
from provider.metrics import Metrics
from provider.mount import MountRequest, MountResult

logger = logging.getLogger(__name__)

SERVICE_NAME = "v1alpha1.CSIDriverProvider"
RUNTIME_NAME = "vault-csi-provider"
API_VERSION = "v1alpha1"
# Answer this long before the caller's deadline, so the reply (a final code) arrives.
DEADLINE_MARGIN_SECONDS = 0.5
# Largest request accepted: far above any real class (etcd caps objects near 1.5 MiB), low
# enough that 16 workers holding one each stay within the memory budget.
MAX_REQUEST_BYTES = 8 * 1024 * 1024
# A Mount with no caller deadline still ends: the driver's own default is about 2 min.
MAX_MOUNT_SECONDS = 60.0

STATUS_CODES: tuple[tuple[type[ProviderError], grpc.StatusCode], ...] = (
    (ConfigError, grpc.StatusCode.INVALID_ARGUMENT),
    (VaultLoginDenied, grpc.StatusCode.UNAUTHENTICATED),
    (VaultPermissionDenied, grpc.StatusCode.PERMISSION_DENIED),
    (VaultNotFound, grpc.StatusCode.NOT_FOUND),
    (ResponseTooLarge, grpc.StatusCode.FAILED_PRECONDITION),
    (KubernetesError, grpc.StatusCode.FAILED_PRECONDITION),
    (VaultUnreachable, grpc.StatusCode.UNKNOWN),  # also VaultCircuitOpen: Vault known down
    (MountRejected, grpc.StatusCode.UNKNOWN),  # a bulkhead was full until the deadline
    (VaultBadResponse, grpc.StatusCode.UNKNOWN),
    (ProviderError, grpc.StatusCode.UNKNOWN),
)


def status_code(error: ProviderError) -> grpc.StatusCode:
    """The gRPC code for an error (the first failing object's, for an ObjectError)."""
    if isinstance(error, ObjectError):
        error = error.primary
    for error_class, code in STATUS_CODES:
        if isinstance(error, error_class):
            return code
    return grpc.StatusCode.UNKNOWN


class ProviderServicer(service_pb2_grpc.CSIDriverProviderServicer):
    """Answers on the event loop; the Mount's work runs on a thread the dispatcher admits."""

    def __init__(self, dispatcher: MountDispatcher, metrics: Metrics) -> None:
        self._dispatcher = dispatcher
        self._metrics = metrics
        # Labelled children looked up once (a lookup costs more than the count itself).
        self._duration = metrics.mount_duration.labels(dispatcher.flavour)
        self._outcomes: dict[tuple[str, grpc.StatusCode], Any] = {}

    async def Version(
        self, request: service_pb2.VersionRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> service_pb2.VersionResponse:
        return service_pb2.VersionResponse(version=API_VERSION, runtime_name=RUNTIME_NAME, runtime_version=__version__)

    async def Mount(
        self, request: service_pb2.MountRequest | Undecodable, context: grpc.aio.ServicerContext[Any, Any]
    ) -> bytes:
        """The MountResponse, encoded (the handler's serializer passes bytes on as they are)."""
        started = time.monotonic()
        if isinstance(request, Undecodable):
            self._finish(started, "error", grpc.StatusCode.INVALID_ARGUMENT, "-", None, "undecodable request")
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT,
                "the MountRequest could not be decoded (its string fields must be valid UTF-8)",
            )
        remaining = context.time_remaining()
        budget = MAX_MOUNT_SECONDS if remaining is None else min(MAX_MOUNT_SECONDS, remaining)
        deadline = started + max(budget - DEADLINE_MARGIN_SECONDS, 0.05)
        mount_request = MountRequest(
            attributes=request.attributes, target_path=request.target_path, permission=request.permission
        )
        who = "-"
        failure: tuple[grpc.StatusCode, str] | None = None
        self._metrics.in_flight += 1
        try:
            dispatched = self._dispatcher.route(mount_request)
            who = f"{dispatched.route.pod} role={dispatched.route.role} vault={dispatched.endpoint.address}"
            result = await self._dispatcher.mount(mount_request, dispatched, deadline=deadline)
        except ProviderError as e:
            failure = status_code(e), _wire_text(str(e))
            self._finish(started, "error", failure[0], who, None, failure[1])
        except Exception:
            logger.exception("Mount failed with an unexpected error")
            failure = grpc.StatusCode.INTERNAL, "internal error in the Vault provider; see its logs"
            self._finish(started, "error", failure[0], who, None, "internal error")
        finally:
            self._metrics.in_flight -= 1  # before the answer leaves: metrics agree with it
        if failure is not None:
            await context.abort(*failure)
        self._finish(
            started, "ok", grpc.StatusCode.OK, f"{who} objects={len(result.config.objects)}", len(result.files), ""
        )
        return encoded(result)

    def _finish(
        self, started: float, outcome: str, code: grpc.StatusCode, pod: str, files: int | None, error: str
    ) -> None:
        elapsed = time.monotonic() - started
        counter = self._outcomes.get((outcome, code))
        if counter is None:
            counter = self._outcomes[(outcome, code)] = self._metrics.mounts.labels(
                outcome, code.name, self._dispatcher.flavour
            )
        counter.inc()
        self._duration.observe(elapsed)
        if outcome == "ok":
            logger.info("mount pod=%s files=%d outcome=ok duration_ms=%.1f", pod, files, elapsed * 1000)
        else:
            logger.info(
                "mount pod=%s outcome=%s code=%s duration_ms=%.1f error=%s",
                pod,
                outcome,
                code.name,
                elapsed * 1000,
                error,
            )


def encoded(result: MountResult) -> bytes:
    """The result's MountResponse, encoded once per result: a plan's remembered result is
    answered again and again (mount._LastMount, which counts these bytes in its size)."""
    if result.encoded:
        return result.encoded[0]
    response = service_pb2.MountResponse(
        files=[service_pb2.File(path=f.path, mode=f.mode, contents=f.contents) for f in result.files],
        object_version=[service_pb2.ObjectVersion(id=f.path, version=f.version) for f in result.files],
    )
    data = response.SerializeToString()
    result.encoded.append(data)  # on the event loop only: no other Mount encodes it meanwhile
    return data


def _wire_text(text: str) -> str:
    """A status message gRPC can send: lone surrogates (from escapes in the request's
    JSON, echoed in the error) are written as escapes rather than failing the reply."""
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


class Undecodable:
    """Stands for bytes that are not a MountRequest (e.g. invalid UTF-8 in a string field).

    grpcio answers INTERNAL when a deserializer fails (or returns None); handing the
    servicer this instead lets it answer INVALID_ARGUMENT, which is what it is."""


UNDECODABLE = Undecodable()


def _decode_mount_request(data: bytes) -> service_pb2.MountRequest | Undecodable:
    try:
        return service_pb2.MountRequest.FromString(data)
    except DecodeError:
        return UNDECODABLE


def create_server(
    servicer: ProviderServicer, *, endpoint: str, max_message_bytes: int = 4 * 1024 * 1024
) -> grpc.aio.Server:
    """Build (not start) an asyncio gRPC server bound to the unix socket `endpoint`; call
    it on the event loop that will serve.

    `max_message_bytes` bounds replies; requests may be up to MAX_REQUEST_BYTES so that an
    oversized class is refused by our validation (INVALID_ARGUMENT, naming the limit) rather
    than by grpcio (RESOURCE_EXHAUSTED, which kubelet treats as not final). No limit is
    set on concurrent RPCs: waiting Mounts cost nothing on the loop, and grpcio would
    answer the excess RESOURCE_EXHAUSTED; admission.py bounds the work instead."""
    server = grpc.aio.server(
        options=[
            ("grpc.max_send_message_length", max_message_bytes),
            ("grpc.max_receive_message_length", MAX_REQUEST_BYTES),
            ("grpc.so_reuseport", 0),
        ],
    )
    handlers = {
        "Version": grpc.unary_unary_rpc_method_handler(
            servicer.Version,
            request_deserializer=service_pb2.VersionRequest.FromString,
            response_serializer=service_pb2.VersionResponse.SerializeToString,
        ),
        "Mount": grpc.unary_unary_rpc_method_handler(
            servicer.Mount,
            request_deserializer=_decode_mount_request,
            response_serializer=None,  # Mount answers bytes, encoded once per result (encoded())
        ),
    }
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE_NAME, handlers),))
    server.add_insecure_port(f"unix:{endpoint}")
    return server
