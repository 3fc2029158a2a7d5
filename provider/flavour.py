"""Which provider contract a socket speaks: the HashiCorp Vault reference's or OpenBao's.

The CSI driver picks a provider by socket name (`spec.provider: openbao` dials
openbao.sock), so one process can serve both. They differ only in how a class names its
parameters, the default token audience and the HMAC key Secret; everything after the
parameters are read (logins, leases, templates, metrics) is the same code.

The OpenBao contract (openbao-csi-provider 2.0) looks each connection parameter up with
the prefixes ``bao``, then ``openbao``, then ``vault``: the first one written (not empty)
wins (``baoAddress`` over ``openbaoAddress`` over ``vaultAddress``); the role is a prefixed
``baoRoleName``/``openbaoRoleName``/``vaultRoleName``, then ``roleName``. The Vault
contract reads the reference's names only, exactly as before.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Mapping
from dataclasses import dataclass

# What follows the prefix in each connection parameter (vaultAddress, baoAddress, ...).
PREFIXED = (
    "Address",
    "Namespace",
    "KubernetesMountPath",
    "AuthMountPath",
    "SkipTLSVerify",
    "CACertPath",
    "CADirectory",
    "TLSServerName",
    "TLSClientCertPath",
    "TLSClientKeyPath",
)
ROLE = "roleName"
OPENBAO_SOCKET = "openbao.sock"


@dataclass(frozen=True, kw_only=True)
class Flavour:
    name: str  # the metrics label, and what `spec.provider` says
    product: str  # for messages
    prefixes: tuple[str, ...]
    default_audience: str
    default_hmac_secret: str

    @functools.cached_property
    def aliases(self) -> frozenset[str]:
        """Every connection and role parameter name of this contract (built once)."""
        names = {f"{prefix}{suffix}" for prefix in self.prefixes for suffix in PREFIXED}
        return frozenset(names | {f"{prefix}RoleName" for prefix in self.prefixes} | {ROLE})

    def canonical(self, params: Mapping[str, str]) -> tuple[Mapping[str, str], Mapping[str, str]]:
        """The parameters under the reference's names (vaultAddress, roleName, ...), and
        for each renamed one the name the class wrote, for messages."""
        if self.prefixes == ("vault",):
            return params, {}
        canonical = {key: value for key, value in params.items() if key not in self.aliases}
        written: dict[str, str] = {}
        for suffix in PREFIXED:
            for prefix in self.prefixes:
                if params.get(f"{prefix}{suffix}"):  # an empty value is unset, as in the reference
                    canonical[f"vault{suffix}"] = params[f"{prefix}{suffix}"]
                    written[f"vault{suffix}"] = f"{prefix}{suffix}"
                    break
        for key in (*(f"{prefix}RoleName" for prefix in self.prefixes), ROLE):
            if params.get(key):
                canonical[ROLE] = params[key]
                written[ROLE] = key
                break
        return canonical, written


VAULT = Flavour(
    name="vault",
    product="Vault",
    prefixes=("vault",),
    default_audience="vault",
    default_hmac_secret="vault-csi-provider-hmac-key",
)
OPENBAO = Flavour(
    name="openbao",
    product="OpenBao",
    prefixes=("bao", "openbao", "vault"),
    default_audience="openbao",
    default_hmac_secret="openbao-csi-provider-hmac-key",
)
FLAVOURS = {flavour.name: flavour for flavour in (VAULT, OPENBAO)}


def of_endpoint(path: str) -> Flavour:
    """The contract a socket speaks, by its file name: openbao.sock is OpenBao's."""
    return OPENBAO if os.path.basename(path) == OPENBAO_SOCKET else VAULT


__all__ = ["FLAVOURS", "OPENBAO", "VAULT", "Flavour", "of_endpoint"]
