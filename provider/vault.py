"""Vault over HTTP: the only module that imports hvac or requests.

One connection pool per Vault address and TLS configuration is shared by all Mounts;
the token and namespace travel as headers on each request, never as pool state, so a
token cannot leak from one pod's request into another's. Every failure leaves this
module as one of provider.errors' Vault errors.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote

import hvac.adapters
import requests
import requests.adapters
import requests_unixsocket
import urllib3

from provider import gojson
from provider.config import TLSConfig
from provider.errors import (
    VaultBadResponse,
    VaultError,
    VaultLoginDenied,
    VaultNotFound,
    VaultPermissionDenied,
    VaultUnreachable,
    truncate,
)
from provider.metrics import Metrics

logger = logging.getLogger(__name__)

# A request is given at most this long when the caller set no tighter deadline: the
# reference provider's Vault client default.
DEFAULT_TIMEOUT = 30.0
# Connections kept per Vault address: one per concurrent request we allow to it.
POOL_SIZE = 32
# Largest Vault reply we read: a file cannot exceed the gRPC message limit anyway.
MAX_BODY_BYTES = 8 * 1024 * 1024


@dataclass(frozen=True, kw_only=True)
class Endpoint:
    """Where a request goes: the Vault address, its TLS settings and the namespace."""

    address: str
    tls: TLSConfig
    namespace: str = ""


@dataclass(frozen=True, kw_only=True)
class Login:
    """A Vault token from a login, with the lifetime Vault gave it."""

    token: str = field(repr=False)
    accessor: str = field(repr=False)
    lease_duration: int
    renewable: bool


@dataclass(frozen=True, kw_only=True)
class Secret:
    """A Vault reply to a read, its numbers kept exactly as sent (gojson.Number)."""

    body: Mapping[str, Any] = field(repr=False)

    @property
    def data(self) -> Any:
        return self.body.get("data")

    @property
    def lease_id(self) -> str:
        value = self.body.get("lease_id")
        return value if isinstance(value, str) else ""

    @property
    def lease_duration(self) -> int:
        value = self.body.get("lease_duration")
        return value.as_int() if isinstance(value, gojson.Number) else 0

    @property
    def renewable(self) -> bool:
        return self.body.get("renewable") is True


class _ServerNameAdapter(requests.adapters.HTTPAdapter):
    """Verifies the server certificate against a name other than the URL's host."""

    def __init__(self, server_name: str, **kwargs: Any) -> None:
        self._server_name = server_name
        super().__init__(**kwargs)

    def init_poolmanager(self, *args: Any, **kwargs: Any) -> None:
        if self._server_name:
            kwargs["server_hostname"] = self._server_name
            kwargs["assert_hostname"] = self._server_name
        super().init_poolmanager(*args, **kwargs)


class VaultClient:
    """Sends Vault requests for many pods; thread-safe."""

    def __init__(self, *, timeout: float = DEFAULT_TIMEOUT, metrics: Metrics | None = None) -> None:
        self._timeout = timeout
        self._metrics = metrics
        self._adapters: dict[tuple[str, TLSConfig], hvac.adapters.RawAdapter] = {}
        self._lock = threading.Lock()

    def close(self) -> None:
        with self._lock:
            for adapter in self._adapters.values():
                adapter.close()
            self._adapters.clear()

    def login(self, endpoint: Endpoint, *, mount: str, role: str, jwt: str, deadline: float | None = None) -> Login:
        """Log in with a service-account JWT (kubernetes or jwt auth)."""
        path = f"auth/{mount}/login"
        status, body = self._send(
            endpoint,
            "POST",
            path,
            token="",
            json_body={"role": role, "jwt": jwt},
            deadline=deadline,
            operation="login",
        )
        if status in (400, 401, 403):
            raise VaultLoginDenied(_vault_says(status, body), status=status)
        _raise_for_status("POST", path, status, body)
        auth = body.get("auth") if isinstance(body, dict) else None
        token = auth.get("client_token") if isinstance(auth, dict) else None
        if not isinstance(token, str) or not token:
            raise VaultBadResponse(f"login at {path} returned no auth block (HTTP {status})", status=status)
        assert isinstance(auth, dict)
        duration = auth.get("lease_duration")
        accessor = auth.get("accessor")
        return Login(
            token=token,
            accessor=accessor if isinstance(accessor, str) else "",
            lease_duration=duration.as_int() if isinstance(duration, gojson.Number) else 0,
            renewable=auth.get("renewable") is True,
        )

    def read(
        self,
        endpoint: Endpoint,
        *,
        token: str,
        method: str,
        path: str,
        params: Mapping[str, list[str]] | None = None,
        json_body: Mapping[str, Any] | bytes | None = None,
        deadline: float | None = None,
        operation: str = "read",
    ) -> Secret:
        """Send one secret request (`path` without /v1/) and return the reply."""
        status, body = self._send(
            endpoint,
            method,
            path,
            token=token,
            params=params,
            json_body=json_body,
            deadline=deadline,
            operation=operation,
        )
        _raise_for_status(method, path, status, body)
        if not isinstance(body, dict):
            raise VaultBadResponse(f"{method} {path}: Vault returned an empty response (HTTP {status})", status=status)
        return Secret(body=body)

    def renew_lease(
        self, endpoint: Endpoint, *, token: str, lease_id: str, increment: int, deadline: float | None = None
    ) -> Secret:
        """Renew a lease; the reply carries the new lease_duration."""
        return self.read(
            endpoint,
            token=token,
            method="PUT",
            path="sys/leases/renew",
            json_body={"lease_id": lease_id, "increment": increment},
            deadline=deadline,
            operation="renew",
        )

    def revoke_lease(self, endpoint: Endpoint, *, token: str, lease_id: str, deadline: float | None = None) -> None:
        status, body = self._send(
            endpoint,
            "PUT",
            "sys/leases/revoke",
            token=token,
            json_body={"lease_id": lease_id},
            deadline=deadline,
            operation="revoke",
        )
        _raise_for_status("PUT", "sys/leases/revoke", status, body)

    def revoke_self(self, endpoint: Endpoint, *, token: str, deadline: float | None = None) -> None:
        status, body = self._send(
            endpoint, "POST", "auth/token/revoke-self", token=token, deadline=deadline, operation="revoke"
        )
        _raise_for_status("POST", "auth/token/revoke-self", status, body)

    def _send(
        self,
        endpoint: Endpoint,
        method: str,
        path: str,
        *,
        token: str,
        params: Mapping[str, list[str]] | None = None,
        json_body: Mapping[str, Any] | bytes | None = None,
        deadline: float | None = None,
        operation: str,
    ) -> tuple[int, Any]:
        started = time.monotonic()
        status = "error"
        try:
            status, body = self._exchange(
                endpoint, method, path, token=token, params=params, json_body=json_body, deadline=deadline
            )
            return status, body
        finally:
            if self._metrics is not None:
                self._metrics.vault_requests.labels(operation, str(status)).inc()
                self._metrics.vault_duration.labels(operation).observe(time.monotonic() - started)

    def _exchange(
        self,
        endpoint: Endpoint,
        method: str,
        path: str,
        *,
        token: str,
        params: Mapping[str, list[str]] | None,
        json_body: Mapping[str, Any] | bytes | None,
        deadline: float | None,
    ) -> tuple[Any, Any]:
        adapter = self._adapter(endpoint)
        timeout = self._timeout
        if deadline is not None:
            timeout = min(timeout, deadline - time.monotonic())
            if timeout <= 0:
                raise VaultUnreachable(f"{method} {path}: no time left before the Mount deadline")
        headers = {}
        if token:
            headers["X-Vault-Token"] = token
        if endpoint.namespace:
            headers["X-Vault-Namespace"] = endpoint.namespace
        data = json_body if isinstance(json_body, bytes) or json_body is None else gojson.dumps(json_body)
        if data is not None:
            headers["Content-Type"] = "application/json"
        try:
            response = adapter.request(
                method,
                "/v1/" + path,
                headers=headers,
                raise_exception=False,
                params=params,
                data=data,
                timeout=timeout,
                stream=True,
            )
            raw = response.raw.read(MAX_BODY_BYTES + 1, decode_content=True)
            if len(raw) > MAX_BODY_BYTES:
                response.close()
            else:
                response.raw.release_conn()  # keep the connection alive for the next request
        except requests.exceptions.SSLError as e:
            raise VaultUnreachable(f"TLS to Vault at {endpoint.address} failed: {truncate(str(e))}") from None
        except requests.exceptions.Timeout:
            raise VaultUnreachable(
                f"{method} {path}: Vault at {endpoint.address} did not answer within {timeout:.1f}s"
            ) from None
        except (requests.exceptions.RequestException, OSError) as e:
            raise VaultUnreachable(f"cannot reach Vault at {endpoint.address}: {truncate(str(e))}") from None
        if len(raw) > MAX_BODY_BYTES:
            raise VaultBadResponse(f"{method} {path}: Vault's reply is larger than {MAX_BODY_BYTES} bytes")
        logger.debug("vault %s %s -> %d (%d bytes)", method, path, response.status_code, len(raw))
        if not raw.strip():
            return response.status_code, None
        try:
            return response.status_code, gojson.loads(raw)
        except (ValueError, RecursionError):
            if response.ok:
                raise VaultBadResponse(
                    f"{method} {path}: Vault's reply is not JSON (HTTP {response.status_code})",
                    status=response.status_code,
                ) from None
            return response.status_code, raw.decode("utf-8", "replace")

    def _adapter(self, endpoint: Endpoint) -> hvac.adapters.RawAdapter:
        key = (endpoint.address, endpoint.tls)
        with self._lock:
            adapter = self._adapters.get(key)
            if adapter is None:
                adapter = self._adapters[key] = _build_adapter(endpoint.address, endpoint.tls)
            return adapter


def _build_adapter(address: str, tls: TLSConfig) -> hvac.adapters.RawAdapter:
    if address.startswith("unix://"):
        session: requests.Session = requests_unixsocket.Session()  # type: ignore[no-untyped-call]
        base_uri = "http+unix://" + quote(address[len("unix://") :], safe="")
    else:
        session = requests.Session()
        base_uri = address.rstrip("/")
        http = _ServerNameAdapter(tls.server_name, pool_connections=4, pool_maxsize=POOL_SIZE)
        session.mount("https://", http)
        session.mount("http://", requests.adapters.HTTPAdapter(pool_connections=4, pool_maxsize=POOL_SIZE))
    session.trust_env = False
    verify: bool | str = True
    if tls.skip_verify:
        verify = False
        # Said once here, by us, rather than by urllib3 on every request.
        urllib3.disable_warnings(urllib3.exceptions.InsecureRequestWarning)
        logger.warning("TLS verification of Vault at %s is disabled (vaultSkipTLSVerify)", address)
    elif tls.ca_cert or tls.ca_directory:
        verify = tls.ca_cert or tls.ca_directory
    cert = (tls.client_cert, tls.client_key) if tls.client_cert and tls.client_key else None
    session.verify = verify
    session.cert = cert
    return hvac.adapters.RawAdapter(
        base_uri=base_uri, session=session, verify=verify, cert=cert, allow_redirects=False, request_header=True
    )


def _vault_says(status: int, body: Any) -> str:
    """Vault's own error text, truncated, for a message."""
    errors = body.get("errors") if isinstance(body, dict) else None
    if isinstance(errors, list) and errors:
        text = "; ".join(str(e) for e in errors)
    elif isinstance(body, str):
        text = body
    else:
        text = "no error text"
    return f"Vault answered {status}: {truncate(text)}"


def _raise_for_status(method: str, path: str, status: int, body: Any) -> None:
    if 200 <= status < 300:
        return
    message = f"{method} {path}: {_vault_says(status, body)}"
    error_class: type[VaultError] = VaultBadResponse
    if status == 403:
        error_class = VaultPermissionDenied
    elif status == 404:
        error_class = VaultNotFound
    elif status in (429, 502, 503, 504):
        error_class = VaultUnreachable
    raise error_class(message, status=status)
