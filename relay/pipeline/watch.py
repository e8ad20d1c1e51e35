"""Watching a stage's partitions for a stall: the age of each partition's oldest message
not started yet (exported, and told to the peers through presence), a partition that stops
making progress, and the lane it waits on."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import structlog

from relay.broker import StageName
from relay.broker.presence import Presence
from relay.broker.topology import Topology
from relay.metrics import Metrics
from relay.pipeline.lanes import Lanes
from relay.pipeline.subscription import Subscription

log = structlog.get_logger(__name__)


class PartitionWatch:
    """Checks one stage worker's subscriptions; says once where a stuck lane waits."""

    def __init__(
        self,
        stage: StageName,
        topology: Topology,
        own_count: bool,
        metrics: Metrics,
        presence: Presence,
        lanes: Lanes[Any],
        stall_seconds: float,
    ) -> None:
        self._stage = stage
        self._topology = topology
        # Whether the worker consumes the service's own partition count's queues.
        self._own_count = own_count
        self._metrics = metrics
        self._presence = presence
        self._lanes = lanes
        self._stall_seconds = stall_seconds
        self._reported_stuck: set[str] = set()  # lanes said to be stuck, until they move

    def stalled(self, subscriptions: Mapping[int, Subscription]) -> dict[int, float]:
        """Partitions whose oldest message held unstarted waited longer than the stall
        limit: the seconds it has waited, by partition."""
        ages = {n: sub.oldest_unstarted() for n, sub in subscriptions.items()}
        return {n: round(age, 1) for n, age in ages.items() if age > self._stall_seconds}

    def check(self, subscriptions: Mapping[int, Subscription], stopping: bool) -> None:
        """Export each partition's oldest unstarted message; say when one stalls, or when
        messages wait on a subscription that is not being handed over."""
        ages: dict[str, float] = {}
        for partition, subscription in subscriptions.items():
            age = subscription.oldest_unstarted()
            if subscription.active and subscription.is_open and not subscription.holding:
                ages[self._topology.queue(self._stage, partition)] = round(age, 1)
            self._metrics.oldest_unstarted.labels(self._stage, self.label(partition)).set(age)
            if age > self._stall_seconds:
                log.error("partition_stalled", stage=self._stage, partition=partition, age=age)
            if subscription.held and not subscription.holding and not stopping:
                log.error("messages_held_without_hand_off", partition=partition)
        self._presence.report(ages)
        self._report_stuck_lanes()

    def held(self, count: int) -> None:
        """Report how many partitions this worker is the active consumer of; only for the
        service's own count (a retiring count's worker would overwrite it)."""
        if self._own_count:
            self._metrics.partitions_held.labels(self._stage).set(count)

    def label(self, partition: int) -> str:
        """A partition as metrics name it: `3`, or `of16.3` for another count's than the
        service's."""
        return str(partition) if self._own_count else self._topology.routing_key(partition)

    def _report_stuck_lanes(self) -> None:
        """Say once where each lane stuck past the stall limit waits: a stall's cause."""
        stuck = self._lanes.stuck(self._stall_seconds)
        for key in stuck.keys() - self._reported_stuck:
            log.error("lane_stuck", stage=self._stage, lane=key, awaiting=stuck[key])
        self._reported_stuck = set(stuck)
