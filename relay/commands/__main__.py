"""`python -m relay.commands`: the `relay` command without its console script."""

from __future__ import annotations

import sys

from relay.commands.main import main

sys.exit(main())
