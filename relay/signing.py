"""Standard Webhooks headers for a delivery, signed with the integration's `whsec_` secret."""

from __future__ import annotations

from datetime import datetime

from standardwebhooks import Webhook


def signature_headers(
    secrets: list[str], webhook_id: str, body: bytes, at: datetime
) -> dict[str, str]:
    """`webhook-id`, `webhook-timestamp` and `webhook-signature` (one `v1,` per secret).

    Several secrets are signed during a rotation's grace period, space-separated, so a
    receiver holding either secret can verify.
    """
    text = body.decode()
    signatures = " ".join(Webhook(secret).sign(webhook_id, at, text) for secret in secrets)
    return {
        "webhook-id": webhook_id,
        "webhook-timestamp": str(int(at.timestamp())),
        "webhook-signature": signatures,
    }
