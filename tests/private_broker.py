"""A private RabbitMQ node beside the system one, for tests that stop, start or cut it.

It runs from the Debian package's own server script (`/usr/lib/rabbitmq/bin/rabbitmq-server`,
which `/usr/sbin/rabbitmq-server` wraps, dropping the variables below) with its own node
name, AMQP and distribution ports, data and log folders, configuration (the package's pins
port 5672) and no plugins, so nothing of the shared broker is touched. It shares the
package's Erlang cookie (HOME=/var/lib/rabbitmq), so `rabbitmqctl -n <node>` reaches it.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import json
import os
import shutil
import socket
import subprocess
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tests.test_cli import free_port

SERVER_SCRIPT = Path("/usr/lib/rabbitmq/bin/rabbitmq-server")
COOKIE_HOME = "/var/lib/rabbitmq"  # where the package keeps its Erlang cookie
START_TIMEOUT = 90.0
CTL_TIMEOUT = 120.0


def available() -> bool:
    """True where a private node can be started: the package's scripts, and root (to read
    the package's Erlang cookie)."""
    return (
        SERVER_SCRIPT.exists()
        and shutil.which("rabbitmqctl") is not None
        and Path(COOKIE_HOME, ".erlang.cookie").exists()
        and os.geteuid() == 0
    )


@dataclass
class PrivateBroker:
    node: str
    port: int
    base: Path
    process: subprocess.Popen[bytes]
    management_port: int | None = None

    @property
    def url(self) -> str:
        return f"amqp://guest:guest@127.0.0.1:{self.port}/"

    @property
    def management_url(self) -> str:
        return f"http://guest:guest@127.0.0.1:{self.management_port}/"

    def ctl(self, *args: str, timeout: float = CTL_TIMEOUT) -> subprocess.CompletedProcess[str]:
        """`rabbitmqctl -n <node> …` (not checked)."""
        return subprocess.run(
            ["rabbitmqctl", "-q", "-n", self.node, *args],
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )

    def _ctl_checked(self, *args: str) -> None:
        done = self.ctl(*args)
        if done.returncode != 0:
            raise RuntimeError(f"rabbitmqctl {' '.join(args)}: {done.stdout}{done.stderr}")

    async def stop_app(self) -> None:
        """`rabbitmqctl stop_app`: the node stays, RabbitMQ in it stops (connections close)."""
        await asyncio.to_thread(self._ctl_checked, "stop_app")

    async def start_app(self) -> None:
        """`rabbitmqctl start_app`, then wait until it is fully booted."""
        await asyncio.to_thread(self._ctl_checked, "start_app")
        await asyncio.to_thread(self._ctl_checked, "await_startup", "--timeout", "90")

    def listing(self, kind: str, *fields: str) -> list[dict[str, Any]]:
        """`rabbitmqctl list_<kind> <fields>` as dicts (empty if the node does not answer)."""
        done = self.ctl(f"list_{kind}", *fields, "--formatter", "json", timeout=60)
        if done.returncode != 0:
            return []
        try:
            rows: list[dict[str, Any]] = json.loads(done.stdout)
        except ValueError:
            return []
        return rows

    def log_tail(self, lines: int = 30) -> str:
        """The end of the node's log, for a failure's diagnosis."""
        found = sorted((self.base / "log").glob("*.log"))
        return "\n".join(
            f"--- {path.name}\n" + "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
            for path in found
        )


def _write_config(base: Path, port: int, management_port: int | None) -> dict[str, str]:
    """The node's own files, and the environment that points the server script at them."""
    for folder in ("mnesia", "log"):
        (base / folder).mkdir(parents=True, exist_ok=True)
    config = f"listeners.tcp.default = 127.0.0.1:{port}\nloopback_users = none\n"
    plugins = "[]"
    if management_port is not None:
        config += f"management.tcp.ip = 127.0.0.1\nmanagement.tcp.port = {management_port}\n"
        plugins = "[rabbitmq_management]"
    (base / "rabbitmq.conf").write_text(config)
    (base / "enabled_plugins").write_text(f"{plugins}.\n")
    (base / "rabbitmq-env.conf").write_text("")  # not the package's (it names the node)
    return {
        "RABBITMQ_CONF_ENV_FILE": str(base / "rabbitmq-env.conf"),
        "RABBITMQ_CONFIG_FILE": str(base / "rabbitmq.conf"),
        "RABBITMQ_ENABLED_PLUGINS_FILE": str(base / "enabled_plugins"),
        "RABBITMQ_MNESIA_BASE": str(base / "mnesia"),
        "RABBITMQ_LOG_BASE": str(base / "log"),
        "RABBITMQ_NODE_PORT": str(port),
        "ERL_EPMD_ADDRESS": "127.0.0.1",
        # The distribution port on loopback only, like the package's node.
        "RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS": "-kernel inet_dist_use_interface {127,0,0,1}",
        "HOME": COOKIE_HOME,
    }


def _spawn(base: Path, management: bool = False) -> PrivateBroker:
    node = f"relayfault-{uuid.uuid4().hex[:8]}@localhost"
    port, dist_port = free_port(), free_port()
    management_port = free_port() if management else None
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith(("RABBITMQ_", "ERL_"))},
        **_write_config(base, port, management_port),
        "RABBITMQ_NODENAME": node,
        "RABBITMQ_DIST_PORT": str(dist_port),
    }
    with (base / "server.out").open("ab") as out, (base / "server.err").open("ab") as err:
        process = subprocess.Popen(
            [str(SERVER_SCRIPT)],
            env=env,
            cwd=base,
            stdout=out,
            stderr=err,
            stdin=subprocess.DEVNULL,
            start_new_session=True,  # its own process group: a ^C to pytest is ours to handle
        )
    return PrivateBroker(node, port, base, process, management_port)


def _accepts(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1):
            return True
    except OSError:
        return False


def _wait_booted(broker: PrivateBroker, timeout: float = START_TIMEOUT) -> bool:
    """Until the node is booted and listening; False if the server exited first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if broker.process.poll() is not None:
            return False
        # Fails at once while the node is not yet registered with epmd: poll.
        if broker.ctl("await_startup", "--timeout", "10", timeout=30).returncode == 0 and _accepts(
            broker.port
        ):
            return True
        time.sleep(0.5)
    raise TimeoutError(f"the private broker {broker.node} did not boot in {timeout:.0f} s")


def _shut_down(broker: PrivateBroker) -> None:
    """`rabbitmqctl stop`, then the process's exit (killed if it does not go)."""
    if broker.process.poll() is None:
        with contextlib.suppress(subprocess.TimeoutExpired):
            broker.ctl("stop", timeout=60)
    try:
        broker.process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        broker.process.kill()
        broker.process.wait(timeout=30)


def _booted_node(base: Path, management: bool = False) -> PrivateBroker:
    """A booted private node with its files under `base`; other ports if the first ones
    found free were taken meanwhile."""
    for attempt in range(3):
        broker = _spawn(base / f"node-{attempt}", management)
        try:
            booted = _wait_booted(broker)
        except BaseException:
            _shut_down(broker)
            raise
        if booted:
            return broker
        _shut_down(broker)
    raise RuntimeError(f"the private broker did not start; see {base}")


def _remove(broker: PrivateBroker) -> None:
    _shut_down(broker)
    shutil.rmtree(broker.base / "mnesia", ignore_errors=True)


@contextlib.contextmanager
def private_broker(base: Path) -> Iterator[PrivateBroker]:
    """A running private node with its files under `base`; stopped and its data deleted
    at the end."""
    broker = _booted_node(base)
    try:
        yield broker
    finally:
        _remove(broker)


@contextlib.contextmanager
def private_cluster(base: Path, size: int = 3) -> Iterator[list[PrivateBroker]]:
    """`size` private nodes with the management plugin, booted side by side and clustered
    (each joins the first: stop_app, reset, join_cluster, start_app); all stopped and their
    data deleted at the end."""
    nodes: list[PrivateBroker] = []
    try:
        with concurrent.futures.ThreadPoolExecutor(size) as pool:
            futures = [pool.submit(_booted_node, base / f"n{i}", True) for i in range(size)]
            for future in futures:
                nodes.append(future.result())
        for node in nodes[1:]:
            for step in (("stop_app",), ("reset",), ("join_cluster", nodes[0].node)):
                node._ctl_checked(*step)
            node._ctl_checked("start_app")
            node._ctl_checked("await_startup", "--timeout", "90")
        yield nodes
    finally:
        with concurrent.futures.ThreadPoolExecutor(max(len(nodes), 1)) as pool:
            list(pool.map(_remove, nodes))
