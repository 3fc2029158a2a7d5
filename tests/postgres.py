"""A throwaway PostgreSQL cluster on a free loopback port (Debian's binaries).

initdb refuses to run as root, so when the tests run as root the server runs as the
`postgres` user, in a directory it owns. Password authentication is on for TCP, so
credentials Vault creates must really work.
"""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import psycopg

from tests.openbao import free_port

SUPERUSER = "postgres"
SUPERUSER_PASSWORD = "postgres-test-password"


def _binaries() -> Path:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    if not found:
        raise RuntimeError("PostgreSQL is not installed: run scripts/install-system-deps")
    return Path(found[-1]).parent


class Postgres:
    def __init__(self) -> None:
        self.port = free_port()
        self.workdir = Path(tempfile.mkdtemp(prefix="vault-csi-pg-"))
        self.datadir = self.workdir / "data"
        self._as_postgres: list[str] = []
        if os.geteuid() == 0:
            shutil.chown(self.workdir, "postgres", "postgres")
            self._as_postgres = ["runuser", "-u", "postgres", "--"]
        os.chmod(self.workdir, 0o755)

    def _run(self, *args: str) -> None:
        subprocess.run([*self._as_postgres, *args], check=True, capture_output=True, timeout=120)

    def start(self) -> None:
        bin_dir = _binaries()
        pwfile = self.workdir / "pw"
        pwfile.write_text(SUPERUSER_PASSWORD)
        if self._as_postgres:
            shutil.chown(pwfile, "postgres", "postgres")
        self._run(
            str(bin_dir / "initdb"),
            "-D",
            str(self.datadir),
            "-U",
            SUPERUSER,
            f"--pwfile={pwfile}",
            "--auth-local=trust",
            "--auth-host=scram-sha-256",
            "--no-sync",
        )
        self._run(
            str(bin_dir / "pg_ctl"),
            "-D",
            str(self.datadir),
            "-l",
            str(self.workdir / "log"),
            "-w",
            "-t",
            "60",
            "-o",
            f"-p {self.port} -k {self.workdir} -c listen_addresses=127.0.0.1 -c fsync=off",
            "start",
        )
        deadline = time.monotonic() + 30
        while True:
            try:
                with self.connect():
                    return
            except psycopg.OperationalError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)

    def stop(self) -> None:
        try:
            self._run(str(_binaries() / "pg_ctl"), "-D", str(self.datadir), "-m", "immediate", "stop")
        finally:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def connect(self, user: str = SUPERUSER, password: str = SUPERUSER_PASSWORD) -> psycopg.Connection:
        return psycopg.connect(
            host="127.0.0.1", port=self.port, user=user, password=password, dbname="postgres", connect_timeout=5
        )

    def users(self, prefix: str) -> set[str]:
        with self.connect() as conn:
            rows = conn.execute("SELECT rolname FROM pg_roles WHERE rolname LIKE %s", (prefix + "%",)).fetchall()
        return {row[0] for row in rows}

    @property
    def vault_connection_url(self) -> str:
        return f"postgresql://{{{{username}}}}:{{{{password}}}}@127.0.0.1:{self.port}/postgres?sslmode=disable"
