"""The delivery worker as a service."""

from __future__ import annotations

from relay.broker import Broker, Topology
from relay.metrics import Metrics
from relay.pipeline.stage import StageWorker
from relay.service.lifecycle import Closer, Context, MakeWorker, worker_context
from relay.settings import Settings
from relay.store import Store
from relay.wire import OutboundEnvelope
from workers.delivery.sender import Sender
from workers.delivery.worker import delivery_worker


def delivery_worker_context(settings: Settings) -> Context:
    """A cleanup context that runs a delivery worker for as long as the application runs."""

    def build(store: Store, broker: Broker, metrics: Metrics) -> tuple[MakeWorker, Closer]:
        sender = Sender(
            settings.allowed_endpoint_networks,
            settings.https_only,
            settings.delivery_connect_timeout,
            settings.delivery_timeout,
        )

        def make(topology: Topology) -> StageWorker[OutboundEnvelope]:
            return delivery_worker(settings, store, broker, sender, metrics, topology)

        return make, sender.close

    return worker_context(settings, "delivery", build)
