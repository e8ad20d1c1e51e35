"""RabbitMQ: topology, partitioning and the confirming publisher."""

from relay.broker.client import Broker, BrokerUnavailable
from relay.broker.errors import BROKER_ERRORS, CONNECTION_ERRORS
from relay.broker.topology import (
    STAGES,
    StageName,
    Topology,
    declare,
    partition_of,
    topology_of,
)

__all__ = [
    "BROKER_ERRORS",
    "CONNECTION_ERRORS",
    "STAGES",
    "Broker",
    "BrokerUnavailable",
    "StageName",
    "Topology",
    "declare",
    "partition_of",
    "topology_of",
]
