"""Errors a user can cause and fix; the command line prints them as one line."""

from pydantic import ValidationError


class ChatbotError(Exception):
    """A problem with the user's input, settings or files, with a message that says what to do."""


class ModelNotFoundError(ChatbotError):
    """A model name or path that cannot be loaded from disk."""


class CorpusError(ChatbotError):
    """Dialogue data that cannot be read; the message names the file and line."""


def settings_error_message(err: ValidationError) -> str:
    """One line per problem, each naming the setting and the bad value."""
    parts = []
    for e in err.errors():
        name = ".".join(str(p) for p in e["loc"]) or "settings"
        if e["type"] == "extra_forbidden":
            parts.append(f"`{name}` is not a known setting")
        else:
            msg = e["msg"].replace("Input should be", "must be").replace("Value error, ", "")
            parts.append(f"`{name}` {msg}, got {e.get('input')!r}")
    return "; ".join(parts)
