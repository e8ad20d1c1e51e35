"""The one error of the admin operations: what cannot be carried out, in words for people.

The CLI prints it (`error: …`, exit 1); the admin API answers it as a 4xx of its choosing.
"""

from __future__ import annotations


class AdminError(Exception):
    """An operation that cannot be carried out; the message is shown to the user."""
