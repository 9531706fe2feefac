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
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any, Sequence

from .config import Settings
from .conversation import Turn, Window, build_window, check_author, check_conversation_id
from .errors import ChatbotError
from .generation import DecodingSettings, GenerationRequest, Generator, apply_overrides, get_preset, make_overrides
from .memory import MemoryStore, open_store
from .prompting import Persona, Utterance, get_persona, list_personas
from .safety import InputRejected, sanitize_input

__all__ = ["ChatEngine", "Reply", "ReplyStream", "EngineBusy", "GenerationFailed", "InputRejected"]

log = logging.getLogger(__name__)

EXAMPLE_USER = "User"
"""Speaker name of the user side of persona examples. Fixed, not the current author's name,
so the pinned part of the prompt is the same for everyone in a conversation."""
EXPIRY_INTERVAL = 3600.0


class EngineBusy(ChatbotError):
    """Too many messages are already waiting in this conversation."""


class GenerationFailed(ChatbotError):
    """The model raised while replying; the user's turn is stored and the engine is still usable."""


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
    """``stop`` (the turn ended), ``length`` (max_new_tokens), ``time`` (max_time), or
    ``fallback`` (the model produced nothing usable and `Settings.fallback_reply` was sent)."""
    prompt_tokens: int
    reply_tokens: int
    window_turns: int
    """Conversation turns in the prompt (the persona's examples not counted)."""
    dropped_turn_ids: tuple[int, ...]
    """Stored turns the window left out, oldest first."""
    cut_turn_ids: tuple[int, ...]
    """Turns shortened to fit (only ever the newest, when it alone exceeds the window)."""
    user_turn_id: int
    bot_turn_id: int
    settings: DecodingSettings
    timings: dict[str, float] = field(default_factory=dict)
    """Seconds spent: ``queued`` (waiting for the conversation), ``prepare`` (memory and window),
    ``generate`` and ``total``."""


@dataclass(frozen=True)
class _Plan:
    persona: Persona
    settings: DecodingSettings
    request: GenerationRequest
    window: Window
    user_turn: Turn
    prompt_tokens: int


class _Clock:
    """Seconds spent in each step of one exchange."""

    def __init__(self) -> None:
        self.started = self._last = time.perf_counter()
        self.timings: dict[str, float] = {}

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

    def busy(self, conversation_id: str) -> int:
        entry = self._entries.get(conversation_id)
        return entry[1] if entry else 0


class ReplyStream:
    """Pieces of a reply as they are generated: ``async for piece in stream``.

    After the loop ends, `reply` holds the full `Reply` (the bot turn is stored by then).
    Leaving the loop early stops the generation; the user's turn stays stored and no bot
    turn is written, and `reply` stays None.
    """

    def __init__(self, engine: "ChatEngine", conversation_id: str, author: str, text: str, options: dict[str, Any]):
        self.reply: Reply | None = None
        self._pieces = engine._stream(self, conversation_id, author, text, **options)

    def __aiter__(self) -> AsyncIterator[str]:
        return self._pieces

    async def aclose(self) -> None:
        await self._pieces.aclose()

    async def text(self) -> str:
        """Consume the whole stream and return the reply text."""
        return "".join([piece async for piece in self._pieces])


class ChatEngine:
    """Conversation memory plus a generator, behind `respond` and `stream`."""

    def __init__(self, generator: Generator, store: MemoryStore, settings: Settings | None = None) -> None:
        self.generator = generator
        self.store = store
        self.settings = settings or Settings()
        self._personas: dict[str, Persona] = {}
        self.default_persona = self.persona(self.settings.persona)  # fail now, not at the first message
        self._locks = _ConversationLocks(self.settings.max_waiting_per_conversation)
        # The model runs on one thread: replies take turns on it (a later issue batches
        # them), and the event loop stays free.
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="generate")
        self._next_expiry = 0.0
        self._closed = False

    @classmethod
    def from_settings(cls, settings: Settings | None = None) -> "ChatEngine":
        """Load the model and open the memory store that ``settings`` name."""
        from .generation import LocalGenerator

        settings = settings or Settings()
        get_persona(settings.persona, settings.prompts_dir)
        generator = LocalGenerator.from_pretrained(settings.model, device=settings.device,
                                                   allow_download=settings.allow_download)
        return cls(generator, open_store(settings.memory_path), settings)

    # ------------------------------------------------------------------ personas and presets

    def persona(self, name: str) -> Persona:
        """A persona by file name (cached after the first read)."""
        if name not in self._personas:
            self._personas[name] = get_persona(name, self.settings.prompts_dir)
        return self._personas[name]

    def personas(self) -> dict[str, Persona]:
        """Every persona available, by name."""
        found = list_personas(self.settings.prompts_dir)
        self._personas.update(found)
        return found

    async def choices(self, conversation_id: str) -> tuple[Persona, str]:
        """The persona and decoding preset this conversation uses now."""
        check_conversation_id(conversation_id)
        options = await self.store.get_options(conversation_id)
        return self._resolve(options)

    def _resolve(self, options: dict[str, str], persona: str | None = None,
                 preset: str | None = None) -> tuple[Persona, str]:
        chosen = self.persona(persona or options.get("persona") or self.settings.persona)
        preset_name = preset or options.get("preset") or self.settings.preset or chosen.preset
        get_preset(preset_name)
        return chosen, preset_name

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

    async def forget_author(self, author: str) -> int:
        """Delete everything ``author`` said, in every conversation."""
        return await self.store.forget_author(check_author(author))

    async def export(self, conversation_id: str) -> dict[str, Any]:
        return await self.store.export(check_conversation_id(conversation_id))

    async def close(self) -> None:
        """Wait for the reply in progress, then close the store."""
        if self._closed:
            return
        self._closed = True
        await asyncio.get_running_loop().run_in_executor(None, self._executor.shutdown)
        await self.store.close()

    # ------------------------------------------------------------------ replying

    async def respond(self, conversation_id: str, author: str, text: str, *, persona: str | None = None,
                      preset: str | None = None, decoding: Any = None) -> Reply:
        """Store the user's message, generate the bot's reply, store it and return it.

        ``persona``, ``preset`` and ``decoding`` (a `DecodingOverrides` or dict) apply to
        this reply only. Raises `InputRejected` for a message the engine will not take
        (nothing is stored), `EngineBusy` when the conversation's queue is full, and
        `GenerationFailed` when the model fails (the user's turn stays stored).
        """
        async with self._exchange(conversation_id, author, text, persona, preset, decoding) as (plan, clock):
            try:
                result = (await self._in_worker(self.generator.generate, [plan.request]))[0]
            except Exception as err:
                raise self._failed(conversation_id, err) from err
            clock.mark("generate")
            return await self._finish(plan, clock, result.text, result.finish_reason, result.completion_tokens)

    def stream(self, conversation_id: str, author: str, text: str, *, persona: str | None = None,
               preset: str | None = None, decoding: Any = None) -> ReplyStream:
        """Like `respond`, but the reply arrives in pieces: ``async for piece in engine.stream(...)``."""
        return ReplyStream(self, conversation_id, author, text,
                           {"persona": persona, "preset": preset, "decoding": decoding})

    async def _stream(self, holder: ReplyStream, conversation_id: str, author: str, text: str, *,
                      persona: str | None, preset: str | None, decoding: Any) -> AsyncIterator[str]:
        async with self._exchange(conversation_id, author, text, persona, preset, decoding) as (plan, clock):
            loop = asyncio.get_running_loop()
            queue: asyncio.Queue[tuple[str, Any]] = asyncio.Queue()
            stop = threading.Event()

            def work() -> None:
                pieces = self.generator.stream(plan.request)
                try:
                    for piece in pieces:
                        loop.call_soon_threadsafe(queue.put_nowait, ("piece", piece))
                        if stop.is_set():
                            break
                except Exception as err:
                    loop.call_soon_threadsafe(queue.put_nowait, ("error", err))
                    return
                finally:
                    close = getattr(pieces, "close", None)
                    if close is not None:
                        close()  # stops the model at its next token when we left early
                loop.call_soon_threadsafe(queue.put_nowait, ("done", None))

            worker = loop.run_in_executor(self._executor, work)
            parts: list[str] = []
            try:
                while True:
                    kind, value = await queue.get()
                    if kind == "piece":
                        parts.append(value)
                        yield value
                    elif kind == "error":
                        raise self._failed(conversation_id, value) from value
                    else:
                        break
            finally:
                stop.set()
                # The model thread must be finished before the conversation is unlocked.
                await asyncio.shield(worker)
            clock.mark("generate")
            reply_text = "".join(parts)
            n_tokens = self.generator.count_tokens(reply_text)
            if not reply_text.strip():
                yield self.settings.fallback_reply
                finish = "fallback"
            elif clock.timings["generate"] >= plan.settings.max_time:
                finish = "time"
            elif n_tokens >= plan.settings.max_new_tokens:
                finish = "length"
            else:
                finish = "stop"
            holder.reply = await self._finish(plan, clock, reply_text, finish, n_tokens)

    # ------------------------------------------------------------------ the steps

    @asynccontextmanager
    async def _exchange(self, conversation_id: str, author: str, text: str, persona: str | None,
                        preset: str | None, decoding: Any) -> AsyncIterator[tuple[_Plan, _Clock]]:
        """Check the message, wait for the conversation, store the user turn and plan the prompt."""
        clock = _Clock()
        text = self._check_message(conversation_id, author, text)
        async with self._locks.hold(conversation_id):
            clock.mark("queued")
            plan = await self._plan(conversation_id, author, text, persona, preset, decoding)
            clock.mark("prepare")
            yield plan, clock

    async def _finish(self, plan: _Plan, clock: _Clock, text: str, finish: str, reply_tokens: int) -> Reply:
        """Store the bot turn (the fallback reply when the model gave nothing) and build the `Reply`."""
        if not text.strip():
            text, finish = self.settings.fallback_reply, "fallback"
        bot_turn = await self.store.append(plan.user_turn.conversation_id, plan.persona.speaker, "bot", text)
        clock.timings["total"] = time.perf_counter() - clock.started
        return self._reply(plan, bot_turn, finish, reply_tokens, clock.timings)

    @staticmethod
    def _failed(conversation_id: str, err: BaseException) -> GenerationFailed:
        log.error("generation failed in %s", conversation_id, exc_info=err)
        return GenerationFailed(f"the model failed to reply ({type(err).__name__}: {err}); "
                                "the message was kept, try again")

    def _check_message(self, conversation_id: str, author: str, text: str) -> str:
        if self._closed:
            raise ChatbotError("the engine is closed")
        check_conversation_id(conversation_id)
        check_author(author)
        return sanitize_input(text, max_chars=self.settings.max_input_chars)

    async def _in_worker(self, fn: Any, *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    async def _plan(self, conversation_id: str, author: str, text: str, persona: str | None,
                    preset: str | None, decoding: Any) -> _Plan:
        """Everything up to the generator: choices checked first, then the user turn stored, then the window."""
        await self._maybe_expire()
        options = await self.store.get_options(conversation_id)
        chosen, preset_name = self._resolve(options, persona, preset)
        settings = apply_overrides(self.settings.decoding_settings(preset_name), make_overrides(decoding))
        budget = self.generator.context_size - settings.max_new_tokens
        if budget < 1:
            raise ChatbotError(f"`max_new_tokens` must be below the model's context of "
                               f"{self.generator.context_size} tokens, got {settings.max_new_tokens}")

        user_turn = await self.store.append(conversation_id, author, "user", text)
        turns = await self.store.newest(conversation_id, self.settings.max_history_turns)
        total = await self.store.count(conversation_id)
        # Building the window tokenizes the history several times: off the event loop.
        window, prompt, prompt_tokens = await asyncio.to_thread(
            self._window, chosen, turns, total - len(turns), budget)
        speakers = {t.author for t in window.turns} | {EXAMPLE_USER, chosen.speaker}
        stops = tuple(self.generator.format.stop_strings(sorted(speakers)))
        if window.dropped:
            log.info("%s: window dropped %d turns", conversation_id, len(window.dropped))
        return _Plan(chosen, settings, GenerationRequest(prompt, settings, stops), window, user_turn, prompt_tokens)

    def _window(self, persona: Persona, turns: Sequence[Turn], first_position: int,
                budget: int) -> tuple[Window, str, int]:
        fmt = self.generator.format

        def render(preamble: str, pinned: Sequence[Utterance], kept: Sequence[Turn]) -> str:
            return fmt.build_prompt(list(pinned) + [Utterance(t.author, t.text) for t in kept], persona.speaker,
                                    preamble)

        window = build_window(turns, render=render, count_tokens=self.generator.count_tokens, budget=budget,
                              preamble=persona.description, pinned=persona.example_turns(EXAMPLE_USER),
                              first_position=first_position, chunk=self.settings.window_chunk)
        prompt = render(window.preamble, window.pinned, window.turns)
        return window, prompt, window.tokens

    async def _maybe_expire(self) -> None:
        days = self.settings.expire_after_days
        now = time.monotonic()
        if days is None or now < self._next_expiry:
            return
        self._next_expiry = now + EXPIRY_INTERVAL
        removed = await self.store.expire(days * 86400)
        if removed:
            log.info("expired %d turns older than %g days", removed, days)

    def _reply(self, plan: _Plan, bot_turn: Turn, finish: str, reply_tokens: int,
               timings: dict[str, float]) -> Reply:
        return Reply(
            text=bot_turn.text, conversation_id=bot_turn.conversation_id, persona=plan.persona.name,
            speaker=plan.persona.speaker, finish_reason=finish, prompt_tokens=plan.prompt_tokens,
            reply_tokens=reply_tokens, window_turns=len(plan.window.turns), dropped_turn_ids=plan.window.dropped,
            cut_turn_ids=plan.window.cut, user_turn_id=plan.user_turn.id, bot_turn_id=bot_turn.id,
            settings=plan.settings, timings=timings,
        )

