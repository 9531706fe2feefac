"""The style lab: replay the same scripted conversations through every cell of a grid of
personas x decoding presets (x models) and measure how each cell talks.

A scenario file (TOML, or YAML) names the grid, the user's lines, optional reference
replies, a seed and how many samples per cell. Everything in it is checked before any
model runs, and a mistake is one `ChatbotError` naming the file, the key and the value.

Every cell goes through the real engine (`ChatEngine.respond`) with a throwaway
in-memory store and the configured safety filters and repetition controls. Sample ``s``
of conversation ``c`` uses the seed `turn_seed(seed, s, c, t)` at turn ``t`` in every
cell, so cells differ only by what the grid varies, and the same scenario and seed give
the same transcripts and numbers (latency aside).
"""

from __future__ import annotations

import asyncio
import logging
import re
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from ..decoding import PRESETS, DecodingOverrides, DecodingSettings, check_preset, compose, derive_seed
from ..errors import ChatbotError, read_text, read_toml, settings_error_message
from ..generation import resolve_model
from .lab_metrics import LabTurn, cell_metrics, reply_nll
from ..prompting import Persona, PersonaExample, check_speaker, get_persona, load_persona
from ..safety import sanitize_input, skeleton

__all__ = ["Scenario", "LabCell", "LabRun", "load_scenario", "prepare", "load_generators", "run_lab", "turn_seed",
           "DEFAULT_PRESET"]

log = logging.getLogger(__name__)

DEFAULT_PRESET = "default"
"""In ``grid.presets``: each persona's own preset (and its decoding table), as a chat would use."""
_NAME = r"^[a-z0-9][a-z0-9_-]{0,39}$"
MAX_SAMPLES = 20


# --------------------------------------------------------------------------- the scenario file


def _not_empty(cls: Any, value: tuple[Any, ...]) -> tuple[Any, ...]:
    # Rather than `min_length`, which pydantic also reports when every item was invalid
    # ("should have at least 1 item after validation") beside the real mistake.
    if not value:
        raise ValueError("must not be empty")
    return value


class ScenarioTurn(BaseModel):
    """One line the user says, with reference replies to score the bot's answer against (optional)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    user: str = Field(min_length=1, max_length=2000)
    references: tuple[str, ...] = ()

    @model_validator(mode="before")
    @classmethod
    def _not_a_scalar(cls, value: Any) -> Any:
        if isinstance(value, (bool, int, float)):
            raise ValueError("must be text: YAML reads a bare yes, no, on, off or number as such; put the line in "
                             "quotes")
        return value

    @field_validator("references")
    @classmethod
    def _references(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        if any(not r.strip() for r in value):
            raise ValueError("must not hold an empty reply")
        return value


class ScenarioConversation(BaseModel):
    """A scripted conversation: the user's lines in order; the bot answers each."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field("", max_length=80)
    turns: tuple[ScenarioTurn, ...] = Field(max_length=50)

    @field_validator("turns", mode="before")
    @classmethod
    def _plain_lines(cls, value: Any) -> Any:
        # A bare string is a line without references: turns = ["hi", {user = "...", references = [...]}]
        if isinstance(value, (list, tuple)):
            return [{"user": v} if isinstance(v, str) else v for v in value]
        return value

    _turns = field_validator("turns")(_not_empty)


class ScenarioPreset(DecodingOverrides):  # type: ignore[misc, valid-type]
    """A decoding preset of this scenario: a shipped preset (``base``) with some settings changed."""

    base: str = "balanced"

    @field_validator("base")
    @classmethod
    def _base(cls, value: str) -> str:
        return check_preset(value)

    @field_validator("seed")
    @classmethod
    def _no_seed(cls, value: Any) -> Any:
        raise ValueError("is set by the lab for every reply (from the scenario's `seed`); remove it")

    def overrides(self) -> dict[str, Any]:
        return self.model_dump(exclude_unset=True, exclude={"base"})


class PersonaVariant(BaseModel):
    """A persona that exists only in this scenario: a persona file elsewhere, or an existing
    persona with some fields changed (``from`` names it)."""

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    file: str | None = None
    based_on: str | None = Field(None, alias="from")
    speaker: str | None = None
    description: str | None = None
    preset: str | None = None
    examples: tuple[PersonaExample, ...] | None = None
    decoding: dict[str, Any] | None = None

    @model_validator(mode="before")
    @classmethod
    def _path(cls, value: Any) -> Any:
        return {"file": value} if isinstance(value, str) else value

    @model_validator(mode="after")
    def _one_source(self) -> "PersonaVariant":
        changed = self.model_dump(exclude_unset=True, exclude={"file", "based_on"}, by_alias=False)
        if self.file is None and self.based_on is None:
            raise ValueError("needs `from` (a persona to change) or a persona file path")
        if self.file is not None and (self.based_on is not None or changed):
            raise ValueError("a persona file path stands alone; change the file, or use `from` and fields")
        return self


class Grid(BaseModel):
    """What the lab compares: every persona with every preset, on every model."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    personas: tuple[str, ...] = Field(max_length=20)
    presets: tuple[str, ...] = Field((DEFAULT_PRESET,), max_length=20)
    models: tuple[str, ...] = Field((), max_length=5)
    """Model directories or cached hub names; empty means the settings' model."""
    response_banks: tuple[tuple[str, ...], ...] = Field(((),), min_length=1, max_length=4)
    """Each a response bank the models choose replies from, as `Settings.response_bank` names one
    (``[]``: the model's own replies alone); every model runs once per entry."""

    _lists = field_validator("personas", "presets")(_not_empty)

    @field_validator("personas", "presets", "models")
    @classmethod
    def _unique(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        seen = [v for i, v in enumerate(value) if v in value[:i]]
        if seen:
            raise ValueError(f"names {seen[0]!r} twice")
        return value


class Scenario(BaseModel):
    """A lab scenario file. Unknown keys are errors."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field("", pattern=r"^$|" + _NAME)
    """Names the output folder (``lab-results/<name>``); default: the file name."""
    description: str = Field("", max_length=1000)
    seed: int = Field(0, ge=0, le=2**31 - 1, strict=True)
    """Every reply's seed derives from it (`turn_seed`)."""
    samples: int = Field(3, ge=1, le=MAX_SAMPLES, strict=True)
    """Times each conversation is replayed per cell, with different seeds (the same in every cell)."""
    user: str = Field("User", min_length=1, max_length=32)
    """The user's name in the transcript."""
    grid: Grid
    presets: dict[str, ScenarioPreset] = Field(default_factory=dict)
    """Presets of this scenario, by name, usable in ``grid.presets``."""
    personas: dict[str, PersonaVariant] = Field(default_factory=dict)
    """Personas of this scenario, by name, usable in ``grid.personas``."""
    conversations: tuple[ScenarioConversation, ...] = Field(max_length=50)

    _conversations = field_validator("conversations")(_not_empty)

    @field_validator("conversations")
    @classmethod
    def _distinct_names(cls, value: tuple[ScenarioConversation, ...]) -> tuple[ScenarioConversation, ...]:
        first: dict[str, int] = {}
        for i, conversation in enumerate(value):
            if conversation.name in first:
                # Starts with its key, so the message is not followed by every conversation as the bad value.
                raise ValueError(f"`conversations.{i}.name` {conversation.name!r} is conversation "
                                 f"{first[conversation.name]}'s name too; the report heads their transcripts with it")
            if conversation.name:
                first[conversation.name] = i
        return value

    @field_validator("user")
    @classmethod
    def _user(cls, value: str) -> str:
        return check_speaker(value)

    @field_validator("presets", "personas")
    @classmethod
    def _names(cls, value: dict[str, Any], info: Any) -> dict[str, Any]:
        for name in value:
            if not re.fullmatch(_NAME, name):
                raise ValueError(f"name {name!r} must be lower-case letters, digits, '-' or '_'")
            if info.field_name == "presets" and (name in PRESETS or name == DEFAULT_PRESET):
                raise ValueError(f"{name!r} is a shipped preset's name; choose another")
        return value


def _yaml_loader() -> Any:
    """PyYAML's safe loader, except that a key given twice in one mapping is an error: plain
    PyYAML keeps the last silently, so a second `presets:` would drop the first unseen."""
    import yaml

    class Loader(yaml.SafeLoader):
        pass

    def mapping(loader: Any, node: Any) -> Any:
        seen = set()
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue  # `<<: *anchor` merges keys that the mapping's own may override
            key = loader.construct_object(key_node)
            if isinstance(key, str) and key in seen:
                raise yaml.constructor.ConstructorError(None, None, f"key {key!r} given twice in one mapping",
                                                        key_node.start_mark)
            seen.add(key)
        return loader.construct_mapping(node)

    Loader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, mapping)
    return Loader


def _yaml_problem(err: Any) -> str:
    """A YAML error as one line, with the line and column of each place it names."""
    def where(mark: Any) -> str:
        return f"line {mark.line + 1}, column {mark.column + 1}"

    problem = getattr(err, "problem", None)
    if problem is None or getattr(err, "problem_mark", None) is None:
        return " ".join(str(err).split())
    text = f"{where(err.problem_mark)}: {problem}"
    if getattr(err, "context", None):
        text += f", {err.context}" + (f" at {where(err.context_mark)}" if err.context_mark is not None else "")
    return text


def _read(path: Path) -> dict[str, Any]:
    if path.suffix.lower() in (".yaml", ".yml"):
        import yaml

        text = read_text(path, "scenario file")
        try:
            data = yaml.load(text, Loader=_yaml_loader())  # a SafeLoader
        except yaml.YAMLError as err:
            raise ChatbotError(f"{path}: not valid YAML ({_yaml_problem(err)})") from None
        if data is None:
            raise ChatbotError(f"{path}: the file is empty; a scenario needs at least `grid` and `conversations`")
        if not isinstance(data, dict):
            raise ChatbotError(f"{path}: a scenario must be a mapping of keys (`grid`, `conversations`, ...), "
                               f"got a {type(data).__name__}")
        return data
    if path.suffix.lower() != ".toml":
        raise ChatbotError(f"{path}: a scenario file must end in .toml, .yaml or .yml")
    return read_toml(path, "scenario file")


def _plain(message: str) -> str:
    """pydantic's words in a file's words: "a valid dictionary or instance of Grid" is a table."""
    message = re.sub(r"a valid dictionary or instance of \w+", "a table of keys (a mapping in YAML)", message)
    return message.replace("a valid tuple", "a list")


def load_scenario(path: str | Path) -> Scenario:
    """Read and check the file's shape (names of personas and presets are checked by `prepare`)."""
    path = Path(path)
    data = _read(path)
    try:
        scenario = Scenario(**data)
    except ValidationError as err:
        raise ChatbotError(f"{path}: {_plain(settings_error_message(err))}") from None
    if not scenario.name:
        stem = re.sub(r"[^a-z0-9_-]+", "-", path.stem.lower()).strip("-_")[:40] or "scenario"
        scenario = scenario.model_copy(update={"name": stem})
    return scenario


# --------------------------------------------------------------------------- checking it against the world


@dataclass(frozen=True)
class LabCell:
    """One cell of the grid, with its decoding settings resolved (seed aside)."""

    model: str
    persona: str
    preset: str
    base_preset: str
    overrides: dict[str, Any]
    settings: DecodingSettings

    @property
    def key(self) -> str:
        return f"{self.model} / {self.persona} / {self.preset}"


@dataclass
class LabPlan:
    """A scenario checked and resolved: the personas to use and the cells to run."""

    scenario: Scenario
    path: Path
    personas: dict[str, Persona]
    cells: list[LabCell]
    models: dict[str, str]
    """Display name -> what to load (directory or hub name)."""
    settings: Any
    banks: dict[str, tuple[str, ...]] = field(default_factory=dict)
    """Display name -> the response bank its replies are chosen from (none: the model alone)."""

    @property
    def replies_per_cell(self) -> int:
        return self.scenario.samples * sum(len(c.turns) for c in self.scenario.conversations)


def _model_label(source: str, taken: set[str]) -> str:
    label = Path(source.rstrip("/")).name or source
    n = 2
    while label in taken:
        label, n = f"{Path(source).name}-{n}", n + 1
    return label


def _personas(scenario: Scenario, path: Path, prompts_dir: Path) -> dict[str, Persona]:
    found: dict[str, Persona] = {}
    for name, variant in scenario.personas.items():
        where = f"{path}: `personas.{name}"
        if variant.file is not None:
            file = Path(variant.file)
            file = file if file.is_absolute() else path.parent / file
            try:
                persona = load_persona(file)
            except ChatbotError as err:
                raise ChatbotError(f"{where}`: {err}") from None
            if persona.name != name:
                raise ChatbotError(f"{where}`: the file {file} holds persona {persona.name!r}; "
                                   f"name it {persona.name!r} here")
        else:
            try:
                base = get_persona(variant.based_on or "", prompts_dir)
            except ChatbotError as err:
                raise ChatbotError(f"{where}.from`: {err}") from None
            changed = variant.model_dump(exclude_unset=True, exclude={"file", "based_on"})
            try:
                persona = Persona(**{**base.model_dump(), **changed, "name": name})
            except ValidationError as err:
                # Each problem names its key inside this persona; put the persona's place in front.
                message = re.sub(r"(^|; )`", rf"\1`personas.{name}.", settings_error_message(err))
                raise ChatbotError(f"{path}: {message}") from None
        if (prompts_dir / f"{name}.toml").is_file():
            raise ChatbotError(f"{where}`: a persona file {prompts_dir / (name + '.toml')} has this name; "
                               "give the scenario's persona another one")
        found[name] = persona
    for name in scenario.grid.personas:
        if name not in found:
            try:
                found[name] = get_persona(name, prompts_dir)
            except ChatbotError as err:
                extra = f" (or one of this scenario's: {', '.join(scenario.personas)})" if scenario.personas else ""
                raise ChatbotError(f"{path}: `grid.personas`: {err}{extra}") from None
    return {name: found[name] for name in scenario.grid.personas}


def prepare(path: str | Path, settings: Any, *, models: Sequence[str] = (), seed: int | None = None,
            samples: int | None = None) -> LabPlan:
    """Read the scenario and check every name and value in it; nothing runs yet.

    ``models`` (the command line's ``--model``) replaces the scenario's models; ``seed``
    and ``samples`` replace the scenario's when given.
    """
    path = Path(path)
    scenario = load_scenario(path)
    if seed is not None and not 0 <= seed < 2**31:
        raise ChatbotError(f"`--seed` must be between 0 and {2**31 - 1}, got {seed}")
    if samples is not None and not 1 <= samples <= MAX_SAMPLES:
        raise ChatbotError(f"`--samples` must be between 1 and {MAX_SAMPLES}, got {samples}")
    scenario = scenario.model_copy(update={k: v for k, v in (("seed", seed), ("samples", samples)) if v is not None})
    personas = _personas(scenario, path, Path(settings.prompts_dir))
    for name, persona in personas.items():
        if skeleton(persona.speaker) == skeleton(scenario.user):
            # "Sam: hi\nSam:" would have the model read the user's lines as its own.
            raise ChatbotError(f"{path}: `user` {scenario.user!r} is the speaker name of persona {name!r} "
                               f"({persona.speaker!r}); give the user another name")
    for p in scenario.grid.presets:
        if p != DEFAULT_PRESET and p not in PRESETS and p not in scenario.presets:
            known = ", ".join([DEFAULT_PRESET, *PRESETS, *scenario.presets])
            raise ChatbotError(f"{path}: `grid.presets`: unknown decoding preset {p!r}; available: {known}")
    for conv_no, conv in enumerate(scenario.conversations):
        for turn_no, turn in enumerate(conv.turns):
            # The engine's own check, so a line it would refuse (blank once cleaned, too long)
            # stops the run here rather than in the first cell.
            try:
                sanitize_input(turn.user, max_chars=settings.max_input_chars)
            except ChatbotError as err:
                raise ChatbotError(f"{path}: `conversations.{conv_no}.turns.{turn_no}.user`: {err}") from None
    sources = list(models) or list(scenario.grid.models) or [settings.model or ""]
    labels: dict[str, str] = {}
    banks: dict[str, tuple[str, ...]] = {}
    for source in sources:
        base = _model_label(resolve_model(source), set(labels))
        for bank in scenario.grid.response_banks:
            label = base if not bank else f"{base}+{'+'.join(Path(b).stem for b in bank)}"
            labels[label], banks[label] = source, tuple(bank)
    cells = []
    for model in labels:
        for persona_name, persona in personas.items():
            for preset in scenario.grid.presets:
                if preset == DEFAULT_PRESET:
                    base, overrides = persona.preset, {}
                elif preset in scenario.presets:
                    base, overrides = scenario.presets[preset].base, scenario.presets[preset].overrides()
                else:
                    base, overrides = preset, {}
                resolved = compose(base, persona.decoding, settings.decoding, overrides)
                cells.append(LabCell(model, persona_name, preset, base, overrides, resolved))
    return LabPlan(scenario, path, personas, cells, labels, settings, banks)


def turn_seed(seed: int, sample: int, conversation: int, turn: int) -> int:
    """The sampling seed of one reply: the same in every cell, different for every (sample, conversation, turn)."""
    return derive_seed(seed, sample, conversation, turn)


# --------------------------------------------------------------------------- running it


@dataclass
class CellResult:
    cell: LabCell
    transcripts: list[dict[str, Any]] = field(default_factory=list)
    metrics: dict[str, Any] = field(default_factory=dict)
    decoding: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0


@dataclass
class LabRun:
    plan: LabPlan
    cells: list[CellResult]
    seconds: float
    model_names: dict[str, str]


class _Recorder:
    """The generator the engine sees: the real one, noting the prompt of each call so the
    chosen reply can be scored under exactly the prompt that produced it."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.name = inner.name
        self.format = inner.format
        self.context_size = inner.context_size
        self.tokenizer = getattr(inner, "tokenizer", None)
        self.last_prompt: str | None = None

    def count_tokens(self, text: str) -> int:
        return self.inner.count_tokens(text)

    def generate(self, requests: Sequence[Any]) -> list[Any]:
        self.last_prompt = requests[-1].prompt
        return self.inner.generate(requests)

    def stream(self, request: Any) -> Any:
        self.last_prompt = request.prompt
        return self.inner.stream(request)


def _write_personas(personas: dict[str, Persona], folder: Path, prompts_dir: Path) -> None:
    """The persona folder the lab's engine reads: the grid's personas exactly as checked, plus
    the other valid persona files, whose speaker names the engine also guards in user text."""
    import tomli_w

    others: dict[str, Persona] = {}
    for file in sorted(prompts_dir.glob("*.toml")):
        try:
            others[file.stem] = load_persona(file)
        except ChatbotError:
            continue  # as in a chat: a broken file nobody uses does not stop the run
    for name, persona in {**others, **personas}.items():
        data = persona.model_dump(mode="json", exclude_defaults=True)
        (folder / f"{name}.toml").write_text(tomli_w.dumps({"name": name, **data}), encoding="utf-8")


def _check_against_model(plan: LabPlan, label: str, generator: Any) -> None:
    """What only the loaded model can tell: reply budgets against its context, line lengths in its tokens."""
    for cell in plan.cells:
        if cell.model == label and cell.settings.max_new_tokens >= generator.context_size:
            raise ChatbotError(f"{plan.path}: preset {cell.preset!r} with persona {cell.persona!r}: `max_new_tokens` "
                               f"must be below model {label}'s context of {generator.context_size} tokens, "
                               f"got {cell.settings.max_new_tokens}")
    for conv_no, conv in enumerate(plan.scenario.conversations):
        for turn_no, turn in enumerate(conv.turns):
            tokens = generator.count_tokens(turn.user)
            if tokens > plan.settings.max_input_tokens:
                raise ChatbotError(f"{plan.path}: `conversations.{conv_no}.turns.{turn_no}.user` is {tokens:,} "
                                   f"tokens; the engine takes at most {plan.settings.max_input_tokens:,}")


def load_generators(plan: LabPlan, *, device: str = "auto", allow_download: bool = False) -> dict[str, Any]:
    """Every model of the grid, loaded and checked before any cell runs."""
    from ..generation import LocalGenerator

    from ..response_bank import BankedGenerator, ResponseBank
    from ..sentence_encoder import load_encoder

    loaded: dict[str, Any] = {}
    models: dict[str, Any] = {}
    banks: dict[tuple[str, ...], ResponseBank] = {}
    for label, source in plan.models.items():
        if source not in models:
            try:
                models[source] = LocalGenerator.from_pretrained(source or None, device=device,
                                                                allow_download=allow_download)
            except ChatbotError as err:
                where = "`grid.models`" if plan.scenario.grid.models else "model"
                raise ChatbotError(f"{plan.path}: {where}: {err}") from None
        generator = models[source]
        bank = plan.banks.get(label, ())
        if bank:
            encoder = plan.settings.sentence_encoder
            try:
                encoder = load_encoder(encoder) if encoder else None
            except ChatbotError as err:
                raise ChatbotError(f"{plan.path}: `sentence_encoder`: {err}") from None
            if bank not in banks:
                try:
                    banks[bank] = ResponseBank.load(bank, encoder=encoder)
                except ChatbotError as err:
                    raise ChatbotError(f"{plan.path}: `grid.response_banks`: {err}") from None
            generator = BankedGenerator(generator, banks[bank], candidates=plan.settings.bank_candidates,
                                        encoder=encoder)
        _check_against_model(plan, label, generator)
        loaded[label] = generator
    return loaded


async def _run_cell(plan: LabPlan, cell: LabCell, generator: Any, prompts_dir: Path,
                    progress: Callable[[str], None] | None) -> CellResult:
    from ..engine import ChatEngine
    from ..memory import InMemoryStore

    scenario = plan.scenario
    recorder = _Recorder(generator)
    settings = plan.settings.model_copy(update={"prompts_dir": prompts_dir, "persona": cell.persona,
                                                "memory_path": ":memory:", "max_batch": 1})
    engine = ChatEngine(recorder, InMemoryStore(), settings)
    result = CellResult(cell)
    scored: list[tuple[str, str]] = []
    turns_by_transcript: list[list[LabTurn]] = []
    started = time.perf_counter()
    try:
        for sample in range(scenario.samples):
            for conv_no, conv in enumerate(scenario.conversations):
                conversation_id = f"lab:c{conv_no}-s{sample}"
                lab_turns: list[LabTurn] = []
                rows: list[dict[str, Any]] = []
                for turn_no, turn in enumerate(conv.turns):
                    seed = turn_seed(scenario.seed, sample, conv_no, turn_no)
                    recorder.last_prompt = None
                    reply = await engine.respond(conversation_id, scenario.user, turn.user, persona=cell.persona,
                                                 preset=cell.base_preset, decoding={**cell.overrides, "seed": seed})
                    lab_turn = LabTurn(turn.user, reply.text, reply.reply_tokens, reply.finish_reason, reply.safety,
                                       reply.attempts, reply.refused, reply.timings.get("total"),
                                       turn.references)
                    if lab_turn.model_written and recorder.last_prompt is not None:
                        scored.append((recorder.last_prompt, reply.text))
                    if not result.decoding:
                        result.decoding = reply.settings.model_dump(exclude={"seed"})
                    lab_turns.append(lab_turn)
                    rows.append({"user": turn.user, "reply": reply.text, "seed": seed,
                                 "reply_tokens": reply.reply_tokens, "finish_reason": reply.finish_reason,
                                 "attempts": reply.attempts, "safety": list(reply.safety),
                                 "latency": None if lab_turn.latency is None else round(lab_turn.latency, 4)})
                    if progress:
                        progress(cell.key)
                turns_by_transcript.append(lab_turns)
                result.transcripts.append({"sample": sample, "conversation": conv_no,
                                           "name": conv.name or f"conversation {conv_no + 1}", "turns": rows})
    finally:
        await engine.close()
    nll = await asyncio.to_thread(_score, generator, scored)
    result.metrics = cell_metrics(turns_by_transcript, samples=scenario.samples, nll=nll)
    result.seconds = time.perf_counter() - started
    log.info("%s: %d replies in %.1f s", cell.key, result.metrics["replies"], result.seconds)
    return result


def _score(generator: Any, scored: Sequence[tuple[str, str]]) -> tuple[float, int]:
    """Summed negative log-likelihood and token count of the replies, each under its prompt."""
    # In a transcript the reply's first word carries the space after "Name:"; a DialoGPT
    # reply follows the end-of-text token directly (as `LocalGenerator.bot_turn_ids` reads them).
    lead = " " if generator.format.name == "transcript" else ""
    model = getattr(generator, "base", generator)  # a response bank's replies are scored by its model
    total, tokens = 0.0, 0
    for prompt, reply in scored:
        nll, n = reply_nll(model.model, model.encode(prompt), model.encode(lead + reply), model.context_size)
        total, tokens = total + nll, tokens + n
    return total, tokens


def run_lab(plan: LabPlan, generators: dict[str, Any], *, progress: Callable[[str], None] | None = None) -> LabRun:
    """Run every cell, in grid order (models, then personas, then presets)."""

    async def run_all() -> list[CellResult]:
        with tempfile.TemporaryDirectory(prefix="chatbot-lab-") as folder:
            # The engine reads personas from a folder: this run's, exactly as checked, the scenario's own included.
            _write_personas(plan.personas, Path(folder), Path(plan.settings.prompts_dir))
            for generator in generators.values():
                # A first call pays one-off costs (allocations, lazy set-up) that would land on the first cell's latency.
                await asyncio.to_thread(_warm_up, generator)
            return [await _run_cell(plan, cell, generators[cell.model], Path(folder), progress) for cell in plan.cells]

    started = time.perf_counter()
    cells = asyncio.run(run_all())
    return LabRun(plan, cells, time.perf_counter() - started,
                  {label: str(getattr(g, "name", label)) for label, g in generators.items()})


def _warm_up(generator: Any) -> None:
    from ..generation import GenerationRequest
    from ..safety import ToxicityFilter

    generator.generate([GenerationRequest("User: hi\nBot:", DecodingSettings(max_new_tokens=4, seed=0), ("\n",))])
    ToxicityFilter().check("warm up")  # its classifier loads on first use (about a second)
