"""Where each process's CPU goes: py-spy samples of a running process, summed by layer.

`Profiles` samples every process of a group (py-spy, 100 Hz, without pausing it) while a
load runs, keeps each process's folded stacks in a folder (open them in speedscope or
flamegraph.pl), and sums the samples by the layer their innermost frame belongs to:
Relay's own code, aiohttp, aio-pika, the store's driver, pydantic, logging, metrics, the
event loop. A sample is a moment the process was on a core (py-spy leaves out threads it
sees waiting), so the shares are shares of the process's CPU time.

    python -m bench.profile FOLDED_FILE...     # the layer table of stacks saved before
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import signal
import sys
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

RATE_HZ = 100
PY_SPY = Path(sys.executable).parent / "py-spy"

# The loop's own C code, and compiled code it calls directly, which py-spy cannot see into:
# uvloop's socket reads and writes and callbacks, asyncpg's (Cython) protocol.
LOOP = "event loop (uvloop: sockets, callbacks; asyncpg's Cython protocol)"
# The first folder of a frame's file (py-spy shortens paths to the import root) -> layer.
LAYERS = {
    "relay": "Relay",
    "workers": "Relay",
    "bench": "Relay",  # the bench's one-reply bot runs inside the bot worker
    "aiohttp": "aiohttp (HTTP in and out)",
    "yarl": "aiohttp (HTTP in and out)",
    "multidict": "aiohttp (HTTP in and out)",
    "aiohappyeyeballs": "aiohttp (HTTP in and out)",
    "http": "aiohttp (HTTP in and out)",
    "aio_pika": "aio-pika, aiormq, pamqp (AMQP)",
    "aiormq": "aio-pika, aiormq, pamqp (AMQP)",
    "pamqp": "aio-pika, aiormq, pamqp (AMQP)",
    "asyncpg": "store driver (asyncpg, aiosqlite, sqlite3)",
    "aiosqlite": "store driver (asyncpg, aiosqlite, sqlite3)",
    "sqlite3": "store driver (asyncpg, aiosqlite, sqlite3)",
    "pydantic": "pydantic (wire models)",
    "pydantic_core": "pydantic (wire models)",
    "structlog": "logging",
    "logging": "logging",
    "prometheus_client": "metrics (prometheus-client)",
    "standardwebhooks": "signatures (standardwebhooks, hmac)",
    "hmac": "signatures (standardwebhooks, hmac)",
    "hashlib": "signatures (standardwebhooks, hmac)",
    "base64": "signatures (standardwebhooks, hmac)",
    "asyncio": LOOP,
    "uvloop": LOOP,
    "threading": LOOP,
    "concurrent": LOOP,
    "contextlib": LOOP,
}
OTHER = "other (stdlib: json, uuid, datetime, ...)"
# aiosqlite's thread blocks in SimpleQueue.get, C code py-spy does not always see as idle:
# its own frame on top means the thread is waiting for work, not working.
WAITING = ("_connection_worker_thread (aiosqlite/",)


def layer_of(frame: str) -> str:
    """The layer of one py-spy frame, `function (package/module.py:line)`."""
    _, _, where = frame.rpartition(" (")
    root = where.split("/", 1)[0].split(".", 1)[0]
    return LAYERS.get(root, OTHER)


@dataclass
class Breakdown:
    """One process's samples by layer, and its busiest frames."""

    samples: int = 0
    layers: Counter[str] = field(default_factory=Counter)
    frames: Counter[str] = field(default_factory=Counter)

    def add(self, stack: str, count: int) -> None:
        """One folded line's stack (frames outermost first, `;`-separated) and count."""
        leaf = stack.rsplit(";", 1)[-1]
        if leaf.startswith(WAITING):
            return
        self.samples += count
        self.layers[layer_of(leaf)] += count
        self.frames[leaf] += count

    def shares(self) -> dict[str, float]:
        """Percent of the process's samples per layer, largest first."""
        total = max(self.samples, 1)
        return {name: round(100 * n / total, 1) for name, n in self.layers.most_common()}

    def top(self, count: int = 8) -> list[tuple[str, float]]:
        """The frames that held the most samples themselves, with their percent."""
        total = max(self.samples, 1)
        return [(frame, round(100 * n / total, 1)) for frame, n in self.frames.most_common(count)]

    def summary(self) -> dict[str, Any]:
        """Samples, layers and busiest frames, as a report keeps them."""
        return {"samples": self.samples, "layers": self.shares(), "frames": self.top()}


def breakdown(lines: Iterable[str]) -> Breakdown:
    """Sum py-spy's folded lines (`frame;frame;... count`)."""
    result = Breakdown()
    for line in lines:
        stack, _, count = line.rstrip("\n").rpartition(" ")
        if stack and count.isdigit():
            result.add(stack, int(count))
    return result


class Profiles:
    """py-spy on every process of some groups while a load runs; a `Breakdown` each."""

    def __init__(self, folder: Path, label: str) -> None:
        self._folder = folder
        self._label = label
        self._running: dict[str, tuple[asyncio.subprocess.Process, Path]] = {}

    @staticmethod
    def available() -> bool:
        """Whether py-spy is installed (it comes with the dev extras)."""
        return PY_SPY.exists() or shutil.which("py-spy") is not None

    async def start(self, groups: Mapping[str, Sequence[int]]) -> None:
        """Start sampling each group's first process."""
        self._folder.mkdir(parents=True, exist_ok=True)
        command = str(PY_SPY) if PY_SPY.exists() else "py-spy"
        for name, pids in groups.items():
            path = self._folder / f"{self._label}-{name.replace(':', '-')}.folded"
            process = await asyncio.create_subprocess_exec(
                command, "record", "--pid", str(pids[0]), "--rate", str(RATE_HZ),
                "--nonblocking", "--format", "raw", "--output", str(path),
                stdout=asyncio.subprocess.DEVNULL,
                stderr=asyncio.subprocess.DEVNULL,
            )  # fmt: skip
            self._running[name] = (process, path)

    async def stop(self) -> dict[str, dict[str, Any]]:
        """Stop sampling (py-spy writes its file on SIGINT); each group's summary."""
        found: dict[str, dict[str, Any]] = {}
        for name, (process, path) in self._running.items():
            with contextlib.suppress(ProcessLookupError):
                process.send_signal(signal.SIGINT)
            try:
                await asyncio.wait_for(process.wait(), 30)
            except TimeoutError:
                process.kill()
                await process.wait()
            if path.exists():
                found[name] = breakdown(path.read_text().splitlines()).summary()
        self._running.clear()
        return found


def print_summaries(title: str, found: Mapping[str, Mapping[str, Any]], top: int = 6) -> None:
    """Each process's layers and busiest frames (`Breakdown.summary`), as text."""
    print(f"\n{title}")
    for name, result in found.items():
        print(f"  {name} ({result['samples']} samples at {RATE_HZ} Hz)")
        for layer, share in result["layers"].items():
            print(f"    {share:5.1f} %  {layer}")
        print("    busiest frames (their own time):")
        for frame, share in result["frames"][:top]:
            print(f"      {share:5.1f} %  {frame}")


def main(paths: Sequence[str]) -> int:
    """Print the breakdown of folded files written before."""
    found = {p: breakdown(Path(p).read_text().splitlines()).summary() for p in paths}
    print_summaries("where the CPU goes", found)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
