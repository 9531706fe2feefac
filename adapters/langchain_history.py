"""LangChain chat history backed by the chatbot's own memory store.

`ChatbotMessageHistory` lets LangChain code (``RunnableWithMessageHistory`` and friends)
keep its history in the same SQLite file the engine, the terminal and the Discord bot
use, under the conversation id ``langchain:session:<session_id>``. Human messages are
stored as ``user`` turns and AI messages as ``bot`` turns (a ``ChatMessage`` by its role).
System messages are left out with a warning: they are instructions sent with every call,
not turns, and refusing them would lose the whole exchange, since
``RunnableWithMessageHistory`` only logs a history's error. Other kinds are refused.

    store = SQLiteMemoryStore("chatbot.sqlite3")
    chain = RunnableWithMessageHistory(
        runnable, lambda session_id: ChatbotMessageHistory(session_id, store),
        input_messages_key="question", history_messages_key="history",
    )
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Coroutine, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any, TypeVar

from langchain_core.chat_history import BaseChatMessageHistory
from langchain_core.messages import AIMessage, BaseMessage, ChatMessage, HumanMessage, SystemMessage

from chatbot.conversation import MAX_CONVERSATION_ID_CHARS, Role, Turn, check_author, check_conversation_id
from chatbot.errors import ChatbotError
from chatbot.memory import MAX_TURN_CHARS, MemoryStore

if TYPE_CHECKING:
    from chatbot.engine import ChatEngine

__all__ = ["ChatbotMessageHistory", "CONVERSATION_PREFIX", "message_role"]

log = logging.getLogger(__name__)

CONVERSATION_PREFIX = "langchain:session:"
"""Conversation ids of LangChain sessions start with this, so they never mix with Discord or CLI ones."""

_STORE_METHODS = ("append", "newest", "reset", "forget_author", "export")

T = TypeVar("T")


def _run_sync(coro: Coroutine[Any, Any, T]) -> T:
    """Run a coroutine to completion from synchronous code, with or without a running loop.

    LangChain calls the sync API (``messages``, ``add_messages``) from sync callbacks that
    may fire inside async code, on the loop's own thread. ``asyncio.run`` refuses to
    start there, and waiting on that loop from inside it would deadlock, so the coroutine
    gets a short-lived worker thread with its own loop instead. The caller's loop is
    blocked until it finishes: that is what calling a sync API from async code means.
    This is safe for the stores: the SQLite one does its work through `asyncio.to_thread`
    on a connection shared behind a lock, and the in-memory one is touched by only the
    worker while the caller waits.
    """
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(coro)
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="langchain-history") as pool:
        return pool.submit(asyncio.run, coro).result()


def _checked_name(value: object, what: str) -> str:
    try:
        return check_author(value)
    except ChatbotError as err:
        raise ValueError(f"`{what}`: {err}") from None


def message_text(message: BaseMessage, label: str) -> str:
    """A message's content as one string; content that is not plain text is refused, naming ``label``."""
    content = message.content
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise ValueError(f"{label} content must be a string or a list of text parts, got {type(content).__name__}")
    pieces = []
    for part in content:
        if isinstance(part, str):
            pieces.append(part)
        elif isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str):
            pieces.append(part["text"])
        else:
            part_type = part.get("type") if isinstance(part, dict) else type(part).__name__
            raise ValueError(f"{label} has a content part of type {part_type!r}; the chatbot reads text only")
    # Same joining rule as LangChain's own `BaseMessage.text`.
    return "".join(pieces)


_CHAT_ROLES = {"user": "user", "human": "user", "assistant": "bot", "ai": "bot", "system": "system"}
"""`ChatMessage` roles the chatbot reads (OpenAI's names and LangChain's own)."""


def message_role(message: BaseMessage) -> str | None:
    """``user``, ``bot`` or ``system`` for a message the chatbot reads; None for any other kind."""
    if isinstance(message, HumanMessage):
        return "user"
    if isinstance(message, AIMessage):
        return "bot"
    if isinstance(message, SystemMessage):
        return "system"
    if isinstance(message, ChatMessage):
        return _CHAT_ROLES.get(message.role.lower())
    return None


def _text_of(message: BaseMessage, index: int) -> str:
    """The text to store for a message, within the memory's per-turn limit."""
    kind = type(message).__name__
    text = message_text(message, f"message {index} ({kind})")
    if len(text) > MAX_TURN_CHARS:
        raise ValueError(f"message {index} ({kind}) is {len(text)} characters; "
                         f"the chatbot memory stores at most {MAX_TURN_CHARS} per turn")
    return text


class ChatbotMessageHistory(BaseChatMessageHistory):
    """The history of one LangChain session, kept in a chatbot `MemoryStore`.

    Pass either ``store`` (any `MemoryStore`, e.g. ``SQLiteMemoryStore("chatbot.sqlite3")``)
    or ``engine`` (its store is used, so the engine and LangChain share one memory).
    ``user_name`` and ``bot_name`` are the authors written for messages without a
    ``name``; a stored turn by anyone else comes back with ``name`` set to its author.
    ``max_messages`` limits reads to the newest N messages (default: all of them).

    The async methods do the work; the sync ones (``messages``, ``add_messages``,
    ``clear``) run them and work both with and without a running event loop.
    """

    def __init__(
        self,
        session_id: str,
        store: MemoryStore | None = None,
        *,
        engine: ChatEngine | None = None,
        user_name: str = "User",
        bot_name: str = "Bot",
        max_messages: int | None = None,
    ) -> None:
        super().__init__()
        if store is None and engine is None:
            raise ValueError('ChatbotMessageHistory needs somewhere to keep messages: pass '
                             'store=SQLiteMemoryStore("chatbot.sqlite3") (or InMemoryStore()), or engine=<ChatEngine>')
        if store is not None and engine is not None:
            raise ValueError("pass either `store` or `engine` to ChatbotMessageHistory, not both "
                             "(an engine brings its own store)")
        if engine is not None:
            store = getattr(engine, "store", None)
            if store is None:
                raise ValueError(f"`engine` must be a ChatEngine with a `.store`, got {type(engine).__name__}")
        if isinstance(store, (str, os.PathLike)):
            raise ValueError(f"`store` must be a MemoryStore, got the path {str(store)!r}; "
                             f"pass store=SQLiteMemoryStore({str(store)!r})")
        missing = [name for name in _STORE_METHODS if not callable(getattr(store, name, None))]
        if missing:
            raise ValueError(f"`store` must be a MemoryStore, got {type(store).__name__} "
                             f"(it has no {', '.join(missing)})")
        if not isinstance(session_id, str):
            raise ValueError(f"`session_id` must be a string, got {type(session_id).__name__}")
        try:
            if not session_id:
                # "langchain:session:" alone would pass the id check, but an empty
                # session id is nearly always a missing value, not a chosen name.
                raise ChatbotError("empty session id")
            self.conversation_id = check_conversation_id(f"{CONVERSATION_PREFIX}{session_id}")
        except ChatbotError:
            # Refused rather than rewritten, so two different session ids never share a history.
            longest = MAX_CONVERSATION_ID_CHARS - len(CONVERSATION_PREFIX)
            raise ValueError(f"`session_id` must be 1 to {longest} characters of letters, digits and _.:@#+=- "
                             f"(no spaces), got {session_id!r}") from None
        if max_messages is not None and (isinstance(max_messages, bool) or not isinstance(max_messages, int)
                                         or max_messages < 1):
            raise ValueError(f"`max_messages` must be a positive integer or None, got {max_messages!r}")
        self.session_id = session_id
        self.store: MemoryStore = store  # type: ignore[assignment]
        self.user_name = _checked_name(user_name, "user_name")
        self.bot_name = _checked_name(bot_name, "bot_name")
        self.max_messages = max_messages

    def __repr__(self) -> str:
        return f"ChatbotMessageHistory({self.session_id!r}, store={type(self.store).__name__})"

    # ------------------------------------------------------------------ conversion

    def _to_message(self, role: str, author: str, text: str) -> BaseMessage:
        if role == "user":
            return HumanMessage(content=text, name=author if author != self.user_name else None)
        return AIMessage(content=text, name=author if author != self.bot_name else None)

    def _to_turn(self, message: object, index: int) -> tuple[str, Role, str] | None:
        """(author, role, text) for one message; None for a system message (left out); a
        ValueError saying why for a message that cannot be stored."""
        if not isinstance(message, BaseMessage):
            raise ValueError(f"message {index} must be a LangChain message, got {type(message).__name__}")
        kind = message_role(message)
        if kind == "system":
            return None
        if kind is None:
            what = f"a ChatMessage with role {message.role!r}" if isinstance(message, ChatMessage) \
                else f"a {type(message).__name__}"
            raise ValueError(f"message {index} is {what}; the chatbot memory keeps only human and AI turns")
        if isinstance(message, AIMessage) and (message.tool_calls or message.invalid_tool_calls):
            # Storing only the text would silently drop the calls and leave a history
            # the model cannot follow.
            raise ValueError(f"message {index} (AIMessage) carries tool calls; the chatbot memory keeps only "
                             "human and AI text turns")
        role: Role = "user" if kind == "user" else "bot"
        default = self.user_name if role == "user" else self.bot_name
        author = _checked_name(message.name, f"message {index} name") if message.name else default
        return author, role, _text_of(message, index)

    # ------------------------------------------------------------------ async API (the real one)

    async def aget_messages(self) -> list[BaseMessage]:
        """The session's messages, oldest first (only the newest ``max_messages`` when set)."""
        if self.max_messages is None:
            turns = (await self.store.export(self.conversation_id))["turns"]
            return [self._to_message(t["role"], t["author"], t["text"]) for t in turns]
        newest: list[Turn] = await self.store.newest(self.conversation_id, self.max_messages)
        return [self._to_message(t.role, t.author, t.text) for t in newest]

    async def aadd_messages(self, messages: Sequence[BaseMessage]) -> None:
        """Store human and AI messages in order, leaving system messages out (with a warning);
        any other kind fails the whole batch."""
        if isinstance(messages, (str, BaseMessage)):
            raise ValueError(f"`messages` must be a list of messages, got a single {type(messages).__name__}")
        # Every message is checked before the first append, so a bad batch writes
        # nothing. (The store has no multi-turn transaction: a disk failure part way
        # through can still leave the first turns written, each of them whole.)
        checked = [self._to_turn(m, i) for i, m in enumerate(messages)]
        turns = [t for t in checked if t is not None]
        if len(turns) < len(checked):
            log.warning("%s: left out %d system message(s); the history keeps human and AI turns, and system "
                        "instructions belong in the prompt", self, len(checked) - len(turns))
        for author, role, text in turns:
            await self.store.append(self.conversation_id, author, role, text)

    async def aclear(self) -> None:
        """Delete this session's messages; other sessions and conversations are untouched."""
        await self.store.reset(self.conversation_id)

    async def aforget_author(self, author: str) -> int:
        """Delete everything ``author`` said as a user, in every conversation of the store
        (not only this session), like `ChatEngine.forget_author`; returns how many turns."""
        return await self.store.forget_author(_checked_name(author, "author"))

    async def aexport(self) -> dict[str, Any]:
        """This session as a JSON-serialisable dict, like `ChatEngine.export`."""
        return await self.store.export(self.conversation_id)

    # ------------------------------------------------------------------ sync API

    @property
    def messages(self) -> list[BaseMessage]:  # type: ignore[override]
        return _run_sync(self.aget_messages())

    def add_messages(self, messages: Sequence[BaseMessage]) -> None:
        _run_sync(self.aadd_messages(messages))

    def clear(self) -> None:
        _run_sync(self.aclear())

    def forget_author(self, author: str) -> int:
        return _run_sync(self.aforget_author(author))

    def export(self) -> dict[str, Any]:
        return _run_sync(self.aexport())
