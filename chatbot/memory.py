"""Conversation memory: the `MemoryStore` contract, a SQLite store and an in-memory store.

Every method is async. The SQLite store does its work in a worker thread so the event
loop never waits on the disk, and an `append` has been committed (WAL, synchronous=FULL)
by the time it returns: an acknowledged turn survives the process being killed.
"""

from __future__ import annotations

import asyncio
import json
import re
import sqlite3
import threading
import time
from pathlib import Path
from typing import Any, Callable, Protocol

from .conversation import ROLES, Role, Turn, check_author, check_conversation_id
from .errors import ChatbotError

__all__ = ["MemoryStore", "StoreBase", "SQLiteMemoryStore", "InMemoryStore", "STORES", "open_store", "export_json",
           "check_author_key",
           "MAX_TURN_CHARS", "MAX_AUTHOR_KEY_CHARS"]

MAX_TURN_CHARS = 20_000
"""Longest text one stored turn may hold; the engine caps user input well below this."""

MAX_AUTHOR_KEY_CHARS = 100

SCHEMA_VERSION = 2
"""1: turns and options. 2: turns.author_key, the stable key forgetting and exporting go by."""
# One statement per item: they run with `execute` inside the opening transaction
# (`executescript` would commit it half way).
_SCHEMA = (
    """CREATE TABLE IF NOT EXISTS turns (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        conversation_id TEXT NOT NULL,
        author TEXT NOT NULL,
        role TEXT NOT NULL CHECK (role IN ('user', 'bot')),
        text TEXT NOT NULL,
        created_at REAL NOT NULL,
        author_key TEXT
    )""",
    """CREATE TABLE IF NOT EXISTS options (
        conversation_id TEXT NOT NULL,
        key TEXT NOT NULL,
        value TEXT NOT NULL,
        PRIMARY KEY (conversation_id, key)
    )""",
)
# After the tables (and the version 1 -> 2 migration), since one of them needs author_key.
# An index keeps the rowid after its columns, so turns_by_author_key already lists one
# key's turns in id order: `export_author` needs no sort.
_INDEXES = (
    "CREATE INDEX IF NOT EXISTS turns_by_conversation ON turns (conversation_id, id)",
    "CREATE INDEX IF NOT EXISTS turns_by_author ON turns (author)",
    "CREATE INDEX IF NOT EXISTS turns_by_author_key ON turns (author_key)",
)
_TURN_COLUMNS = "id, conversation_id, author, role, text, created_at, author_key"


class MemoryStore(Protocol):
    """Where conversations live. Implementations must make `append` durable when it returns.

    Every stored turn has an author key: the ``author_key`` given to `append`, else the
    author name. ``author`` is what the prompt shows and may change or repeat between
    people; the key is what `forget_author` and `export_author` find a person by.
    """

    async def append(self, conversation_id: str, author: str, role: Role, text: str, *,
                     author_key: str | None = None) -> Turn:
        """Store one turn and return it with its id and author key (``author_key`` or, when None, ``author``)."""

    async def newest(self, conversation_id: str, limit: int) -> list[Turn]:
        """The newest ``limit`` turns of a conversation, oldest first, each with its author key."""

    async def count(self, conversation_id: str) -> int:
        """How many turns the conversation holds (the window's absolute positions start here)."""

    async def reset(self, conversation_id: str) -> int:
        """Delete a conversation's turns; returns how many."""

    async def forget_author(self, author_key: str) -> int:
        """Delete every user turn whose author key is ``author_key``, in every conversation; returns how many.

        Bot turns stay (they are the bot's words, and the other people's conversation
        reads oddly without them). Turns stored without a key have their author name as
        key, so a name still forgets what was said under it."""

    async def export_author(self, author_key: str) -> dict[str, Any]:
        """Every user turn whose author key is ``author_key`` as a JSON-serialisable dict:
        ``{"author_key", "exported_at", "conversations": {conversation_id: [turn, ...]}}``,
        turns in id order (what a person gets when they ask for their data)."""

    async def export(self, conversation_id: str) -> dict[str, Any]:
        """The whole conversation as a JSON-serialisable dict."""

    async def expire(self, older_than_seconds: float) -> int:
        """Delete turns older than this many seconds; returns how many."""

    async def get_options(self, conversation_id: str) -> dict[str, str]:
        """Per-conversation choices (persona, preset) that outlive a restart; `reset` keeps them."""

    async def set_option(self, conversation_id: str, key: str, value: str | None) -> None:
        """Store one option, or remove it when ``value`` is None."""

    async def close(self) -> None:
        """Release the store's resources."""


def _check_turn(conversation_id: str, author: str, role: str, text: str, author_key: str | None = None) -> None:
    check_conversation_id(conversation_id)
    check_author(author)
    if author_key is not None:
        check_author_key(author_key)
    if role not in ROLES:
        raise ChatbotError(f"`role` must be one of {', '.join(ROLES)}, got {role!r}")
    if not isinstance(text, str):
        raise ChatbotError(f"turn text must be a string, got {type(text).__name__}")
    if len(text) > MAX_TURN_CHARS:
        raise ChatbotError(f"turn text must be at most {MAX_TURN_CHARS} characters, got {len(text)}")


def check_author_key(author_key: object) -> str:
    """Return the key unchanged if it is valid (like an author name: non-blank, at most
    `MAX_AUTHOR_KEY_CHARS`), else raise `ChatbotError` naming it."""
    if not isinstance(author_key, str) or not author_key.strip():
        raise ChatbotError(f"`author_key` must be a non-empty string, got {author_key!r}")
    if len(author_key) > MAX_AUTHOR_KEY_CHARS:
        raise ChatbotError(f"`author_key` must be at most {MAX_AUTHOR_KEY_CHARS} characters, got {len(author_key)}")
    return author_key


def _key_of(author: str, author_key: str | None) -> str:
    """The key a new turn is stored under; the one rule both stores share."""
    return author if author_key is None else author_key


def _check_limit(limit: int) -> None:
    if not isinstance(limit, int) or limit < 0:
        raise ChatbotError(f"`limit` must be a non-negative integer, got {limit!r}")


def _check_option(key: str, value: str | None) -> None:
    if not isinstance(key, str) or not re.fullmatch(r"[a-z][a-z0-9_]{0,39}", key):
        raise ChatbotError(f"option names are short lowercase words, got {key!r}")
    if value is not None and (not isinstance(value, str) or len(value) > 1000):
        raise ChatbotError(f"option `{key}` must be a string of at most 1000 characters, got {value!r}")


def _export(conversation_id: str, turns: list[Turn], options: dict[str, str]) -> dict[str, Any]:
    return {"conversation_id": conversation_id, "exported_at": time.time(), "options": options,
            "turns": [t.to_json() for t in turns]}


def _export_author(author_key: str, turns: list[Turn]) -> dict[str, Any]:
    """``turns`` in id order; conversations come in the order of their first turn."""
    conversations: dict[str, list[dict[str, Any]]] = {}
    for turn in turns:
        conversations.setdefault(turn.conversation_id, []).append(turn.to_json())
    return {"author_key": author_key, "exported_at": time.time(), "conversations": conversations}


class StoreBase:
    """The `MemoryStore` contract over a backend's primitives: every argument is checked here,
    once, and the backend only stores and finds. A new backend subclasses this, writes the
    primitives below (plain functions over its storage, given valid arguments) and registers
    itself in `STORES`.

    `_call` runs a primitive; this base runs it in place, a backend that blocks (a file, a
    server) runs it on a worker thread.
    """

    async def _call(self, fn: Any, *args: Any) -> Any:
        return fn(*args)

    # -- the primitives a backend writes ---------------------------------------------
    def _append(self, conversation_id: str, author: str, role: str, text: str, author_key: str) -> Turn:
        raise NotImplementedError

    def _newest(self, conversation_id: str, limit: int) -> list[Turn]:
        """The newest ``limit`` turns, oldest first; every turn when ``limit`` is -1."""
        raise NotImplementedError

    def _count(self, conversation_id: str) -> int:
        raise NotImplementedError

    def _reset(self, conversation_id: str) -> int:
        raise NotImplementedError

    def _forget_author(self, author_key: str) -> int:
        """Delete the user turns under ``author_key``; how many."""
        raise NotImplementedError

    def _by_author(self, author_key: str) -> list[Turn]:
        """The user turns under ``author_key``, in id order."""
        raise NotImplementedError

    def _expire(self, before: float) -> int:
        """Delete the turns created before this time; how many."""
        raise NotImplementedError

    def _get_options(self, conversation_id: str) -> dict[str, str]:
        raise NotImplementedError

    def _set_option(self, conversation_id: str, key: str, value: str | None) -> None:
        raise NotImplementedError

    def _close(self) -> None:
        return None

    # -- the contract ----------------------------------------------------------------
    async def append(self, conversation_id: str, author: str, role: Role, text: str, *,
                     author_key: str | None = None) -> Turn:
        _check_turn(conversation_id, author, role, text, author_key)
        return await self._call(self._append, conversation_id, author, role, text, _key_of(author, author_key))

    async def newest(self, conversation_id: str, limit: int) -> list[Turn]:
        check_conversation_id(conversation_id)
        _check_limit(limit)
        return await self._call(self._newest, conversation_id, limit) if limit else []

    async def count(self, conversation_id: str) -> int:
        return await self._call(self._count, check_conversation_id(conversation_id))

    async def reset(self, conversation_id: str) -> int:
        return await self._call(self._reset, check_conversation_id(conversation_id))

    async def forget_author(self, author_key: str) -> int:
        return await self._call(self._forget_author, check_author_key(author_key))

    async def export_author(self, author_key: str) -> dict[str, Any]:
        return _export_author(author_key, await self._call(self._by_author, check_author_key(author_key)))

    async def expire(self, older_than_seconds: float) -> int:
        if not older_than_seconds > 0:
            raise ChatbotError(f"`older_than_seconds` must be greater than 0, got {older_than_seconds!r}")
        return await self._call(self._expire, time.time() - older_than_seconds)

    async def get_options(self, conversation_id: str) -> dict[str, str]:
        return await self._call(self._get_options, check_conversation_id(conversation_id))

    async def set_option(self, conversation_id: str, key: str, value: str | None) -> None:
        check_conversation_id(conversation_id)
        _check_option(key, value)
        await self._call(self._set_option, conversation_id, key, value)

    async def export(self, conversation_id: str) -> dict[str, Any]:
        check_conversation_id(conversation_id)

        def both() -> tuple[list[Turn], dict[str, str]]:  # one call: the turns and options of one moment
            return self._newest(conversation_id, -1), self._get_options(conversation_id)

        turns, options = await self._call(both)
        return _export(conversation_id, turns, options)

    async def close(self) -> None:
        await asyncio.to_thread(self._close)


class SQLiteMemoryStore(StoreBase):
    """The embedded default: one SQLite file in WAL mode, shared by every face."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path).expanduser()
        if not self.path.parent.is_dir():
            # Not created: a mistyped folder would otherwise quietly become a second, empty memory.
            raise ChatbotError(f"cannot open the memory database {self.path}: the folder {self.path.parent} "
                               "does not exist; create it first, or fix the path")
        try:
            # One connection used from worker threads; the lock serialises it (sqlite3
            # connections are not safe for concurrent use).
            self._conn = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None, timeout=30)
            self._conn.execute("PRAGMA journal_mode=WAL")
            self._conn.execute("PRAGMA synchronous=FULL")
            self._conn.execute("PRAGMA foreign_keys=ON")
            self._prepare_schema()
        except (sqlite3.DatabaseError, OSError) as err:
            raise ChatbotError(f"cannot open the memory database {self.path}: {err}") from None
        self._lock = threading.Lock()
        self._closed = False

    def _prepare_schema(self) -> None:
        """Create the tables, or bring an older file up to `SCHEMA_VERSION`, in one transaction.

        IMMEDIATE takes the write lock before the version is read, so two processes opening
        the same old file cannot both migrate it; a failure part way leaves it untouched.
        """
        conn = self._conn
        conn.execute("BEGIN IMMEDIATE")
        try:
            version = conn.execute("PRAGMA user_version").fetchone()[0]
            if version > SCHEMA_VERSION:
                raise ChatbotError(f"{self.path} was written by a newer version (schema {version}); upgrade first")
            for statement in _SCHEMA:
                conn.execute(statement)
            columns = {row[1] for row in conn.execute("PRAGMA table_info(turns)")}
            if "author_key" not in columns:
                # Schema 1: turns had only a display name, which is what forgetting went by
                # then, so it is the key those turns keep.
                conn.execute("ALTER TABLE turns ADD COLUMN author_key TEXT")
                conn.execute("UPDATE turns SET author_key = author")
            for statement in _INDEXES:
                conn.execute(statement)
            if version != SCHEMA_VERSION:
                conn.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise

    def _run(self, fn: Any, *args: Any) -> Any:
        with self._lock:
            if self._closed:
                raise ChatbotError("the memory store is closed")
            try:
                return fn(*args)
            except sqlite3.DatabaseError as err:
                # A damaged file, a full disk, a lock held too long: the user's to fix, so
                # an error that says which file (a write's transaction was rolled back).
                raise ChatbotError(f"the memory database {self.path} failed: {err}") from err

    async def _call(self, fn: Any, *args: Any) -> Any:
        return await asyncio.to_thread(self._run, fn, *args)

    @staticmethod
    def _row(row: tuple) -> Turn:
        return Turn(id=row[0], conversation_id=row[1], author=row[2], role=row[3], text=row[4], created_at=row[5],
                    author_key=row[6])

    def _append(self, conversation_id: str, author: str, role: str, text: str, author_key: str) -> Turn:
        now = time.time()
        with self._conn:  # BEGIN ... COMMIT; the commit is on disk when this returns
            cur = self._conn.execute(
                "INSERT INTO turns (conversation_id, author, role, text, created_at, author_key) "
                "VALUES (?, ?, ?, ?, ?, ?)",
                (conversation_id, author, role, text, now, author_key),
            )
        return Turn(conversation_id, author, role, text, now, int(cur.lastrowid), author_key)  # type: ignore[arg-type]

    def _newest(self, conversation_id: str, limit: int) -> list[Turn]:
        rows = self._conn.execute(
            f"SELECT {_TURN_COLUMNS} FROM turns WHERE conversation_id = ? ORDER BY id DESC LIMIT ?",
            (conversation_id, limit),
        ).fetchall()
        return [self._row(r) for r in reversed(rows)]

    def _count(self, conversation_id: str) -> int:
        return int(self._conn.execute("SELECT COUNT(*) FROM turns WHERE conversation_id = ?",
                                      (conversation_id,)).fetchone()[0])

    def _delete(self, where: str, arg: Any) -> int:
        with self._conn:
            return self._conn.execute(f"DELETE FROM turns WHERE {where}", (arg,)).rowcount

    def _reset(self, conversation_id: str) -> int:
        return self._delete("conversation_id = ?", conversation_id)

    def _forget_author(self, author_key: str) -> int:
        return self._delete("author_key = ? AND role = 'user'", author_key)

    def _by_author(self, author_key: str) -> list[Turn]:
        rows = self._conn.execute(
            f"SELECT {_TURN_COLUMNS} FROM turns WHERE author_key = ? AND role = 'user' ORDER BY id",
            (author_key,),
        ).fetchall()
        return [self._row(r) for r in rows]

    def _expire(self, before: float) -> int:
        return self._delete("created_at < ?", before)

    def _get_options(self, conversation_id: str) -> dict[str, str]:
        rows = self._conn.execute("SELECT key, value FROM options WHERE conversation_id = ? ORDER BY key",
                                  (conversation_id,)).fetchall()
        return dict(rows)

    def _set_option(self, conversation_id: str, key: str, value: str | None) -> None:
        with self._conn:
            if value is None:
                self._conn.execute("DELETE FROM options WHERE conversation_id = ? AND key = ?", (conversation_id, key))
            else:
                self._conn.execute("INSERT OR REPLACE INTO options (conversation_id, key, value) VALUES (?, ?, ?)",
                                   (conversation_id, key, value))

    def _close(self) -> None:
        with self._lock:
            if not self._closed:
                self._closed = True
                self._conn.close()


class InMemoryStore(StoreBase):
    """Same contract, kept in a dict: for tests and throwaway conversations."""

    def __init__(self) -> None:
        self._turns: dict[str, list[Turn]] = {}
        self._options: dict[str, dict[str, str]] = {}
        self._next_id = 1

    def _append(self, conversation_id: str, author: str, role: str, text: str, author_key: str) -> Turn:
        turn = Turn(conversation_id, author, role, text, time.time(), self._next_id, author_key)  # type: ignore[arg-type]
        self._next_id += 1
        self._turns.setdefault(conversation_id, []).append(turn)
        return turn

    def _newest(self, conversation_id: str, limit: int) -> list[Turn]:
        turns = self._turns.get(conversation_id, [])
        return list(turns if limit == -1 else turns[-limit:])

    def _count(self, conversation_id: str) -> int:
        return len(self._turns.get(conversation_id, []))

    def _reset(self, conversation_id: str) -> int:
        return len(self._turns.pop(conversation_id, []))

    def _remove(self, drop: Any) -> int:
        removed = 0
        for cid, turns in self._turns.items():
            kept = [t for t in turns if not drop(t)]
            removed += len(turns) - len(kept)
            self._turns[cid] = kept
        return removed

    def _forget_author(self, author_key: str) -> int:
        return self._remove(lambda t: t.author_key == author_key and t.role == "user")

    def _by_author(self, author_key: str) -> list[Turn]:
        turns = [t for ts in self._turns.values() for t in ts if t.author_key == author_key and t.role == "user"]
        return sorted(turns, key=lambda t: t.id)

    def _expire(self, before: float) -> int:
        return self._remove(lambda t: t.created_at < before)

    def _get_options(self, conversation_id: str) -> dict[str, str]:
        return dict(sorted(self._options.get(conversation_id, {}).items()))

    def _set_option(self, conversation_id: str, key: str, value: str | None) -> None:
        if value is None:
            options = self._options.get(conversation_id, {})
            options.pop(key, None)
            if not options:  # a throwaway conversation leaves nothing behind
                self._options.pop(conversation_id, None)
        else:
            self._options.setdefault(conversation_id, {})[key] = value


def export_json(data: dict[str, Any]) -> str:
    """An export as pretty JSON text (what a user downloads)."""
    return json.dumps(data, indent=2, ensure_ascii=False)


STORES: dict[str, Callable[[str], StoreBase]] = {
    "memory": lambda rest: InMemoryStore(),
    "sqlite": SQLiteMemoryStore,
}
"""Memory backends by URL scheme, each made from the rest of the URL: a new backend is its
`StoreBase` subclass and one entry here."""
_URL = re.compile(r"([a-z][a-z0-9+.-]*)://(.*)", re.S)


def open_store(location: str | Path) -> StoreBase:
    """The store a settings value names: ``:memory:`` (or ``memory://``) for a throwaway one, a
    ``scheme://...`` URL for a registered backend (`STORES`), else a SQLite file's path
    (``sqlite:///path`` too)."""
    text = str(location)
    if text == ":memory:":
        return InMemoryStore()
    match = _URL.fullmatch(text)
    if match is None:
        return SQLiteMemoryStore(text)
    scheme, rest = match.groups()
    if scheme not in STORES:
        raise ChatbotError(f"memory {text!r}: no store for {scheme}:// here; known: "
                           f"{', '.join(f'{name}://' for name in STORES)}, or a SQLite file's path")
    return STORES[scheme](rest[1:] if scheme == "sqlite" and rest.startswith("/") else rest)
