"""The steps of one exchange (a message and its reply) that touch memory and the prompt.

`ChatEngine` orders them: `Exchanges.check_message` before the conversation is queued; once
its turn comes, `refusal` (an abusive message, nothing stored) or `plan` (choices resolved,
the user turn stored, the window and prompt planned); the reply policy runs the model; then
`finish` (the bot turn stored, the `Reply` built). Each step is a method here so the engine
itself is only the order, the locks and the model's worker.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

from .config import Settings
from .conversation import Turn, Window, check_author, check_conversation_id, prompt_planner
from .decoding import DecodingSettings, seeded_for
from .errors import InputRejected
from .generation import GenerationRequest, Generator
from .memory import MemoryStore, check_author_key
from .personas import PersonaBook
from .prompting import Persona
from .reply_policy import Outcome, RepeatCheck
from .safety import OutputFilter, break_special_tokens, neutralise_speaker_tags, sanitize_input

__all__ = ["Reply", "Exchanges", "ExchangePlan", "StepClock", "EXAMPLE_USER", "finish_despite_cancel"]

log = logging.getLogger(__name__)
T = TypeVar("T")

EXAMPLE_USER = "User"
"""Speaker name of the user side of persona examples. Fixed, not the current author's name,
so the pinned part of the prompt is the same for everyone in a conversation."""
EXPIRY_INTERVAL = 3600.0


@dataclass(frozen=True)
class Reply:
    """The bot's answer and what it took to produce it."""

    text: str
    conversation_id: str
    persona: str
    """Persona that answered (its file name)."""
    speaker: str
    """The bot's speaker name in the transcript."""
    finish_reason: str
    """``stop`` (the turn ended), ``length`` (max_new_tokens), ``time`` (max_time), ``fallback``
    (the model produced nothing usable; `Settings.fallback_reply` was sent), ``unsafe`` (every
    attempt was flagged; `Settings.unsafe_fallback_reply` was sent) or ``refused``."""
    prompt_tokens: int
    reply_tokens: int
    window_turns: int
    """Conversation turns in the prompt (the persona's examples not counted)."""
    dropped_turn_ids: tuple[int, ...]
    """Stored turns the window left out, oldest first."""
    cut_turn_ids: tuple[int, ...]
    """Turns shortened to fit (only ever the newest, when it alone exceeds the window)."""
    user_turn_id: int | None
    """None when the message was refused (it is not stored)."""
    bot_turn_id: int | None
    """None when nothing was stored: a refused message, or a conversation reset after an unsafe reply."""
    settings: DecodingSettings
    timings: dict[str, float] = field(default_factory=dict)
    """Seconds spent: ``queued`` (waiting for the conversation), ``prepare`` (memory and window),
    ``generate`` (all attempts and their checks) and ``total``."""
    safety: tuple[str, ...] = ()
    """What the filters did, over all attempts ("redacted email", "toxicity: matched ...")."""
    attempts: int = 1
    """Replies generated: more than one when a reply was unsafe or repeated an earlier one."""
    repeat_similarity: float = 0.0
    """Similarity (0-1) of the reply to the most similar of the bot's recent replies."""
    refused: bool = False
    """The message was refused as abusive (`Settings.abusive_input`); `text` is the refusal."""
    reset: bool = False
    """The conversation was forgotten after an unsafe reply (`Settings.reset_after_unsafe`)."""



@dataclass(frozen=True)
class ExchangePlan:
    """What one exchange has decided before the model runs: who answers, how, and from which prompt."""


    persona: Persona
    settings: DecodingSettings
    request: GenerationRequest
    window: Window
    user_turn: Turn
    prompt_tokens: int
    recent_replies: tuple[str, ...]
    """The bot's latest replies (up to `repeat_lookback`), to catch a reply that repeats one."""
    speakers: tuple[str, ...]



class StepClock:
    """Seconds spent in each step of one exchange."""

    def __init__(self) -> None:
        self.started = self._last = time.perf_counter()
        self.timings: dict[str, float] = {}

    def elapsed(self) -> float:
        return time.perf_counter() - self.started

    def mark(self, step: str) -> None:
        now = time.perf_counter()
        self.timings[step] = now - self._last
        self._last = now




class Exchanges:
    """The memory and prompt steps of every exchange of one engine (its store, generator and personas)."""

    def __init__(self, generator: Generator, store: MemoryStore, book: PersonaBook, settings: Settings,
                 input_filter: OutputFilter | None) -> None:
        self.generator = generator
        self.store = store
        self.book = book
        self.settings = settings
        self.input_filter = input_filter
        """Judges what users send (`Settings.abusive_input` ``refuse``); None lets everything through."""
        tokenizer = getattr(generator, "tokenizer", None)
        self._special_tokens = tuple(getattr(tokenizer, "all_special_tokens", ())) or (
            getattr(generator.format, "eos_token", "<|endoftext|>"),)
        self._next_expiry = 0.0

    def check_message(self, conversation_id: str, author: str, text: str, author_key: str | None = None, *,
                      role: str = "user") -> str:
        """The user's text cleaned (`safety.sanitize_input`), literal special tokens made plain, length-checked."""
        check_conversation_id(conversation_id)
        if role == "user":
            self.book.check_author(author)
        else:
            check_author(author)
        if author_key is not None:
            check_author_key(author_key)  # here, so a bad key fails before the conversation is queued
        text = break_special_tokens(sanitize_input(text, max_chars=self.settings.max_input_chars),
                                    self._special_tokens)
        tokens = self.generator.count_tokens(text)
        if tokens > self.settings.max_input_tokens:
            raise InputRejected(f"that message is {tokens:,} tokens long; "
                                f"the limit is {self.settings.max_input_tokens:,}")
        return text

    async def refusal(self, conversation_id: str, text: str, persona: str | None, preset: str | None,
                      decoding: Any) -> Reply | None:
        """The refusal `Reply` for an abusive message (nothing stored), or None to go on."""
        if self.input_filter is None:
            return None
        verdict = await asyncio.to_thread(self.input_filter.check, text)
        if verdict.allowed:
            return None
        log.info("%s: refused an abusive message (%s)", conversation_id, "; ".join(verdict.reasons))
        options = await self.store.get_options(conversation_id)
        chosen, preset_name = self.book.resolve(options, persona, preset)
        settings = self.book.decoding(chosen, preset_name, decoding)
        return Reply(text=self.settings.refusal_reply, conversation_id=conversation_id, persona=chosen.name,
                     speaker=chosen.speaker, finish_reason="refused", prompt_tokens=0, reply_tokens=0,
                     window_turns=0, dropped_turn_ids=(), cut_turn_ids=(), user_turn_id=None, bot_turn_id=None,
                     settings=settings, safety=tuple(f"input {r}" for r in verdict.reasons), refused=True)

    async def plan(self, conversation_id: str, author: str, author_key: str | None, text: str,
                   persona: str | None, preset: str | None, decoding: Any, stop: tuple[str, ...] = ()) -> ExchangePlan:
        """Everything up to the generator: choices checked first, then the user turn stored, then the
        window; ``stop``, the caller's stop strings, end the reply as the format's own do."""
        await self._maybe_expire()
        options = await self.store.get_options(conversation_id)
        chosen, preset_name = self.book.resolve(options, persona, preset)
        settings = self.book.decoding(chosen, preset_name, decoding)
        plan = self.planner(chosen, settings)
        # The persona alone must fit the window: checked before the user's turn is stored.
        await asyncio.to_thread(plan, [])

        earlier = await self.store.newest(conversation_id, self.settings.max_history_turns - 1)
        speakers = self.speakers(earlier, chosen, author)
        # Nobody may start a fake turn of any speaker of this conversation inside their message.
        text = neutralise_speaker_tags(text, speakers)
        user_turn = await self.store.append(conversation_id, author, "user", text, author_key=author_key)
        turns = [*earlier, user_turn]
        total = await self.store.count(conversation_id)
        # Building the window tokenizes the history several times: off the event loop.
        planned = await asyncio.to_thread(plan, turns, first_position=total - len(turns))
        window = planned.window
        recent = tuple(t.text for t in earlier if t.role == "bot")[-settings.repeat_lookback:]
        if window.dropped:
            log.info("%s: window dropped %d turns", conversation_id, len(window.dropped))
        # The user's seed makes the conversation reproducible; each reply samples with a seed of its own.
        request = GenerationRequest(planned.prompt, seeded_for(settings, conversation_id, total),
                                    (*planned.stop_strings, *stop), planned.bot_texts, cancel=threading.Event(),
                                    context=planned.said, style=chosen.style)
        return ExchangePlan(chosen, settings, request, window, user_turn, window.tokens, recent,
                            tuple(sorted(speakers)))

    def planner(self, persona: Persona, settings: DecodingSettings) -> Callable[..., Any]:
        """The prompt planner of ``persona``'s conversations under ``settings`` (`prompt_planner`)."""
        return prompt_planner(self.generator, settings, speaker=persona.speaker, preamble=persona.description,
                              pinned=persona.example_turns(EXAMPLE_USER), speakers=(EXAMPLE_USER,),
                              chunk=self.settings.window_chunk)

    def speakers(self, earlier: list[Turn], chosen: Persona, author: str) -> set[str]:
        """Every name that may start a turn in this conversation's prompt."""
        return {t.author for t in earlier} | self.book.speakers | {EXAMPLE_USER, chosen.speaker, author}

    async def remember(self, conversation_id: str, author: str, text: str, role: str, author_key: str | None,
                       unless_within: int) -> Turn | None:
        """`ChatEngine.remember`'s store step, for a checked ``text``, while the conversation is held."""
        options = await self.store.get_options(conversation_id)
        chosen, _ = self.book.resolve(options)
        earlier = await self.store.newest(conversation_id, max(unless_within, self.settings.max_history_turns))
        if role == "bot":
            author, author_key = chosen.speaker, None
        text = neutralise_speaker_tags(text, self.speakers(earlier, chosen, author))
        # Only turns the window reads can count as already there.
        within = min(unless_within, self.settings.max_history_turns - 1)
        if within > 0 and any(t.role == role and t.text == text for t in earlier[-within:]):
            return None
        return await self.store.append(conversation_id, author, role, text,  # type: ignore[arg-type]
                                       author_key=author_key)

    def streamed(self, plan: ExchangePlan, outcome: Outcome, started: float) -> Outcome:
        """The outcome of a sentence-gated reply as `finish` takes it: its length, why it ended
        (``time`` or ``length`` when a limit cut it), its likeness to recent replies."""
        shown, finish = outcome.text, outcome.finish
        n_tokens = self.generator.count_tokens(shown) if shown else 0
        if finish == "stop":
            if time.perf_counter() - started >= plan.settings.max_time:
                finish = "time"
            elif n_tokens >= plan.settings.max_new_tokens:
                finish = "length"
        similarity = RepeatCheck(plan.recent_replies, plan.settings).similarity(shown)
        return Outcome(shown, finish, n_tokens, outcome.reasons, outcome.attempts, similarity)

    async def finish(self, plan: ExchangePlan, clock: StepClock, outcome: Outcome) -> Reply:
        """Store the bot turn (a fallback when the model gave nothing usable) and build the `Reply`."""
        text, finish = outcome.text, outcome.finish
        conversation_id = plan.user_turn.conversation_id
        reset = False
        if finish == "unsafe" and not text.strip():
            text = self.settings.unsafe_fallback_reply
            reset = self.settings.reset_after_unsafe
        elif not text.strip():
            text, finish = self.settings.fallback_reply, "fallback"
        if reset:
            # As ParlAI does after an unsafe reply: start over, so the model does not build on it.
            await self.store.reset(conversation_id)
            bot_turn_id = None
        else:
            # Once stored, the reply is returned even to a caller cancelled meanwhile: a stored reply
            # nobody was given would read, next time, as something the user was told.
            stored = await finish_despite_cancel(self.store.append(conversation_id, plan.persona.speaker, "bot", text))
            bot_turn_id = stored.id
        clock.timings["total"] = clock.elapsed()
        return Reply(
            text=text, conversation_id=conversation_id, persona=plan.persona.name, speaker=plan.persona.speaker,
            finish_reason=finish, prompt_tokens=plan.prompt_tokens, reply_tokens=outcome.reply_tokens,
            window_turns=len(plan.window.turns), dropped_turn_ids=plan.window.dropped, cut_turn_ids=plan.window.cut,
            user_turn_id=plan.user_turn.id, bot_turn_id=bot_turn_id, settings=plan.settings, timings=clock.timings,
            safety=tuple(outcome.reasons), attempts=outcome.attempts, repeat_similarity=round(outcome.similarity, 3),
            reset=reset,
        )

    async def _maybe_expire(self) -> None:
        days = self.settings.expire_after_days
        now = time.monotonic()
        if days is None or now < self._next_expiry:
            return
        self._next_expiry = now + EXPIRY_INTERVAL
        removed = await self.store.expire(days * 86400)
        if removed:
            log.info("expired %d turns older than %g days", removed, days)


async def finish_despite_cancel(coro: Awaitable[T]) -> T:
    """Await ``coro`` to its end and return its result, dropping a cancellation of the caller that
    came meanwhile: the work it would have stopped is done, and its result must reach the caller."""
    task = asyncio.ensure_future(coro)
    while True:
        try:
            return await asyncio.shield(task)
        except asyncio.CancelledError:
            if task.cancelled():
                raise
            current = asyncio.current_task()
            if current is not None:
                current.uncancel()
