"""`relay run` on every core (`RELAY_RUN_PROCESSES=3`): the ingress in the process started,
the bot worker and the delivery worker in child processes of their own. Real processes
throughout: a message goes end to end, a killed worker is started again, a stop signal
stops every process, and the children do not outlive a parent killed outright."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from relay.service.supervisor import child_environment, split_roles
from relay.settings import Settings
from relay.store import SqlStore
from tests.fleet import Fleet, Service, fleet
from tests.helpers import eventually, make_integration, message, until_ready
from tests.receivers import Hit, Receiver
from tests.test_cli import RELAY, free_port, relay_env

pytestmark = pytest.mark.slow

SPLIT = {"RELAY_RUN_PROCESSES": "3", "RELAY_LOG_LEVEL": "info"}
WORKERS = {"bot-worker", "delivery-worker"}
# Every process stops within this (the shutdown timeout is 15 s; nothing is in hand here).
STOP_BOUND = 30.0


def process_stat(pid: int) -> tuple[str, int] | None:
    """A process's state letter and parent pid; None once it is gone."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    state, parent = text.rsplit(")", 1)[1].split()[:2]
    return state, int(parent)


def alive(pid: int) -> bool:
    """Running (a zombie, ended but not yet reaped by whoever adopted it, is not)."""
    about = process_stat(pid)
    return about is not None and about[0] != "Z"


def proc_words(pid: int, name: str) -> list[str]:
    """A process's command line or environment (`cmdline`, `environ`), word by word."""
    with contextlib.suppress(FileNotFoundError, ProcessLookupError):
        return Path(f"/proc/{pid}/{name}").read_bytes().decode().split("\0")
    return []


def role_of(pid: int) -> str:
    """The `relay` command a process runs (`bot-worker`...), from its command line."""
    words = proc_words(pid, "cmdline")
    return words[words.index("relay.commands") + 1] if "relay.commands" in words else ""


def children(pid: int) -> dict[str, int]:
    """The live child processes of `pid`, by the role each runs."""
    found = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            about = process_stat(int(entry.name))
            if about is not None and about[1] == pid and about[0] != "Z":
                found[role_of(int(entry.name))] = int(entry.name)
    return found


async def both_workers(pid: int) -> dict[str, int]:
    """The two worker children of `pid`, once both run."""

    async def found() -> dict[str, int]:
        running = children(pid)
        return running if set(running) == WORKERS else {}

    return await eventually(found, timeout=30, interval=0.05)


async def readiness(http: aiohttp.ClientSession, url: str) -> tuple[int, dict[str, Any]]:
    async with http.get(f"{url}/readyz") as answer:
        return answer.status, await answer.json()


async def post(http: aiohttp.ClientSession, url: str, integration: str, token: str, n: str) -> str:
    """Send one message; its conversation id."""
    async with http.post(
        f"{url}/webhooks/{integration}",
        json=message(n, conversationId=f"conv-{n}"),
        headers={"Authorization": f"Bearer {token}"},
    ) as answer:
        assert answer.status == 200, await answer.text()
        return str((await answer.json())["conversation"]["id"])


async def delivered(receiver: Receiver, path: str, count: int) -> list[Hit]:
    """The echo bot's replies at `path`, once `count` have come."""

    async def arrived() -> list[Hit]:
        hits = receiver.at(path)
        return hits if len(hits) >= count else []

    return await eventually(arrived, timeout=45, interval=0.05)


@contextlib.asynccontextmanager
async def split_run(
    settings: Settings, tmp_path: Path, processes: str = "3"
) -> AsyncIterator[tuple[Fleet, Service]]:
    """`relay run` with its workers in processes of their own (or `processes=1`: not),
    ready (both workers up)."""
    env = {**SPLIT, "RELAY_RUN_PROCESSES": processes}
    async with fleet(settings, env=env, logs=tmp_path) as services:
        try:
            yield services, await services.start("run")
        except BaseException:
            print(services.tails(60))  # what the processes said, for the failure's report
            raise


@pytest.mark.parametrize("processes", ["3", "1"])
async def test_a_message_goes_end_to_end_through_three_processes_or_one(
    settings: Settings, store: SqlStore, receiver: Receiver, tmp_path: Path, processes: str
) -> None:
    path = f"e2e-{processes}-{settings.database_url[:6]}"
    integration, token = await make_integration(store, settings, response_url=receiver.url(path))
    async with split_run(settings, tmp_path, processes) as (services, run):
        workers = await both_workers(run.process.pid) if processes == "3" else {}
        assert children(run.process.pid) == workers
        for role, pid in workers.items():
            command = proc_words(pid, "cmdline")
            assert command[command.index("--parent") + 1] == str(run.process.pid), role
            # Not the default status ports: another relay run on this machine has them.
            port = f"RELAY_{role.replace('-', '_').upper()}_PORT=0"
            assert port in proc_words(pid, "environ")
        status, body = await readiness(services.http, run.url)
        assert (status, body["status"]) == (200, "ok")
        await post(services.http, run.url, integration, token, path)
        hits = await delivered(receiver, path, 2)
    texts = [hit.body.get("payload", {}).get("text") for hit in hits]
    assert f"echo: hello {path}" in texts
    assert run.process.returncode == 0  # stopped by the fleet's SIGTERM


def test_auto_splits_where_there_are_several_cores_and_workers_get_free_ports() -> None:
    several = len(os.sched_getaffinity(0)) > 1
    assert split_roles(Settings(_env_file=None)) == several
    assert split_roles(Settings(_env_file=None, run_processes="3"))
    assert not split_roles(Settings(_env_file=None, run_processes="1"))
    # A port set (as by RELAY_BOT_WORKER_PORT) is the child's too; one not set is a free one.
    chosen = Settings(_env_file=None, bot_worker_port=9181)
    kept = child_environment(chosen, "bot-worker").get("RELAY_BOT_WORKER_PORT")
    assert kept == os.environ.get("RELAY_BOT_WORKER_PORT")
    assert child_environment(chosen, "delivery-worker")["RELAY_DELIVERY_WORKER_PORT"] == "0"


async def test_a_killed_worker_is_started_again_and_delivers_what_came_meanwhile(
    settings: Settings, store: SqlStore, receiver: Receiver, tmp_path: Path
) -> None:
    path = f"restart-{settings.database_url[:6]}"
    integration, token = await make_integration(store, settings, response_url=receiver.url(path))
    async with split_run(settings, tmp_path) as (services, run):
        killed = (await both_workers(run.process.pid))["bot-worker"]
        os.kill(killed, signal.SIGKILL)

        async def down() -> dict[str, Any]:
            status, body = await readiness(services.http, run.url)
            return body if status == 503 and "bot_worker" in body.get("failures", {}) else {}

        said = await eventually(down, timeout=10, interval=0.02)
        # Exited (and when it starts again), or already starting again.
        assert said["failures"]["bot_worker"].startswith(("exited (SIGKILL)", "starting"))
        # Accepted while the bot worker is down: it waits in its queue.
        await post(services.http, run.url, integration, token, f"{path}-1")
        again = await both_workers(run.process.pid)
        assert again["bot-worker"] != killed
        await until_ready(services.http, run.url, timeout=30)
        await post(services.http, run.url, integration, token, f"{path}-2")
        # The echo bot answers twice to each.
        await delivered(receiver, path, 4)
        assert run.running
        logged = services.events()
    assert "worker_process_exited" in logged


@contextlib.asynccontextmanager
async def alone(settings: Settings, tmp_path: Path) -> AsyncIterator[asyncio.subprocess.Process]:
    """`relay run` (split) in a process group of its own, as a terminal's foreground job is,
    ready; SIGKILL to the group at the end if anything is left."""
    port = free_port()
    env = relay_env(settings, {**SPLIT, "RELAY_HTTP_PORT": str(port)})
    with (tmp_path / "run.out").open("ab") as out:
        process = await asyncio.create_subprocess_exec(
            *RELAY, "run", env=env, stdout=out, stderr=out, start_new_session=True
        )
    try:
        async with aiohttp.ClientSession() as http:
            await until_ready(http, f"http://127.0.0.1:{port}", timeout=60)
        yield process
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        await process.wait()


@pytest.mark.parametrize(
    "how", ["SIGTERM to the parent", "SIGINT to the parent", "Ctrl-C (SIGINT to the group)"]
)
async def test_a_stop_signal_stops_every_process_and_exits_zero(
    settings: Settings, tmp_path: Path, how: str
) -> None:
    async with alone(settings, tmp_path) as process:
        workers = await both_workers(process.pid)
        if how.startswith("Ctrl-C"):
            os.killpg(process.pid, signal.SIGINT)
        else:
            process.send_signal(signal.SIGTERM if how.startswith("SIGTERM") else signal.SIGINT)
        code = await asyncio.wait_for(process.wait(), STOP_BOUND)
        # The parent waits for its children: none is left when it exits.
        assert [role for role, pid in workers.items() if alive(pid)] == []
    output = (tmp_path / "run.out").read_text(errors="replace")
    assert code == 0, output[-3000:]
    assert output.count('"worker_process_stopped"') == 2, output[-3000:]
    assert '"worker_process_killed"' not in output
    assert '"worker_process_exited"' not in output  # no restart on the way out


async def test_the_workers_stop_when_the_parent_is_killed(
    settings: Settings, tmp_path: Path
) -> None:
    async with split_run(settings, tmp_path) as (services, run):
        workers = await both_workers(run.process.pid)
        await services.kill(run)

        async def all_gone() -> bool:
            return not any(alive(pid) for pid in workers.values())

        await eventually(all_gone, timeout=STOP_BOUND, interval=0.05)
        # Each stopped as on SIGTERM (the kernel's, asked for at start), not killed.
        stopped = [line for line in run.lines() if '"event":"stopped"' in line.replace(" ", "")]
        assert len(stopped) == 2, run.tail(40)
