"""Settings: typed, in one place, read from a TOML file and the environment.

Precedence, lowest first: the defaults below, the TOML file, then environment variables
(``CHATBOT_<FIELD>``, ``CHATBOT_DECODING__<FIELD>`` for a decoding override, and
``DISCORD_TOKEN``). Every key is checked: a misspelt key in the file or a misspelt
``CHATBOT_`` variable is an error that names it, never a silently ignored default.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal, Mapping

from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, field_validator

from .decoding import PRESETS, DecodingOverrides, DecodingSettings, compose
from .errors import ChatbotError, read_toml, settings_error_message
from .memory import MAX_TURN_CHARS
from .prompting import PROMPTS_DIR

__all__ = ["Settings", "ENV_PREFIX", "DEFAULT_CONFIG_FILE"]

ENV_PREFIX = "CHATBOT_"
DEFAULT_CONFIG_FILE = "chatbot.toml"
"""Read from the working directory when no file is named."""


class Settings(BaseModel):
    """Everything the engine and its faces can be told. Unknown keys are errors."""

    model_config = ConfigDict(extra="forbid", frozen=True, validate_default=True)

    model: str | None = None
    """Model directory, or a hub name already in the local cache; empty means the shipped model."""
    device: str = "auto"
    """``auto`` (CUDA, then MPS, then CPU), ``cpu``, ``cuda``, ``cuda:1`` or ``mps``."""
    allow_download: bool = False
    """Fetch a hub model that is not cached (needs network)."""
    memory_path: str = "chatbot.sqlite3"
    """SQLite file that holds every conversation (its folder must exist); ``:memory:`` keeps them in
    this process only; a ``scheme://`` URL names another registered store (`memory.STORES`)."""
    persona: str = "friendly"
    """Persona used by conversations that have not chosen one (a file name in ``prompts_dir``)."""
    prompts_dir: Path = PROMPTS_DIR
    """Folder of persona files."""
    preset: str | None = None
    """Decoding preset for conversations that have not chosen one; empty means the persona's own."""
    decoding: DecodingOverrides = Field(default_factory=DecodingOverrides)  # type: ignore[valid-type]
    """Decoding settings that override the preset, e.g. ``{temperature = 0.6, max_new_tokens = 60}``."""
    window_chunk: int = Field(8, ge=1, le=256)
    """Old turns leave the window this many at a time, so the prompt's prefix stays stable between replies."""
    max_history_turns: int = Field(256, ge=1, le=10_000)
    """Newest turns read from memory to build a window (the window then keeps those that fit)."""
    max_input_chars: int = Field(2000, ge=1, le=MAX_TURN_CHARS)
    """Longest message accepted, in characters; longer ones are refused with a message saying so."""
    max_waiting_per_conversation: int = Field(8, ge=1, le=1000)
    """Messages that may queue behind a conversation's current reply before new ones are turned away."""
    max_batch: int = Field(1, ge=1, le=256)
    """Replies decoded together on the model (continuous batching, with each conversation's prompt prefix
    reused between turns); 1 answers them one at a time. See `python bot.py bench`. The batch's keys and
    values are allocated at start: `max_batch` x the model's context x its layers x 2 x its width, in the
    model's precision (GPT-2 124M in float32: about 85 MB per reply), plus a row of the model's context
    (75 MB) for each of up to four prompts being read at once; on a CPU a GPT-2 model also keeps a
    transposed copy of its layers' weights (about 340 MB for GPT-2 124M)."""
    prefix_cache_mb: int = Field(512, ge=0, le=1_000_000)
    """Memory for reusable prompt prefixes when `max_batch` > 1; the least recently used go first."""
    prefill_chunk: int = Field(256, ge=1, le=65536)
    """Prompt tokens read between two decode steps when `max_batch` > 1: larger starts new replies
    sooner, smaller keeps the replies already under way flowing while a long prompt is read."""
    expire_after_days: float | None = Field(None, gt=0)
    """Delete turns older than this many days (checked at start and hourly); empty keeps everything."""
    max_input_tokens: int = Field(512, ge=1, le=100_000)
    """Longest message accepted, in the model's tokens; longer ones are refused with a message saying so."""
    abusive_input: Literal["refuse", "pass"] = "refuse"
    """What to do with a message the toxicity filter flags: answer with `refusal_reply` without storing it, or pass it to the model."""
    refusal_reply: str = Field("Let's keep it friendly. What else is on your mind?", min_length=1, max_length=500)
    """The bot's answer to a refused abusive message."""
    block_toxic_output: bool = True
    """Check every reply with the toxicity filter; a flagged reply is regenerated, then replaced."""
    toxicity_threshold: float = Field(0.9, gt=0.0, le=1.0)
    """Classifier probability at which text counts as toxic (the word and phrase lists block regardless)."""
    blocklist: tuple[str, ...] = ()
    """Extra words or phrases that always count as toxic."""
    allowlist: tuple[str, ...] = ()
    """Extra words or phrases never counted as toxic (place names, technical terms)."""
    redact_personal_data: bool = True
    """Replace e-mail addresses, phone and card numbers and API tokens in replies with a placeholder."""
    unsafe_retries: int = Field(2, ge=0, le=5)
    """How many times a reply flagged as toxic is generated again before `unsafe_fallback_reply` is sent."""
    unsafe_fallback_reply: str = Field("Let's talk about something else.", min_length=1, max_length=500)
    """Sent instead of a reply that stayed toxic after the retries."""
    reset_after_unsafe: bool = False
    """Forget the conversation after a reply had to be replaced, so the model does not build on it."""
    fallback_reply: str = Field("Sorry, I lost my train of thought. Could you say that another way?",
                                min_length=1, max_length=500)
    """What the bot says when the model produces nothing usable."""
    discord_token: SecretStr | None = None
    """Bot token for the Discord face (also read from ``DISCORD_TOKEN``); never logged or printed."""
    discord_channels: tuple[int, ...] = ()
    """Channel ids where the bot answers every message without being mentioned (threads in them too)."""
    discord_stream: bool = True
    """Show replies as they are generated, by editing the bot's message; off sends each reply once, finished."""
    discord_edit_interval: float = Field(1.2, ge=0.2, le=60)
    """Seconds between two edits or sends of a streaming reply in one channel (Discord limits edits per channel)."""
    discord_cooldown_messages: int = Field(5, ge=1, le=1000)
    """Messages one user may send the bot per `discord_cooldown_seconds`; more get a "slow down" note."""
    discord_cooldown_seconds: float = Field(30.0, gt=0, le=86_400)
    """Length of the per-user cooldown window."""
    discord_max_pending: int = Field(32, ge=1, le=10_000)
    """Replies being written or waiting, over all channels; beyond it new messages get the busy reply."""
    discord_reply_timeout: float = Field(90.0, gt=0, le=3600)
    """Seconds a message may wait and be answered in; after that the reply stops with a note."""
    discord_busy_reply: str = Field("I'm still answering earlier messages here. Try again in a moment.",
                                    min_length=1, max_length=500)
    """Sent when a channel's queue (`max_waiting_per_conversation`) or `discord_max_pending` is full."""
    discord_cooldown_reply: str = Field("You're sending messages faster than I can answer. Slow down a little.",
                                        min_length=1, max_length=500)
    """Sent (once per cooldown window) to a user over the cooldown; the seconds to wait are added."""
    discord_sharded: bool = False
    """Run as an ``AutoShardedBot`` (for bots in very many servers); one model serves every shard."""
    discord_sync_commands: bool = True
    """Register the slash commands with Discord at start-up (turn off once they are registered)."""
    discord_shutdown_grace: float = Field(10.0, ge=0, le=600)
    """Seconds replies in progress get to finish at shutdown before they are cancelled."""

    @field_validator("model", "preset", "expire_after_days", "discord_token", mode="before")
    @classmethod
    def _empty_is_none(cls, value: Any) -> Any:
        return None if isinstance(value, str) and not value.strip() else value

    @field_validator("device")
    @classmethod
    def _device(cls, value: str) -> str:
        kind = value.split(":", 1)[0]
        if kind not in ("auto", "cpu", "cuda", "mps"):
            raise ValueError("must be auto, cpu, cuda, cuda:N or mps")
        return value

    @field_validator("preset")
    @classmethod
    def _preset(cls, value: str | None) -> str | None:
        if value is not None and value not in PRESETS:
            raise ValueError(f"must be one of {', '.join(PRESETS)}")
        return value

    @field_validator("persona")
    @classmethod
    def _persona_name(cls, value: str) -> str:
        import re

        if not re.fullmatch(r"[a-z0-9][a-z0-9_-]{0,39}", value):
            raise ValueError("must be a persona file name such as 'friendly'")
        return value

    # ------------------------------------------------------------------ loading

    @classmethod
    def load(cls, path: str | os.PathLike[str] | None = None, *, env: Mapping[str, str] | None = None,
             **overrides: Any) -> "Settings":
        """Defaults, then a TOML file, then the environment, then ``overrides`` (None values skipped).

        The file is ``path``, else the one ``CHATBOT_CONFIG`` names, else ``chatbot.toml``
        in the working directory if there is one.
        """
        env = os.environ if env is None else env
        values: dict[str, Any] = {}
        if path is None and env.get(f"{ENV_PREFIX}CONFIG"):
            path = env[f"{ENV_PREFIX}CONFIG"]
        if path is None and Path(DEFAULT_CONFIG_FILE).is_file():
            path = DEFAULT_CONFIG_FILE
        if path is not None:
            values.update(read_toml(Path(path), "settings file"))
            cls.make(values, source=str(path))  # so a mistake in the file is reported with its name
        _merge(values, _from_env(env))
        _merge(values, {k: v for k, v in overrides.items() if v is not None})
        return cls.make(values)

    @classmethod
    def from_file(cls, path: str | os.PathLike[str]) -> "Settings":
        """Settings from one TOML file (and the environment, which overrides it)."""
        return cls.load(path)

    @classmethod
    def make(cls, values: Mapping[str, Any], *, source: str | None = None) -> "Settings":
        """Validate ``values``; a problem is a `ChatbotError` naming the key (and the file)."""
        try:
            return cls(**values)
        except ValidationError as err:
            where = f"{source}: " if source else ""
            raise ChatbotError(f"{where}{settings_error_message(err)}") from None

    def decoding_settings(self, preset: str) -> DecodingSettings:
        """The named preset with this configuration's ``decoding`` overrides on top."""
        return compose(preset, self.decoding)


def _merge(into: dict[str, Any], new: Mapping[str, Any]) -> None:
    for key, value in new.items():
        if key == "decoding" and isinstance(value, Mapping) and isinstance(into.get("decoding"), Mapping):
            # The environment overrides single decoding keys, not the whole table.
            into["decoding"] = {**into["decoding"], **value}
        else:
            into[key] = value


def _from_env(env: Mapping[str, str]) -> dict[str, Any]:
    """Settings named by environment variables.

    Written by hand rather than with pydantic-settings because that library skips
    unknown prefixed variables, and a misspelt ``CHATBOT_PERSONNA`` must be an error.
    """
    fields = Settings.model_fields
    decoding_fields = DecodingSettings.model_fields
    values: dict[str, Any] = {}
    for name, raw in env.items():
        if name == "DISCORD_TOKEN" and f"{ENV_PREFIX}DISCORD_TOKEN" not in env:
            values["discord_token"] = raw
            continue
        if not name.startswith(ENV_PREFIX):
            continue
        key = name[len(ENV_PREFIX):].lower()
        if key.startswith("decoding__"):
            sub = key[len("decoding__"):]
            if sub not in decoding_fields:
                raise ChatbotError(f"environment variable {name}: `decoding.{sub}` is not a known setting")
            values.setdefault("decoding", {})[sub] = None if raw.strip() in ("", "none") else raw
        elif key in ("blocklist", "allowlist", "discord_channels"):
            values[key] = tuple(w.strip() for w in raw.split(",") if w.strip())
        elif key in fields and key != "decoding":
            values[key] = raw
        elif key == "config":
            continue  # names the settings file itself; read by the command line
        elif key == "decoding":
            raise ChatbotError(f"environment variable {name}: set one decoding key at a time, "
                               f"e.g. {ENV_PREFIX}DECODING__TEMPERATURE=0.6")
        else:
            raise ChatbotError(f"environment variable {name}: `{key}` is not a known setting")
    return values
