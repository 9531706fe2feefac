"""A conversation memory and response engine for GPT-2-family models."""

from .errors import ChatbotError, CorpusError, ModelNotFoundError

__all__ = ["ChatbotError", "CorpusError", "ModelNotFoundError"]
__version__ = "0.1.0"
