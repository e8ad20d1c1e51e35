"""The delivery worker as a service: the stage worker, and beside it the operations
dispatcher (`workers.delivery.operations`) with an HTTP pool of its own; its dead-letter
keeper tells of the responses the broker dead-lettered (`BrokerDeaths`)."""

from __future__ import annotations

from relay.broker import Broker, Topology
from relay.broker.operations import OperationsEvents
from relay.metrics import Metrics
from relay.pipeline.stage import StageWorker
from relay.service.lifecycle import Closer, Context, MakeWorker, worker_context
from relay.settings import Settings
from relay.store import Store
from relay.wire import OutboundEnvelope
from workers.delivery.operations import OperationsDispatcher
from workers.delivery.sender import Sender
from workers.delivery.telling import BrokerDeaths
from workers.delivery.worker import delivery_worker


def sender_of(settings: Settings) -> Sender:
    """A guarded, pooled sender with the settings' timeouts."""
    return Sender(
        settings.allowed_endpoint_networks,
        settings.https_only,
        settings.delivery_connect_timeout,
        settings.delivery_timeout,
    )


def delivery_worker_context(settings: Settings) -> Context:
    """A cleanup context that runs a delivery worker for as long as the application runs."""

    def build(store: Store, broker: Broker, metrics: Metrics) -> tuple[MakeWorker, Closer]:
        sender, operations_sender = sender_of(settings), sender_of(settings)
        dispatcher = OperationsDispatcher(settings, store, broker, operations_sender, metrics)
        dispatcher.start()

        def make(topology: Topology) -> StageWorker[OutboundEnvelope]:
            return delivery_worker(settings, store, broker, sender, metrics, topology)

        async def close() -> None:
            await dispatcher.stop()
            await operations_sender.close()
            await sender.close()

        return make, close

    def telling(store: Store, broker: Broker) -> BrokerDeaths:
        return BrokerDeaths(store, OperationsEvents(broker))

    return worker_context(settings, "delivery", build, telling)
