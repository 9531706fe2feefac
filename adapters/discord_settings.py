"""The Discord face's settings: the ``[discord]`` table of the settings file.

Light to import (pydantic only): the core finds it through the ``chatbot.sections`` entry
point while reading a settings file, without loading discord.py.
"""

from __future__ import annotations

from typing import Any

from pydantic import Field, SecretStr, field_validator

from chatbot.config import Section

__all__ = ["DiscordSettings", "NO_TOKEN"]

NO_TOKEN = ("no Discord token: set DISCORD_TOKEN in the environment or `token` in the [discord] table of the "
            "settings file (the README's Discord section shows how to get one)")


class DiscordSettings(Section):
    """How the bot behaves on Discord; the engine's own settings (persona, memory, safety) are the core's."""

    name = "discord"
    env_aliases = {"DISCORD_TOKEN": "token"}

    token: SecretStr | None = None
    """Bot token (also read from ``DISCORD_TOKEN``); never logged or printed."""
    channels: tuple[int, ...] = ()
    """Channel ids where the bot answers every message without being mentioned (threads in them too)."""
    stream: bool = True
    """Show replies as they are generated, by editing the bot's message; off sends each reply once, finished."""
    edit_interval: float = Field(1.2, ge=0.2, le=60)
    """Seconds between two edits or sends of a streaming reply in one channel (Discord limits edits per channel)."""
    cooldown_messages: int = Field(5, ge=1, le=1000)
    """Messages one user may send the bot per `cooldown_seconds`; more get a "slow down" note."""
    cooldown_seconds: float = Field(30.0, gt=0, le=86_400)
    """Length of the per-user cooldown window."""
    max_pending: int = Field(32, ge=1, le=10_000)
    """Replies being written or waiting, over all channels; beyond it new messages get the busy reply."""
    reply_timeout: float = Field(90.0, gt=0, le=3600)
    """Seconds a message may wait and be answered in; after that the reply stops with a note."""
    busy_reply: str = Field("I'm still answering earlier messages here. Try again in a moment.",
                            min_length=1, max_length=500)
    """Sent when a channel's queue (the core's `max_waiting_per_conversation`) or `max_pending` is full."""
    cooldown_reply: str = Field("You're sending messages faster than I can answer. Slow down a little.",
                                min_length=1, max_length=500)
    """Sent (once per cooldown window) to a user over the cooldown; the seconds to wait are added."""
    sharded: bool = False
    """Run as an ``AutoShardedBot`` (for bots in very many servers); one model serves every shard."""
    sync_commands: bool = True
    """Register the slash commands with Discord at start-up (turn off once they are registered)."""
    shutdown_grace: float = Field(10.0, ge=0, le=600)
    """Seconds replies in progress get to finish at shutdown before they are cancelled."""

    @field_validator("token", mode="before")
    @classmethod
    def _empty_is_none(cls, value: Any) -> Any:
        return None if isinstance(value, str) and not value.strip() else value
