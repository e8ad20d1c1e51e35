"""The stages between the ingress and the delivery.

A `StageWorker` (`stage`) consumes a stage's partitions in order, built from parts: a
`PartitionSet` (`partitions`, `subscriber`, `subscription`, `watch`, `background`) that
subscribes, shares and hands over partitions; `Lanes` (`lanes`), one per conversation; a
`Handling` (`handling`) that takes a message from its lane to its settling, keeping a
conversation's order while a message waits (`parking`, `adoption`, `waiting`, `delays`);
and a `Settler` (`settle`), the one place a verdict becomes broker actions. Each stage is a
handler behind `handler.StageHandler` (the bot and delivery workers, in `workers/`): the
pipeline calls the handler it is given and never imports `workers`. Responses go out
through `replies`, what a crash left pending through `outbox`, and dead letters are listed
and replayed by `dlq`.

How a delivery travels (by function name):

1. `Subscriber._subscribe` consumes the partition queue; the broker's delivery calls the
   stage worker's intake, `StageWorker._on_delivery` (held with `Subscription.held` during
   a hand-off or a stop, returned when the channel closes).
2. `StageWorker._take` reads the envelope (`relay.pipeline.handler.parse`) and
   `Lanes.submit`s it under its conversation's key: one lane per conversation, in arrival
   order.
3. In its lane, `Handling.process` -> `Handling._handle`: a stale delivery is skipped; one
   that is not an envelope is dead (`Handling._dead_unread`); otherwise
   `Handling._verdict`:
   - `Adoption.recall`, on meeting the conversation, adopts the parking the store shows
     (`StageHandler.unfinished`); if that fails, `Adoption.unrecalled` makes it wait;
   - a message parked behind its conversation's head (`Parking.wait_behind`) waits in
     memory when its turn is near (`Handling._wait_in_memory`, `WaitingRoom.hold`, back
     through `StageWorker._resume` into its lane) or in a delay queue
     (`Adoption.parked_for`);
   - any other goes to the handler: `StageHandler.decide` returns a `Verdict`.
4. `Settler.settle` carries the verdict out: `Settler._forward` publishes to a delay or
   dead-letter queue with a confirm, the message is acked (`quietly`), and
   `Settler._track_parking` moves the conversation's parking on, which (unless the message
   was only sent away to wait behind its parked head) releases what waits in memory behind
   it (`WaitingRoom.release`).

A partition handed over (`PartitionSet.rebalance` -> `PartitionSet._hand_off`) or a worker
stopping (`StageWorker.stop`) takes back what was not started (`StageWorker._withdraw`),
finishes what was, and gives the rest back (`PartitionSet._give_back`, renewing worn
messages: `renewal.renew_worn`).
"""
