"""The HTTP face's settings: the ``[http]`` table of the settings file.

Light to import (pydantic only): the core finds it through the ``chatbot.sections`` entry
point while reading a settings file, without loading FastAPI.
"""

from __future__ import annotations

import ipaddress
from typing import Any

from pydantic import Field, SecretStr, field_validator

from chatbot.config import Section

__all__ = ["HttpSettings", "is_loopback"]


class HttpSettings(Section):
    """How ``bot.py serve`` listens and whom it answers; the engine's own settings are the core's."""

    name = "http"
    env_aliases = {"CHATBOT_API_KEYS": "api_keys"}

    host: str = Field("127.0.0.1", min_length=1)
    """Address to listen on. Anything but loopback needs `api_keys`: the server refuses to start without."""
    port: int = Field(8000, ge=0, le=65535)
    """Port to listen on (0: any free one, printed at start)."""
    api_keys: tuple[SecretStr, ...] = ()
    """Keys a client must send as ``Authorization: Bearer <key>`` (also ``CHATBOT_API_KEYS``, comma-separated);
    none: no key needed, loopback only. Never logged or printed."""
    model_name: str = Field("gpt2-chatbot", min_length=1, max_length=200)
    """The model id `/v1/models` lists and replies carry; any other id a client asks for is an error."""
    requests_per_minute: int = Field(120, ge=1, le=1_000_000)
    """Requests one key (or, without keys, one client address) may make a minute; more get 429 with Retry-After."""
    max_pending: int = Field(32, ge=1, le=10_000)
    """Replies being written or waiting, over all clients; beyond it new requests get 429 with Retry-After."""
    request_timeout: float = Field(60.0, gt=0, le=3600)
    """Seconds a request may wait and be answered in; past it, 504 (a stream ends with an error event)."""
    max_body_bytes: int = Field(1_000_000, ge=1024, le=100_000_000)
    """Largest request body; a larger one gets 413 before it is read."""
    max_messages: int = Field(64, ge=1, le=10_000)
    """Most messages in one chat request."""
    max_n: int = Field(4, ge=1, le=16)
    """Most replies (`n`) one stateless request may ask for."""
    cors_origins: tuple[str, ...] = ()
    """Web origins whose pages may call the API from a browser (``https://example.org``); none: closed."""
    shutdown_grace: float = Field(10.0, ge=0, le=600)
    """Seconds streams in progress get to finish after SIGTERM; new requests get 503 meanwhile."""

    @field_validator("api_keys", mode="after")
    @classmethod
    def _keys_not_blank(cls, value: tuple[SecretStr, ...]) -> tuple[SecretStr, ...]:
        for key in value:
            secret = key.get_secret_value()
            if len(secret) < 8 or secret != secret.strip():
                raise ValueError("each API key must be at least 8 characters, without spaces around it")
        return value

    @field_validator("cors_origins", mode="after")
    @classmethod
    def _origins(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        for origin in value:
            if origin != "*" and not origin.startswith(("http://", "https://")):
                raise ValueError(f"a CORS origin is a scheme and host (https://example.org) or *, got {origin!r}")
        return value

    def keys(self) -> frozenset[str]:
        return frozenset(k.get_secret_value() for k in self.api_keys)


def is_loopback(host: Any) -> bool:
    """Whether ``host`` only listens on this machine (``127.0.0.1``, ``::1``, ``localhost``)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(str(host)).is_loopback
    except ValueError:
        return False
