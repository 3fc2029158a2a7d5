"""A real 3-node OpenBao Raft cluster on loopback: init, unseal, join."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import requests

from tests.openbao import bao_binary, free_port


class Node:
    def __init__(self, workdir: Path, name: str) -> None:
        self.name = name
        self.dir = workdir / name
        self.dir.mkdir(parents=True, exist_ok=True)
        (self.dir / "data").mkdir(exist_ok=True)
        self.config = self.dir / "config.hcl"
        self._choose_ports()
        self.process: subprocess.Popen[bytes] | None = None

    def _choose_ports(self) -> None:
        self.api_port, self.cluster_port = free_port(), free_port()
        self.url = f"http://127.0.0.1:{self.api_port}"
        self.config.write_text(
            f'storage "raft" {{\n  path = "{self.dir / "data"}"\n  node_id = "{self.name}"\n}}\n'
            f'listener "tcp" {{\n  address = "127.0.0.1:{self.api_port}"\n'
            f'  cluster_address = "127.0.0.1:{self.cluster_port}"\n  tls_disable = true\n}}\n'
            f'api_addr = "{self.url}"\ncluster_addr = "https://127.0.0.1:{self.cluster_port}"\n'
            "disable_mlock = true\n"
        )

    def start(self) -> None:
        """Start the node once. A free port can be taken by another process before the
        node binds it (seen in a full run): then new ports, at most three times."""
        for attempt in range(3):
            with open(self.dir / "log", "ab") as log:
                self.process = subprocess.Popen(
                    [bao_binary(), "server", f"-config={self.config}"],
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    env={**os.environ, "HOME": str(self.dir)},
                )
            process = self.process

            def up_or_exited(process: subprocess.Popen[bytes] = process) -> bool:
                return process.poll() is not None or self.health() is not None

            _wait(up_or_exited, f"{self.name} to listen")
            if process.poll() is None:
                return
            if b"address already in use" not in (self.dir / "log").read_bytes() or attempt == 2:
                raise RuntimeError(f"{self.name} exited at start ({self.dir / 'log'})")
            self._choose_ports()

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait(10)

    def health(self) -> int | None:
        try:
            return requests.get(f"{self.url}/v1/sys/health", timeout=1).status_code
        except requests.RequestException:
            return None

    def api(self, method: str, path: str, body: dict[str, Any] | None = None, token: str = "") -> Any:
        headers = {"X-Vault-Token": token} if token else {}
        # sys/init writes the keyring through Raft with fsyncs: seen to take over 10 s on a
        # loaded 2-core machine, so the admin calls wait longer than a Mount would.
        response = requests.request(method, f"{self.url}/v1/{path}", json=body, headers=headers, timeout=60)
        if response.status_code >= 400:
            raise AssertionError(f"{self.name} {method} {path}: {response.status_code} {response.text}")
        return response.json() if response.content else None


def _wait(check: Any, what: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.2)
    raise RuntimeError(f"timed out waiting for {what}")


class RaftCluster:
    def __init__(self, workdir: Path, size: int = 3) -> None:
        self.nodes = [Node(workdir, f"node{i}") for i in range(1, size + 1)]
        self.root_token = ""
        self.unseal_key = ""

    def start(self) -> None:
        first, *others = self.nodes
        first.start()
        init = first.api("PUT", "sys/init", {"secret_shares": 1, "secret_threshold": 1})
        self.root_token, self.unseal_key = init["root_token"], init["keys_base64"][0]
        first.api("PUT", "sys/unseal", {"key": self.unseal_key})
        _wait(lambda: first.health() == 200, "node1 to become active")
        for node in others:
            node.start()
            node.api("PUT", "sys/storage/raft/join", {"leader_api_addr": first.url})
            node.api("PUT", "sys/unseal", {"key": self.unseal_key})
        for node in others:
            _wait(lambda n=node: n.health() in (429, 473), f"{node.name} to become a standby")
        _wait(lambda: len(self.peers()) == len(self.nodes), "all nodes to join")

    def peers(self) -> list[str]:
        reply = self.active().api("GET", "sys/storage/raft/configuration", token=self.root_token)
        return [server["node_id"] for server in reply["data"]["config"]["servers"] if server.get("voter")]

    def active(self) -> Node:
        for node in self.nodes:
            if node.health() == 200:
                return node
        raise RuntimeError("no active node")

    def api(self, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
        return self.active().api(method, path, body, token=self.root_token)

    def stop(self) -> None:
        for node in self.nodes:
            if node.process is not None and node.process.poll() is None:
                node.process.terminate()
                try:
                    node.process.wait(10)
                except subprocess.TimeoutExpired:
                    node.kill()
