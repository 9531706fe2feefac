"""The bundled chit-chat corpus (the `chitchat-dataset` package: 7,168 conversations, MIT licence),
read once here for everything that uses it: training (`chatbot.tools.training`) and the response
bank (`chatbot.response_bank`)."""

from __future__ import annotations

from .errors import CorpusError

__all__ = ["chitchat_conversations"]


def chitchat_conversations() -> list[tuple[str, list[tuple[str, str]]]]:
    """Every conversation, by its key in sorted order, as (sender id, message text) pairs: a
    message's parts, sent one after another, are joined with spaces."""
    try:
        import chitchat_dataset
    except ImportError as err:  # pragma: no cover - declared dependency
        raise CorpusError("the `chitchat-dataset` package is not installed; run the README's set-up") from err
    data = chitchat_dataset.Dataset()
    conversations = []
    for key in sorted(data):
        messages = []
        for message in data[key]["messages"]:
            sender = message[0].get("sender", "") if message else ""
            messages.append((sender, " ".join(str(u.get("text", "")) for u in message)))
        conversations.append((key, messages))
    return conversations
