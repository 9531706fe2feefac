"""Both memory stores against the same contract; the SQLite one against a real file."""

import asyncio
import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from chatbot.conversation import check_conversation_id
from chatbot.errors import ChatbotError, InvalidConversationId
from chatbot.memory import MAX_TURN_CHARS, InMemoryStore, SQLiteMemoryStore, export_json

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(params=["sqlite", "memory"])
async def store(request, tmp_path):
    s = SQLiteMemoryStore(tmp_path / "memory.sqlite3") if request.param == "sqlite" else InMemoryStore()
    yield s
    await s.close()


async def test_append_and_newest_oldest_first(store):
    for i in range(5):
        await store.append("cli:local", "ada" if i % 2 == 0 else "Bot", "user" if i % 2 == 0 else "bot", f"t{i}")
    turns = await store.newest("cli:local", 3)
    assert [t.text for t in turns] == ["t2", "t3", "t4"]
    assert turns[0].id < turns[1].id < turns[2].id
    assert await store.newest("cli:local", 0) == []
    assert await store.newest("cli:other", 5) == []
    assert await store.count("cli:local") == 5 and await store.count("cli:other") == 0


async def test_reset_only_touches_one_conversation(store):
    await store.append("discord:channel:1", "ada", "user", "a")
    await store.append("discord:channel:2", "ada", "user", "b")
    assert await store.reset("discord:channel:1") == 1
    assert await store.newest("discord:channel:1", 10) == []
    assert [t.text for t in await store.newest("discord:channel:2", 10)] == ["b"]


async def test_forget_author_everywhere_and_nothing_else(store):
    await store.append("discord:channel:1", "ada", "user", "ada in 1")
    await store.append("discord:channel:1", "Bot", "bot", "reply in 1")
    await store.append("discord:channel:1", "bob", "user", "bob in 1")
    await store.append("discord:dm:9", "ada", "user", "ada in dm")
    assert await store.forget_author("ada") == 2
    assert [t.text for t in await store.newest("discord:channel:1", 10)] == ["reply in 1", "bob in 1"]
    assert await store.newest("discord:dm:9", 10) == []


async def namesakes(store):
    """Two people both called Sam (their Discord ids differ) in two channels, and the bot answering."""
    for channel in ("discord:channel:1", "discord:channel:2"):
        await store.append(channel, "Sam", "user", f"sam one in {channel}", author_key="discord:user:1")
        await store.append(channel, "Bot", "bot", f"reply in {channel}")
        await store.append(channel, "Sam", "user", f"sam two in {channel}", author_key="discord:user:2")


async def test_forget_author_goes_by_key_not_display_name(store):
    await namesakes(store)
    assert await store.forget_author("Sam") == 0  # a name is only a key for turns stored without one
    assert await store.forget_author("discord:user:1") == 2
    for channel in ("discord:channel:1", "discord:channel:2"):
        left = await store.newest(channel, 10)
        assert [(t.text, t.author_key) for t in left] == [(f"reply in {channel}", "Bot"),
                                                          (f"sam two in {channel}", "discord:user:2")]
    assert await store.forget_author("discord:user:1") == 0


async def test_the_key_defaults_to_the_author_name_and_is_on_every_row(store):
    turn = await store.append("cli:local", "ada", "user", "hi")
    assert turn.author_key == "ada"
    keyed = await store.append("cli:local", "ada", "user", "again", author_key="cli:user:ada")
    assert keyed.author_key == "cli:user:ada"
    assert [t.author_key for t in await store.newest("cli:local", 5)] == ["ada", "cli:user:ada"]
    assert [t["author_key"] for t in (await store.export("cli:local"))["turns"]] == ["ada", "cli:user:ada"]
    assert await store.forget_author("ada") == 1


async def test_export_author_is_exactly_that_keys_turns_by_conversation(store):
    await store.append("discord:channel:2", "Sam", "user", "first, in 2", author_key="discord:user:1")
    await namesakes(store)
    data = json.loads(export_json(await store.export_author("discord:user:1")))
    assert data["author_key"] == "discord:user:1" and data["exported_at"] > 0
    assert list(data["conversations"]) == ["discord:channel:2", "discord:channel:1"]  # by their first turn
    assert [t["text"] for t in data["conversations"]["discord:channel:1"]] == ["sam one in discord:channel:1"]
    in_two = data["conversations"]["discord:channel:2"]
    assert [t["text"] for t in in_two] == ["first, in 2", "sam one in discord:channel:2"]
    assert in_two[0]["id"] < in_two[1]["id"]
    every = [t for ts in data["conversations"].values() for t in ts]
    assert {(t["role"], t["author"], t["author_key"]) for t in every} == {("user", "Sam", "discord:user:1")}
    assert (await store.export_author("discord:user:9"))["conversations"] == {}


@pytest.mark.parametrize("bad", ["", "   ", "k" * 101, 42, b"discord:user:1"])
async def test_a_bad_author_key_is_refused_and_nothing_is_written(store, bad):
    with pytest.raises(ChatbotError, match="`author_key` must be"):
        await store.append("cli:local", "ada", "user", "hi", author_key=bad)
    assert await store.newest("cli:local", 10) == []
    with pytest.raises(ChatbotError, match="`author_key` must be"):
        await store.forget_author(bad)
    with pytest.raises(ChatbotError, match="`author_key` must be"):
        await store.export_author(bad)


async def test_export_is_json(store):
    await store.append("langchain:session:x", "ada", "user", "héllo 🙂")
    data = await store.export("langchain:session:x")
    again = json.loads(export_json(data))
    assert again["conversation_id"] == "langchain:session:x"
    assert again["turns"][0]["text"] == "héllo 🙂" and again["turns"][0]["role"] == "user"


async def test_expire_old_turns(store, monkeypatch):
    await store.append("cli:local", "ada", "user", "old")
    real = time.time
    monkeypatch.setattr(time, "time", lambda: real() + 3600)
    await store.append("cli:local", "ada", "user", "new")
    assert await store.expire(1800) == 1
    assert [t.text for t in await store.newest("cli:local", 10)] == ["new"]


@pytest.mark.parametrize("bad", ["", "local", "cli:", "cli:has space", "cli:new\nline", "Cli:x", "cli:x/../y",
                                 "x:" + "a" * 300, 42])
async def test_odd_conversation_ids_are_refused_and_nothing_is_written(store, bad):
    with pytest.raises(InvalidConversationId):
        await store.append(bad, "ada", "user", "hi")
    assert await store.newest("cli:local", 10) == []


async def test_bad_turns_are_refused(store):
    with pytest.raises(ChatbotError, match="`role` must be one of"):
        await store.append("cli:local", "ada", "admin", "hi")
    with pytest.raises(ChatbotError, match="author must be"):
        await store.append("cli:local", "  ", "user", "hi")
    with pytest.raises(ChatbotError, match="at most"):
        await store.append("cli:local", "ada", "user", "x" * (MAX_TURN_CHARS + 1))
    with pytest.raises(ChatbotError, match="`limit`"):
        await store.newest("cli:local", -1)
    assert await store.newest("cli:local", 10) == []


async def test_concurrent_conversations_keep_their_own_order(store):
    async def talk(cid, n):
        for i in range(n):
            await store.append(cid, "ada", "user", f"{cid}-{i}")

    await asyncio.gather(talk("discord:channel:1", 20), talk("discord:channel:2", 20))
    for cid in ("discord:channel:1", "discord:channel:2"):
        assert [t.text for t in await store.newest(cid, 50)] == [f"{cid}-{i}" for i in range(20)]


def test_valid_ids():
    for ok in ("discord:channel:42", "discord:dm:7", "langchain:session:abc-1", "cli:local", "discord:thread:1:2"):
        assert check_conversation_id(ok) == ok


async def test_sqlite_remembers_across_restarts_and_uses_wal(tmp_path):
    path = tmp_path / "m.sqlite3"
    first = SQLiteMemoryStore(path)
    await first.append("cli:local", "ada", "user", "remember me")
    await first.close()
    second = SQLiteMemoryStore(path)
    assert [t.text for t in await second.newest("cli:local", 5)] == ["remember me"]
    await second.close()
    with sqlite3.connect(path) as conn:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    with pytest.raises(ChatbotError, match="closed"):
        await second.newest("cli:local", 5)


# The schema as version 1 wrote it, copied here so the migration is tested against the real thing.
SCHEMA_V1 = """
CREATE TABLE IF NOT EXISTS turns (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    conversation_id TEXT NOT NULL,
    author TEXT NOT NULL,
    role TEXT NOT NULL CHECK (role IN ('user', 'bot')),
    text TEXT NOT NULL,
    created_at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS turns_by_conversation ON turns (conversation_id, id);
CREATE INDEX IF NOT EXISTS turns_by_author ON turns (author);
CREATE TABLE IF NOT EXISTS options (
    conversation_id TEXT NOT NULL,
    key TEXT NOT NULL,
    value TEXT NOT NULL,
    PRIMARY KEY (conversation_id, key)
);
PRAGMA user_version=1;
"""


def version_1_file(path):
    with sqlite3.connect(path) as conn:
        conn.executescript(SCHEMA_V1)
        conn.executemany("INSERT INTO turns (conversation_id, author, role, text, created_at) VALUES (?, ?, ?, ?, ?)",
                         [("discord:channel:1", "ada", "user", "old ada", 1.0),
                          ("discord:channel:1", "Bot", "bot", "old reply", 2.0),
                          ("discord:dm:9", "ada", "user", "old ada in dm", 3.0),
                          ("discord:channel:1", "bob", "user", "old bob", 4.0)])
        conn.execute("INSERT INTO options VALUES ('discord:channel:1', 'persona', 'other')")
    conn.close()


async def test_a_version_1_file_is_migrated_on_open(tmp_path):
    path = tmp_path / "v1.sqlite3"
    version_1_file(path)
    store = SQLiteMemoryStore(path)
    turns = await store.newest("discord:channel:1", 10)
    assert [(t.text, t.author_key) for t in turns] == [("old ada", "ada"), ("old reply", "Bot"), ("old bob", "bob")]
    assert await store.get_options("discord:channel:1") == {"persona": "other"}
    assert [t["text"] for t in (await store.export_author("ada"))["conversations"]["discord:dm:9"]] == ["old ada in dm"]
    assert await store.forget_author("ada") == 2  # by name, as before the migration
    assert [t.text for t in await store.newest("discord:channel:1", 10)] == ["old reply", "old bob"]
    assert await store.newest("discord:dm:9", 10) == []
    await store.append("discord:channel:1", "ada", "user", "new ada", author_key="discord:user:7")
    await store.close()

    with sqlite3.connect(path) as conn:
        assert conn.execute("PRAGMA user_version").fetchone()[0] == 2
        assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        indexes = {row[1] for row in conn.execute("PRAGMA index_list(turns)")}
        assert "turns_by_author_key" in indexes
    conn.close()
    again = SQLiteMemoryStore(path)  # opening a migrated file again changes nothing
    assert [(t.text, t.author_key) for t in await again.newest("discord:channel:1", 10)] == [
        ("old reply", "Bot"), ("old bob", "bob"), ("new ada", "discord:user:7")]
    await again.close()


async def test_a_migration_that_fails_part_way_leaves_the_file_as_it_was(tmp_path, monkeypatch):
    path = tmp_path / "v1.sqlite3"
    version_1_file(path)
    import chatbot.memory as memory

    # Fails after the column is added and filled, before the version is written.
    monkeypatch.setattr(memory, "_INDEXES", (*memory._INDEXES, "CREATE INDEX broken ON no_such_table (x)"))
    with pytest.raises(ChatbotError, match="cannot open the memory database"):
        SQLiteMemoryStore(path)
    with sqlite3.connect(path) as conn:
        assert conn.execute("PRAGMA user_version").fetchone()[0] == 1
        assert "author_key" not in {row[1] for row in conn.execute("PRAGMA table_info(turns)")}
    conn.close()
    monkeypatch.undo()
    store = SQLiteMemoryStore(path)
    assert await store.forget_author("ada") == 2
    await store.close()


def test_a_newer_schema_is_refused_and_left_alone(tmp_path):
    path = tmp_path / "future.sqlite3"
    with sqlite3.connect(path) as conn:
        conn.execute("CREATE TABLE turns (id INTEGER PRIMARY KEY, something TEXT)")
        conn.execute("PRAGMA user_version=3")
    conn.close()
    with pytest.raises(ChatbotError, match=r"newer version \(schema 3\)"):
        SQLiteMemoryStore(path)
    with sqlite3.connect(path) as conn:
        assert conn.execute("PRAGMA user_version").fetchone()[0] == 3
        assert [row[1] for row in conn.execute("PRAGMA table_info(turns)")] == ["id", "something"]
        assert conn.execute("SELECT name FROM sqlite_master WHERE name = 'options'").fetchone() is None
    conn.close()


def test_not_a_database_is_a_clear_error(tmp_path):
    bad = tmp_path / "m.sqlite3"
    bad.write_bytes(b"this is not sqlite" * 100)
    with pytest.raises(ChatbotError, match="cannot open the memory database"):
        SQLiteMemoryStore(bad)


def test_a_mistyped_folder_is_an_error_and_is_not_created(tmp_path):
    path = tmp_path / "nonexistent" / "dir" / "x.sqlite3"
    with pytest.raises(ChatbotError, match="the folder .*nonexistent/dir does not exist"):
        SQLiteMemoryStore(path)
    assert not (tmp_path / "nonexistent").exists()


WRITER = """
import asyncio, sys
from chatbot.memory import SQLiteMemoryStore

async def main():
    store = SQLiteMemoryStore(sys.argv[1])
    i = 0
    while True:
        turn = await store.append("cli:kill", "ada", "user", f"turn {sys.argv[2]}-{i}")
        print(turn.id, flush=True)  # acknowledged: append has returned
        i += 1

asyncio.run(main())
"""


def test_sigkill_never_loses_an_acknowledged_turn(tmp_path):
    """A writer is killed with SIGKILL mid-stream, again and again; every turn it had
    acknowledged is still there and the database passes its integrity check."""
    path = tmp_path / "kill.sqlite3"
    acknowledged: list[int] = []
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    for round_ in range(6):
        proc = subprocess.Popen([sys.executable, "-c", WRITER, str(path), str(round_)], stdout=subprocess.PIPE,
                                text=True, env=env)
        target = 20 + 13 * round_
        got = 0
        assert proc.stdout is not None
        for line in proc.stdout:
            acknowledged.append(int(line))
            got += 1
            if got >= target:
                break
        os.kill(proc.pid, signal.SIGKILL)
        # Whatever else it printed before dying was acknowledged too.
        acknowledged.extend(int(line) for line in proc.stdout.read().split())
        proc.wait()
        assert proc.returncode == -signal.SIGKILL
        with sqlite3.connect(path) as conn:
            assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
            stored = {row[0] for row in conn.execute("SELECT id FROM turns")}
        missing = set(acknowledged) - stored
        assert not missing, f"round {round_}: acknowledged turns lost: {sorted(missing)[:5]}"
    assert len(acknowledged) >= sum(20 + 13 * r for r in range(6))


async def test_a_database_failure_in_use_is_an_error_naming_the_file_and_writes_nothing(tmp_path):
    path = tmp_path / "m.sqlite3"
    store = SQLiteMemoryStore(path)
    await store.append("cli:local", "ada", "user", "hello")
    # A real SQLite failure on the open file (as a full disk or a damaged page gives one).
    store._conn.execute("PRAGMA query_only=ON")
    with pytest.raises(ChatbotError, match=f"the memory database {path} failed: attempt to write a readonly"):
        await store.append("cli:local", "ada", "user", "lost?")
    store._conn.execute("PRAGMA query_only=OFF")
    assert [t.text for t in await store.newest("cli:local", 10)] == ["hello"]
    await store.close()


def test_open_store_picks_the_backend_by_url(tmp_path, monkeypatch):
    from chatbot.memory import STORES, StoreBase, open_store

    assert isinstance(open_store(":memory:"), InMemoryStore) and isinstance(open_store("memory://"), InMemoryStore)
    store = open_store(f"sqlite:///{tmp_path}/a.sqlite3")  # sqlite:////abs/path, as SQLAlchemy writes it
    assert isinstance(store, SQLiteMemoryStore) and store.path == tmp_path / "a.sqlite3"
    asyncio.run(store.close())
    assert open_store(tmp_path / "b.sqlite3").path == tmp_path / "b.sqlite3"
    with pytest.raises(ChatbotError, match=r"no store for postgresql:// here; known: memory://, sqlite://"):
        open_store("postgresql://db.example/chat")

    class Recording(InMemoryStore):
        """A new backend: a subclass and one entry in STORES; the base checks every argument."""

        def __init__(self, rest):
            super().__init__()
            self.rest, self.appended = rest, []

        def _append(self, *args):
            self.appended.append(args)
            return super()._append(*args)

    monkeypatch.setitem(STORES, "recording", Recording)
    store = open_store("recording://somewhere")
    assert isinstance(store, StoreBase) and store.rest == "somewhere"
    with pytest.raises(InvalidConversationId):
        asyncio.run(store.append("no id", "ada", "user", "hi"))
    asyncio.run(store.append("cli:x", "ada", "user", "hi"))
    assert store.appended == [("cli:x", "ada", "user", "hi", "ada")]
