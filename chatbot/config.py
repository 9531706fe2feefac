"""Settings: typed, in one place, read from a TOML file and the environment.

Precedence, lowest first: the defaults below, the TOML file, then environment variables
(``CHATBOT_<FIELD>``, ``CHATBOT_DECODING__<FIELD>`` for a decoding override, and
``CHATBOT_<SECTION>__<FIELD>`` for a face's section). Every key is checked: a misspelt key in
the file or a misspelt ``CHATBOT_`` variable is an error that names it, never a silently
ignored default.

A face keeps its own settings in its own `Section` (the Discord bot's ``[discord]`` table), so
the core knows no face. Sections are found through the ``chatbot.sections`` entry point group,
which is how an installed face, the project's own or another package's, declares one::

    # pyproject.toml
    [project.entry-points."chatbot.sections"]
    discord = "adapters.discord_settings:DiscordSettings"
"""

from __future__ import annotations

import functools
import os
import re
import typing
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any, ClassVar, Literal, Mapping, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from .decoding import PRESETS, DecodingOverrides, DecodingSettings, compose
from .errors import ChatbotError, read_toml, settings_error_message
from .memory import MAX_TURN_CHARS
from .prompting import PROMPTS_DIR
from .sentence_encoder import BUNDLED_ENCODER

__all__ = ["Settings", "Section", "register_section", "known_sections", "ENV_PREFIX", "DEFAULT_CONFIG_FILE"]

ENV_PREFIX = "CHATBOT_"
DEFAULT_CONFIG_FILE = "chatbot.toml"
"""Read from the working directory when no file is named."""
SECTION_ENTRY_POINTS = "chatbot.sections"
"""The entry point group through which installed faces declare their `Section`."""


class Section(BaseModel):
    """A face's own settings: a ``[name]`` table in the settings file, ``CHATBOT_<NAME>__<KEY>``
    in the environment, read with `Settings.section`. Unknown keys are errors, as in `Settings`."""

    model_config = ConfigDict(extra="forbid", frozen=True, validate_default=True)

    name: ClassVar[str]
    """The table's name; also the entry point's name."""
    env_aliases: ClassVar[Mapping[str, str]] = {}
    """Other environment variables read as one of the keys, e.g. ``{"DISCORD_TOKEN": "token"}``;
    the ``CHATBOT_`` variable for the same key wins."""

    @model_validator(mode="before")
    @classmethod
    def _lists_from_text(cls, values: Any) -> Any:
        return _split_lists(cls, values)


S = TypeVar("S", bound=Section)
_REGISTERED: dict[str, type[Section]] = {}


def register_section(cls: type[S]) -> type[S]:
    """Make ``cls`` a known section in this process (installed faces use the entry point instead)."""
    if not (isinstance(cls, type) and issubclass(cls, Section)):
        raise TypeError(f"a settings section must be a Section subclass, got {cls!r}")
    name = getattr(cls, "name", None)
    if not isinstance(name, str) or not re.fullmatch(r"[a-z][a-z0-9_]*", name) or name in Settings.model_fields:
        raise ValueError(f"{cls.__name__}.name must be a lower-case table name that is not a core setting, "
                         f"got {name!r}")
    if _REGISTERED.get(name, cls) is not cls:
        raise ValueError(f"two settings sections are named {name!r}: {_REGISTERED[name].__name__} "
                         f"and {cls.__name__}")
    _REGISTERED[name] = cls
    return cls


@functools.cache
def _installed_sections() -> tuple[type[Section], ...]:
    found = []
    for ep in entry_points(group=SECTION_ENTRY_POINTS):
        cls = ep.load()
        if not (isinstance(cls, type) and issubclass(cls, Section)) or getattr(cls, "name", None) != ep.name:
            raise ChatbotError(f"the settings section {ep.name!r} ({ep.value}) is not a Section named {ep.name!r}; "
                               "reinstall the package that declares it")
        found.append(cls)
    return tuple(found)


def known_sections() -> dict[str, type[Section]]:
    """Every section this process knows, by table name: the installed faces' and the registered ones."""
    for cls in _installed_sections():
        _REGISTERED.setdefault(cls.name, cls)
    return dict(_REGISTERED)


def _split_lists(model: type[BaseModel], values: Any) -> Any:
    """``values`` with each text given for a list field split at its commas: how the environment
    gives a list ("a,b"), and one name in a file stands for a list of one ("" for none)."""
    if not isinstance(values, Mapping):
        return values
    out = dict(values)
    for key, value in values.items():
        field = model.model_fields.get(key)
        if isinstance(value, str) and field is not None and _is_tuple(field.annotation):
            out[key] = tuple(v.strip() for v in value.split(",") if v.strip())
    return out


def _is_tuple(annotation: Any) -> bool:
    if typing.get_origin(annotation) is tuple:
        return True
    return any(_is_tuple(a) for a in typing.get_args(annotation)) if typing.get_origin(annotation) else False


def _moved(key: str, known: Mapping[str, type[Section]]) -> str | None:
    """What to write instead of a face's key given at the top level (``discord_token``)."""
    for name, cls in known.items():
        sub = key[len(name) + 1:]
        if key.startswith(f"{name}_") and sub in cls.model_fields:
            return (f"`{key}` is now `{sub}` in the [{name}] table "
                    f"(environment: {ENV_PREFIX}{name.upper()}__{sub.upper()})")
    return None


def _section_values(cls: type[S], values: Any) -> S:
    if isinstance(values, cls):
        return values
    if isinstance(values, Section):  # the same table name, another class: check its values anew
        values = values.model_dump()
    try:
        return cls.model_validate(values)
    except ValidationError as err:
        raise ValueError(settings_error_message(err, prefix=f"{cls.name}.")) from None


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
    response_bank: tuple[str, ...] = ("chitchat",)
    """Replies people wrote, as candidates beside the model's own, the best chosen by the model
    (`chatbot/response_bank.py`), from one bank of: ``chitchat`` (the bundled corpus) and JSON lines
    files of ``{"context": ..., "reply": ...}`` pairs; empty for the model's replies alone."""
    bank_candidates: int = Field(30, ge=1, le=500)
    """Bank replies scored for each message when `response_bank` is set."""
    sentence_encoder: str = BUNDLED_ENCODER
    """The sentence-transformers model whose embeddings say how close each bank candidate's meaning is
    to the conversation (`chatbot/sentence_encoder.py`): ``all-MiniLM-L6-v2`` (bundled), a model
    folder, or empty to leave meaning out of the choice."""
    fallback_reply: str = Field("Sorry, I lost my train of thought. Could you say that another way?",
                                min_length=1, max_length=500)
    """What the bot says when the model produces nothing usable."""
    sections: Mapping[str, Section] = Field(default_factory=dict, repr=False)
    """The faces' own settings (`Section`s), by table name; read with `section`."""

    @field_validator("model", "preset", "expire_after_days", mode="before")
    @classmethod
    def _empty_is_none(cls, value: Any) -> Any:
        return None if isinstance(value, str) and not value.strip() else value

    @model_validator(mode="before")
    @classmethod
    def _gather_sections(cls, values: Any) -> Any:
        # A face's table arrives as a top-level key (``[discord]`` in the file, ``discord=`` here).
        if not isinstance(values, Mapping):
            return values
        known = known_sections()
        out: dict[str, Any] = {}
        tables = dict(values.get("sections") or {})
        for key, value in values.items():
            if key == "sections":
                continue
            if key in known:
                tables[key] = value
            elif key not in cls.model_fields and (moved := _moved(key, known)):
                raise ValueError(moved)
            else:
                out[key] = value
        unknown = sorted(set(tables) - set(known))
        if unknown:
            raise ValueError(f"`{unknown[0]}` is not a known setting (sections: {', '.join(sorted(known)) or 'none'})")
        out["sections"] = {name: _section_values(known[name], table) for name, table in tables.items()}
        return _split_lists(cls, out)

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

    def section(self, cls: type[S]) -> S:
        """This face's settings: its table as given, or its defaults when there is none."""
        got = self.sections.get(cls.name)
        return got if isinstance(got, cls) else _section_values(cls, got or {})

    def with_section(self, cls: type[S], **changes: Any) -> "Settings":
        """A copy whose ``cls`` section has ``changes`` (None values skipped) on top; checked like the file."""
        current = self.section(cls)
        values = {**{k: getattr(current, k) for k in current.model_fields_set},
                  **{k: v for k, v in changes.items() if v is not None}}
        try:
            table = _section_values(cls, values)
        except ValueError as err:
            raise ChatbotError(str(err)) from None
        return self.model_copy(update={"sections": {**self.sections, cls.name: table}})

    def decoding_settings(self, preset: str) -> DecodingSettings:
        """The named preset with this configuration's ``decoding`` overrides on top."""
        return compose(preset, self.decoding)


def _merge(into: dict[str, Any], new: Mapping[str, Any]) -> None:
    for key, value in new.items():
        if isinstance(value, Mapping) and isinstance(into.get(key), Mapping):
            # The environment overrides single keys of a table (decoding, a face's section), not the whole table.
            into[key] = {**into[key], **value}
        else:
            into[key] = value


def _from_env(env: Mapping[str, str]) -> dict[str, Any]:
    """Settings named by environment variables.

    Written by hand rather than with pydantic-settings because that library skips
    unknown prefixed variables, and a misspelt ``CHATBOT_PERSONNA`` must be an error.
    """
    fields = Settings.model_fields
    known = known_sections()
    tables: dict[str, Mapping[str, Any]] = {"decoding": DecodingSettings.model_fields,
                                            **{n: c.model_fields for n, c in known.items()}}
    values: dict[str, Any] = {}
    for table, cls in known.items():
        for var, sub in cls.env_aliases.items():
            if var in env and f"{ENV_PREFIX}{table}__{sub}".upper() not in env:
                values.setdefault(table, {})[sub] = env[var]
    for name, raw in env.items():
        if not name.startswith(ENV_PREFIX):
            continue
        key = name[len(ENV_PREFIX):].lower()
        table, _, sub = key.partition("__")
        if sub and table in tables:
            if sub not in tables[table]:
                raise ChatbotError(f"environment variable {name}: `{table}.{sub}` is not a known setting")
            if table == "decoding":
                values.setdefault(table, {})[sub] = None if raw.strip() in ("", "none") else raw
            else:
                values.setdefault(table, {})[sub] = raw
        elif key in fields and key != "decoding":
            values[key] = raw
        elif key in ("config", "cache"):
            continue  # the settings file itself (read by the command line); where built banks are kept
        elif key == "decoding":
            raise ChatbotError(f"environment variable {name}: set one decoding key at a time, "
                               f"e.g. {ENV_PREFIX}DECODING__TEMPERATURE=0.6")
        else:
            problem = _moved(key, known) or f"`{key}` is not a known setting"
            raise ChatbotError(f"environment variable {name}: {problem}")
    return values
