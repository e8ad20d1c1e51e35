"""The stages between the ingress and the delivery: a `StageWorker` consumes a stage's
partitions in order (`stage`, `partitions`, `subscription`, `lanes`), keeps a conversation's
order while a message waits (`parking`, `adoption`, `delays`) and settles each message in
one place (`settle`); responses go out through `replies`, what a crash left pending through
`outbox`, and dead letters are listed and replayed by `dlq`."""
