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
from workers.bot.bots import Bots
from workers.bot.worker import BotTurns


def bot_worker_context(settings: Settings) -> Context:
    """A cleanup context that runs a bot worker for as long as the application runs."""

    def build(store: Store, broker: Broker, metrics: Metrics) -> tuple[MakeWorker, Closer]:
        bots = Bots(settings, store, load_adapter(settings))

        def make(topology: Topology) -> StageWorker[InboundEnvelope]:
            return StageWorker(
                BotTurns(settings, store, broker, bots, metrics),
                broker,
                metrics,
                settings.bot_concurrency,
                settings,
                topology,
            )

        return make, bots.close

    return worker_context(settings, "bot", build)
