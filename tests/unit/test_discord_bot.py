"""The Discord face on a tiny GPT-2 and a real SQLite file.

The bot, its cog, discord.py's cache, messages, interactions, command tree and cooldowns
are all real; only the network is replaced (`tests.discord_gateway.FakeDiscord` answers
the REST calls and feeds gateway events), so every assertion is on the payload Discord
would have received.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time

import discord
import pytest
from discord.ext import commands

from adapters.discord_bot import (
    ChannelThrottle,
    ChatBot,
    ChatCog,
    LiveReply,
    ShardedChatBot,
    make_bot,
    run_discord,
    speaker_name,
)
from adapters.discord_settings import DiscordSettings
from adapters.discord_text import split_message
from chatbot.config import Settings
from chatbot.engine import ChatEngine
from chatbot.errors import ChatbotError
from chatbot.memory import SQLiteMemoryStore
from tests.discord_gateway import (
    BOT_ID,
    BOT_ROLE_ID,
    CHANNEL_ID,
    NO_PERMISSIONS,
    OTHER_BOT_ID,
    QUIET_CHANNEL_ID,
    THREAD_ID,
    FakeDiscord,
)

NONE_ALLOWED = {"parse": [], "replied_user": False}
EPHEMERAL = 64
CHANNEL = f"discord:channel:{CHANNEL_ID}"


def settings_for(tiny_prompts, tmp_path, **values):
    """Core settings with a [discord] table: each key goes where its name belongs."""
    face = {"channels": (QUIET_CHANNEL_ID,), "edit_interval": 0.2, "sync_commands": True}
    face.update({k: v for k, v in values.items() if k in DiscordSettings.model_fields})
    core = {"persona": "tester", "prompts_dir": tiny_prompts, "decoding": {"max_new_tokens": 6},
            "memory_path": str(tmp_path / "memory.sqlite3")}
    core.update({k: v for k, v in values.items() if k not in DiscordSettings.model_fields})
    return Settings(**core, discord=face)


async def start(gen, settings, monkeypatch):
    engine = ChatEngine(gen, SQLiteMemoryStore(settings.memory_path), settings)
    bot = make_bot(engine)
    fake = FakeDiscord(bot, monkeypatch)
    await fake.connect()
    return bot, fake, engine


@pytest.fixture()
async def world(roomy_gen, tiny_prompts, tmp_path, monkeypatch):
    bot, fake, engine = await start(roomy_gen, settings_for(tiny_prompts, tmp_path), monkeypatch)
    yield bot, fake, engine
    await bot.close()


def scripted_stream(gen, monkeypatch, text, *, pieces=None, delay=0.0):
    """The generator streams ``text`` (in ``pieces`` if given), sleeping ``delay`` before each piece."""
    parts = pieces or [text]

    def stream(request):
        for part in parts:
            time.sleep(delay)
            yield part

    def generate(requests):
        from chatbot.generation import GenerationResult

        time.sleep(delay)
        return [GenerationResult(text, 10, 5, "stop", delay) for _ in requests]

    monkeypatch.setattr(gen, "stream", stream)
    monkeypatch.setattr(gen, "generate", generate)


async def stored(engine, conversation_id):
    return [(t.author, t.role, t.text, t.author_key) for t in await engine.history(conversation_id)]


# --------------------------------------------------------------------------- when the bot answers


async def test_starting_the_bot_prints_no_voice_library_warnings(roomy_gen, tiny_prompts, tmp_path, monkeypatch,
                                                                 caplog):
    monkeypatch.setattr(discord.VoiceClient, "warn_nacl", True)  # as in a process that has made no client yet
    monkeypatch.setattr(discord.VoiceClient, "warn_dave", True)
    settings = settings_for(tiny_prompts, tmp_path)
    engine = ChatEngine(roomy_gen, SQLiteMemoryStore(settings.memory_path), settings)
    with caplog.at_level("WARNING", logger="discord"):
        bot = make_bot(engine)
    assert "voice" not in caplog.text
    await bot.close()
    await engine.close()


async def test_a_mention_is_answered_in_a_reply_that_pings_nobody(world):
    bot, fake, engine = world
    trigger = fake.message(f"<@{BOT_ID}> hello there", mentions=(BOT_ID,))
    await fake.settle()
    sends = fake.sends(CHANNEL_ID)
    assert sends, "no reply"
    first = sends[0].json
    assert first["message_reference"]["message_id"] == trigger
    assert first["allowed_mentions"] == NONE_ALLOWED
    assert all(r.json["allowed_mentions"] == NONE_ALLOWED for r in fake.sends())
    assert all(r.json["allowed_mentions"]["parse"] == [] for r in fake.edits())  # edits carry no reply ping
    assert fake.typing(), "no typing indicator while generating"
    turns = await stored(engine, CHANNEL)
    assert turns[0] == ("ada", "user", "hello there", "discord:user:1")
    assert turns[1][1] == "bot" and turns[1][2] == fake.shown(CHANNEL_ID)[0]


@pytest.mark.parametrize("how", ["dm", "reply", "configured channel", "bot role", "thread mention"])
async def test_dms_replies_configured_channels_and_role_mentions_are_answered(world, how):
    bot, fake, engine = world
    if how == "dm":
        fake.message("hi bot", guild=False, channel_id=77)
        where, conversation = 77, "discord:dm:1"
    elif how == "reply":
        fake.message(f"<@{BOT_ID}> first", mentions=(BOT_ID,))
        await fake.settle()
        fake.message("and a follow-up", reply_to=fake.bot_message(-1))
        where, conversation = CHANNEL_ID, CHANNEL
    elif how == "configured channel":
        fake.message("no mention needed here", channel_id=QUIET_CHANNEL_ID)
        where, conversation = QUIET_CHANNEL_ID, f"discord:channel:{QUIET_CHANNEL_ID}"
    elif how == "bot role":
        fake.message(f"<@&{BOT_ROLE_ID}> are you there", role_mentions=(BOT_ROLE_ID,))
        where, conversation = CHANNEL_ID, CHANNEL
    else:
        fake.message(f"<@{BOT_ID}> in a thread", mentions=(BOT_ID,), channel_id=THREAD_ID)
        where, conversation = THREAD_ID, f"discord:thread:{THREAD_ID}"
    await fake.settle()
    assert fake.sends(where)
    turns = await stored(engine, conversation)
    assert turns[-2][1] == "user" and turns[-1][1] == "bot"
    assert "<@" not in turns[-2][2]


async def test_messages_not_for_the_bot_are_left_alone(world):
    bot, fake, engine = world
    fake.message("just chatting with friends")
    fake.message(f"hey <@{7}> look", mentions=(7,))
    fake.message("@everyone meeting at 5")
    fake.message(f"<@{BOT_ID}> I am a bot", mentions=(BOT_ID,), author_id=OTHER_BOT_ID, name="otherbot", bot=True)
    fake.message(f"<@{BOT_ID}> from a webhook", mentions=(BOT_ID,), author_id=55, webhook_id=55)
    fake.message(f"<@{BOT_ID}> from myself", mentions=(BOT_ID,), author_id=BOT_ID, name="chatbot", bot=True)
    fake.message(f"<@{BOT_ID}> pinned a message", mentions=(BOT_ID,), message_type=6)
    await fake.settle()
    assert [r for r in fake.requests if "/channels/" in r.url] == []  # no reply, no typing
    assert await engine.count(CHANNEL) == 0


async def test_two_bots_never_answer_each_other(roomy_gen, tiny_prompts, tmp_path, monkeypatch):
    """Two of our bots in one channel, each seeing the other's messages as mentions: one human message, one reply."""
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    a, fake_a, _ = await start(roomy_gen, settings_for(tiny_prompts, tmp_path / "a",
                                                       channels=(CHANNEL_ID,)), monkeypatch)
    b, fake_b, _ = await start(roomy_gen, settings_for(tiny_prompts, tmp_path / "b",
                                                       channels=(CHANNEL_ID,)), monkeypatch)
    try:
        fake_a.message("hello bots")
        fake_b.message("hello bots")
        for _ in range(3):  # relay what each bot posted to the other, as the gateway would
            await fake_a.settle()
            await fake_b.settle()
            for src, dst in ((fake_a, fake_b), (fake_b, fake_a)):
                for request in src.sends():
                    if not getattr(request, "relayed", False):
                        request.relayed = True
                        dst.message(f"<@{BOT_ID}> {request.json['content']}", mentions=(BOT_ID,),
                                    author_id=OTHER_BOT_ID, name="otherbot", bot=True)
        assert len(fake_a.sends()) == 1 and len(fake_b.sends()) == 1
    finally:
        await a.close()
        await b.close()


# --------------------------------------------------------------------------- what it says


@pytest.mark.parametrize("stream", [True, False])
async def test_mass_and_role_mentions_arrive_neutralised(roomy_gen, tiny_prompts, tmp_path, monkeypatch, stream):
    bot, fake, engine = await start(roomy_gen, settings_for(tiny_prompts, tmp_path, stream=stream),
                                    monkeypatch)
    try:
        scripted_stream(roomy_gen, monkeypatch, "Hey @everyone and @here, ask <@&401234567890123456> or <@201234567890123456> about it.")
        fake.message(f"<@{BOT_ID}> who should I ask?", mentions=(BOT_ID,))
        await fake.settle()
        for request in fake.writes():
            assert request.json["allowed_mentions"]["parse"] == []
            content = request.json["content"]
            assert "@everyone" not in content and "@here" not in content
            assert "<@&401234567890123456>" not in content and "<@201234567890123456>" not in content
        assert "ask" in fake.shown(CHANNEL_ID)[0]
    finally:
        await bot.close()


def long_reply() -> str:
    para = ("Here is a family 👨‍👩‍👧‍👦 and a flag 🇳🇴 in a sentence that goes on for a while. " * 14).strip()
    code = "```python\n" + "\n".join(f"print('line {i}')  # 🙂" for i in range(60)) + "\n```"
    return "\n\n".join([para, code, para, para])


@pytest.mark.parametrize("stream", [True, False])
async def test_a_long_reply_is_split_cleanly_into_several_messages(roomy_gen, tiny_prompts, tmp_path,
                                                                   monkeypatch, stream):
    text = long_reply()
    assert len(text) > 4000
    settings = settings_for(tiny_prompts, tmp_path, stream=stream, edit_interval=0.2,
                            max_input_chars=5000, decoding={"max_new_tokens": 6})
    bot, fake, engine = await start(roomy_gen, settings, monkeypatch)
    try:
        sentences = [s + " " for s in text.split(" ")]  # word-sized pieces, as a streamer gives
        scripted_stream(roomy_gen, monkeypatch, text, pieces=sentences)
        fake.message(f"<@{BOT_ID}> tell me everything", mentions=(BOT_ID,))
        await fake.settle()
        shown = fake.shown(CHANNEL_ID)
        stored_reply = (await engine.history(CHANNEL))[-1].text
        assert shown == split_message(stored_reply)
        assert len(shown) >= 3 and all(len(m) <= 2000 for m in shown)
        assert all(m.count("```") % 2 == 0 for m in shown), "a code fence left open"
        assert sum(m.count("👨‍👩‍👧‍👦") for m in shown) == text.count("👨‍👩‍👧‍👦")
        assert sum(m.count("🇳🇴") for m in shown) == text.count("🇳🇴")
    finally:
        await bot.close()


async def test_streaming_edits_are_throttled_per_channel(roomy_gen, tiny_prompts, tmp_path, monkeypatch):
    interval = 0.3
    settings = settings_for(tiny_prompts, tmp_path, edit_interval=interval)
    bot, fake, engine = await start(roomy_gen, settings, monkeypatch)
    try:
        sentences = [f"Sentence number {i} is here. " for i in range(30)]
        scripted_stream(roomy_gen, monkeypatch, "".join(sentences), pieces=sentences, delay=0.03)
        fake.message(f"<@{BOT_ID}> talk", mentions=(BOT_ID,))
        fake.message(f"<@{BOT_ID}> talk here too", mentions=(BOT_ID,), channel_id=THREAD_ID)
        await fake.settle()
        for channel in (CHANNEL_ID, THREAD_ID):
            times = [r.at for r in fake.writes(channel)]
            assert len(times) >= 2, "the reply did not stream"
            # 30 pieces came in; far fewer writes went out, never two closer than the interval.
            assert len(times) < 15
            gaps = [b - a for a, b in zip(times, times[1:])]
            assert min(gaps) >= interval * 0.9, gaps
            assert fake.shown(channel) == ["".join(sentences).strip()]
    finally:
        await bot.close()


async def test_two_channels_stream_side_by_side_each_at_its_own_pace(world):
    """Replies in two channels at once (as two model workers would give): each keeps its own pace, not one timer."""
    bot, fake, engine = world
    cog = bot.get_cog("Chat")
    fake.message("a question here")
    fake.message("and one there", channel_id=THREAD_ID)
    triggers = list(bot._connection._messages)[-2:]

    async def write(trigger):
        live = LiveReply(trigger, cog.throttle)
        text = ""
        for i in range(25):
            text += f"Piece {i}. "
            await live.update(text)
            await asyncio.sleep(0.04)
        await live.finish(text)

    await asyncio.gather(*(write(t) for t in triggers))
    interval = cog.throttle.interval
    for channel in (CHANNEL_ID, THREAD_ID):
        times = [r.at for r in fake.writes(channel)]
        assert len(times) >= 3
        assert min(b - a for a, b in zip(times, times[1:])) >= interval * 0.9
    # The two channels' writes interleave closely: nobody waited for the other channel's interval.
    both = sorted((r.at, r.channel_id) for r in fake.writes())
    assert min(b[0] - a[0] for a, b in zip(both, both[1:]) if a[1] != b[1]) < interval / 2


def test_the_throttle_paces_each_channel_on_its_own():
    now = [0.0]
    throttle = ChannelThrottle(1.0, clock=lambda: now[0])
    assert throttle.ready(1) and throttle.ready(2)
    throttle.wrote(1)
    assert not throttle.ready(1) and throttle.ready(2)
    assert throttle.wait_time(1) == pytest.approx(1.0)
    now[0] = 1.0
    assert throttle.ready(1)


def test_speaker_names_cannot_fake_a_turn_or_pass_for_the_bot():
    class U:
        def __init__(self, name, uid=123456):
            self.display_name, self.id = name, uid

    assert speaker_name(U("Ada: Lovelace")) == "Ada Lovelace"
    assert speaker_name(U("line\nbreak\u202e")) == "line break"
    assert speaker_name(U("Bot"), frozenset({"bot"})) == "Bot (user)"
    assert speaker_name(U("   ")) == "User3456"
    assert len(speaker_name(U("x" * 80))) == 32


# --------------------------------------------------------------------------- limits


async def test_a_user_over_the_cooldown_is_told_once_and_others_still_get_answers(roomy_gen, tiny_prompts,
                                                                                 tmp_path, monkeypatch):
    settings = settings_for(tiny_prompts, tmp_path, cooldown_messages=2, cooldown_seconds=60)
    bot, fake, engine = await start(roomy_gen, settings, monkeypatch)
    try:
        for i in range(5):
            fake.message(f"<@{BOT_ID}> message {i}", mentions=(BOT_ID,))
            await fake.settle()
        fake.message(f"<@{BOT_ID}> my turn", mentions=(BOT_ID,), author_id=2, name="bob")
        await fake.settle()
        notes = [c for c in fake.shown() if "faster than I can answer" in c]
        assert len(notes) == 1 and "try again in" in notes[0]
        turns = await stored(engine, CHANNEL)
        assert [t[2] for t in turns if t[1] == "user"] == ["message 0", "message 1", "my turn"]
    finally:
        await bot.close()


async def test_a_full_channel_queue_gets_the_busy_reply(roomy_gen, tiny_prompts, tmp_path, monkeypatch):
    settings = settings_for(tiny_prompts, tmp_path, max_waiting_per_conversation=1)
    bot, fake, engine = await start(roomy_gen, settings, monkeypatch)
    try:
        scripted_stream(roomy_gen, monkeypatch, "Fine thanks.", delay=0.3)
        for uid in range(1, 6):
            fake.message(f"<@{BOT_ID}> hi from {uid}", mentions=(BOT_ID,), author_id=uid, name=f"user{uid}")
        await fake.settle()
        contents = fake.shown(CHANNEL_ID)
        busy = [c for c in contents if "still answering" in c]
        answered = [c for c in contents if c == "Fine thanks."]
        assert busy and answered and len(busy) + len(answered) == 5
        # Busy messages were not stored: only the answered ones are in memory.
        assert len([t for t in await stored(engine, CHANNEL) if t[1] == "user"]) == len(answered)
    finally:
        await bot.close()


async def test_too_many_pending_replies_overall_get_the_busy_reply(roomy_gen, tiny_prompts, tmp_path, monkeypatch):
    settings = settings_for(tiny_prompts, tmp_path, max_pending=2)
    bot, fake, engine = await start(roomy_gen, settings, monkeypatch)
    try:
        scripted_stream(roomy_gen, monkeypatch, "Fine thanks.", delay=0.2)
        fake.message("one", channel_id=QUIET_CHANNEL_ID)
        fake.message(f"<@{BOT_ID}> two", mentions=(BOT_ID,), author_id=2)
        fake.message(f"<@{BOT_ID}> three", mentions=(BOT_ID,), author_id=3, channel_id=THREAD_ID)
        await fake.settle()
        contents = fake.shown()
        assert contents.count("Fine thanks.") == 2
        assert len([c for c in contents if "still answering" in c]) == 1
    finally:
        await bot.close()


async def test_a_reply_over_the_time_limit_stops_with_a_note(roomy_gen, tiny_prompts, tmp_path, monkeypatch):
    settings = settings_for(tiny_prompts, tmp_path, reply_timeout=2)
    bot, fake, engine = await start(roomy_gen, settings, monkeypatch)
    try:
        scripted_stream(roomy_gen, monkeypatch, "", pieces=["Slow. "] * 40, delay=0.15)
        fake.message(f"<@{BOT_ID}> take your time", mentions=(BOT_ID,))
        await fake.settle()
        assert "out of time" in fake.shown(CHANNEL_ID)[-1]
        # The user's message is kept; no half reply was stored as if it were whole.
        assert [t[1] for t in await stored(engine, CHANNEL)] == ["user"]
    finally:
        await bot.close()


async def test_a_message_over_the_limit_is_refused_with_the_reason(world):
    bot, fake, engine = world
    fake.message(f"<@{BOT_ID}> " + "word " * 500, mentions=(BOT_ID,))
    await fake.settle()
    assert "can't take that message" in fake.sends()[0].json["content"]
    assert await engine.count(CHANNEL) == 0


# --------------------------------------------------------------------------- slash commands


def response(fake, index=-1):
    """The message of an interaction response, or of the follow-up after a deferred one."""
    r = fake.interaction_responses[index]
    return (r.json if r.path.startswith("/webhooks/") else r.json["data"]), r.files


async def test_forget_me_removes_the_callers_turns_everywhere_and_nothing_else(world):
    bot, fake, engine = world
    fake.message(f"<@{BOT_ID}> I am ada in general", mentions=(BOT_ID,))
    fake.message(f"<@{BOT_ID}> bob in general", mentions=(BOT_ID,), author_id=2, name="bob")
    await fake.settle()
    fake.message("ada in a DM", guild=False, channel_id=77)
    fake.message(f"<@{BOT_ID}> ada in the thread", mentions=(BOT_ID,), channel_id=THREAD_ID, global_name="Ada L")
    fake.message(f"<@{BOT_ID}> a different ada", mentions=(BOT_ID,), channel_id=THREAD_ID, author_id=3)
    await fake.settle()
    fake.interaction("forget-me", user_id=1)
    await fake.settle()
    data, _ = response(fake)
    assert data["flags"] == EPHEMERAL and "3 of your messages" in data["content"]
    general = await stored(engine, CHANNEL)
    assert [t[2] for t in general if t[1] == "user"] == ["bob in general"]
    assert len([t for t in general if t[1] == "bot"]) == 2
    assert [t[1] for t in await stored(engine, "discord:dm:1")] == ["bot"]
    thread = await stored(engine, f"discord:thread:{THREAD_ID}")
    # Same display name "ada", another person: their turn stays.
    assert [(t[0], t[2]) for t in thread if t[1] == "user"] == [("ada", "a different ada")]


async def test_export_sends_only_the_callers_data_as_an_ephemeral_file(world):
    bot, fake, engine = world
    fake.message(f"<@{BOT_ID}> mine", mentions=(BOT_ID,))
    fake.message(f"<@{BOT_ID}> not mine", mentions=(BOT_ID,), author_id=2, name="bob")
    fake.message("also mine", guild=False, channel_id=77)
    await fake.settle()
    fake.interaction("export", user_id=1)
    await fake.settle()
    data, files = response(fake)
    assert data["flags"] == EPHEMERAL and data["allowed_mentions"]["parse"] == []
    (name, body), = files
    exported = json.loads(body)
    assert name.endswith(".json")
    texts = sorted(t["text"] for turns in exported["conversations"].values() for t in turns)
    assert texts == ["also mine", "mine"]


async def test_reset_needs_manage_messages_in_a_server(world):
    bot, fake, engine = world
    fake.message(f"<@{BOT_ID}> remember me", mentions=(BOT_ID,))
    await fake.settle()
    fake.interaction("reset", permissions=NO_PERMISSIONS)
    await fake.settle()
    data, _ = response(fake)
    assert data["flags"] == EPHEMERAL and "Manage Messages" in data["content"]
    assert await engine.count(CHANNEL) == 2
    fake.interaction("reset")
    await fake.settle()
    assert "forgot this conversation (2 messages)" in response(fake)[0]["content"]
    assert await engine.count(CHANNEL) == 0
    # In a DM the conversation is the caller's own.
    fake.message("dm me", guild=False, channel_id=77)
    await fake.settle()
    fake.interaction("reset", guild=False, channel_id=77, permissions=NO_PERMISSIONS)
    await fake.settle()
    assert await engine.count("discord:dm:1") == 0


async def test_persona_lists_and_chooses_per_channel_and_the_choice_is_kept(world, roomy_gen, tiny_prompts,
                                                                          tmp_path, monkeypatch):
    bot, fake, engine = world
    fake.interaction("persona")
    await fake.settle()
    data, _ = response(fake)
    assert data["flags"] == EPHEMERAL and "**other**" in data["content"] and "→ **tester**" in data["content"]
    fake.interaction("persona", options={"name": "other"}, permissions=NO_PERMISSIONS)
    await fake.settle()
    assert "Manage Messages" in response(fake)[0]["content"]
    fake.interaction("persona", options={"name": "nobody"})
    await fake.settle()
    assert "nobody" in response(fake)[0]["content"] and response(fake)[0]["flags"] == EPHEMERAL
    fake.interaction("persona", options={"name": "other"})
    await fake.settle()
    assert "Pip" in response(fake)[0]["content"]
    fake.message(f"<@{BOT_ID}> who are you", mentions=(BOT_ID,))
    await fake.settle()
    assert (await engine.history(CHANNEL))[-1].author == "Pip"
    assert (await engine.choices(f"discord:thread:{THREAD_ID}"))[0].name == "tester"
    await bot.close()
    # A restart reads the choice back from the memory file.
    bot2, fake2, engine2 = await start(roomy_gen, settings_for(tiny_prompts, tmp_path), monkeypatch)
    try:
        assert (await engine2.choices(CHANNEL))[0].name == "other"
    finally:
        await bot2.close()


async def test_style_chooses_a_preset_per_channel(world):
    bot, fake, engine = world
    fake.interaction("style")
    await fake.settle()
    assert "→ **greedy**" in response(fake)[0]["content"]  # the tester persona's own preset
    fake.interaction("style", options={"preset": "creative"})
    await fake.settle()
    assert "creative" in response(fake)[0]["content"]
    assert (await engine.choices(CHANNEL))[1] == "creative"
    fake.interaction("style", options={"preset": "default"})
    await fake.settle()
    assert (await engine.choices(CHANNEL))[1] == "greedy"


async def test_slash_commands_are_registered_with_discord(world):
    bot, fake, engine = world
    (sync,) = [r for r in fake.requests if r.method == "PUT" and r.path.endswith("/commands")]
    names = {c["name"]: c for c in sync.json}
    assert set(names) == {"reset", "persona", "style", "forget-me", "export"}
    assert int(names["reset"]["default_member_permissions"]) == discord.Permissions(manage_messages=True).value


# --------------------------------------------------------------------------- shutdown and sharding


async def test_shutdown_finishes_replies_in_progress_and_flushes_memory(roomy_gen, tiny_prompts, tmp_path,
                                                                        monkeypatch):
    settings = settings_for(tiny_prompts, tmp_path, shutdown_grace=10)
    bot, fake, engine = await start(roomy_gen, settings, monkeypatch)
    scripted_stream(roomy_gen, monkeypatch, "Almost done.", delay=0.4)
    fake.message(f"<@{BOT_ID}> one more thing", mentions=(BOT_ID,))
    await asyncio.sleep(0.1)
    closing = asyncio.create_task(bot.close())
    await asyncio.sleep(0.05)
    fake.message(f"<@{BOT_ID}> too late", mentions=(BOT_ID,), author_id=2)
    await closing
    assert bot.is_closed()
    assert fake.shown(CHANNEL_ID) == ["Almost done."]
    reopened = SQLiteMemoryStore(settings.memory_path)
    try:
        assert [(t.role, t.text) for t in await reopened.newest(CHANNEL, 10)] == [
            ("user", "one more thing"), ("bot", "Almost done.")]
    finally:
        await reopened.close()


async def test_shutdown_cancels_replies_that_overrun_the_grace(roomy_gen, tiny_prompts, tmp_path, monkeypatch):
    settings = settings_for(tiny_prompts, tmp_path, shutdown_grace=0.2)
    bot, fake, engine = await start(roomy_gen, settings, monkeypatch)
    scripted_stream(roomy_gen, monkeypatch, "", pieces=["Slow. "] * 30, delay=0.1)
    fake.message(f"<@{BOT_ID}> long one", mentions=(BOT_ID,))
    await asyncio.sleep(0.2)
    started = time.monotonic()
    await bot.close()
    assert time.monotonic() - started < 3
    reopened = SQLiteMemoryStore(settings.memory_path)
    try:
        assert [t.role for t in await reopened.newest(CHANNEL, 10)] == ["user"]
    finally:
        await reopened.close()


async def test_sigterm_stops_the_running_bot_cleanly(roomy_gen, tiny_prompts, tmp_path, monkeypatch):
    settings = settings_for(tiny_prompts, tmp_path, token="not-a-real-token", sync_commands=False)
    engine = ChatEngine(roomy_gen, SQLiteMemoryStore(settings.memory_path), settings)
    connected = asyncio.Event()

    async def start_offline(self, token, *, reconnect=True):
        # The gateway connection is the network edge: stand in for it, and stay "connected".
        assert token == "not-a-real-token"
        await self._async_setup_hook()
        await self.setup_hook()
        connected.set()
        while not self.is_closed():  # as the real connection loop does, until close()
            await asyncio.sleep(0.02)

    monkeypatch.setattr(ChatBot, "start", start_offline)
    runner = asyncio.create_task(run_discord(settings, engine=engine))
    await asyncio.wait_for(connected.wait(), 10)
    os.kill(os.getpid(), signal.SIGTERM)
    await asyncio.wait_for(runner, 10)
    with pytest.raises(ChatbotError, match="closed"):
        await engine.respond(CHANNEL, "ada", "hello?")


async def test_a_refused_token_is_a_clear_error_and_the_engine_is_closed(roomy_gen, tiny_prompts, tmp_path,
                                                                         monkeypatch):
    settings = settings_for(tiny_prompts, tmp_path, token="bad-token")
    engine = ChatEngine(roomy_gen, SQLiteMemoryStore(settings.memory_path), settings)

    async def refuse(self, token):
        raise discord.LoginFailure("Improper token has been passed.")

    monkeypatch.setattr(discord.http.HTTPClient, "static_login", refuse)
    with pytest.raises(ChatbotError, match="refused the token") as err:
        await run_discord(settings, engine=engine)
    assert "bad-token" not in str(err.value)
    with pytest.raises(ChatbotError, match="closed"):
        await engine.respond(CHANNEL, "ada", "hello?")


async def test_no_network_is_a_clear_error(roomy_gen, tiny_prompts, tmp_path, monkeypatch):
    import aiohttp

    settings = settings_for(tiny_prompts, tmp_path, token="a-token")
    engine = ChatEngine(roomy_gen, SQLiteMemoryStore(settings.memory_path), settings)

    async def unreachable(self, token):
        raise aiohttp.ClientConnectionError("Cannot connect to host discord.com:443")

    monkeypatch.setattr(discord.http.HTTPClient, "static_login", unreachable)
    with pytest.raises(ChatbotError, match="cannot reach Discord"):
        await run_discord(settings, engine=engine)


async def test_no_token_is_a_clear_error(tiny_prompts, tmp_path):
    with pytest.raises(ChatbotError, match="DISCORD_TOKEN"):
        await run_discord(settings_for(tiny_prompts, tmp_path))


async def test_a_sharded_bot_serves_every_shard_from_one_engine(roomy_gen, tiny_prompts, tmp_path, monkeypatch):
    settings = settings_for(tiny_prompts, tmp_path, sharded=True)
    bot, fake, engine = await start(roomy_gen, settings, monkeypatch)
    try:
        assert isinstance(bot, ShardedChatBot) and isinstance(bot, commands.AutoShardedBot)
        cog = bot.get_cog("Chat")
        assert isinstance(cog, ChatCog) and cog.engine is engine
        fake.message(f"<@{BOT_ID}> hello shards", mentions=(BOT_ID,))
        await fake.settle()
        assert fake.sends(CHANNEL_ID)
    finally:
        await bot.close()


async def test_the_extension_refuses_a_client_without_an_engine():
    bot = commands.Bot(command_prefix="!", intents=discord.Intents.default())
    with pytest.raises(commands.ExtensionFailed, match="make_bot"):
        await bot.load_extension("adapters.discord_extension")


async def test_a_reply_to_someone_else_carries_their_message_as_context(world):
    bot, fake, engine = world
    fake.message("the museum opens at ten", author_id=2, name="bob")
    await fake.settle()
    bobs = fake.bot._connection._messages[-1]
    fake.message(f"<@{BOT_ID}> is that right?", mentions=(BOT_ID,), reply_to=bobs)
    fake.message(f"<@{BOT_ID}> and on sundays?", mentions=(BOT_ID,), reply_to=bobs)
    await fake.settle()
    # Bob's message is context under his own name and key (once), then ada's questions.
    turns = [t for t in await stored(engine, CHANNEL) if t[1] == "user"]
    assert turns == [("bob", "user", "the museum opens at ten", "discord:user:2"),
                     ("ada", "user", "is that right?", "discord:user:1"),
                     ("ada", "user", "and on sundays?", "discord:user:1")]
