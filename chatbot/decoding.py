"""Decoding: how a reply is sampled, decided in one place for every generator and face.

- `DecodingSettings` and the named `PRESETS`;
- `compose`, the one precedence rule: a preset, then a persona's table, then the settings',
  then one call's overrides;
- `seeded_for`, each reply's own seed from the user's;
- `logits_pipeline`, the one way settings become logits processors and sampling warpers, used
  by the local generator (through ``model.generate``) and the batching one (step by step).
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from .errors import ChatbotError, settings_error_message

__all__ = ["DecodingSettings", "DecodingOverrides", "PRESETS", "REPETITION_OFF", "ENGINE_ONLY", "GENERATION_FIELDS",
           "apply_overrides", "check_preset", "compose", "derive_seed", "get_preset", "logits_pipeline", "make_decoding_settings",
           "make_overrides", "seeded_for"]


class DecodingSettings(BaseModel):
    """How a reply is sampled. Every field is validated; unknown keys are errors."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, frozen=True)

    max_new_tokens: int = Field(40, ge=1, le=2048)
    """Upper bound on the reply length in tokens."""
    temperature: float = Field(0.8, ge=0.0, le=10.0)
    """Sampling temperature; 0 means greedy decoding."""
    top_k: int = Field(50, ge=0)
    """Sample only among the k most likely tokens; 0 turns the filter off."""
    top_p: float = Field(0.9, gt=0.0, le=1.0)
    """Nucleus sampling: smallest token set whose probability reaches top_p; 1 turns it off."""
    repetition_penalty: float = Field(1.0, gt=0.0, le=10.0)
    """Stock penalty on every prompt and reply token, the user's words too; prefer `bot_repetition_penalty` (1 = off)."""
    bot_repetition_penalty: float = Field(1.3, ge=1.0, le=10.0)
    """Divide the logits of tokens the bot itself said (earlier turns and this reply) by this; 1 turns it off."""
    no_repeat_ngram_size: int = Field(3, ge=0, le=16)
    """Never repeat an n-gram of this size within the reply (the prompt is not looked at); 0 turns it off."""
    bot_no_repeat_ngram_size: int = Field(4, ge=0, le=16)
    """Never produce an n-gram of this size that occurs in one of the bot's earlier turns; 0 turns it off."""
    avoid_repeats: bool = True
    """Regenerate a reply too like one of the bot's recent ones; applied by the engine, the generator ignores it."""
    repeat_threshold: float = Field(0.8, gt=0.0, le=1.0)
    """Similarity in (0, 1] from which a reply counts as a repeat; engine only, the generator ignores it."""
    repeat_lookback: int = Field(5, ge=1, le=50)
    """How many of the bot's latest replies a new one is compared with; engine only, the generator ignores it."""
    repeat_retries: int = Field(2, ge=0, le=5)
    """Most regenerations of a reply found to be a repeat; engine only, the generator ignores it."""
    max_time: float = Field(20.0, gt=0.0, le=600.0)
    """Seconds one generate call may take before it is stopped."""
    seed: int | None = Field(None, ge=0)
    """Seed for sampling; None samples differently every time."""

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


def _overrides_model() -> type[BaseModel]:
    from typing import Optional

    from pydantic import create_model
    from pydantic.fields import FieldInfo

    # Same fields and limits as DecodingSettings, each optional: built from it so the
    # two can never disagree about what a valid value is.
    fields: dict[str, Any] = {
        name: (Optional[info.annotation], FieldInfo.merge_field_infos(info, default=None))
        for name, info in DecodingSettings.model_fields.items()
    }
    return create_model("DecodingOverrides", __config__=ConfigDict(extra="forbid", frozen=True), **fields)


DecodingOverrides = _overrides_model()
"""Some decoding settings to put on top of a preset; only the keys given count (``seed = None`` included)."""


def apply_overrides(base: DecodingSettings, overrides: BaseModel | None) -> DecodingSettings:
    """``base`` with the fields set in ``overrides`` replaced."""
    given = overrides.model_dump(exclude_unset=True) if overrides is not None else {}
    return DecodingSettings(**{**base.model_dump(), **given}) if given else base


def make_overrides(value: Any) -> BaseModel | None:
    """A `DecodingOverrides` from None, a dict or an overrides object; errors name the key."""
    if value is None or isinstance(value, DecodingOverrides):
        return value
    if isinstance(value, DecodingSettings):
        return DecodingOverrides(**value.model_dump())
    if not isinstance(value, dict):
        raise ChatbotError(f"decoding overrides must be a dict, got {type(value).__name__}")
    try:
        return DecodingOverrides(**value)
    except ValidationError as err:
        raise ChatbotError(settings_error_message(err)) from None


def make_decoding_settings(**values: Any) -> DecodingSettings:
    """Build `DecodingSettings`, turning validation errors into a `ChatbotError`."""
    try:
        return DecodingSettings(**values)
    except ValidationError as err:
        raise ChatbotError(settings_error_message(err)) from None


REPETITION_OFF: dict[str, Any] = {
    "repetition_penalty": 1.0,
    "bot_repetition_penalty": 1.0,
    "no_repeat_ngram_size": 0,
    "bot_no_repeat_ngram_size": 0,
    "avoid_repeats": False,
}
"""Every repetition control off: ``apply_overrides(settings, make_overrides(REPETITION_OFF))``."""

PRESETS: dict[str, DecodingSettings] = {
    "greedy": DecodingSettings(temperature=0.0),
    "precise": DecodingSettings(temperature=0.5, top_k=40, top_p=0.8),
    "balanced": DecodingSettings(),
    "creative": DecodingSettings(temperature=1.0, top_k=0, top_p=0.95, bot_repetition_penalty=1.5),
    # The baseline that measures what the repetition controls buy: balanced without them.
    "plain": DecodingSettings(**REPETITION_OFF),
}
"""Named decoding styles a persona (or a user) can pick; each is a full `DecodingSettings`."""


def derive_seed(seed: int, *where: object) -> int:
    """The seed of one reply, from the user's seed and where the reply stands (a conversation and
    its turn, say): the same inputs give the same seed, every other position another one. A hash
    rather than arithmetic, so no two positions collide however long a conversation runs."""
    digest = hashlib.sha256(":".join(map(str, (seed, *where))).encode()).digest()
    return int.from_bytes(digest[:4], "big") >> 1


def seeded_for(settings: DecodingSettings, *where: object) -> DecodingSettings:
    """``settings`` with its seed replaced by `derive_seed` for ``where``; unchanged without a seed.

    A user's seed makes a whole conversation reproducible; used as it is for every reply,
    it would make the replies alike (the same random draws at every turn)."""
    if settings.seed is None:
        return settings
    return settings.model_copy(update={"seed": derive_seed(settings.seed, *where)})


def check_preset(name: str) -> str:
    """``name`` if it is a preset (a validator's check, as persona files and lab scenarios name one), else ValueError."""
    if name not in PRESETS:
        raise ValueError(f"must be one of {', '.join(PRESETS)}")
    return name


def get_preset(name: str) -> DecodingSettings:
    try:
        return PRESETS[name]
    except KeyError:
        raise ChatbotError(f"unknown decoding preset {name!r}; available: {', '.join(PRESETS)}") from None


ENGINE_ONLY = ("avoid_repeats", "repeat_threshold", "repeat_lookback", "repeat_retries")
"""Settings the engine applies by comparing a reply with the conversation's earlier ones; a
generator ignores them, and a face without a conversation (a LangChain call) refuses them."""
GENERATION_FIELDS = tuple(name for name in DecodingSettings.model_fields if name not in ENGINE_ONLY)
"""The settings a generator reads: what a command line or a model call can set one by one."""


def compose(preset: str | DecodingSettings, *layers: Any) -> DecodingSettings:
    """The one precedence rule: ``preset`` (a name or settings), then each layer on top, in
    order; a layer is None, a dict or a `DecodingOverrides`, and only the keys it gives count.

    Every face and tool calls it the same way: ``compose(preset, persona.decoding,
    settings.decoding, call_overrides)``.
    """
    settings = get_preset(preset) if isinstance(preset, str) else preset
    for layer in layers:
        settings = apply_overrides(settings, make_overrides(layer or None))
    return settings


def logits_pipeline(settings: DecodingSettings, *, prompt_length: int, bot_turns: Sequence[Sequence[Sequence[int]]],
                    blank_start_ids: Sequence[int] = ()) -> tuple[Any, Any]:
    """``(processors, warpers)`` for a batch whose rows all decode under ``settings``.

    ``prompt_length`` is where every row's reply begins (the padded prompt length); row ``i``
    of ``bot_turns`` holds the token ids of each of the bot's earlier turns in that row's
    prompt; ``blank_start_ids`` are tokens that would make the reply empty if they came first.
    The processors come in the order transformers' ``generate`` applies its own before ours,
    so results are the same as when it built them; ``warpers`` is None for greedy decoding.
    """
    from transformers import (
        LogitsProcessorList,
        RepetitionPenaltyLogitsProcessor,
        SuppressTokensAtBeginLogitsProcessor,
        TemperatureLogitsWarper,
        TopKLogitsWarper,
        TopPLogitsWarper,
    )

    from .repetition import BotRepetitionPenalty, ReplyNoRepeatNGram

    processors = LogitsProcessorList()
    if settings.repetition_penalty != 1.0:
        processors.append(RepetitionPenaltyLogitsProcessor(settings.repetition_penalty))
    if blank_start_ids:
        processors.append(SuppressTokensAtBeginLogitsProcessor(list(blank_start_ids), prompt_length))
    if settings.bot_repetition_penalty > 1.0:
        said = [[t for turn in row for t in turn] for row in bot_turns]
        processors.append(BotRepetitionPenalty(settings.bot_repetition_penalty, said, prompt_length))
    if settings.no_repeat_ngram_size > 0:
        processors.append(ReplyNoRepeatNGram(settings.no_repeat_ngram_size, prompt_length))
    if settings.bot_no_repeat_ngram_size > 0 and any(bot_turns):
        processors.append(ReplyNoRepeatNGram(settings.bot_no_repeat_ngram_size, prompt_length,
                                             [list(map(list, row)) for row in bot_turns]))
    if settings.greedy:
        return processors, None
    warpers = LogitsProcessorList([TemperatureLogitsWarper(settings.temperature)])
    if settings.top_k:
        warpers.append(TopKLogitsWarper(settings.top_k))
    if settings.top_p < 1.0:
        warpers.append(TopPLogitsWarper(settings.top_p))
    return processors, warpers
