"""Administration: what an operator does to a running relay, whichever way they ask.

Three homes, one job each:

- `relay.admin` (here): the operations themselves, knowing neither HTTP nor argparse:
  integrations and tokens (`integrations`), the bot an integration names (`bots`), changing
  its bot and delivery options (`changes`), the response endpoint's check (`endpoints`),
  partition counts in use and retiring one (`partitions`), sending an integration's
  given-up responses again (`recovery`), and pruning under the store's lease (`retention`,
  also run by the workers' janitor).
- `relay.ingress.admin`: the admin API under `/admin/v1`, which parses a request, calls in
  here (or the store, or `relay.pipeline.dlq`) and answers through `relay.views`.
- `relay.commands`: the `relay` CLI, which parses arguments and calls the same operations.

The wire models both show are in `relay.wire.admin`, with every other wire model.
"""

from __future__ import annotations

from relay.admin.bots import changed_bot, check_bot
from relay.admin.changes import (
    UNCHANGED,
    Settled,
    Unchanged,
    apply_change,
    bot_choice,
    bot_given,
    check_delivery,
    delivery_given,
    delivery_options,
    settle_change,
)
from relay.admin.endpoints import check_endpoint, verify_endpoint
from relay.admin.errors import AdminError
from relay.admin.integrations import (
    Rotated,
    create_integration,
    create_token,
    disable_integration,
    rotate_secret,
)

__all__ = [
    "UNCHANGED",
    "AdminError",
    "Rotated",
    "Settled",
    "Unchanged",
    "apply_change",
    "bot_choice",
    "bot_given",
    "changed_bot",
    "check_bot",
    "check_delivery",
    "check_endpoint",
    "create_integration",
    "create_token",
    "delivery_given",
    "delivery_options",
    "disable_integration",
    "rotate_secret",
    "settle_change",
    "verify_endpoint",
]
