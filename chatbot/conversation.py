"""Turns and conversation ids.

A conversation id is a scope: ``discord:channel:42``, ``discord:dm:7``,
``langchain:session:abc``, ``cli:local``. It names whose history a turn belongs to, so
one history is never shared by everyone.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass
from typing import Any, Literal

from .errors import ChatbotError

Role = Literal["user", "bot"]
ROLES = ("user", "bot")
MAX_CONVERSATION_ID_CHARS = 200
MAX_AUTHOR_CHARS = 100

# scope ":" rest, where rest is printable ASCII without spaces; anything else (control
# characters, spaces, quotes, slashes) is refused rather than silently rewritten, so two
# different inputs can never end up in the same conversation.
_CONVERSATION_ID = re.compile(r"[a-z][a-z0-9_-]*:[A-Za-z0-9_.:@#+=-]+")


class InvalidConversationId(ChatbotError):
    """A conversation id that is not a ``scope:key`` string."""


def check_conversation_id(conversation_id: object) -> str:
    """Return the id unchanged if it is valid, else raise `InvalidConversationId` saying why."""
    if not isinstance(conversation_id, str):
        raise InvalidConversationId(f"conversation id must be a string, got {type(conversation_id).__name__}")
    if len(conversation_id) > MAX_CONVERSATION_ID_CHARS:
        raise InvalidConversationId(
            f"conversation id must be at most {MAX_CONVERSATION_ID_CHARS} characters, got {len(conversation_id)}"
        )
    if not _CONVERSATION_ID.fullmatch(conversation_id):
        raise InvalidConversationId(
            f"conversation id must look like 'scope:key' (e.g. 'discord:channel:42', 'cli:local') using letters, "
            f"digits and _.:@#+=-, got {conversation_id!r}"
        )
    return conversation_id


def check_author(author: object) -> str:
    if not isinstance(author, str) or not author.strip():
        raise ChatbotError(f"author must be a non-empty string, got {author!r}")
    if len(author) > MAX_AUTHOR_CHARS:
        raise ChatbotError(f"author must be at most {MAX_AUTHOR_CHARS} characters, got {len(author)}")
    return author


@dataclass(frozen=True)
class Turn:
    """One stored message of a conversation."""

    conversation_id: str
    author: str
    role: Role
    text: str
    created_at: float
    id: int

    def to_json(self) -> dict[str, Any]:
        return asdict(self)
