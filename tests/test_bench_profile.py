"""`make bench`'s profile: py-spy on a real process, its samples summed by layer."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from bench.e2e import Resources, layer_rows
from bench.profile import LOOP, OTHER, Profiles, breakdown, layer_of

FOLDED = [
    "<module> (relay:6);main (relay/commands/main.py:76);Runner.run (asyncio/runners.py:118) 40",
    "main (relay/commands/main.py:76);_answer (relay/service/app.py:84) 10",
    "x (relay/ingress/app.py:1);StreamWriter._writelines (aiohttp/http_writer.py:116) 20",
    "x (relay/broker/client.py:1);Channel.basic_publish (aiormq/channel.py:939) 15",
    "x (relay/store/postgres.py:96);Connection._do_execute (asyncpg/connection.py:2069) 10",
    "x (relay/wire/__init__.py:1);BaseModel.model_dump_json (pydantic/main.py:587) 5",
    "x (workers/bot/worker.py:1);uuid4 (uuid.py:723) 5",
    # aiosqlite's thread waiting for work: not CPU, left out.
    "Thread.run (threading.py:982);_connection_worker_thread (aiosqlite/core.py:59) 99",
    "",
    "a line that is not a sample",
]


def test_samples_are_summed_by_the_layer_of_their_innermost_frame():
    result = breakdown(FOLDED)
    assert result.samples == 105
    assert result.shares() == {
        LOOP: 38.1,
        "aiohttp (HTTP in and out)": 19.0,
        "aio-pika, aiormq, pamqp (AMQP)": 14.3,
        "Relay": 9.5,
        "store driver (asyncpg, aiosqlite, sqlite3)": 9.5,
        "pydantic (wire models)": 4.8,
        OTHER: 4.8,
    }
    assert result.top(2) == [
        ("Runner.run (asyncio/runners.py:118)", 38.1),
        ("StreamWriter._writelines (aiohttp/http_writer.py:116)", 19.0),
    ]
    assert layer_of("f (workers/delivery/sender.py:3)") == "Relay"
    assert layer_of("f (<frozen importlib._bootstrap>:1)") == OTHER


async def test_a_busy_process_is_sampled_and_its_stacks_kept(tmp_path: Path):
    assert Profiles.available()
    # A process spending its time in the json module, its own layer `other`.
    busy = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        "import json, time\nend = time.time() + 30\n"
        "while time.time() < end: json.dumps({'k': list(range(200))})",
    )
    try:
        profiles = Profiles(tmp_path, "case")
        await profiles.start({"busy:worker": [busy.pid]})
        folded = tmp_path / "case-busy-worker.folded"
        # The sampling window (not a wait for something to happen): py-spy writes its
        # stacks when stopped.
        await asyncio.sleep(1.5)
        found = await profiles.stop()
    finally:
        busy.kill()
        await busy.wait()
    assert folded.exists()
    summary = found["busy:worker"]
    assert summary["samples"] >= 50  # 1.5 s at 100 Hz, allowing for a slow start
    assert max(summary["layers"], key=summary["layers"].get) == OTHER
    assert any("json" in frame for frame, _ in summary["frames"])


def test_each_process_s_cpu_per_message_is_shared_out_by_its_layers():
    case: Any = SimpleNamespace(
        profile={
            "ingress": {"samples": 10, "layers": {"Relay": 50.0, "aiohttp": 50.0}},
            "bot-worker": {"samples": 10, "layers": {"Relay": 100.0}},
            "receiver": {"samples": 0, "layers": {}},  # not sampled: left out
        },
        resources={
            "ingress": Resources(80.0, 1.0, 40.0, 1.2, 2.0),
            "bot-worker": Resources(80.0, 1.0, 40.0, 1.0, 2.0),
        },
    )
    assert layer_rows(case) == [
        {"layer": "Relay", "ingress": 0.6, "bot-worker": 1.0, "total": 1.6},
        {"layer": "aiohttp", "ingress": 0.6, "bot-worker": 0.0, "total": 0.6},
    ]
