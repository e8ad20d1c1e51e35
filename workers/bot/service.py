"""The bot worker as a service."""

from __future__ import annotations

from relay.broker import Broker, Topology
from relay.metrics import Metrics
from relay.pipeline.stage import StageWorker
from relay.service.lifecycle import Closer, Context, MakeWorker, worker_context
from relay.settings import Settings
from relay.store import Store
from relay.wire import InboundEnvelope
from workers.bot.adapters import load_adapter
from workers.bot.worker import bot_worker


def bot_worker_context(settings: Settings) -> Context:
    """A cleanup context that runs a bot worker for as long as the application runs."""

    def build(store: Store, broker: Broker, metrics: Metrics) -> tuple[MakeWorker, Closer]:
        adapter = load_adapter(settings)

        def make(topology: Topology) -> StageWorker[InboundEnvelope]:
            return bot_worker(settings, store, broker, adapter, metrics, topology)

        return make, adapter.close

    return worker_context(settings, "bot", build)
