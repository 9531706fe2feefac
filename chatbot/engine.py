"""`ChatEngine`: the one door into the core. Every face (terminal, LangChain, Discord) calls it.

A message travels: sanitize the text, store the user turn (committed), read the newest
turns, build the token-budgeted window with the persona pinned, format the prompt, run
the generator in a worker thread, store the bot turn, return a `Reply`.

Concurrency: one conversation's messages are answered one at a time, in arrival order
(a per-conversation lock, with a bounded number of waiters); different conversations
interleave freely, and the event loop never waits on the model or the disk. The model
itself runs on a single worker thread, so requests from different conversations take
turns on it rather than fighting over the same cores.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from concurrent.futures import Executor, ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any, TypeVar

from .config import Settings
from .conversation import Turn, Window, check_author, check_conversation_id, prompt_planner
from .decoding import DecodingSettings, get_preset, seeded_for
from .errors import ChatbotError, EngineBusy, GenerationFailed, InputRejected
from .generation import GenerationRequest, Generator
from .memory import MemoryStore, check_author_key, open_store
from .personas import PersonaBook
from .prompting import Persona, get_persona
from .reply_policy import Outcome, RepeatCheck, ReplyPolicy
from .safety import (
    FilterContext,
    ToxicityFilter,
    break_special_tokens,
    neutralise_speaker_tags,
    output_chain,
    sanitize_input,
)

__all__ = ["ChatEngine", "Reply", "ReplyStream", "iterate_in_thread"]

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
class _Plan:
    persona: Persona
    settings: DecodingSettings
    request: GenerationRequest
    window: Window
    user_turn: Turn
    prompt_tokens: int
    recent_replies: tuple[str, ...]
    """The bot's latest replies (up to `repeat_lookback`), to catch a reply that repeats one."""
    speakers: tuple[str, ...]


class _Clock:
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


class _ConversationLocks:
    """One asyncio lock per conversation that has work in flight, with bounded waiting.

    Entries are removed when nobody holds or waits, so the table only ever holds busy
    conversations.
    """

    def __init__(self, max_waiting: int) -> None:
        self.max_waiting = max_waiting
        self._entries: dict[str, list[Any]] = {}  # id -> [lock, holders + waiters]

    @asynccontextmanager
    async def hold(self, conversation_id: str) -> AsyncIterator[None]:
        entry = self._entries.setdefault(conversation_id, [asyncio.Lock(), 0])
        if entry[1] > self.max_waiting:
            raise EngineBusy("still answering earlier messages in this conversation; try again in a moment")
        entry[1] += 1
        try:
            async with entry[0]:
                yield
        finally:
            entry[1] -= 1
            if entry[1] == 0:
                self._entries.pop(conversation_id, None)

    async def idle(self) -> None:
        """Return once no conversation has work in flight or waiting."""
        while self._entries:
            await asyncio.sleep(0.02)

    def busy(self, conversation_id: str) -> int:
        entry = self._entries.get(conversation_id)
        return entry[1] if entry else 0


class ReplyStream:
    """Pieces of a reply as they are generated: ``async for piece in stream``.

    After the loop ends, `reply` holds the full `Reply` (the bot turn is stored by then).
    Leaving the loop early with ``break`` does not by itself end a Python async generator:
    use ``async with engine.stream(...) as stream:`` or call `aclose`, which stops the
    generation and frees the conversation (a dropped stream is closed when it is
    garbage-collected). The user's turn stays stored, no bot turn is written, and `reply`
    stays None.
    """

    def __init__(self, engine: "ChatEngine", conversation_id: str, author: str, text: str, options: dict[str, Any]):
        self.reply: Reply | None = None
        self._pieces = engine._stream(self, conversation_id, author, text, **options)

    def __aiter__(self) -> AsyncIterator[str]:
        return self._pieces

    async def aclose(self) -> None:
        """Stop the reply and free the conversation (needed only when leaving the loop early)."""
        await self._pieces.aclose()

    async def __aenter__(self) -> ReplyStream:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def text(self) -> str:
        """Consume the whole stream and return the reply text."""
        return "".join([piece async for piece in self._pieces])


class ChatEngine:
    """Conversation memory plus a generator, behind `respond` and `stream`."""

    def __init__(self, generator: Generator, store: MemoryStore, settings: Settings | None = None) -> None:
        self.generator = generator
        self.store = store
        self.settings = settings or Settings()
        self.book = PersonaBook(self.settings.prompts_dir, self.settings.persona, self.settings.preset,
                                self.settings.decoding)
        self.default_persona = self.book.default
        self._locks = _ConversationLocks(self.settings.max_waiting_per_conversation)
        # Model calls run on worker threads, so the event loop stays free. A plain generator
        # gets one (replies take turns on the model); a batching one gets a thread per request
        # it can hold, each waiting for its row of the batch.
        self._executor = ThreadPoolExecutor(max_workers=getattr(generator, "max_concurrency", 1),
                                            thread_name_prefix="generate")
        self._owns_generator = False
        self._next_expiry = 0.0
        self._closed = False
        st = self.settings
        # One toxicity filter judges both what users send and what the bot says.
        toxicity = ToxicityFilter(st.toxicity_threshold, blocklist=st.blocklist, allowlist=st.allowlist)
        self.output_filter = output_chain(redact_personal_data=st.redact_personal_data,
                                          block_toxic=st.block_toxic_output, toxicity=toxicity)
        self.input_filter = toxicity if st.abusive_input == "refuse" else None
        self.policy = ReplyPolicy(self.output_filter, st.unsafe_retries)
        tokenizer = getattr(generator, "tokenizer", None)
        self._special_tokens = tuple(getattr(tokenizer, "all_special_tokens", ())) or (
            getattr(generator.format, "eos_token", "<|endoftext|>"),)
        # A reply budget that leaves the default persona no room would fail every message: fail now.
        preset = self.settings.preset or self.default_persona.preset
        self._planner(self.default_persona, self.book.decoding(self.default_persona, preset, None))([])

    @classmethod
    def from_settings(cls, settings: Settings | None = None) -> "ChatEngine":
        """Load the model and open the memory store that ``settings`` name."""
        from .generation import LocalGenerator

        settings = settings or Settings()
        get_persona(settings.persona, settings.prompts_dir)
        generator = LocalGenerator.from_pretrained(settings.model, device=settings.device,
                                                   allow_download=settings.allow_download)
        if settings.max_batch > 1:
            from .scheduler import BatchingGenerator

            generator = BatchingGenerator(generator, max_batch=settings.max_batch,
                                          cache_bytes=settings.prefix_cache_mb * 2**20,
                                          prefill_chunk=settings.prefill_chunk)
        engine = cls(generator, open_store(settings.memory_path), settings)
        engine._owns_generator = True
        return engine

    # ------------------------------------------------------------------ personas and presets

    def persona(self, name: str) -> Persona:
        """A persona by file name (cached after the first read)."""
        return self.book.get(name)

    def personas(self) -> dict[str, Persona]:
        """Every persona available, by name (`PersonaBook.all`: a malformed file is left out and logged once)."""
        return self.book.all()

    async def choices(self, conversation_id: str) -> tuple[Persona, str]:
        """The persona and decoding preset this conversation uses now."""
        check_conversation_id(conversation_id)
        options = await self.store.get_options(conversation_id)
        return self.book.resolve(options)

    async def set_persona(self, conversation_id: str, name: str | None) -> Persona:
        """Choose this conversation's persona (kept across restarts); None goes back to the default."""
        check_conversation_id(conversation_id)
        if name is not None:
            self.persona(name)
        await self.store.set_option(conversation_id, "persona", name)
        return (await self.choices(conversation_id))[0]

    async def set_preset(self, conversation_id: str, name: str | None) -> str:
        """Choose this conversation's decoding preset; None goes back to the persona's."""
        check_conversation_id(conversation_id)
        if name is not None:
            get_preset(name)
        await self.store.set_option(conversation_id, "preset", name)
        return (await self.choices(conversation_id))[1]

    # ------------------------------------------------------------------ memory operations

    async def history(self, conversation_id: str, limit: int = 50) -> list[Turn]:
        return await self.store.newest(check_conversation_id(conversation_id), limit)

    async def count(self, conversation_id: str) -> int:
        return await self.store.count(check_conversation_id(conversation_id))

    async def reset(self, conversation_id: str) -> int:
        """Forget a conversation's turns (its persona and preset choices stay)."""
        async with self._locks.hold(check_conversation_id(conversation_id)):
            return await self.store.reset(conversation_id)

    async def forget_author(self, author_key: str) -> int:
        """Delete everything the person with ``author_key`` said, in every conversation; returns
        how many turns. The key is the one given to `respond`/`stream`, or the author name
        for messages sent without one. The bot's replies stay."""
        return await self.store.forget_author(check_author_key(author_key))

    async def export_author(self, author_key: str) -> dict[str, Any]:
        """Everything the person with ``author_key`` said, in every conversation, grouped by
        conversation (see `MemoryStore.export_author`)."""
        return await self.store.export_author(check_author_key(author_key))

    async def remember(self, conversation_id: str, author: str, text: str, *, role: str = "user",
                       author_key: str | None = None, unless_within: int = 0) -> Turn | None:
        """Store a turn without answering it: context the bot should see, such as the message
        someone replied to (a ``user`` turn of its author) or an old reply of the bot's own
        that has left the window (a ``bot`` turn, under this conversation's speaker).

        The text is cleaned as a message is, and cut to `Settings.max_input_chars` rather
        than refused. With ``unless_within`` > 0, nothing is stored (None is returned) when
        one of that many newest turns already holds the same text from the same role.
        """
        if role not in ("user", "bot"):
            raise ChatbotError(f"`role` must be user or bot, got {role!r}")
        text = text[: self.settings.max_input_chars] if isinstance(text, str) else text
        text = self._check_message(conversation_id, author, text, author_key, role=role)
        async with self._locks.hold(conversation_id):
            options = await self.store.get_options(conversation_id)
            chosen, _ = self.book.resolve(options)
            earlier = await self.store.newest(conversation_id, max(unless_within, self.settings.max_history_turns))
            if role == "bot":
                author, author_key = chosen.speaker, None
            text = neutralise_speaker_tags(text, self._speakers(earlier, chosen, author))
            # Only turns the window reads can count as already there.
            within = min(unless_within, self.settings.max_history_turns - 1)
            if within > 0 and any(t.role == role and t.text == text for t in earlier[-within:]):
                return None
            return await self.store.append(conversation_id, author, role, text, author_key=author_key)  # type: ignore[arg-type]

    def _speakers(self, earlier: list[Turn], chosen: Persona, author: str) -> set[str]:
        """Every name that may start a turn in this conversation's prompt."""
        return {t.author for t in earlier} | self.book.speakers | {EXAMPLE_USER, chosen.speaker, author}

    async def export(self, conversation_id: str) -> dict[str, Any]:
        return await self.store.export(check_conversation_id(conversation_id))

    async def close(self) -> None:
        """Refuse new messages, let those already accepted finish, then close the store."""
        if self._closed:
            return
        self._closed = True
        await self._locks.idle()
        await asyncio.get_running_loop().run_in_executor(None, self._executor.shutdown)
        if self._owns_generator and hasattr(self.generator, "close"):
            await asyncio.to_thread(self.generator.close)
        await self.store.close()

    # ------------------------------------------------------------------ replying

    async def respond(self, conversation_id: str, author: str, text: str, *, persona: str | None = None,
                      preset: str | None = None, decoding: Any = None, author_key: str | None = None) -> Reply:
        """Store the user's message, generate the bot's reply, check it, store it and return it.

        ``author`` is the name the prompt shows. ``author_key`` is who the person is, stably
        (``discord:user:42``), for `forget_author` and `export_author`; without one the
        author name is the key, which is enough only where names are unique and never change.
        ``persona``, ``preset`` and ``decoding`` (a `DecodingOverrides` or dict) apply to
        this reply only. Raises `InputRejected` for a message the engine will not take
        (nothing is stored), `EngineBusy` when the conversation's queue is full, and
        `GenerationFailed` when the model fails (the user's turn stays stored). An abusive
        message is answered with `Settings.refusal_reply` (``reply.refused``) and not stored.
        """
        clock = _Clock()
        text = self._check_message(conversation_id, author, text, author_key)
        async with self._exchange(conversation_id, author, author_key, text, persona, preset, decoding,
                                  clock) as plan:
            if isinstance(plan, Reply):
                return plan
            outcome = await self._generate_checked(plan)
            clock.mark("generate")
            return await self._finish(plan, clock, outcome)

    def stream(self, conversation_id: str, author: str, text: str, *, persona: str | None = None,
               preset: str | None = None, decoding: Any = None, author_key: str | None = None) -> ReplyStream:
        """Like `respond` (same arguments, ``author_key`` included), but the reply arrives in pieces:
        ``async for piece in engine.stream(...)``.

        Text is released a sentence at a time, each one checked by the output filters
        first, so nothing unsafe is ever shown. A sentence that fails stops the reply
        there; if nothing was shown yet, the reply is generated again (as `respond` does).
        """
        return ReplyStream(self, conversation_id, author, text,
                           {"persona": persona, "preset": preset, "decoding": decoding, "author_key": author_key})

    async def _stream(self, holder: ReplyStream, conversation_id: str, author: str, text: str, *,
                      persona: str | None, preset: str | None, decoding: Any,
                      author_key: str | None) -> AsyncIterator[str]:
        clock = _Clock()
        text = self._check_message(conversation_id, author, text, author_key)
        async with self._exchange(conversation_id, author, author_key, text, persona, preset, decoding,
                                  clock) as plan:
            if isinstance(plan, Reply):
                holder.reply = plan
                yield plan.text
                return
            gated = self.policy.gated(self.generator, plan.request, FilterContext(conversation_id, plan.speakers))
            started = time.perf_counter()
            try:
                # Leaving early (a time limit, a shutdown) stops the model at its next token; the
                # worker has finished by the time this loop is left, so the conversation is never
                # unlocked while its model call still runs.
                async for piece in iterate_in_thread(gated.pieces, self._executor, on_stop=gated.stop):
                    yield piece
            except ChatbotError:  # a full model queue (`GeneratorBusy`, an `EngineBusy`) among them
                raise
            except Exception as err:
                raise self._failed(conversation_id, err) from err
            assert gated.outcome is not None
            shown, finish, reasons, attempts = (gated.outcome.text, gated.outcome.finish, gated.outcome.reasons,
                                                gated.outcome.attempts)
            if finish == "unsafe" and not shown:
                yield self.settings.unsafe_fallback_reply
            elif not shown.strip():
                yield self.settings.fallback_reply
            n_tokens = self.generator.count_tokens(shown) if shown else 0
            if finish == "stop":
                if time.perf_counter() - started >= plan.settings.max_time:
                    finish = "time"
                elif n_tokens >= plan.settings.max_new_tokens:
                    finish = "length"
            similarity = RepeatCheck(plan.recent_replies, plan.settings).similarity(shown)
            clock.mark("generate")
            holder.reply = await self._finish(plan, clock, Outcome(shown, finish, n_tokens, reasons, attempts,
                                                                   similarity))

    # ------------------------------------------------------------------ the steps

    async def _refusal(self, conversation_id: str, text: str, persona: str | None, preset: str | None,
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

    async def _generate_checked(self, plan: _Plan) -> Outcome:
        """The reply policy's whole reply (`ReplyPolicy.whole`) for this plan, on the model's worker."""
        context = FilterContext(plan.user_turn.conversation_id, plan.speakers)
        repeat = RepeatCheck(plan.recent_replies, plan.settings)
        try:
            return (await self._in_worker(self.policy.whole, self.generator, [plan.request], [context], [repeat]))[0]
        except asyncio.CancelledError:
            # Whoever waited has gone (a time limit, a shutdown): free the model for the next reply.
            if plan.request.cancel is not None:
                plan.request.cancel.set()
            raise
        except ChatbotError:
            raise
        except Exception as err:
            raise self._failed(plan.user_turn.conversation_id, err) from err

    @asynccontextmanager
    async def _exchange(self, conversation_id: str, author: str, author_key: str | None, text: str,
                        persona: str | None, preset: str | None, decoding: Any,
                        clock: _Clock) -> AsyncIterator[_Plan | Reply]:
        """Wait for the conversation (messages keep their order), then either refuse an abusive
        message (a `Reply`, nothing stored) or store the user turn and plan the prompt.

        Once the conversation's turn has come, the message is taken: a caller cancelled
        meanwhile (Ctrl-C in the terminal, a timeout, a shutdown) is stopped only after the
        user turn is stored, as it is when it stops during the reply.
        """
        async with self._locks.hold(conversation_id):
            clock.mark("queued")

            async def take() -> _Plan | Reply:
                refused = await self._refusal(conversation_id, text, persona, preset, decoding)
                if refused is not None:
                    return refused
                return await self._plan(conversation_id, author, author_key, text, persona, preset, decoding)

            plan = await _finish_before_cancel(take())
            if isinstance(plan, Reply):
                yield plan
                return
            clock.mark("prepare")
            yield plan

    async def _finish(self, plan: _Plan, clock: _Clock, outcome: Outcome) -> Reply:
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
            stored = await _finish_despite_cancel(self.store.append(conversation_id, plan.persona.speaker, "bot", text))
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

    @staticmethod
    def _failed(conversation_id: str, err: BaseException) -> GenerationFailed:
        log.error("generation failed in %s", conversation_id, exc_info=err)
        return GenerationFailed(f"the model failed to reply ({type(err).__name__}: {err}); "
                                "the message was kept, try again")

    def check_author(self, author: str) -> str:
        """``author`` if a person may speak under that name here (`PersonaBook.check_author`)."""
        return self.book.check_author(author)

    def _check_message(self, conversation_id: str, author: str, text: str, author_key: str | None = None, *,
                       role: str = "user") -> str:
        """The user's text cleaned (`safety.sanitize_input`), literal special tokens made plain, length-checked."""
        if self._closed:
            raise ChatbotError("the engine is closed")
        check_conversation_id(conversation_id)
        if role == "user":
            self.check_author(author)
        else:
            check_author(author)
        if author_key is not None:
            check_author_key(author_key)  # here, so a bad key fails before the conversation is queued
        text = break_special_tokens(sanitize_input(text, max_chars=self.settings.max_input_chars),
                                    self._special_tokens)
        tokens = self.generator.count_tokens(text)
        if tokens > self.settings.max_input_tokens:
            raise InputRejected(f"that message is {tokens:,} tokens long; the limit is {self.settings.max_input_tokens:,}")
        return text

    async def _in_worker(self, fn: Any, *args: Any) -> Any:
        try:
            future = asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)
        except RuntimeError:  # the executor is shut down
            raise ChatbotError("the engine is closed") from None
        return await future

    async def _plan(self, conversation_id: str, author: str, author_key: str | None, text: str,
                    persona: str | None, preset: str | None, decoding: Any) -> _Plan:
        """Everything up to the generator: choices checked first, then the user turn stored, then the window."""
        await self._maybe_expire()
        options = await self.store.get_options(conversation_id)
        chosen, preset_name = self.book.resolve(options, persona, preset)
        settings = self.book.decoding(chosen, preset_name, decoding)
        plan = self._planner(chosen, settings)
        # The persona alone must fit the window: checked before the user's turn is stored.
        await asyncio.to_thread(plan, [])

        earlier = await self.store.newest(conversation_id, self.settings.max_history_turns - 1)
        speakers = self._speakers(earlier, chosen, author)
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
                                    planned.stop_strings, planned.bot_texts, cancel=threading.Event())
        return _Plan(chosen, settings, request, window, user_turn, window.tokens, recent, tuple(sorted(speakers)))

    def _planner(self, persona: Persona, settings: DecodingSettings) -> Callable[..., Any]:
        """The prompt planner of ``persona``'s conversations under ``settings`` (`prompt_planner`)."""
        return prompt_planner(self.generator, settings, speaker=persona.speaker, preamble=persona.description,
                              pinned=persona.example_turns(EXAMPLE_USER), speakers=(EXAMPLE_USER,),
                              chunk=self.settings.window_chunk)

    async def _maybe_expire(self) -> None:
        days = self.settings.expire_after_days
        now = time.monotonic()
        if days is None or now < self._next_expiry:
            return
        self._next_expiry = now + EXPIRY_INTERVAL
        removed = await self.store.expire(days * 86400)
        if removed:
            log.info("expired %d turns older than %g days", removed, days)


async def _finish_before_cancel(coro: Awaitable[T]) -> T:
    """Await ``coro`` to its end even when the caller is cancelled meanwhile, then pass the
    cancellation on (an error from ``coro`` is raised instead). `asyncio.shield` alone returns
    at once and leaves the work running unawaited, outside the caller's lock."""
    task = asyncio.ensure_future(coro)
    cancelled: asyncio.CancelledError | None = None
    while True:
        try:
            result = await asyncio.shield(task)
            break
        except asyncio.CancelledError as err:
            if task.cancelled():  # the work itself was cancelled, not only its caller
                raise
            cancelled = err
    if cancelled is not None:
        raise cancelled
    return result


async def _finish_despite_cancel(coro: Awaitable[T]) -> T:
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


async def iterate_in_thread(make: Callable[[], Iterator[T]], executor: Executor | None = None, *,
                            on_stop: Callable[[], None] | None = None) -> AsyncIterator[T]:
    """Run a blocking iterator on a worker thread and yield its items without blocking the loop.

    Closing this generator early stops the iterator (it is closed on its own thread) and
    waits for the thread to finish, so whatever the iterator holds is released by then.
    ``on_stop`` is called first, whenever this generator ends: the way to interrupt an
    iterator that is busy between two items. Errors from the iterator are raised here.
    """
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue[tuple[str, Any]] = asyncio.Queue()
    stop = threading.Event()

    def work() -> None:
        iterator = make()
        try:
            for item in iterator:
                loop.call_soon_threadsafe(queue.put_nowait, ("item", item))
                if stop.is_set():
                    break
        except Exception as err:
            loop.call_soon_threadsafe(queue.put_nowait, ("error", err))
            return
        finally:
            getattr(iterator, "close", lambda: None)()
        loop.call_soon_threadsafe(queue.put_nowait, ("done", None))

    worker = loop.run_in_executor(executor, work)
    try:
        while True:
            kind, value = await queue.get()
            if kind == "item":
                yield value
            elif kind == "error":
                raise value
            else:
                break
    finally:
        stop.set()
        if on_stop is not None:
            on_stop()
        await asyncio.shield(worker)
