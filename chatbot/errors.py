"""Every error of the project, in one place. Each is a `ChatbotError`: a problem a user can cause
and fix, whose message says what to do; the command line prints it as one line."""

import tomllib
from pathlib import Path
from typing import Any

from pydantic import ValidationError


class ChatbotError(Exception):
    """A problem with the user's input, settings or files, with a message that says what to do."""


class ModelNotFoundError(ChatbotError):
    """A model name or path that cannot be loaded from disk."""


class CorpusError(ChatbotError):
    """Dialogue data that cannot be read; the message names the file and line."""


class InvalidConversationId(ChatbotError):
    """A conversation id that is not a ``scope:key`` string."""


class InputRejected(ChatbotError):
    """A message the engine will not take; the text says why, in words fit for the user."""


class EngineBusy(ChatbotError):
    """Too much is waiting to take this message now; try again in a moment."""


class GeneratorBusy(EngineBusy):
    """The generator's queue is full (a kind of `EngineBusy`, so a face handles one case)."""


class GenerationFailed(ChatbotError):
    """The model raised while replying; the user's turn is stored and the engine is still usable."""


def settings_error_message(err: ValidationError, *, prefix: str = "") -> str:
    """One line per problem, each naming the setting (after ``prefix``, a table's ``name.``) and the bad value."""
    parts = []
    for e in err.errors():
        name = prefix + ".".join(str(p) for p in e["loc"]) if e["loc"] else prefix.rstrip(".") or "settings"
        if e["type"] == "extra_forbidden":
            parts.append(f"`{name}` is not a known setting")
        else:
            msg = e["msg"].replace("Input should be", "must be").replace("Value error, ", "")
            # A nested check already names its own setting and value.
            parts.append(msg if msg.startswith("`") else f"`{name}` {msg}, got {e.get('input')!r}")
    return "; ".join(parts)


def read_text(path: Path, what: str, *, name: str | None = None) -> str:
    """A text file's contents; a missing or unreadable file is a `ChatbotError` naming it
    (as ``name``, default the path; ``what`` says what it is)."""
    where = name or str(path)
    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ChatbotError(f"{where}: no such {what}") from None
    except (OSError, UnicodeDecodeError) as err:
        raise ChatbotError(f"{where}: cannot read ({err})") from None


def read_toml(path: Path, what: str) -> dict[str, Any]:
    """A TOML file's table; any problem is a `ChatbotError` naming the file (``what`` says what it is)."""
    text = read_text(path, what)
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as err:
        raise ChatbotError(f"{path}: not valid TOML ({err})") from None
