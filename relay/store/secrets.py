"""Secrets at rest: the signing and bot secrets the store keeps, sealed with Fernet keys
(`RELAY_SECRET_KEYS`).

The first key seals, every key opens (`MultiFernet`), so keys can rotate: add the new key
first, run `relay secrets reencrypt` (every stored secret sealed again with it), then
remove the old one. A sealed value starts with `MARK`; a value without it is plain text
(written before keys were set, or with none) and reads as it is. With no keys, secrets are
stored as they are. An error names whose secret it is, never the secret or a key.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from cryptography.fernet import Fernet, InvalidToken, MultiFernet
from pydantic import SecretStr

from relay.store.driver import StoreError

# Fernet tokens are URL-safe base64 and secrets are `whsec_…` or URL-safe base64: a colon
# tells a sealed value from a plain one.
MARK = "fernet:"


class SecretUnreadable(StoreError):
    """A stored secret that no key opens (the key that sealed it was removed), or a sealed
    one read with no keys at all."""


def new_key() -> str:
    """A fresh Fernet key (`relay secrets new-key`)."""
    return Fernet.generate_key().decode()


@dataclass(frozen=True)
class SecretBox:
    """Seals secrets before the store writes them and opens them as it reads; with no keys,
    both are the identity."""

    fernet: MultiFernet | None = None

    @classmethod
    def of(cls, keys: Sequence[SecretStr | str]) -> SecretBox:
        """The box of these keys, the first sealing; ValueError for a key that is not one
        (by its position, never its value)."""
        fernets = []
        for position, key in enumerate(keys, start=1):
            text = key.get_secret_value() if isinstance(key, SecretStr) else key
            try:
                fernets.append(Fernet(text.strip()))
            except ValueError:
                raise ValueError(
                    f"key {position} is not a Fernet key (32 URL-safe base64-encoded bytes;"
                    " `relay secrets new-key` makes one)"
                ) from None
        return cls(MultiFernet(fernets) if fernets else None)

    @property
    def encrypts(self) -> bool:
        """Whether secrets are sealed (keys are set)."""
        return self.fernet is not None

    def seal(self, secret: str) -> str:
        """What to store for `secret`: sealed with the first key, or itself with no keys."""
        if self.fernet is None:
            return secret
        return MARK + self.fernet.encrypt(secret.encode()).decode()

    def open(self, stored: str, whose: str) -> str:
        """The secret a stored value holds; SecretUnreadable (naming `whose`, e.g. "the
        signing secret of integration X") if no key opens it."""
        if not stored.startswith(MARK):
            return stored
        fernet = self._keys(whose)
        try:
            return fernet.decrypt(stored.removeprefix(MARK).encode()).decode()
        except InvalidToken:
            raise _unreadable(whose) from None

    def reseal(self, stored: str, whose: str) -> str:
        """A stored value sealed again with the first key (a plain one sealed for the first
        time); SecretUnreadable as `open`."""
        if not stored.startswith(MARK):
            return self.seal(stored)
        fernet = self._keys(whose)
        try:
            return MARK + fernet.rotate(stored.removeprefix(MARK).encode()).decode()
        except InvalidToken:
            raise _unreadable(whose) from None

    def _keys(self, whose: str) -> MultiFernet:
        if self.fernet is None:
            raise SecretUnreadable(f"{whose} is encrypted, and RELAY_SECRET_KEYS is empty")
        return self.fernet


def _unreadable(whose: str) -> SecretUnreadable:
    return SecretUnreadable(
        f"{whose} cannot be decrypted: no key in RELAY_SECRET_KEYS opens it"
        " (was the key that encrypted it removed?)"
    )
