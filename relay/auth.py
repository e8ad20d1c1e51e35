"""Tokens: made, hashed and checked here; only hashes reach the store."""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets

from relay.wire.tokens import ConversationScope

TOKEN_PREFIX = "rly_"
REPLY_PREFIX = "rlyr_"
# Conversation tokens, by scope: the prefix says where a token is looked up (an integration
# token is never looked for among them, nor one of them among an integration's).
READ_PREFIX = "rlyv_"
CONVERSE_PREFIX = "rlyc_"
CONVERSATION_PREFIXES: dict[ConversationScope, str] = {
    "read": READ_PREFIX,
    "converse": CONVERSE_PREFIX,
}


def new_token() -> str:
    """A fresh bearer token (256 random bits)."""
    return TOKEN_PREFIX + secrets.token_urlsafe(32)


def new_conversation_token(scope: ConversationScope) -> str:
    """A fresh conversation token of `scope` (256 random bits, like every bearer token)."""
    return CONVERSATION_PREFIXES[scope] + secrets.token_urlsafe(32)


def is_conversation_token(token: str) -> bool:
    """Whether `token` has the form of a conversation token (of either scope)."""
    return token.startswith((READ_PREFIX, CONVERSE_PREFIX))


def new_signing_secret() -> str:
    """A Standard Webhooks secret: `whsec_` and base64 of 24 random bytes."""
    return "whsec_" + base64.b64encode(secrets.token_bytes(24)).decode()


def hash_token(token: str) -> str:
    """SHA-256 of the token; tokens carry 256 random bits, so no slow hash is needed.

    Whatever a caller sends hashes (a lone surrogate too): it then matches no token."""
    return hashlib.sha256(token.encode(errors="surrogatepass")).hexdigest()


def bearer_token(header: str | None) -> str | None:
    """The token of an `Authorization: Bearer <token>` header (scheme case-insensitive)."""
    if not header:
        return None
    scheme, _, token = header.strip().partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token or " " in token:
        return None
    return token


def token_matches(token: str | None, hashes: list[str]) -> bool:
    """Constant-time check of a token against every active hash (no early exit)."""
    candidate = hash_token(token or "")
    found = False
    for stored in hashes:
        found |= hmac.compare_digest(candidate, stored)
    return found and bool(token)


def reply_token(secret: str, conversation_id: str, expires: int) -> str:
    """A token that lets a bot post into one conversation until `expires` (unix seconds).

    Made without a store write: an HMAC over the conversation and expiry, keyed by the
    integration's bot secret, so every relay process can check it.
    """
    return _scoped_token(REPLY_PREFIX, secret, conversation_id, expires)


def reply_token_valid(secret: str, token: str, conversation_id: str, now: float) -> bool:
    """True if `token` is a live reply token for this conversation."""
    return _scoped_valid(REPLY_PREFIX, secret, token, conversation_id, now)


def _scoped_token(prefix: str, secret: str, conversation_id: str, expires: int) -> str:
    claim = base64.urlsafe_b64encode(f"{conversation_id}|{expires}".encode()).decode()
    return f"{prefix}{claim}.{_mac(secret, claim)}"


def _scoped_valid(prefix: str, secret: str, token: str, conversation_id: str, now: float) -> bool:
    if not token.isascii():
        return False
    claim, _, mac = token.removeprefix(prefix).partition(".")
    if not hmac.compare_digest(mac, _mac(secret, claim)):
        return False
    try:
        conversation, _, expires = base64.urlsafe_b64decode(claim).decode().rpartition("|")
        return conversation == conversation_id and now < int(expires)
    except ValueError:
        return False


def _mac(secret: str, claim: str) -> str:
    digest = hmac.new(secret.encode(), claim.encode(), hashlib.sha256).digest()
    return base64.urlsafe_b64encode(digest).decode().rstrip("=")
