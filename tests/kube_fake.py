"""A faithful fake of the few Kubernetes API endpoints the provider and Vault touch.

- TokenReview (authentication.k8s.io/v1): verifies an RS256 service-account JWT
  (signature, expiry, audiences, bound pod still alive with the same uid) and answers
  with the service account's user and uid, as the API server does.
- TokenRequest (serviceaccounts/{name}/token): issues projected-style JWTs bound to a
  pod.
- Secrets and Pods: get, create (409 on a duplicate), delete, with Status objects.

Callers authenticate with a bearer token: the admin token, or (for TokenReview) any
valid service-account JWT. Faults can be switched on to test the provider's handling.
"""

from __future__ import annotations

import json
import re
import secrets
import threading
import time
import uuid
from collections import Counter
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import jwt
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import NameOID

ISSUER = "https://kubernetes.default.svc.cluster.local"
API_AUDIENCES = [ISSUER]


@dataclass(frozen=True)
class FakePod:
    namespace: str
    name: str
    uid: str
    service_account: str
    service_account_uid: str


class FakeKubernetes:
    def __init__(self) -> None:
        self._key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        self.public_key_pem = (
            self._key.public_key()
            .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
            .decode()
        )
        self.admin_token = secrets.token_urlsafe(24)
        self.lock = threading.Lock()
        self.service_accounts: dict[tuple[str, str], str] = {}
        self.pods: dict[tuple[str, str], FakePod] = {}
        self.secrets: dict[tuple[str, str], dict[str, Any]] = {}
        self.calls: Counter[str] = Counter()
        # Fault injection: a status code to answer every provider call with, or a delay.
        self.fail_status: int | None = None
        self.delay_seconds = 0.0
        self._server: ThreadingHTTPServer | None = None

    # --- lifecycle -------------------------------------------------------------------
    def start(self) -> None:
        fake = self

        class Handler(_Handler):
            pass

        Handler.fake = fake
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        threading.Thread(target=self._server.serve_forever, daemon=True).start()

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()

    @property
    def url(self) -> str:
        assert self._server is not None
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def kubeconfig(self, namespace: str = "vault-csi") -> dict[str, Any]:
        return {
            "clusters": [{"name": "fake", "cluster": {"server": self.url}}],
            "contexts": [{"name": "fake", "context": {"cluster": "fake", "user": "admin", "namespace": namespace}}],
            "users": [{"name": "admin", "user": {"token": self.admin_token}}],
            "current-context": "fake",
        }

    def ca_cert_pem(self) -> str:
        """A self-signed certificate: Vault wants some PEM even for an http:// host."""
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "fake-kubernetes")])
        now = time.time()
        import datetime as dt

        cert = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(self._key.public_key())
            .serial_number(1)
            .not_valid_before(dt.datetime.fromtimestamp(now - 60, dt.UTC))
            .not_valid_after(dt.datetime.fromtimestamp(now + 86400, dt.UTC))
            .sign(self._key, hashes.SHA256())
        )
        return cert.public_bytes(serialization.Encoding.PEM).decode()

    # --- objects ---------------------------------------------------------------------
    def add_service_account(self, namespace: str, name: str) -> str:
        with self.lock:
            return self.service_accounts.setdefault((namespace, name), str(uuid.uuid4()))

    def add_pod(self, namespace: str, name: str, service_account: str = "default", *, uid: str = "") -> FakePod:
        sa_uid = self.add_service_account(namespace, service_account)
        pod = FakePod(namespace, name, uid or str(uuid.uuid4()), service_account, sa_uid)
        with self.lock:
            self.pods[(namespace, name)] = pod
        return pod

    def delete_pod(self, pod: FakePod) -> None:
        with self.lock:
            self.pods.pop((pod.namespace, pod.name), None)

    def issue_token(
        self,
        namespace: str,
        service_account: str,
        *,
        audiences: list[str] | None = None,
        pod: FakePod | None = None,
        expiration_seconds: int = 3600,
    ) -> str:
        sa_uid = self.add_service_account(namespace, service_account)
        now = int(time.time())
        claims: dict[str, Any] = {
            "iss": ISSUER,
            "sub": f"system:serviceaccount:{namespace}:{service_account}",
            "aud": audiences or API_AUDIENCES,
            "iat": now,
            "nbf": now,
            "exp": now + expiration_seconds,
            "jti": str(uuid.uuid4()),
            "kubernetes.io": {
                "namespace": namespace,
                "serviceaccount": {"name": service_account, "uid": sa_uid},
            },
        }
        if pod is not None:
            claims["kubernetes.io"]["pod"] = {"name": pod.name, "uid": pod.uid}
        return jwt.encode(claims, self._key, algorithm="RS256", headers={"kid": "fake"})

    def pod_token(self, pod: FakePod, audience: str = "vault") -> str:
        return self.issue_token(pod.namespace, pod.service_account, audiences=[audience], pod=pod)

    def review(self, token: str, audiences: list[str] | None) -> dict[str, Any]:
        """The status of a TokenReview, as the API server computes it."""
        wanted = audiences or API_AUDIENCES
        try:
            claims = jwt.decode(
                token, self._key.public_key(), algorithms=["RS256"], options={"verify_aud": False}, leeway=0
            )
        except jwt.PyJWTError as e:
            return {"authenticated": False, "error": f"invalid bearer token: {e}"}
        token_audiences = claims.get("aud") or []
        if isinstance(token_audiences, str):
            token_audiences = [token_audiences]
        matched = [a for a in wanted if a in token_audiences]
        if not matched:
            return {"authenticated": False, "error": "invalid bearer token, token audiences are invalid"}
        info = claims.get("kubernetes.io", {})
        namespace = info.get("namespace", "")
        sa = info.get("serviceaccount", {})
        with self.lock:
            sa_uid = self.service_accounts.get((namespace, sa.get("name", "")))
            bound = info.get("pod")
            pod = self.pods.get((namespace, bound["name"])) if bound else None
        if sa_uid is None or sa_uid != sa.get("uid"):
            return {"authenticated": False, "error": "service account has been deleted"}
        if bound and (pod is None or pod.uid != bound.get("uid")):
            return {"authenticated": False, "error": f"pod {bound.get('name')} has been deleted"}
        extra = {}
        if bound:
            extra = {
                "authentication.kubernetes.io/pod-name": [bound["name"]],
                "authentication.kubernetes.io/pod-uid": [bound["uid"]],
            }
        return {
            "authenticated": True,
            "user": {
                "username": f"system:serviceaccount:{namespace}:{sa['name']}",
                "uid": sa_uid,
                "groups": ["system:serviceaccounts", f"system:serviceaccounts:{namespace}", "system:authenticated"],
                "extra": extra,
            },
            "audiences": matched,
        }


def status(code: int, reason: str, message: str, **details: Any) -> dict[str, Any]:
    return {
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": message,
        "reason": reason,
        "details": details,
        "code": code,
    }


_SECRETS = re.compile(r"^/api/v1/namespaces/([^/]+)/secrets(?:/([^/]+))?$")
_PODS = re.compile(r"^/api/v1/namespaces/([^/]+)/pods/([^/]+)$")
_TOKEN = re.compile(r"^/api/v1/namespaces/([^/]+)/serviceaccounts/([^/]+)/token$")
_REVIEW = "/apis/authentication.k8s.io/v1/tokenreviews"


class _Handler(BaseHTTPRequestHandler):
    fake: FakeKubernetes
    disable_nagle_algorithm = True
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def _send(self, code: int, body: dict[str, Any]) -> None:
        data = json.dumps(body).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _body(self) -> dict[str, Any]:
        length = int(self.headers.get("Content-Length") or 0)
        return json.loads(self.rfile.read(length) or b"{}")

    def _bearer(self) -> str:
        header = self.headers.get("Authorization", "")
        return header[7:] if header.startswith("Bearer ") else ""

    def _authorized(self, allow_service_accounts: bool = False) -> bool:
        token = self._bearer()
        if token == self.fake.admin_token:
            return True
        if allow_service_accounts and token and self.fake.review(token, API_AUDIENCES)["authenticated"]:
            return True
        self._send(401, status(401, "Unauthorized", "Unauthorized"))
        return False

    def _faulted(self) -> bool:
        if self.fake.delay_seconds:
            time.sleep(self.fake.delay_seconds)
        if self.fake.fail_status is not None:
            code = self.fake.fail_status
            self._send(code, status(code, "Forbidden" if code == 403 else "InternalError", "injected fault"))
            return True
        return False

    def do_POST(self) -> None:
        path = self.path.split("?", 1)[0]
        body = self._body()
        if path == _REVIEW:
            self.fake.calls["tokenreview"] += 1
            if not self._authorized(allow_service_accounts=True):
                return
            spec = body.get("spec", {})
            result = self.fake.review(spec.get("token", ""), spec.get("audiences"))
            self._send(
                201,
                {"apiVersion": "authentication.k8s.io/v1", "kind": "TokenReview", "spec": spec, "status": result},
            )
            return
        if not self._authorized() or self._faulted():
            return
        if m := _TOKEN.match(path):
            self._token_request(m.group(1), m.group(2), body)
        elif (m := _SECRETS.match(path)) and not m.group(2):
            self.fake.calls["secret.create"] += 1
            name = body.get("metadata", {}).get("name", "")
            key = (m.group(1), name)
            with self.fake.lock:
                if key in self.fake.secrets:
                    self._send(
                        409, status(409, "AlreadyExists", f'secrets "{name}" already exists', name=name, kind="secrets")
                    )
                    return
                body.setdefault("metadata", {}).update(
                    {"namespace": m.group(1), "uid": str(uuid.uuid4()), "resourceVersion": "1"}
                )
                self.fake.secrets[key] = body
            self._send(201, body)
        else:
            self._send(404, status(404, "NotFound", "the server could not find the requested resource"))

    def _token_request(self, namespace: str, name: str, body: dict[str, Any]) -> None:
        self.fake.calls["tokenrequest"] += 1
        if (namespace, name) not in self.fake.service_accounts:
            self._send(
                404, status(404, "NotFound", f'serviceaccounts "{name}" not found', name=name, kind="serviceaccounts")
            )
            return
        spec = body.get("spec", {})
        ref = spec.get("boundObjectRef") or {}
        pod = None
        if ref:
            pod = self.fake.pods.get((namespace, ref.get("name", "")))
            if pod is None or (ref.get("uid") and ref["uid"] != pod.uid):
                self._send(404, status(404, "NotFound", f'pods "{ref.get("name")}" not found', kind="pods"))
                return
        expiration = int(spec.get("expirationSeconds") or 3600)
        token = self.fake.issue_token(
            namespace, name, audiences=spec.get("audiences") or None, pod=pod, expiration_seconds=expiration
        )
        expires = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() + expiration))
        self._send(
            201,
            {
                "apiVersion": "authentication.k8s.io/v1",
                "kind": "TokenRequest",
                "metadata": {"name": name, "namespace": namespace},
                "spec": spec,
                "status": {"token": token, "expirationTimestamp": expires},
            },
        )

    def do_GET(self) -> None:
        path = self.path.split("?", 1)[0]
        if not self._authorized() or self._faulted():
            return
        if (m := _SECRETS.match(path)) and m.group(2):
            self.fake.calls["secret.get"] += 1
            secret = self.fake.secrets.get((m.group(1), m.group(2)))
            if secret is None:
                self._send(
                    404, status(404, "NotFound", f'secrets "{m.group(2)}" not found', name=m.group(2), kind="secrets")
                )
            else:
                self._send(200, secret)
        elif m := _PODS.match(path):
            self.fake.calls["pod.get"] += 1
            pod = self.fake.pods.get((m.group(1), m.group(2)))
            if pod is None:
                self._send(404, status(404, "NotFound", f'pods "{m.group(2)}" not found', name=m.group(2), kind="pods"))
            else:
                self._send(
                    200,
                    {
                        "apiVersion": "v1",
                        "kind": "Pod",
                        "metadata": {"name": pod.name, "namespace": pod.namespace, "uid": pod.uid},
                        "spec": {"serviceAccountName": pod.service_account, "containers": []},
                    },
                )
        else:
            self._send(404, status(404, "NotFound", "the server could not find the requested resource"))

    def do_DELETE(self) -> None:
        path = self.path.split("?", 1)[0]
        if not self._authorized():
            return
        if (m := _SECRETS.match(path)) and m.group(2):
            with self.fake.lock:
                secret = self.fake.secrets.pop((m.group(1), m.group(2)), None)
            if secret is None:
                self._send(404, status(404, "NotFound", f'secrets "{m.group(2)}" not found', kind="secrets"))
            else:
                self._send(200, {"kind": "Status", "apiVersion": "v1", "status": "Success"})
        else:
            self._send(404, status(404, "NotFound", "the server could not find the requested resource"))


__all__ = ["FakeKubernetes", "FakePod"]
