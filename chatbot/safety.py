"""Input sanitizing: what a user's text goes through before it reaches memory or a prompt.

The engine calls `sanitize_input` first thing, so every face (terminal, LangChain,
Discord) gets the same treatment and nothing unclean is ever stored.
"""

from __future__ import annotations

import unicodedata

from .errors import ChatbotError

__all__ = ["InputRejected", "sanitize_input"]


class InputRejected(ChatbotError):
    """A message the engine will not take; the text says why, in words fit for the user."""


def _keep(ch: str) -> bool:
    if ch in "\n\t":
        return True
    # Cc: control characters (NUL, ESC, DEL, C1); Cf: invisible format characters
    # (zero-width spaces, bidi overrides) that can hide text from a reader; Cs: lone
    # surrogates, which cannot be stored as UTF-8.
    return unicodedata.category(ch) not in ("Cc", "Cf", "Cs")


def sanitize_input(text: object, *, max_chars: int) -> str:
    """Return the user's text normalised (NFKC) and without control or invisible characters.

    Raises `InputRejected` for text that is not a string, is empty once cleaned, or is
    longer than ``max_chars`` characters: the user is told rather than the message
    silently cut.
    """
    if not isinstance(text, str):
        raise InputRejected(f"a message must be text, got {type(text).__name__}")
    if len(text) > 4 * max_chars:
        # Checked before normalising too, so a huge message costs nothing to refuse.
        raise InputRejected(f"that message is {len(text):,} characters long; the limit is {max_chars:,}")
    cleaned = "".join(ch for ch in unicodedata.normalize("NFKC", text) if _keep(ch)).strip()
    if not cleaned:
        raise InputRejected("that message is empty")
    if len(cleaned) > max_chars:
        raise InputRejected(f"that message is {len(cleaned):,} characters long; the limit is {max_chars:,}")
    return cleaned
