"""Vault addresses: parsed once, in one way, for every use.

A class's ``vaultAddress`` decides where the pod's token is sent, which connection pool,
breaker and bulkhead a Mount counts against, and what messages and metric labels say.
If those were derived from the text in different ways, a crafted address could be
counted under one Vault and connect to another (``http://dead:1?@vault:8200``). So
everything comes from one Target, parsed strictly here:

- ``https://``, ``http://`` or ``unix://``; a host; an optional port;
- an optional path prefix (``https://gw.example.com/vault`` sends to ``/vault/v1/...``,
  as the reference does), user info (sent as basic auth, as Go's net/http does);
- no query, no fragment, no spaces or control characters, at most MAX_ADDRESS_LENGTH.

``describe()`` never shows credentials; ``key()`` is the canonical form (lower-case
host, explicit port, no credentials) that pools, breakers and bulkheads share.
"""

from __future__ import annotations

import base64
import functools
from dataclasses import dataclass, field
from urllib.parse import unquote, urlsplit

# Far longer than any real address; bounds what an address can make the provider keep
# (breakers, metric labels) and print.
MAX_ADDRESS_LENGTH = 512
_DEFAULT_PORTS = {"https": 443, "http": 80}
# Parsed addresses kept (each a few hundred bytes): more than a node's Vaults and gateways.
PARSED_ADDRESSES = 256


@dataclass(frozen=True, kw_only=True)
class Target:
    """Where an address points, split into what makes a connection and what rides on requests."""

    scheme: str  # http, https or unix
    host: str  # lower-case; "localhost" for unix
    port: int  # 0 for unix
    socket_path: str = ""
    prefix: str = ""  # path before /v1, without a trailing slash
    authorization: str = field(default="", repr=False)  # "Basic …" from user info, or empty

    @classmethod
    def parse(cls, address: str) -> Target:
        """Raise ValueError saying what is wrong with an address (never echoing it). A
        node's few addresses are parsed once each, not at every use of every Mount."""
        return _parse(address)

    @classmethod
    def _parse(cls, address: str) -> Target:
        if len(address) > MAX_ADDRESS_LENGTH:
            raise ValueError(f"it is longer than {MAX_ADDRESS_LENGTH} characters")
        if any(ch.isspace() or ord(ch) < 32 or ord(ch) == 127 for ch in address):
            raise ValueError("it contains spaces or control characters")
        if address.startswith("unix://"):
            path = address[len("unix://") :]
            if not path.startswith("/"):
                raise ValueError("a unix:// address needs an absolute socket path (unix:///run/vault.sock)")
            return cls(scheme="unix", host="localhost", port=0, socket_path=path)
        if "?" in address or "#" in address:
            raise ValueError("a Vault address has no query (?) or fragment (#)")
        parts = urlsplit(address)
        if parts.scheme not in _DEFAULT_PORTS:
            raise ValueError("it must start with https://, http:// or unix://")
        if not parts.hostname:
            raise ValueError("it has no host")
        port = parts.port or _DEFAULT_PORTS[parts.scheme]  # .port raises ValueError when invalid
        authorization = ""
        if parts.username is not None:
            credentials = f"{unquote(parts.username)}:{unquote(parts.password or '')}"
            authorization = "Basic " + base64.b64encode(credentials.encode()).decode()
        return cls(
            scheme=parts.scheme,
            host=parts.hostname.lower(),
            port=port,
            prefix=parts.path.rstrip("/"),
            authorization=authorization,
        )

    def key(self) -> str:
        """The canonical address: explicit port, no credentials."""
        if self.scheme == "unix":
            return f"unix://{self.socket_path}"
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{self.scheme}://{host}:{self.port}{self.prefix}"

    def describe(self) -> str:
        """The address for messages: no credentials, the default port left out."""
        if self.scheme == "unix":
            return self.key()
        host = f"[{self.host}]" if ":" in self.host else self.host
        port = "" if self.port == _DEFAULT_PORTS[self.scheme] else f":{self.port}"
        return f"{self.scheme}://{host}{port}{self.prefix}"


@functools.lru_cache(maxsize=PARSED_ADDRESSES)
def _parse(address: str) -> Target:
    return Target._parse(address)  # a failure raises and is not cached


def safe_describe(address: str) -> str:
    """An address as written by a class, fit for a message: credentials removed, or the
    whole thing withheld when it does not parse."""
    try:
        return Target.parse(address).describe()
    except ValueError:
        return "(an invalid address)"
