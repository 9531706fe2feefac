"""Prompt formats: the one place that decides how a dialogue becomes model text.

Training (`chatbot.tools.training`) renders every corpus conversation through the same
`PromptFormat` that the chat path uses to build prompts, so the two cannot drift apart.

Two formats exist:

* ``transcript``: one line per turn, ``Name: text``. The prompt ends with the bot's
  ``Name:`` and the reply ends at the newline that starts the next turn. Speaker names
  carry meaning (persona name, Discord author names), so this is the format of the
  shipped model.
* ``dialogpt``: turns joined by the end-of-text token, as Microsoft's DialoGPT was
  trained; speaker names are not part of the text.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Protocol, Sequence

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from .decoding import check_preset, make_overrides
from .errors import ChatbotError, read_toml, settings_error_message

__all__ = [
    "Utterance",
    "PromptFormat",
    "TranscriptFormat",
    "DialoGPTFormat",
    "FORMAT_NAMES",
    "make_format",
    "clean_text",
    "clean_speaker",
    "check_speaker",
    "cut_at_stop",
    "Persona",
    "load_persona",
    "list_personas",
    "get_persona",
    "PROMPTS_DIR",
]

MAX_SPEAKER_CHARS = 32
_WHITESPACE = re.compile(r"\s+")
# A speaker name is a label in front of a colon; characters that would end the label or
# the line early are not allowed in it.
_SPEAKER_FORBIDDEN = re.compile(r"[:\n\r\t]")


@dataclass(frozen=True)
class Utterance:
    """One turn of a dialogue as the prompt format sees it."""

    speaker: str
    text: str


def clean_text(text: str) -> str:
    """Collapse all whitespace runs (newlines included) to single spaces and strip.

    Each turn of the transcript format lives on one line; a newline inside a turn
    would read as the start of a new turn.
    """
    return _WHITESPACE.sub(" ", text).strip()


def clean_speaker(name: str) -> str:
    """Make a speaker name safe to use as a transcript label."""
    name = clean_text(_SPEAKER_FORBIDDEN.sub(" ", name))
    return name[:MAX_SPEAKER_CHARS].strip() or "User"


def check_speaker(name: str) -> str:
    """``name`` unchanged if it is already a clean transcript label (a validator's check), else ValueError."""
    if clean_speaker(name) != name:
        raise ValueError("must be a single line without ':' or surrounding spaces")
    return name


def cut_at_stop(text: str, stop_strings: Iterable[str]) -> tuple[str, bool]:
    """Cut ``text`` at the earliest occurrence of any stop string.

    Returns the text before it and whether a stop string was found. Works on decoded
    text, so a stop string spread over several tokens is found the same as a
    single-token one.
    """
    cut = len(text)
    for stop in stop_strings:
        if not stop:
            continue
        at = text.find(stop)
        if at != -1 and at < cut:
            cut = at
    return text[:cut], cut != len(text)


class PromptFormat(Protocol):
    """How turns become text, for training and for prompting."""

    name: str

    def render_conversation(self, turns: Sequence[Utterance]) -> str:
        """Text of a whole conversation, as the model is trained on it."""

    def build_prompt(self, turns: Sequence[Utterance], reply_speaker: str, preamble: str = "") -> str:
        """Text that makes the model continue with ``reply_speaker``'s next turn."""

    def stop_strings(self, speakers: Iterable[str]) -> list[str]:
        """Strings that end a reply: the start of any other turn."""


class TranscriptFormat:
    """``Name: text`` lines; a reply ends where the next line would begin."""

    name = "transcript"

    def __init__(self, eos_token: str = "<|endoftext|>") -> None:
        self.eos_token = eos_token

    def render_turn(self, turn: Utterance) -> str:
        return f"{clean_speaker(turn.speaker)}: {clean_text(turn.text)}\n"

    def render_conversation(self, turns: Sequence[Utterance]) -> str:
        return "".join(self.render_turn(t) for t in turns)

    def build_prompt(self, turns: Sequence[Utterance], reply_speaker: str, preamble: str = "") -> str:
        head = f"{clean_text(preamble)}\n" if preamble.strip() else ""
        # No space after the colon: in training text the space belongs to the first
        # word of the turn (one token with it), so the prompt must stop before it.
        return head + self.render_conversation(turns) + f"{clean_speaker(reply_speaker)}:"

    def stop_strings(self, speakers: Iterable[str] = ()) -> list[str]:
        stops = ["\n", self.eos_token]
        for speaker in speakers:
            stops.append(f" {clean_speaker(speaker)}:")
        return list(dict.fromkeys(stops))


class DialoGPTFormat:
    """Turns joined by the end-of-text token (DialoGPT's training format)."""

    name = "dialogpt"

    def __init__(self, eos_token: str = "<|endoftext|>") -> None:
        self.eos_token = eos_token

    def render_conversation(self, turns: Sequence[Utterance]) -> str:
        return "".join(clean_text(t.text) + self.eos_token for t in turns)

    def build_prompt(self, turns: Sequence[Utterance], reply_speaker: str, preamble: str = "") -> str:
        head = clean_text(preamble) + self.eos_token if preamble.strip() else ""
        return head + self.render_conversation(turns)

    def stop_strings(self, speakers: Iterable[str] = ()) -> list[str]:
        return [self.eos_token]


FORMAT_NAMES = ("transcript", "dialogpt")


def make_format(name: str, eos_token: str = "<|endoftext|>") -> PromptFormat:
    """Build the prompt format called ``name``."""
    if name == "transcript":
        return TranscriptFormat(eos_token)
    if name == "dialogpt":
        return DialoGPTFormat(eos_token)
    raise ValueError(f"`prompt_format` must be one of {', '.join(FORMAT_NAMES)}, got {name!r}")


def format_name_for_model(model_name: str, config: object | None = None) -> str:
    """Which format a model was trained with.

    Models trained by this project record it in their config (``chatbot_prompt_format``);
    DialoGPT checkpoints are recognised by name; any other GPT-2 gets the transcript
    format, which a plain language model continues naturally.
    """
    recorded = getattr(config, "chatbot_prompt_format", None)
    if recorded:
        return str(recorded)
    if "dialogpt" in model_name.lower():
        return "dialogpt"
    return "transcript"


# --------------------------------------------------------------------------- personas

def _prompts_dir() -> Path:
    # A wheel installs the repository's prompts/ folder as chatbot/prompts (package data);
    # a checkout (and an editable install) reads it where it is.
    installed = Path(__file__).resolve().parent / "prompts"
    return installed if installed.is_dir() else Path(__file__).resolve().parents[1] / "prompts"


PROMPTS_DIR = _prompts_dir()
"""Where persona files live: one TOML file per persona, data not code."""


class PersonaExample(BaseModel):
    """One example exchange shown to the model before the conversation."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    user: str = Field(min_length=1, max_length=500)
    bot: str = Field(min_length=1, max_length=500)


class PersonaStyle(BaseModel):
    """How a persona's replies read, where the reply is chosen among candidates (`response_bank`):
    which it would not say, which it would rather say, and how it writes them."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    max_words: int | None = Field(None, ge=1, le=200)
    """Candidates longer than this are not chosen (a terse persona)."""
    avoid: tuple[str, ...] = ()
    """Words or marks it does not use: each one a candidate has counts against it ("lol", "gonna")."""
    prefer: tuple[str, ...] = ()
    """Words or marks it likes: each one a candidate has counts for it ("!", "haha")."""
    sentence_case: bool = False
    """Write the chosen reply as sentences: a capital first letter, "I" for "i", a full stop at the end."""

    def fit(self, text: str) -> float:
        """How many of the preferred words and marks ``text`` has, less how many avoided ones."""
        return float(_count_marks(text, self.prefer) - _count_marks(text, self.avoid))

    def allows(self, text: str) -> bool:
        return self.max_words is None or len(text.split()) <= self.max_words

    def write(self, text: str) -> str:
        """``text`` as this persona writes it."""
        if not self.sentence_case or not text.strip():
            return text
        text = re.sub(r"\bi\b", "I", re.sub(r"\bi'(m|ve|ll|d)\b", r"I'\1", text.strip()))
        text = re.sub(r"(^|[.!?]\s+)([a-z])", lambda m: m.group(1) + m.group(2).upper(), text)
        return text if text[-1] in ".!?…\"')" else text + "."


def _count_marks(text: str, marks: Sequence[str]) -> int:
    """Occurrences of each mark in ``text``: a word or phrase as a whole word (any case), a
    punctuation mark anywhere."""
    lowered = text.lower()
    total = 0
    for mark in marks:
        if re.fullmatch(r"\W+", mark):
            total += lowered.count(mark)
        else:
            total += len(re.findall(rf"(?<!\w){re.escape(mark.lower())}(?!\w)", lowered))
    return total


class Persona(BaseModel):
    """How the bot presents itself: its name in the transcript, a description and example exchanges."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(pattern=r"^[a-z0-9][a-z0-9_-]{0,39}$")
    """The persona's id, equal to its file name without `.toml`."""
    speaker: str = Field(min_length=1, max_length=MAX_SPEAKER_CHARS)
    """The bot's speaker name in the transcript (``Sam:``)."""
    description: str = Field("", max_length=1000)
    """One or two sentences pinned at the top of every prompt."""
    preset: str = "balanced"
    """Default decoding preset (see `chatbot.decoding.PRESETS`)."""
    examples: tuple[PersonaExample, ...] = ()
    """Example exchanges pinned after the description."""
    decoding: dict[str, Any] = Field(default_factory=dict)
    """Decoding settings on top of the preset for this persona, e.g. ``{bot_repetition_penalty = 1.5}``."""
    style: PersonaStyle = Field(default_factory=PersonaStyle)
    """How its replies read where they are chosen among candidates (the ``[style]`` table)."""

    @field_validator("decoding")
    @classmethod
    def _decoding(cls, value: dict[str, Any]) -> dict[str, Any]:
        try:
            make_overrides(value)
        except ChatbotError as err:
            raise ValueError(str(err).replace("`", "`decoding.", 1)) from None
        return value

    @field_validator("speaker")
    @classmethod
    def _speaker(cls, value: str) -> str:
        return check_speaker(value)

    @field_validator("preset")
    @classmethod
    def _preset(cls, value: str) -> str:
        return check_preset(value)

    def example_turns(self, user: str = "User") -> list[Utterance]:
        """The example exchanges as turns, with ``user`` as the other speaker."""
        turns: list[Utterance] = []
        for ex in self.examples:
            turns += [Utterance(user, ex.user), Utterance(self.speaker, ex.bot)]
        return turns


def load_persona(path: str | Path) -> Persona:
    """Read one persona file; any problem is a `ChatbotError` naming the file and the field."""
    path = Path(path)
    data = read_toml(path, "persona file")
    try:
        persona = Persona(**data)
    except ValidationError as err:
        raise ChatbotError(f"{path}: {settings_error_message(err)}") from None
    if persona.name != path.stem:
        raise ChatbotError(f"{path}: `name` must match the file name ({path.stem!r}), got {persona.name!r}")
    return persona


def list_personas(directory: str | Path = PROMPTS_DIR, *,
                  on_error: Callable[[ChatbotError], None] | None = None) -> dict[str, Persona]:
    """Every persona in ``directory``, by name. A malformed file raises, or with ``on_error``
    is passed to it and left out."""
    found = {}
    for path in sorted(Path(directory).glob("*.toml")):
        try:
            found[path.stem] = load_persona(path)
        except ChatbotError as err:
            if on_error is None:
                raise
            on_error(err)
    return found


def get_persona(name: str, directory: str | Path = PROMPTS_DIR) -> Persona:
    path = Path(directory) / f"{name}.toml"
    if not re.fullmatch(r"[a-z0-9][a-z0-9_-]{0,39}", name) or not path.is_file():
        known = ", ".join(p.stem for p in sorted(Path(directory).glob("*.toml"))) or "none"
        raise ChatbotError(f"unknown persona {name!r}; available: {known}")
    return load_persona(path)
