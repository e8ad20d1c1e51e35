"""`relay run` on every core: the worker roles in processes of their own, kept running.

With `RELAY_RUN_PROCESSES=3` (or `auto` where this process may use several cores) `relay
run` serves the ingress itself and starts `relay bot-worker` and `relay delivery-worker`
as its children, with its own environment, output and working folder. Each worker's status
port is a free one the system picks (port 0) unless its variable was set. A worker tells
its parent when it has started (`announce_started`, a line on a pipe): until then, and while
it is down, the parent's `/readyz` says so (`bot_worker`, `delivery_worker`): ready means
every role runs, as it did when one process served them all. How they stop:

- Ctrl-C: the terminal sends SIGINT to the whole foreground process group, so every
  process starts its graceful stop at once; the parent also sends its children SIGTERM
  (which they ignore once stopping) and waits for them.
- SIGTERM (or SIGINT) to the parent alone: forwarded to the children as SIGTERM as soon as
  the ingress stops accepting; each stops gracefully within `RELAY_SHUTDOWN_TIMEOUT`. The
  parent waits that long and `STOP_GRACE` more, then SIGKILLs what still runs (the broker
  gives its unacked messages to another consumer). It exits as it always has, 0.
- A child that exits while the parent runs (a crash, a kill -9, an out-of-memory kill):
  logged, and started again after a wait that doubles from `RESTART_FIRST` to
  `RESTART_MOST`: the workers hold nothing a restart loses (what a dead one held unacked
  goes back to its queue).
- The parent killed outright (kill -9): on Linux each child asked the kernel, as it
  started (`follow_parent`, PR_SET_PDEATHSIG), for a SIGTERM when its parent dies, so it
  stops gracefully rather than live on orphaned.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import os
import signal
import sys
from collections.abc import AsyncIterator

import structlog
from aiohttp import web

from relay.aio import cancel_and_wait
from relay.service.app import ReadinessCheck
from relay.service.lifecycle import Context
from relay.settings import Settings

log = structlog.get_logger(__name__)

# The roles `relay run` starts as children, and the setting of each one's status port.
WORKER_PORTS = {"bot-worker": "bot_worker_port", "delivery-worker": "delivery_worker_port"}
# The wait before starting an exited worker again doubles from the first to the most; a
# worker that ran at least `STEADY` seconds before it exited waits the first again.
RESTART_FIRST = 0.5
RESTART_MOST = 10.0
STEADY = 30.0
# Beyond the shutdown timeout (what a worker gives the messages in hand), the time a worker
# may take to close its broker and store before it is killed.
STOP_GRACE = 5.0
PR_SET_PDEATHSIG = 1  # <linux/prctl.h>
STARTED = b"started\n"


def split_roles(settings: Settings) -> bool:
    """Whether `relay run` runs its workers in processes of their own."""
    if settings.run_processes == "auto":
        return usable_cores() > 1
    return settings.run_processes == "3"


def usable_cores() -> int:
    """The cores this process may run on: its CPU affinity where the system tells it (a
    `taskset` or a container's cpuset), else the machine's."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def child_environment(settings: Settings, role: str) -> dict[str, str]:
    """This process's environment for a worker child: the same settings, and its status port
    a free one unless it was set (the default would collide with another `relay run`)."""
    env = dict(os.environ)
    field = WORKER_PORTS[role]
    if field not in settings.model_fields_set:
        env[f"RELAY_{field.upper()}"] = "0"
    return env


def follow_parent(pid: int) -> bool:
    """Have the kernel send this process SIGTERM when its parent dies, even by kill -9
    (Linux; elsewhere nothing); False if the parent `pid` is gone already."""
    if sys.platform == "linux":
        libc = ctypes.CDLL(None, use_errno=True)
        # Tied to the thread that started this process: the parent's event loop thread,
        # which lives as long as the parent does.
        if libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG) failed")
    # Checked after asking: a parent that died before would never send the signal.
    return os.getppid() == pid


def announce_started(fd: int) -> Context:
    """A cleanup context, the last of a worker's: once the rest have started, write a line
    to the pipe `fd` (its parent reads it: the worker is up) and close it."""

    @contextlib.asynccontextmanager
    async def started(_: web.Application) -> AsyncIterator[None]:
        try:
            os.write(fd, STARTED)  # a few bytes into an empty pipe: never blocks
        except BrokenPipeError:
            pass  # the parent is gone: the kernel's SIGTERM follows
        finally:
            os.close(fd)
        yield

    return started


async def started_line(fd: int) -> bytes:
    """What a worker writes to the pipe `fd` once started (`STARTED`); empty if it ended
    before. The caller closes `fd`."""
    loop = asyncio.get_running_loop()
    readable: asyncio.Future[None] = loop.create_future()

    def on_readable() -> None:
        if not readable.done():
            readable.set_result(None)

    loop.add_reader(fd, on_readable)
    try:
        await readable
    finally:
        loop.remove_reader(fd)
    # The worker writes it at once (a write this small to a pipe is never split).
    return os.read(fd, len(STARTED))


def exit_text(code: int) -> str:
    """An exit status as people say it: `code 1`, or the signal that ended the process."""
    if code < 0:
        with contextlib.suppress(ValueError):
            return signal.Signals(-code).name
    return f"code {code}"


class Child:
    """One worker role in a process of its own, started again whenever it exits, until
    stopped."""

    def __init__(self, role: str, env: dict[str, str], stop_within: float) -> None:
        self.role = role
        self._env = env
        self._stop_within = stop_within
        self._process: asyncio.subprocess.Process | None = None
        self._task: asyncio.Task[None] | None = None
        self._stopping = asyncio.Event()
        # Why the role is not running now; None while its process runs.
        self.down: str | None = "not started yet"

    def start(self) -> None:
        """Start the process, and start it again each time it exits."""
        self._task = asyncio.create_task(self._keep_running(), name=f"supervise {self.role}")

    async def check(self) -> str | None:
        """Readiness: None while the process runs, else why it does not."""
        return self.down

    def terminate(self) -> None:
        """Ask the process to stop (SIGTERM), and start it no more."""
        self._stopping.set()
        self._signal(signal.SIGTERM)

    async def stop(self) -> None:
        """`terminate`, then wait for the process to end, within the bound; SIGKILL after."""
        self.terminate()
        if self._task is None:
            return
        try:
            await asyncio.wait_for(asyncio.shield(self._task), self._stop_within)
        except TimeoutError:
            log.error("worker_process_killed", role=self.role, after_seconds=self._stop_within)
            self._signal(signal.SIGKILL)
            await self._task

    async def _keep_running(self) -> None:
        loop = asyncio.get_running_loop()
        wait = RESTART_FIRST
        while not self._stopping.is_set():
            started = loop.time()
            ended = await self._run_once()
            if self._stopping.is_set():
                return
            wait = RESTART_FIRST if loop.time() - started >= STEADY else wait
            self.down = f"{ended}, starting again in {wait:g} s"
            log.error("worker_process_exited", role=self.role, exit=ended, wait=wait)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), wait)
            wait = min(2 * wait, RESTART_MOST)

    async def _run_once(self) -> str:
        """Start the process and wait for it to end; how it ended."""
        reading, writing = os.pipe()
        try:
            process = await asyncio.create_subprocess_exec(
                *worker_command(self.role, writing),
                env=self._env,
                stdin=asyncio.subprocess.DEVNULL,
                pass_fds=(writing,),
            )
        except OSError as error:  # out of processes or memory: a crash like any other
            os.close(reading)
            return f"could not start ({error})"
        finally:
            os.close(writing)  # the child's copy only: the pipe ends when the child does
        try:
            ended = f"exited ({exit_text(await self._watch(process, reading))})"
        finally:
            os.close(reading)
        self.down = ended
        if self._stopping.is_set():
            log.info("worker_process_stopped", role=self.role, exit=ended)
        return ended

    async def _watch(self, process: asyncio.subprocess.Process, ready_fd: int) -> int:
        """Running once the process says it has started; its exit code."""
        self._process, self.down = process, "starting"
        log.info("worker_process_started", role=self.role, pid=process.pid)
        if self._stopping.is_set():
            self._signal(signal.SIGTERM)  # the stop came while the process was being started
        watching = asyncio.create_task(self._note_started(ready_fd))
        try:
            return await process.wait()
        finally:
            await cancel_and_wait(watching)

    async def _note_started(self, fd: int) -> None:
        if await started_line(fd) == STARTED:
            self.down = None

    def _signal(self, sig: signal.Signals) -> None:
        process = self._process
        if process is not None and process.returncode is None:
            with contextlib.suppress(ProcessLookupError):  # it has just ended
                process.send_signal(sig)


def worker_command(role: str, ready_fd: int) -> list[str]:
    """The command that runs `role` as a child of this process, telling it has started on
    the pipe `ready_fd`."""
    supervised = ["--parent", str(os.getpid()), "--ready-fd", str(ready_fd)]
    return [sys.executable, "-m", "relay.commands", role, *supervised]


class Workers:
    """The worker roles of `relay run`, each in a process of its own."""

    def __init__(self, settings: Settings) -> None:
        # A worker's own stop is bounded by the shutdown timeout; then it closes its broker
        # and store.
        stop_within = settings.shutdown_timeout + STOP_GRACE
        self._children = [
            Child(role, child_environment(settings, role), stop_within) for role in WORKER_PORTS
        ]

    def checks(self) -> list[tuple[str, ReadinessCheck]]:
        """A readiness check per role (`bot_worker`, `delivery_worker`): its process runs."""
        return [(child.role.replace("-", "_"), child.check) for child in self._children]

    def start(self) -> None:
        for child in self._children:
            child.start()

    def terminate(self) -> None:
        """Ask every worker to stop, and start none again."""
        for child in self._children:
            child.terminate()

    async def stop(self) -> None:
        """Stop every worker, each within the bound."""
        await asyncio.gather(*(child.stop() for child in self._children))
