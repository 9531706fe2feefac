"""The Discord face at its edges: Discord's deadlines and rate limits, failures mid-reply, shutdown,
deleted messages, look-alike names, time limits and context from reply chains."""

from __future__ import annotations

import asyncio
import itertools
import time
import types

import discord
import pytest

from adapters.discord_bot import PLACEHOLDER
from tests.discord_gateway import BOT_ID, CHANNEL_ID, QUIET_CHANNEL_ID
from tests.unit.test_discord_bot import (
    CHANNEL,
    long_reply,
    scripted_stream,
    settings_for,
    start,
    stored,
)


@pytest.fixture()
async def world(roomy_gen, tiny_prompts, tmp_path, monkeypatch):
    bot, fake, engine = await start(roomy_gen, settings_for(tiny_prompts, tmp_path), monkeypatch)
    yield bot, fake, engine
    await bot.close()


# --------------------------------------------------------------------------- slash commands


async def test_reset_during_a_reply_answers_within_discords_3_second_deadline(roomy_gen, tiny_prompts, tmp_path,
                                                                              monkeypatch):
    """/reset waits for a reply in progress; Discord drops an interaction not acknowledged within 3 s."""
    bot, fake, _engine = await start(roomy_gen, settings_for(tiny_prompts, tmp_path), monkeypatch)
    try:
        scripted_stream(roomy_gen, monkeypatch, "", pieces=["Slow. "] * 8, delay=0.5)  # a ~4 s reply
        fake.message(f"<@{BOT_ID}> long one", mentions=(BOT_ID,))
        await asyncio.sleep(0.3)
        asked = time.monotonic()
        fake.interaction("reset")
        await fake.settle()
        answered = fake.interaction_responses[0].at
        assert answered - asked < 3.0, f"first interaction response after {answered - asked:.1f} s"
    finally:
        await bot.close()


# --------------------------------------------------------------------------- the placeholder left behind


async def test_a_model_failure_mid_stream_does_not_leave_the_placeholder(world, roomy_gen, monkeypatch):
    _bot, fake, _engine = world

    def stream(request):
        yield "Hello there. "
        yield "How are you? "
        time.sleep(0.3)
        raise RuntimeError("CUDA out of memory")

    monkeypatch.setattr(roomy_gen, "stream", stream)
    fake.message(f"<@{BOT_ID}> hi", mentions=(BOT_ID,))
    await fake.settle()
    shown = fake.shown(CHANNEL_ID)
    assert any("went wrong" in c for c in shown), shown
    assert not any(c.rstrip().endswith(PLACEHOLDER) for c in shown), shown


async def test_a_reply_cancelled_at_shutdown_does_not_leave_the_placeholder(roomy_gen, tiny_prompts, tmp_path,
                                                                            monkeypatch):
    settings = settings_for(tiny_prompts, tmp_path, shutdown_grace=0.2)
    bot, fake, _engine = await start(roomy_gen, settings, monkeypatch)
    scripted_stream(roomy_gen, monkeypatch, "", pieces=["Slow. "] * 30, delay=0.1)
    fake.message(f"<@{BOT_ID}> long one", mentions=(BOT_ID,))
    await asyncio.sleep(0.5)
    await bot.close()
    shown = fake.shown(CHANNEL_ID)
    assert shown, "nothing was streamed before the shutdown"
    assert not shown[-1].rstrip().endswith(PLACEHOLDER), shown  # reads as "still typing" forever


# --------------------------------------------------------------------------- timeouts


async def test_a_reply_finished_and_stored_is_not_shown_as_out_of_time(roomy_gen, tiny_prompts, tmp_path,
                                                                       monkeypatch):
    """A reply that finished (and was stored) is shown whole, even when its last edit waits past the time limit."""
    settings = settings_for(tiny_prompts, tmp_path, edit_interval=3, reply_timeout=2)
    bot, fake, engine = await start(roomy_gen, settings, monkeypatch)
    try:
        scripted_stream(roomy_gen, monkeypatch, "All done here.")
        fake.message(f"<@{BOT_ID}> quick one", mentions=(BOT_ID,))
        await fake.settle()
        turns = await stored(engine, CHANNEL)
        assert [t[1] for t in turns] == ["user", "bot"]  # the engine finished and stored the whole reply
        assert fake.shown(CHANNEL_ID) == [turns[1][2]], fake.shown(CHANNEL_ID)
    finally:
        await bot.close()


# --------------------------------------------------------------------------- streaming pace


async def test_a_short_reply_is_one_write_without_a_placeholder_edit(world, roomy_gen, monkeypatch):
    """A reply complete within one interval is one send, with no placeholder to edit away."""
    _bot, fake, _engine = world
    scripted_stream(roomy_gen, monkeypatch, "Hi there.")
    fake.message(f"<@{BOT_ID}> hi", mentions=(BOT_ID,))
    await fake.settle()
    assert [r.json["content"] for r in fake.writes(CHANNEL_ID)] == ["Hi there."]


async def test_a_long_streamed_reply_keeps_the_per_channel_pace(roomy_gen, tiny_prompts, tmp_path, monkeypatch):
    """Every request keeps the channel's pace, also where a long reply edits one message and sends the next."""
    interval = 0.3
    settings = settings_for(tiny_prompts, tmp_path, edit_interval=interval, max_input_chars=5000)
    bot, fake, _engine = await start(roomy_gen, settings, monkeypatch)
    try:
        text = long_reply()
        scripted_stream(roomy_gen, monkeypatch, text, pieces=[w + " " for w in text.split(" ")], delay=0.003)
        fake.message(f"<@{BOT_ID}> tell me everything", mentions=(BOT_ID,))
        await fake.settle()
        gaps = [b.at - a.at for a, b in itertools.pairwise(fake.writes())]
        assert len(fake.shown(CHANNEL_ID)) >= 3
        assert min(gaps) >= interval * 0.9, [round(g, 3) for g in gaps]
    finally:
        await bot.close()


# --------------------------------------------------------------------------- deleted trigger


async def test_a_deleted_question_still_gets_its_reply_or_is_not_kept(world, roomy_gen, monkeypatch):
    """A question deleted before the answer goes out (while queued, or by a moderator) still gets its answer."""
    bot, fake, engine = world
    deleted: set[int] = set()
    real = fake._request

    async def refusing(route, **kw):
        ref = (kw.get("json") or {}).get("message_reference")
        if ref and int(ref["message_id"]) in deleted and ref.get("fail_if_not_exists", True):
            raise discord.HTTPException(types.SimpleNamespace(status=400, reason="Bad Request"),
                                        {"code": 50035, "message": "Invalid Form Body: Unknown message"})
        return await real(route, **kw)

    bot.http.request = refusing
    deleted.add(fake.message(f"<@{BOT_ID}> what time is it?", mentions=(BOT_ID,)))
    await fake.settle()
    turns = await stored(engine, CHANNEL)
    assert fake.shown(CHANNEL_ID) or not turns, ("nothing shown, yet memory keeps", turns)


# --------------------------------------------------------------------------- cooldown


async def test_bare_mentions_do_not_use_up_the_cooldown(roomy_gen, tiny_prompts, tmp_path, monkeypatch):
    """A bare mention (or attachments only) is ignored and spends no cooldown slot."""
    settings = settings_for(tiny_prompts, tmp_path, cooldown_messages=2, cooldown_seconds=60)
    bot, fake, engine = await start(roomy_gen, settings, monkeypatch)
    try:
        for _ in range(2):
            fake.message(f"<@{BOT_ID}>", mentions=(BOT_ID,))
            await fake.settle()
        fake.message(f"<@{BOT_ID}> now a real question", mentions=(BOT_ID,))
        await fake.settle()
        assert not any("faster than I can answer" in c for c in fake.shown()), fake.shown()
        assert await engine.count(CHANNEL) == 2
    finally:
        await bot.close()


# --------------------------------------------------------------------------- /forget-me


async def test_forget_me_erases_the_callers_words_quoted_in_other_peoples_turns(world):
    """/forget-me also erases the caller's words that reached memory as context of someone else's reply."""
    _bot, fake, engine = world
    fake.message("my secret plan involves tulips", author_id=2, name="carol")
    await fake.settle()
    carols = fake.bot._connection._messages[-1]
    fake.message(f"<@{BOT_ID}> what do you think of this?", mentions=(BOT_ID,), reply_to=carols)
    await fake.settle()
    fake.interaction("forget-me", user_id=2, name="carol")
    await fake.settle()
    texts = [t[2] for t in await stored(engine, CHANNEL)]
    assert not any("tulips" in t for t in texts), texts




# --------------------------------------------------------------------------- prompt names





async def test_a_look_alike_of_the_bots_name_is_marked(world):
    """Display names that read as the bot's name ("Bоt" with a Cyrillic о, "B.o.t") are marked as users."""
    _bot, fake, engine = world
    for name in ("Bоt", "B.o.t"):
        fake.message(f"<@{BOT_ID}> hello", mentions=(BOT_ID,), author_id=7, name="x", global_name=name)
        await fake.settle()
    authors = [t[0] for t in await stored(engine, CHANNEL) if t[1] == "user"]
    assert all("(user)" in a for a in authors), authors


async def test_the_time_limit_is_kept_when_the_model_is_mid_sentence(roomy_gen, tiny_prompts, tmp_path, monkeypatch):
    """The time limit holds while the model is in the middle of a sentence: the model stops at its next token."""
    settings = settings_for(tiny_prompts, tmp_path, reply_timeout=1)
    bot, fake, _engine = await start(roomy_gen, settings, monkeypatch)
    try:
        def stream(request):  # 3.3 s of one sentence; like the real model, it stops when the request is cancelled
            for piece in ["and so "] * 10 + ["on."]:
                time.sleep(0.3)
                if request.cancel is not None and request.cancel.is_set():
                    return
                yield piece

        monkeypatch.setattr(roomy_gen, "stream", stream)
        asked = time.monotonic()
        fake.message(f"<@{BOT_ID}> go on", mentions=(BOT_ID,))
        await fake.settle()
        (sent,) = fake.sends()
        at, content = sent.at, sent.json["content"]
        assert "too long" in content, content
        assert at - asked < 1.5, f"the 1 s limit was told after {at - asked:.1f} s"
    finally:
        await bot.close()


async def test_a_timed_out_reply_does_not_keep_the_model_busy_for_other_channels(roomy_gen, tiny_prompts, tmp_path,
                                                                                  monkeypatch):
    """discord_stream = false: a reply past its time limit stops the model, so other channels are not held up."""
    from chatbot.generation import GenerationResult

    settings = settings_for(tiny_prompts, tmp_path, stream=False, reply_timeout=1)
    bot, fake, _engine = await start(roomy_gen, settings, monkeypatch)
    calls = []

    def generate(requests):
        calls.append(1)
        # The first reply is slow, the rest are instant; like the real model, a cancelled request ends.
        for _ in range(30 if len(calls) == 1 else 0):
            if requests[0].cancel is not None and requests[0].cancel.is_set():
                break
            time.sleep(0.1)
        return [GenerationResult("Quick answer.", 10, 3, "stop", 0.0) for _ in requests]

    monkeypatch.setattr(roomy_gen, "generate", generate)
    try:
        fake.message(f"<@{BOT_ID}> a hard question", mentions=(BOT_ID,))
        await asyncio.sleep(1.2)  # the first one has timed out by now
        fake.message(f"<@{BOT_ID}> an easy one", mentions=(BOT_ID,), channel_id=QUIET_CHANNEL_ID)
        await fake.settle()
        assert fake.shown(QUIET_CHANNEL_ID) == ["Quick answer."], fake.shown(QUIET_CHANNEL_ID)
    finally:
        await bot.close()


async def test_a_reply_to_an_old_bot_message_keeps_it_as_context(roomy_gen, tiny_prompts, tmp_path, monkeypatch):
    """A reply to an old bot message brings that message back into the prompt once the window has moved on."""
    settings = settings_for(tiny_prompts, tmp_path, max_history_turns=4)
    bot, fake, _engine = await start(roomy_gen, settings, monkeypatch)
    prompts: list[str] = []

    def stream(request):
        prompts.append(request.prompt)
        yield f"Answer number {len(prompts)} is tulips."

    monkeypatch.setattr(roomy_gen, "stream", stream)
    try:
        fake.message(f"<@{BOT_ID}> what flower?", mentions=(BOT_ID,))
        await fake.settle()
        first = fake.bot_message(0)
        for i in range(3):
            fake.message(f"<@{BOT_ID}> something else {i}", mentions=(BOT_ID,))
            await fake.settle()
        fake.message("why that one?", reply_to=first)
        await fake.settle()
        assert "Answer number 1" in prompts[-1], prompts[-1]
    finally:
        await bot.close()
