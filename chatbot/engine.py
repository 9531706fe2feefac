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
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from concurrent.futures import Executor, ThreadPoolExecutor
from contextlib import asynccontextmanager
from typing import Any, TypeVar

from .config import Settings
from .conversation import Turn, check_conversation_id
from .decoding import get_preset
from .errors import ChatbotError, EngineBusy, GenerationFailed, InputRejected
from .exchange import ExchangePlan, Exchanges, Reply, StepClock
from .generation import GenerationRequest, Generator, prompt_budget
from .memory import MemoryStore, open_store
from .personas import PersonaBook
from .prompting import Persona, get_persona
from .reply_policy import Outcome, RepeatCheck, ReplyPolicy
from .safety import FilterContext, OutputFilter, ToxicityFilter, output_chain

__all__ = ["ChatEngine", "Reply", "ReplyStream", "check_stops", "iterate_in_thread", "load_generator"]

log = logging.getLogger(__name__)
T = TypeVar("T")




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

    def __init__(self, generator: Generator, store: MemoryStore, settings: Settings | None = None, *,
                 output_filter: OutputFilter | None = None) -> None:
        """``output_filter`` checks every reply; the default is the chain `safety.OUTPUT_FILTERS`
        makes for ``settings``."""
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
        self._closed = False
        st = self.settings
        # One toxicity filter judges both what users send and what the bot says.
        toxicity = ToxicityFilter(st.toxicity_threshold, blocklist=st.blocklist, allowlist=st.allowlist)
        self.output_filter = output_filter or output_chain(
            redact_personal_data=st.redact_personal_data, block_toxic=st.block_toxic_output, toxicity=toxicity)
        self.policy = ReplyPolicy(self.output_filter, st.unsafe_retries)
        self.steps = Exchanges(generator, store, self.book, st,
                               toxicity if st.abusive_input == "refuse" else None)
        # A reply budget that leaves the default persona no room would fail every message: fail now.
        preset = self.settings.preset or self.default_persona.preset
        self.steps.planner(self.default_persona, self.book.decoding(self.default_persona, preset, None))([])

    @classmethod
    def from_settings(cls, settings: Settings | None = None) -> "ChatEngine":
        """Load the model and open the memory store that ``settings`` name."""
        settings = settings or Settings()
        get_persona(settings.persona, settings.prompts_dir)  # a wrong name fails before the model loads
        engine = cls(load_generator(settings), open_store(settings.memory_path), settings)
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
        options = await self.store.get_options(conversation_id)
        return self.book.resolve(options)

    async def set_persona(self, conversation_id: str, name: str | None) -> Persona:
        """Choose this conversation's persona (kept across restarts); None goes back to the default."""
        if name is not None:
            self.persona(name)
        await self.store.set_option(conversation_id, "persona", name)
        return (await self.choices(conversation_id))[0]

    async def set_preset(self, conversation_id: str, name: str | None) -> str:
        """Choose this conversation's decoding preset; None goes back to the persona's."""
        if name is not None:
            get_preset(name)
        await self.store.set_option(conversation_id, "preset", name)
        return (await self.choices(conversation_id))[1]

    # ------------------------------------------------------------------ memory operations
    # The store checks each conversation id and author key (`memory.StoreBase`); the engine checks
    # them itself only where a mistake must fail before a conversation is queued (`Exchanges.check_message`).

    async def history(self, conversation_id: str, limit: int = 50) -> list[Turn]:
        return await self.store.newest(conversation_id, limit)

    async def count(self, conversation_id: str) -> int:
        return await self.store.count(conversation_id)

    async def reset(self, conversation_id: str) -> int:
        """Forget a conversation's turns (its persona and preset choices stay)."""
        async with self._locks.hold(check_conversation_id(conversation_id)):
            return await self.store.reset(conversation_id)

    async def forget_author(self, author_key: str) -> int:
        """Delete everything the person with ``author_key`` said, in every conversation; returns
        how many turns. The key is the one given to `respond`/`stream`, or the author name
        for messages sent without one. The bot's replies stay."""
        return await self.store.forget_author(author_key)

    async def export_author(self, author_key: str) -> dict[str, Any]:
        """Everything the person with ``author_key`` said, in every conversation, grouped by
        conversation (see `MemoryStore.export_author`)."""
        return await self.store.export_author(author_key)

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
            return await self.steps.remember(conversation_id, author, text, role, author_key, unless_within)

    async def export(self, conversation_id: str) -> dict[str, Any]:
        return await self.store.export(conversation_id)

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
                      preset: str | None = None, decoding: Any = None, author_key: str | None = None,
                      stop: Sequence[str] = ()) -> Reply:
        """Store the user's message, generate the bot's reply, check it, store it and return it.

        ``author`` is the name the prompt shows. ``author_key`` is who the person is, stably
        (``discord:user:42``), for `forget_author` and `export_author`; without one the
        author name is the key, which is enough only where names are unique and never change.
        ``persona``, ``preset`` and ``decoding`` (a `DecodingOverrides` or dict) apply to
        this reply only, and so do ``stop`` strings beside the prompt format's own (the reply
        ends before the first). Raises `InputRejected` for a message the engine will not take
        (nothing is stored), `EngineBusy` when the conversation's queue is full, and
        `GenerationFailed` when the model fails (the user's turn stays stored). An abusive
        message is answered with `Settings.refusal_reply` (``reply.refused``) and not stored.
        """
        clock = StepClock()
        text = self._check_message(conversation_id, author, text, author_key)
        stop = check_stops(stop)
        async with self._exchange(conversation_id, author, author_key, text, persona, preset, decoding,
                                  clock, stop) as plan:
            if isinstance(plan, Reply):
                return plan
            outcome = await self._generate_checked(plan)
            clock.mark("generate")
            return await self.steps.finish(plan, clock, outcome)

    def stream(self, conversation_id: str, author: str, text: str, *, persona: str | None = None,
               preset: str | None = None, decoding: Any = None, author_key: str | None = None,
               stop: Sequence[str] = ()) -> ReplyStream:
        """Like `respond` (same arguments, ``author_key`` and ``stop`` included), but the reply arrives in pieces:
        ``async for piece in engine.stream(...)``.

        Text is released a sentence at a time, each one checked by the output filters
        first, so nothing unsafe is ever shown. A sentence that fails stops the reply
        there; if nothing was shown yet, the reply is generated again (as `respond` does).
        """
        return ReplyStream(self, conversation_id, author, text,
                           {"persona": persona, "preset": preset, "decoding": decoding, "author_key": author_key,
                            "stop": stop})

    async def _stream(self, holder: ReplyStream, conversation_id: str, author: str, text: str, *,
                      persona: str | None, preset: str | None, decoding: Any,
                      author_key: str | None, stop: Sequence[str]) -> AsyncIterator[str]:
        clock = StepClock()
        text = self._check_message(conversation_id, author, text, author_key)
        stop = check_stops(stop)
        async with self._exchange(conversation_id, author, author_key, text, persona, preset, decoding,
                                  clock, stop) as plan:
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
                raise _failed(conversation_id, err) from err
            assert gated.outcome is not None
            outcome = self.steps.streamed(plan, gated.outcome, started)
            if outcome.finish == "unsafe" and not outcome.text:
                yield self.settings.unsafe_fallback_reply
            elif not outcome.text.strip():
                yield self.settings.fallback_reply
            clock.mark("generate")
            holder.reply = await self.steps.finish(plan, clock, outcome)

    # ------------------------------------------------------------------ plain text, no memory

    async def complete(self, prompt: str, *, preset: str | None = None, decoding: Any = None,
                       stop: Sequence[str] = ()) -> Outcome:
        """The model's continuation of ``prompt`` as it is (no persona, no memory, nothing stored),
        checked by the output filters as replies are (an unsafe one is generated again; `Outcome`
        ``unsafe`` with no text when every try was). Decoding: ``preset`` (default: the settings',
        else the default persona's), then the settings' table, then ``decoding``."""
        return await self._checked(self._completion(prompt, preset, decoding, stop), FilterContext("completion"), None)

    async def complete_stream(self, prompt: str, *, preset: str | None = None, decoding: Any = None,
                              stop: Sequence[str] = ()) -> AsyncIterator[str]:
        """`complete`, in pieces as they are generated: a checked sentence at a time, as `stream`."""
        request = self._completion(prompt, preset, decoding, stop)
        gated = self.policy.gated(self.generator, request, FilterContext("completion"))
        try:
            async for piece in iterate_in_thread(gated.pieces, self._executor, on_stop=gated.stop):
                yield piece
        except ChatbotError:
            raise
        except Exception as err:
            raise _failed("completion", err) from err

    def _completion(self, prompt: str, preset: str | None, decoding: Any, stop: Sequence[str]) -> GenerationRequest:
        if self._closed:
            raise ChatbotError("the engine is closed")
        if not isinstance(prompt, str) or not prompt:
            raise InputRejected("the prompt is empty")
        persona = self.default_persona
        settings = self.book.decoding(persona, preset or self.settings.preset or persona.preset, decoding)
        tokens = self.generator.count_tokens(prompt)
        budget = prompt_budget(self.generator.context_size, settings)
        if tokens > budget:
            raise InputRejected(f"the prompt is {tokens:,} tokens long; with max_new_tokens {settings.max_new_tokens} "
                                f"the model's context of {self.generator.context_size} leaves room for {budget:,}")
        return GenerationRequest(prompt, settings, check_stops(stop), trim_to_sentence=False,
                                 cancel=threading.Event())

    # ------------------------------------------------------------------ the steps

    async def _generate_checked(self, plan: ExchangePlan) -> Outcome:
        """The reply policy's whole reply (`ReplyPolicy.whole`) for this plan, on the model's worker."""
        return await self._checked(plan.request, FilterContext(plan.user_turn.conversation_id, plan.speakers),
                                   RepeatCheck(plan.recent_replies, plan.settings))

    async def _checked(self, request: GenerationRequest, context: FilterContext, repeat: RepeatCheck | None) -> Outcome:
        """`ReplyPolicy.whole` for one request on the model's worker; a failure of the model is a
        `GenerationFailed` naming where (``context.conversation_id``)."""
        try:
            return (await self._in_worker(self.policy.whole, self.generator, [request], [context], [repeat]))[0]
        except asyncio.CancelledError:
            # Whoever waited has gone (a time limit, a shutdown): free the model for the next reply.
            if request.cancel is not None:
                request.cancel.set()
            raise
        except ChatbotError:
            raise
        except Exception as err:
            raise _failed(context.conversation_id, err) from err

    @asynccontextmanager
    async def _exchange(self, conversation_id: str, author: str, author_key: str | None, text: str,
                        persona: str | None, preset: str | None, decoding: Any,
                        clock: StepClock, stop: tuple[str, ...] = ()) -> AsyncIterator[ExchangePlan | Reply]:
        """Wait for the conversation (messages keep their order), then either refuse an abusive
        message (a `Reply`, nothing stored) or store the user turn and plan the prompt.

        Once the conversation's turn has come, the message is taken: a caller cancelled
        meanwhile (Ctrl-C in the terminal, a timeout, a shutdown) is stopped only after the
        user turn is stored, as it is when it stops during the reply.
        """
        async with self._locks.hold(conversation_id):
            clock.mark("queued")

            async def take() -> ExchangePlan | Reply:
                refused = await self.steps.refusal(conversation_id, text, persona, preset, decoding)
                if refused is not None:
                    return refused
                return await self.steps.plan(conversation_id, author, author_key, text, persona, preset, decoding,
                                             stop)

            plan = await _finish_before_cancel(take())
            if isinstance(plan, Reply):
                yield plan
                return
            clock.mark("prepare")
            yield plan

    def check_author(self, author: str) -> str:
        """``author`` if a person may speak under that name here (`PersonaBook.check_author`)."""
        return self.book.check_author(author)

    def _check_message(self, conversation_id: str, author: str, text: str, author_key: str | None = None, *,
                       role: str = "user") -> str:
        if self._closed:
            raise ChatbotError("the engine is closed")
        return self.steps.check_message(conversation_id, author, text, author_key, role=role)

    async def _in_worker(self, fn: Any, *args: Any) -> Any:
        try:
            future = asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)
        except RuntimeError:  # the executor is shut down
            raise ChatbotError("the engine is closed") from None
        return await future

MAX_STOPS = 4
"""Stop strings one call may add (OpenAI's API takes up to four)."""


def check_stops(stop: Any) -> tuple[str, ...]:
    """A call's stop strings, checked: one string or a list of up to `MAX_STOPS` non-empty ones."""
    stops = (stop,) if isinstance(stop, str) else tuple(stop or ())
    if len(stops) > MAX_STOPS or not all(isinstance(s, str) and s and len(s) <= 200 for s in stops):
        raise InputRejected(f"`stop` must be a string or a list of at most {MAX_STOPS} non-empty strings "
                            "of 200 characters at most")
    return stops


def load_generator(settings: Settings) -> Generator:
    """The generator ``settings`` ask for: the model on its device, its replies decoded together
    (`BatchingGenerator`) when `Settings.max_batch` is above 1, choosing among a response bank's
    replies too (`BankedGenerator`) when `Settings.response_bank` names one."""
    from .generation import LocalGenerator
    from .response_bank import banked, check_sources
    from .scheduler import BatchingGenerator
    from .sentence_encoder import check_encoder

    if settings.response_bank:
        check_sources(settings.response_bank)  # a mistyped file fails before the model loads
        if settings.sentence_encoder:
            check_encoder(settings.sentence_encoder)
    generator = LocalGenerator.from_pretrained(settings.model, device=settings.device,
                                               allow_download=settings.allow_download)
    if settings.max_batch > 1:
        generator = BatchingGenerator(generator, max_batch=settings.max_batch,
                                      cache_bytes=settings.prefix_cache_mb * 2**20, prefill_chunk=settings.prefill_chunk)
    if settings.response_bank:
        generator = banked(generator, settings.response_bank, settings.bank_candidates, settings.sentence_encoder)
    return generator


def _failed(conversation_id: str, err: BaseException) -> GenerationFailed:
    log.error("generation failed in %s", conversation_id, exc_info=err)
    return GenerationFailed(f"the model failed to reply ({type(err).__name__}: {err}); "
                            "the message was kept, try again")


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
