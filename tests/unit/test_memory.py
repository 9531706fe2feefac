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

from chatbot.conversation import InvalidConversationId, check_conversation_id
from chatbot.errors import ChatbotError
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


def test_not_a_database_is_a_clear_error(tmp_path):
    bad = tmp_path / "m.sqlite3"
    bad.write_bytes(b"this is not sqlite" * 100)
    with pytest.raises(ChatbotError, match="cannot open the memory database"):
        SQLiteMemoryStore(bad)


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
