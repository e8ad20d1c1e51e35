"""The `relay` command line: it parses arguments and dispatches, nothing more.

`main` builds the parser from the command groups, each a module here that adds its
commands and runs them by calling what does the work elsewhere:

- `roles`: the services (`ingress`, `bot-worker`, `delivery-worker`, `run`);
- `sink`: a local response endpoint for demos and tests (`relay sink`);
- `integrations`, `tokens`, `secrets`: what `relay.admin` and the store do for operators;
- `dlq`, `deliveries`, `queues`, `partitions`, `prune`: looking at and recovering traffic.

What every command shares is written once: `common` (the store and the broker a command
opens, the options every group uses) and `output` (JSON and tables).
"""
