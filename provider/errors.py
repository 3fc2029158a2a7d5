"""The provider's one exception tree.

Every failure a Mount can meet is one of these; server.py maps each class to a gRPC
status code in a single table, and the message is what the pod's events show, so it
leads with what to fix::

    ProviderError
    ├── ConfigError            the SecretProviderClass or the Mount request is invalid
    ├── VaultError             Vault answered, or could not be reached
    │   ├── VaultUnreachable       connection refused, TLS failure, timeout
    │   │   └── VaultCircuitOpen       refused without a try: Vault is known to be down
    │   ├── VaultLoginDenied       the login was refused (400/401/403 on auth/*/login)
    │   ├── VaultPermissionDenied  a read was refused (403) even after a fresh login
    │   ├── VaultNotFound          the path or the key does not exist
    │   └── VaultBadResponse       a reply we cannot use (no auth block, bad JSON, 5xx)
    ├── KubernetesError        the Kubernetes API refused or could not be reached
    ├── MountRejected          not admitted: this class's or endpoint's Mounts are all busy
    ├── ObjectError            one or more objects of a Mount failed (holds each cause)
    └── ResponseTooLarge       the files would not fit in the gRPC message limit
"""

from __future__ import annotations

import json
import re

# Upstream bodies are truncated to this many characters in messages: enough for Vault's
# error text, short enough to keep a pod event readable (kubelet trims events at 1 KiB).
UPSTREAM_TEXT_MAX = 300


def quote(text: str) -> str:
    """A name in a message, double-quoted as Go's %q would write it."""
    return json.dumps(text, ensure_ascii=False)


# What upstream text may echo of a request and must not carry into a pod's events or the
# log (a gateway answering 502 "upstream rejected token=s.…", or a login's body with its
# JWT): a Vault or OpenBao token (hvs., hvb., hvr., s., b., r. and 20 or more token
# characters) or a JWT (its base64url header starts with eyJ).
_CREDENTIALS = re.compile(r"\b(?:hv[sbr]|[sbr])\.[A-Za-z0-9_-]{20,}|\beyJ[A-Za-z0-9_-]*(?:\.[A-Za-z0-9_-]*){0,2}")
REDACTED = "(redacted)"


def truncate(text: str, limit: int = UPSTREAM_TEXT_MAX) -> str:
    """Shorten upstream text for a message, saying that it was cut, with any token or JWT
    it holds redacted (before it is cut: a cut one would leave its start)."""
    cut = len(text) > 4 * limit  # looked at no further: the text may be megabytes
    text = _CREDENTIALS.sub(REDACTED, " ".join(text[: 4 * limit].split()))
    return text if len(text) <= limit and not cut else text[:limit] + "…(truncated)"


class ProviderError(Exception):
    """Base of every error the provider reports to the driver."""


class ConfigError(ProviderError):
    """The SecretProviderClass parameters or the Mount request are invalid."""


class VaultError(ProviderError):
    """Vault refused a request, answered something unusable, or could not be reached."""

    def __init__(self, message: str, *, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


class VaultUnreachable(VaultError):
    """No answer from Vault: connection refused or reset, TLS failure, timeout."""


class VaultCircuitOpen(VaultUnreachable):
    """Vault at this address failed to connect again and again: the Mount is answered at
    once, without a Vault call, until a probe reaches it."""


class VaultLoginDenied(VaultError):
    """Vault refused the login for this role and service account."""


class VaultPermissionDenied(VaultError):
    """Vault refused to read a path with a freshly obtained token."""


class VaultNotFound(VaultError):
    """The secret path, or the key inside it, does not exist."""


class VaultBadResponse(VaultError):
    """Vault answered with something the provider cannot use."""


class KubernetesError(ProviderError):
    """The Kubernetes API refused a request or could not be reached."""


class MountRejected(ProviderError):
    """The Mount could not start before its deadline: the Mounts of its class or of its
    Vault endpoint already hold every slot they may have (a bulkhead)."""


class ResponseTooLarge(ProviderError):
    """The files of a Mount exceed the gRPC message size limit."""


class ObjectError(ProviderError):
    """One or more objects of a Mount failed; each failure is kept with its object."""

    def __init__(self, failures: list[tuple[str, ProviderError]]) -> None:
        self.failures = failures
        if len(failures) == 1:
            message = f"object {quote(failures[0][0])}: {failures[0][1]}"
        else:
            message = f"{len(failures)} objects failed: " + "; ".join(
                f"object {quote(name)}: {error}" for name, error in failures
            )
        super().__init__(message)

    @property
    def primary(self) -> ProviderError:
        """The failure that decides the status code: the first one."""
        return self.failures[0][1]
