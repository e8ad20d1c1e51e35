"""The Bot Framework wire: the Activity and the objects in it, in one place.

What the bot worker sends a Bot Framework bot (`workers.bot.adapters.botframework`) and what
the bot sends back to the relay's connector (`relay.ingress.connector`) are the same
objects: both import them from here.
"""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field

from relay.wire import Timestamp


class _Wire(BaseModel):
    # Bot Framework objects carry many more fields than Relay reads: keep them all.
    model_config = ConfigDict(extra="allow", validate_by_name=True, validate_by_alias=True)


class ChannelAccount(_Wire):
    """A user or bot in an Activity (`from`, `recipient`)."""

    id: str
    name: str | None = None


class ConversationAccount(_Wire):
    """The conversation of an Activity."""

    id: str


class CardAction(_Wire):
    """A button (of a card or of suggested actions)."""

    type: str
    title: str | None = None
    value: Any = None
    text: str | None = None
    displayText: str | None = None


class CardImage(_Wire):
    """An image of a card."""

    url: str


class HeroCard(_Wire):
    """The content of a hero card attachment."""

    title: str | None = None
    subtitle: str | None = None
    text: str | None = None
    images: list[CardImage] = Field(default_factory=list)
    buttons: list[CardAction] = Field(default_factory=list)


class Attachment(_Wire):
    """A file, picture or card attached to a message."""

    contentType: str
    contentUrl: str | None = None
    content: Any = None
    name: str | None = None


class SuggestedActions(_Wire):
    """Buttons offered under a message."""

    actions: list[CardAction] = Field(default_factory=list)


def _no_number(value: Any) -> Any:
    # pydantic would read a number as unix seconds; the Activity schema says an ISO 8601 string.
    if isinstance(value, int | float):
        raise ValueError("must be an ISO 8601 date-time string")
    return value


class Activity(_Wire):
    """A Bot Framework Activity: what the relay sends the bot, and what the bot sends back."""

    type: str
    id: str | None = None
    timestamp: Annotated[Timestamp | None, BeforeValidator(_no_number)] = None
    channelId: str | None = None
    serviceUrl: str | None = None
    from_: ChannelAccount | None = Field(default=None, alias="from")
    recipient: ChannelAccount | None = None
    conversation: ConversationAccount | None = None
    replyToId: str | None = None
    text: str | None = None
    textFormat: str | None = None
    attachments: list[Attachment] = Field(default_factory=list)
    suggestedActions: SuggestedActions | None = None
    channelData: Any = None

    def wire(self) -> dict[str, Any]:
        """The JSON object sent on the wire (camelCase, `from`; no nulls, no empty defaults)."""
        return self.model_dump(mode="json", by_alias=True, exclude_none=True, exclude_defaults=True)


class ResourceResponse(_Wire):
    """The answer to an activity sent: the id of what was created."""

    id: str
