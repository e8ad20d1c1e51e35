"""The stamp that places a message in the order of visibility (`relay.store.sql.history`
says why it is what it is), set by the statements that make a row visible: an incoming
message when it is marked queued or handled, a response when it is inserted."""

from __future__ import annotations


def stamp_set(dialect: str) -> str:
    """The SET clause stamping rows an UPDATE makes visible (rows stamped before keep it)."""
    if dialect == "postgresql":
        return (
            "txid = COALESCE(txid, pg_current_xact_id()::text::bigint),"
            " item = COALESCE(item, nextval('message_items'))"
        )
    return "txid = COALESCE(txid, (SELECT COALESCE(MAX(txid), 0) + 1 FROM messages))"


def stamp_values(dialect: str) -> tuple[str, str]:
    """The columns and values stamping rows an INSERT writes visible."""
    if dialect == "postgresql":
        return "txid, item", "pg_current_xact_id()::text::bigint, nextval('message_items')"
    return "txid", "(SELECT COALESCE(MAX(txid), 0) + 1 FROM messages)"
