"""Command line: flags and environment -> Settings; logging set up once; exit code.

Flags follow Go's flag package, as the reference provider's do: ``-flag=value``,
``-flag value``, ``--flag=value``, and booleans alone (``-debug``). Precedence:
environment < flags < SecretProviderClass parameters (the last applied per Mount).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import re
import sys
from collections.abc import Mapping, Sequence

from provider import __version__
from provider.config import Settings, TLSConfig, VaultSettings, parse_bool
from provider.errors import ConfigError
from provider.flavour import OPENBAO, of_endpoint

TRACE = 5
# The oldest Secrets Store CSI driver the provider works with, as the reference states it.
MIN_DRIVER_VERSION = "v0.0.21"
LOG_LEVELS = {
    "trace": TRACE,
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warn": logging.WARNING,
    "warning": logging.WARNING,
    "error": logging.ERROR,
    "off": logging.CRITICAL + 10,
}
_DURATION = re.compile(r"(\d+(?:\.\d*)?)(ns|us|µs|ms|s|m|h)")
_UNIT_SECONDS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}


def parse_duration(text: str) -> float:
    """Seconds from a Go duration ("60s", "1m30s") or a plain number of seconds."""
    try:
        return float(text)
    except ValueError:
        pass
    position, total = 0, 0.0
    for match in _DURATION.finditer(text):
        if match.start() != position:
            break
        total += float(match.group(1)) * _UNIT_SECONDS[match.group(2)]
        position = match.end()
    if position != len(text) or not text:
        raise argparse.ArgumentTypeError(f"invalid duration {text!r} (e.g. 60s, 2m)")
    return total


def _bool(text: str) -> bool:
    try:
        return parse_bool("flag", text)
    except ConfigError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must not be negative, got {value}")
    return value


def _cache_size(text: str) -> int:
    """Any integer, as Go's flag.IntVar takes it; zero or less disables the cache."""
    try:
        return max(int(text), 0)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a whole number, got {text!r}") from None


def _log_level(text: str) -> str:
    """As hclog.LevelFromString reads it: any case, surrounding spaces ignored; an unknown
    level is info (the reference starts rather than fails; we also say so)."""
    level = text.strip().lower()
    if level not in LOG_LEVELS:
        print(f"vault-csi-provider: unknown -log-level {text!r}; using info", file=sys.stderr)
        return "info"
    return level


def _output(text: str) -> str:
    return text or "json"


def _endpoint(text: str) -> str:
    """A socket path; unix:///path (the form gRPC targets use) is accepted too."""
    if text.startswith("unix://"):
        return text[len("unix://") :]
    if "://" in text:
        raise argparse.ArgumentTypeError(f"must be a unix socket path (or unix:///path), got {text!r}")
    return text


def _fraction(text: str) -> float:
    value = float(text)
    if not 0 < value < 1:
        raise argparse.ArgumentTypeError(f"must be between 0 and 1, got {text}")
    return value


def _share(text: str) -> float:
    value = float(text)
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"must be more than 0 and at most 1, got {text}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="vault-csi-provider",
        description="HashiCorp Vault provider for the Secrets Store CSI driver.",
        epilog="Also: vault-csi-provider check SPC.yaml [-mount ...] [-strict]: lint a SecretProviderClass "
        "offline, or dry-run its Mount (check -h for its flags).",
        allow_abbrev=False,
    )

    def flag(name: str, **kwargs: object) -> None:
        parser.add_argument(f"-{name}", f"--{name}", dest=name.replace("-", "_"), **kwargs)  # type: ignore[arg-type]

    def switch(name: str, help: str) -> None:
        flag(name, nargs="?", const=True, default=None, type=_bool, metavar="BOOL", help=help)

    flag(
        "endpoint",
        action="append",
        default=None,
        type=_endpoint,
        help="unix socket to serve gRPC on (default /tmp/vault.sock); give it again for more sockets: one named "
        "openbao.sock speaks the OpenBao provider's contract, any other the Vault one",
    )
    flag("log-level", default=None, type=_log_level, help="trace, debug, info, warn, error or off (any case)")
    switch("debug", "deprecated: same as -log-level=debug")
    flag("log-format", default="text", choices=["text", "json"], help="log line format")
    switch("version", "print the version and exit")
    flag("output", default="json", type=_output, choices=["json", "yaml", "json-pretty"], help="format of -version")
    flag("health-addr", default=":8080", help="address of /health/live, /health/ready and /metrics")
    flag("hmac-secret-name", default="vault-csi-provider-hmac-key", help="Secret holding the HMAC key")
    flag("hmac-key-ttl", default=60.0, type=parse_duration, help="how long the HMAC key is kept in memory")
    flag("cache-size", default=1000, type=_cache_size, help="Vault tokens cached; 0 or less disables the cache")
    flag("max-response-bytes", default=4 * 1024 * 1024, type=_non_negative_int, help="largest Mount reply")
    flag("lease-cache-size", default=5000, type=_non_negative_int, help="leased replies kept; 0 disables reuse")
    flag(
        "lease-cache-namespace-share",
        default=0.25,
        type=_share,
        help="largest share of the lease cache (replies and bytes) one Kubernetes namespace may hold",
    )
    flag("lease-renew-fraction", default=2 / 3, type=_fraction, help="share of a lease's life before renewal")
    switch("revoke-leases-of-deleted-pods", "revoke tokens and leases of deleted pods (needs pods get)")
    flag("revocation-interval", default=60.0, type=parse_duration, help="how often deleted pods are looked for")
    flag(
        "allowed-vault-addresses",
        default="",
        help="comma-separated Vault addresses a class's vaultAddress may name (besides -vault-addr); empty: any",
    )
    flag("vault-addr", default=None, help="default Vault address (env VAULT_ADDR)")
    flag("vault-mount", default="kubernetes", help="default auth mount path")
    flag("vault-namespace", default=None, help="default Vault namespace (env VAULT_NAMESPACE)")
    flag("vault-tls-ca-cert", default=None, help="CA certificate file (env VAULT_CACERT)")
    flag("vault-tls-ca-directory", default=None, help="directory of CA certificates (env VAULT_CAPATH)")
    flag("vault-tls-server-name", default=None, help="TLS server name (env VAULT_TLS_SERVER_NAME)")
    flag("vault-tls-client-cert", default=None, help="client certificate (env VAULT_CLIENT_CERT)")
    flag("vault-tls-client-key", default=None, help="client key (env VAULT_CLIENT_KEY)")
    switch("vault-tls-skip-verify", "do not verify Vault's certificate (env VAULT_SKIP_VERIFY)")
    # For classes on an openbao.sock, as openbao-csi-provider names them: BAO_* env, then VAULT_*.
    flag("openbao-addr", default=None, help="default OpenBao address (env BAO_ADDR, then VAULT_ADDR)")
    flag("openbao-mount", default="kubernetes", help="default OpenBao auth mount path")
    flag("openbao-namespace", default=None, help="default OpenBao namespace (env BAO_NAMESPACE)")
    flag("openbao-tls-ca-cert", default=None, help="CA certificate file (env BAO_CACERT)")
    flag("openbao-tls-ca-directory", default=None, help="directory of CA certificates (env BAO_CAPATH)")
    flag("openbao-tls-server-name", default=None, help="TLS server name (env BAO_TLS_SERVER_NAME)")
    flag("openbao-tls-client-cert", default=None, help="client certificate (env BAO_CLIENT_CERT)")
    flag("openbao-tls-client-key", default=None, help="client key (env BAO_CLIENT_KEY)")
    switch("openbao-tls-skip-verify", "do not verify OpenBao's certificate (env BAO_SKIP_VERIFY)")
    flag(
        "openbao-hmac-secret-name",
        default="openbao-csi-provider-hmac-key",
        help="Secret holding the HMAC key of openbao.sock's versions",
    )
    return parser


def settings_from(args: argparse.Namespace, environ: Mapping[str, str]) -> Settings:
    """Flags over environment over defaults."""
    level = args.log_level or ("debug" if args.debug else "info")
    endpoints = args.endpoint or ["/tmp/vault.sock"]
    repeated = sorted({e for e in endpoints if endpoints.count(e) > 1})
    if repeated:
        raise ConfigError(f"-endpoint {repeated[0]} is given more than once")
    allowed = tuple(a.strip() for a in args.allowed_vault_addresses.split(",") if a.strip())
    return Settings(
        endpoint=endpoints[0],
        extra_endpoints=tuple(endpoints[1:]),
        log_level=level,
        log_format=args.log_format,
        health_addr=args.health_addr,
        hmac_secret_name=args.hmac_secret_name,
        openbao_hmac_secret_name=args.openbao_hmac_secret_name,
        hmac_key_ttl=args.hmac_key_ttl,
        cache_size=args.cache_size,
        max_response_bytes=args.max_response_bytes,
        lease_cache_size=args.lease_cache_size,
        lease_cache_namespace_share=args.lease_cache_namespace_share,
        lease_renew_fraction=args.lease_renew_fraction,
        revoke_deleted_pods=bool(args.revoke_leases_of_deleted_pods),
        revocation_interval=args.revocation_interval,
        vault=_server_settings(args, environ, "vault", ("VAULT",), allowed),
        # Read only when an openbao.sock is served: a Vault-only node ignores BAO_* as before.
        openbao=(
            _server_settings(args, environ, "openbao", ("BAO", "VAULT"), allowed)
            if any(of_endpoint(endpoint) is OPENBAO for endpoint in endpoints)
            else VaultSettings(allowed_addresses=allowed)
        ),
    )


def _server_settings(
    args: argparse.Namespace,
    environ: Mapping[str, str],
    flag: str,
    env_prefixes: Sequence[str],
    allowed: tuple[str, ...],
) -> VaultSettings:
    """One contract's defaults: its -FLAG-* flags, else the first of its environment
    prefixes that sets the variable to something (BAO_ADDR, then VAULT_ADDR; the last one
    counts even when empty, as VAULT_ADDR always has), else the default."""

    def variable(env_suffix: str) -> str | None:
        """The environment variable that decides, if any."""
        for index, prefix in enumerate(env_prefixes):
            name = f"{prefix}_{env_suffix}"
            if environ.get(name) or (name in environ and index == len(env_prefixes) - 1):
                return name
        return None

    def pick(option: str, env_suffix: str, default: str = "") -> str:
        value = getattr(args, f"{flag}_{option}")
        if value is not None:
            return str(value)
        name = variable(env_suffix)
        return environ[name] if name is not None else default

    skip = getattr(args, f"{flag}_tls_skip_verify")
    if skip is None:
        name = variable("SKIP_VERIFY")
        skip = parse_bool(name, environ[name]) if name is not None and environ[name] else False
    return VaultSettings(
        address=pick("addr", "ADDR", "https://127.0.0.1:8200"),
        auth_mount=getattr(args, f"{flag}_mount").strip("/"),
        namespace=pick("namespace", "NAMESPACE"),
        tls=TLSConfig(
            ca_cert=pick("tls_ca_cert", "CACERT"),
            ca_directory=pick("tls_ca_directory", "CAPATH"),
            server_name=pick("tls_server_name", "TLS_SERVER_NAME"),
            client_cert=pick("tls_client_cert", "CLIENT_CERT"),
            client_key=pick("tls_client_key", "CLIENT_KEY"),
            skip_verify=bool(skip),
        ),
        allowed_addresses=allowed,
    )


class JSONFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": self.formatTime(record, "%Y-%m-%dT%H:%M:%S%z"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry)


def setup_logging(level: str, log_format: str) -> None:
    logging.addLevelName(TRACE, "TRACE")
    handler = logging.StreamHandler(sys.stderr)
    if log_format == "json":
        handler.setFormatter(JSONFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(LOG_LEVELS[level])


def version_text(output: str) -> str:
    # The reference's keys first (internal/version: version, buildDate, goVersion,
    # minDriverVersion), so tooling that reads them keeps working; then our runtime's.
    info = {
        "version": __version__,
        "buildDate": "",
        "goVersion": "",
        "minDriverVersion": MIN_DRIVER_VERSION,
        "runtime": "python",
        "runtimeVersion": platform.python_version(),
        "platform": f"{sys.platform}/{platform.machine()}",
    }
    if output == "yaml":
        return "".join(f"{key}: {value}\n" for key, value in info.items())
    return json.dumps(info, indent=2 if output == "json-pretty" else None)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "check":
        from provider import check

        return check.main(argv[1:])
    args = build_parser().parse_args(argv)
    if args.version:
        print(version_text(args.output))
        return 0
    try:
        settings = settings_from(args, os.environ)
    except ConfigError as e:
        print(f"vault-csi-provider: {e}", file=sys.stderr)
        return 2
    setup_logging(settings.log_level, settings.log_format)
    from provider import app

    return app.run(settings)
