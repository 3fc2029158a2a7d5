"""Run the provider against an embedded OpenBao, the way the CSI driver would use it.

1. Start an OpenBao dev server and a stand-in for the Kubernetes API on loopback.
2. Configure Vault: kubernetes auth, a KV v2 secret, a policy and a role.
3. Start `vault-csi-provider` as a real process on a unix socket.
4. Call Mount the way the driver does for an example SecretProviderClass and pod.
5. Write the returned files into ./demo-output, show them, and clean up.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import grpc
import yaml

from provider._proto import service_pb2, service_pb2_grpc
from tests.kube_fake import FakeKubernetes
from tests.openbao import OpenBao, enable_kubernetes_auth, free_port

SPC = """\
apiVersion: secrets-store.csi.x-k8s.io/v1
kind: SecretProviderClass
metadata:
  name: demo-db
  namespace: shop
spec:
  provider: vault
  parameters:
    roleName: shop-web
    objects: |
      - objectName: db-username
        secretPath: secret/data/shop/db
        secretKey: username
      - objectName: db-password
        secretPath: secret/data/shop/db
        secretKey: password
        filePermission: 0400
      - objectName: db.json
        secretPath: secret/data/shop/db
      - objectName: .pgpass
        filePermission: 0400
        template: |
          {{- with index .Objects "db.json" -}}
          db.shop:5432:shop:{{ .Secrets.username }}:{{ .Secrets.password }}
          {{ end -}}
"""


def main() -> int:
    sys.stdout.reconfigure(line_buffering=True)  # type: ignore[union-attr]  # keep order with the provider's log
    out = Path("demo-output")
    with tempfile.TemporaryDirectory(prefix="vault-csi-demo-") as tmp:
        work = Path(tmp)
        kube = FakeKubernetes()
        kube.start()
        bao = OpenBao(work / "openbao")
        provider: subprocess.Popen[bytes] | None = None
        try:
            print(f"1. OpenBao dev server and a Kubernetes API stand-in on loopback ({kube.url})")
            bao.start()
            print(f"   OpenBao at {bao.url}")
            print("2. Vault: kubernetes auth, secret/shop/db, policy shop-web, role shop-web")
            enable_kubernetes_auth(bao, kube)
            bao.api("POST", "secret/data/shop/db", {"data": {"username": "shop", "password": "correct horse"}})
            bao.api(
                "PUT", "sys/policies/acl/shop-web", {"policy": 'path "secret/data/shop/*" { capabilities = ["read"] }'}
            )
            bao.api(
                "PUT",
                "auth/kubernetes/role/shop-web",
                {
                    "bound_service_account_names": ["web"],
                    "bound_service_account_namespaces": ["shop"],
                    "token_policies": ["shop-web"],
                    "audience": "vault",
                },
            )
            kubeconfig = work / "kubeconfig"
            kubeconfig.write_text(yaml.safe_dump(kube.kubeconfig("vault-csi")))
            socket_path = work / "vault.sock"
            health = f"127.0.0.1:{free_port()}"
            print(f"3. vault-csi-provider on unix:{socket_path}")
            provider = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "provider",
                    f"-endpoint={socket_path}",
                    f"-vault-addr={bao.url}",
                    f"-health-addr={health}",
                ],
                env={**os.environ, "KUBECONFIG": str(kubeconfig)},
            )
            deadline = time.monotonic() + 20
            while not socket_path.exists():
                if time.monotonic() > deadline or provider.poll() is not None:
                    raise SystemExit("the provider did not start")
                time.sleep(0.05)
            pod = kube.add_pod("shop", "web-0", "web")
            spc = yaml.safe_load(SPC)
            attributes = dict(spc["spec"]["parameters"])
            attributes.update(
                {
                    "csi.storage.k8s.io/pod.name": pod.name,
                    "csi.storage.k8s.io/pod.namespace": pod.namespace,
                    "csi.storage.k8s.io/pod.uid": pod.uid,
                    "csi.storage.k8s.io/serviceAccount.name": pod.service_account,
                    "csi.storage.k8s.io/serviceAccount.tokens": json.dumps(
                        {"vault": {"token": kube.pod_token(pod), "expirationTimestamp": "2030-01-01T00:00:00Z"}}
                    ),
                }
            )
            print("4. Mount for pod shop/web-0 with SecretProviderClass demo-db:")
            print("   " + SPC.replace("\n", "\n   "))
            with grpc.insecure_channel(f"unix:{socket_path}") as channel:
                stub = service_pb2_grpc.CSIDriverProviderStub(channel)
                grpc.channel_ready_future(channel).result(timeout=10)
                version = stub.Version(service_pb2.VersionRequest(version="v1alpha1"))
                print(f"   Version: {version.runtime_name} {version.runtime_version} ({version.version})")
                response = stub.Mount(
                    service_pb2.MountRequest(
                        attributes=json.dumps(attributes),
                        secrets="{}",
                        target_path=str(out.resolve()),
                        permission="420",
                    ),
                    timeout=30,
                )
            print(f"5. Files written to {out}/:")
            out.mkdir(exist_ok=True)
            versions = {v.id: v.version for v in response.object_version}
            for file in response.files:
                target = out / file.path
                target.write_bytes(file.contents)
                target.chmod(file.mode)
                print(f"   {oct(file.mode)[2:]:>4}  {file.path:<12} version {versions[file.path][:12]}…")
                print(f"         {file.contents.decode()}")
            print("Done. The provider's log lines show one INFO line for the Mount.")
            return 0
        finally:
            if provider is not None:
                provider.terminate()
                provider.wait(15)
            bao.stop()
            kube.stop()
            if "--keep" not in sys.argv:
                shutil.rmtree(out, ignore_errors=True)
                print(f"Cleaned up: OpenBao, the provider and {out}/ are gone (run with --keep to keep the files).")


if __name__ == "__main__":
    raise SystemExit(main())
