"""A private PostgreSQL cluster beside the system one, for tests that restart it.

Made with Debian's cluster tools (`pg_createcluster`, `pg_ctlcluster`, `pg_dropcluster`) on
a free port, listening on localhost only (the default), with trust authentication and one
database; dropped at the end. The newest installed server version is used.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import shutil
import subprocess
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from tests.test_cli import free_port

BINARIES = Path("/usr/lib/postgresql")
DATABASE = "relay"
TOOL_TIMEOUT = 120.0


def server_version() -> str | None:
    """The newest PostgreSQL version installed with the Debian layout, or None."""
    if not BINARIES.is_dir():
        return None
    versions = [
        path.name
        for path in BINARIES.iterdir()
        if re.fullmatch(r"\d+(\.\d+)?", path.name) and (path / "bin" / "pg_ctl").exists()
    ]
    return max(versions, key=lambda v: tuple(map(int, v.split(".")))) if versions else None


def available() -> bool:
    """True where a private cluster can be made: the cluster tools, a server, and root."""
    tools = ("pg_createcluster", "pg_ctlcluster", "pg_dropcluster", "psql")
    return (
        all(shutil.which(tool) for tool in tools)
        and server_version() is not None
        and os.geteuid() == 0
    )


def _run(*command: str) -> str:
    done = subprocess.run(
        command, capture_output=True, text=True, timeout=TOOL_TIMEOUT, check=False
    )
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} exited {done.returncode}: {done.stderr}")
    return done.stdout


@dataclass
class PrivateCluster:
    version: str
    name: str
    port: int

    @property
    def url(self) -> str:
        """The cluster's test database (append `?schema=…` for a schema of one's own)."""
        return f"postgresql://postgres@127.0.0.1:{self.port}/{DATABASE}"

    def ctl(self, action: str, *options: str) -> str:
        return _run(
            "pg_ctlcluster",
            "--skip-systemctl-redirect",
            *options,
            self.version,
            self.name,
            action,
        )

    async def restart(self) -> None:
        """`pg_ctlcluster … restart` (fast mode: clients are disconnected at once); returns
        once the server accepts connections again."""
        await asyncio.to_thread(self.ctl, "restart", "--mode", "fast")

    def log_tail(self, lines: int = 20) -> str:
        path = Path(f"/var/log/postgresql/postgresql-{self.version}-{self.name}.log")
        if not path.exists():
            return ""
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


def _create(version: str) -> PrivateCluster:
    cluster = PrivateCluster(version, f"relayfault_{uuid.uuid4().hex[:8]}", free_port())
    _run(
        "pg_createcluster",
        version,
        cluster.name,
        "--port",
        str(cluster.port),
        "-o",
        "max_connections=200",
        "--",
        "--auth=trust",
    )
    return cluster


def _drop(cluster: PrivateCluster) -> None:
    with contextlib.suppress(RuntimeError, subprocess.TimeoutExpired):
        _run("pg_dropcluster", "--stop", cluster.version, cluster.name)


@contextlib.contextmanager
def private_postgres() -> Iterator[PrivateCluster]:
    """A running private cluster with an empty `relay` database; dropped at the end.
    Another port if the one found free was taken meanwhile."""
    version = server_version()
    if version is None:
        raise RuntimeError("no PostgreSQL server installed")
    failures = []
    for _ in range(3):
        cluster = _create(version)
        try:
            cluster.ctl("start")
            break
        except RuntimeError as error:
            failures.append(str(error))
            _drop(cluster)
    else:
        raise RuntimeError(f"the private PostgreSQL cluster did not start: {failures}")
    try:
        _run(
            "psql",
            "-h",
            "127.0.0.1",
            "-p",
            str(cluster.port),
            "-U",
            "postgres",
            "-d",
            "postgres",
            "-c",
            f"CREATE DATABASE {DATABASE}",
        )
        yield cluster
    finally:
        _drop(cluster)
