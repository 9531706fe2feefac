"""Errors a user can cause and fix; the command line prints them as one line."""


class ChatbotError(Exception):
    """A problem with the user's input, settings or files, with a message that says what to do."""


class ModelNotFoundError(ChatbotError):
    """A model name or path that cannot be loaded from disk."""


class CorpusError(ChatbotError):
    """Dialogue data that cannot be read; the message names the file and line."""
