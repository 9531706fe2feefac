"""The Discord face: a `commands.Cog` that turns Discord messages into engine calls.

What it adds to the engine, and only that:

- who gets an answer: a mention of the bot (or of its role), a reply to one of its
  messages, a DM, or any message in a configured channel; never a bot, a webhook or
  itself, so two bots can never talk each other into a loop;
- where memory lives: one conversation per channel, per thread and per DM
  (``discord:channel:<id>``, ``discord:thread:<id>``, ``discord:dm:<user id>``); the
  prompt names people by display name, memory keys their turns by user id
  (``discord:user:<id>``) so `/forget-me` and `/export` find them after a rename;
- manners: typing while it works, replies streamed by editing its message no more than
  once per `edit_interval` in each channel, long replies split at clean places,
  a per-user cooldown and a bound on waiting replies (each with a short note rather than
  silence), a time limit, and no pings ever (`AllowedMentions.none()` on the client and
  on every send, on top of the engine's own mention filter);
- slash commands: /reset, /persona, /style, /forget-me, /export (`adapters.discord_commands`);
- a clean stop: no new messages, replies in progress finish (or are cancelled after
  `shutdown_grace`), memory is closed, then the client.

The engine is injected: `make_bot(engine, settings)` builds the client, which loads
`adapters.discord_extension` (whose ``setup`` adds this cog with the client's engine). The model never runs on the
event loop; the engine keeps it on its worker thread.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import signal
import time
import unicodedata
from collections.abc import Callable
from typing import Any

import aiohttp
import discord
from discord.ext import commands

from chatbot.config import Settings
from chatbot.engine import ChatEngine
from chatbot.errors import ChatbotError, EngineBusy, GenerationFailed, InputRejected
from chatbot.safety import skeleton

from .discord_settings import NO_TOKEN, DiscordSettings
from .discord_text import split_message

__all__ = ["ChatCog", "ChatBot", "ShardedChatBot", "make_bot", "run_discord", "conversation_id_for",
           "author_key_for", "speaker_name", "EXTENSION"]

log = logging.getLogger(__name__)

NO_MENTIONS = discord.AllowedMentions.none()
EXTENSION = "adapters.discord_extension"
"""The extension that adds `ChatCog` to a client made by `make_bot`. It is a module of its
own because discord.py executes an extension's module afresh when loading it, which here
would make a second copy of every class."""
MAX_SPEAKER_CHARS = 32
QUOTE_CHARS = 300
"""How much of a replied-to message is given to the model as context."""
RECENT_TURNS = 12
"""Someone's replied-to message found among this many newest turns is not stored again."""
RECENT_BOT_TURNS = 4
"""The bot's own replied-to message is stored again unless it is this recent: only the
newest turns are sure to be in the window."""
ANSWERED_TYPES = (discord.MessageType.default, discord.MessageType.reply)
PLACEHOLDER = "…"

_USER_MENTION = re.compile(r"<@!?(\d+)>")
_ROLE_MENTION = re.compile(r"<@&(\d+)>")
_CHANNEL_MENTION = re.compile(r"<#(\d+)>")
_CUSTOM_EMOJI = re.compile(r"<a?(:\w+:)\d+>")


# ---------------------------------------------------------------------------- naming


def conversation_id_for(channel: Any, author: Any) -> str:
    """The memory a message belongs to: its thread, its channel, or the DM with its author."""
    if isinstance(channel, discord.Thread):
        return f"discord:thread:{channel.id}"
    if isinstance(channel, (discord.DMChannel, discord.GroupChannel)) or getattr(channel, "guild", None) is None:
        return f"discord:dm:{author.id}"
    return f"discord:channel:{channel.id}"


def author_key_for(user: Any) -> str:
    """The stable key a user's turns are stored under (display names change and repeat)."""
    return f"discord:user:{user.id}"


def speaker_name(user: Any, reserved: frozenset[str] = frozenset()) -> str:
    """The name a user goes by in the prompt: the display name, made safe for a ``Name:`` line.

    Colons and line breaks would let a name fake a turn boundary, so they go; a name that
    collides with one of the bot's own speaker names gets a mark, so the model never
    reads a person's words as its own.
    """
    name = unicodedata.normalize("NFKC", getattr(user, "display_name", "") or "")
    name = "".join(" " if ch.isspace() else ch for ch in name
                   if ch.isspace() or unicodedata.category(ch)[0] not in "CZ")
    name = " ".join(name.replace(":", " ").split())[:MAX_SPEAKER_CHARS].strip()
    if not name:
        name = f"User{str(user.id)[-4:]}"
    if skeleton(name) in reserved:  # "Bоt" with a Cyrillic о, "B.o.t": still the bot's name to a reader
        name = f"{name} (user)"
    return name


def message_text(message: discord.Message, me: Any) -> str:
    """What the user said, for the model: the bot's own mention removed, other mentions as names.

    Written here rather than using `Message.clean_content` because that keeps the bot's
    own mention ("@Bot hello") and gives no way to drop it.
    """
    users = {u.id: u for u in message.mentions}
    roles = {r.id: r for r in message.role_mentions}

    def user(match: re.Match[str]) -> str:
        uid = int(match.group(1))
        if me is not None and uid == me.id:
            return ""
        found = users.get(uid)
        return f"@{found.display_name}" if found is not None else "@someone"

    def role(match: re.Match[str]) -> str:
        found = roles.get(int(match.group(1)))
        if found is not None and _is_my_role(found, me):
            return ""
        return f"@{found.name}" if found is not None else "@role"

    def channel(match: re.Match[str]) -> str:
        guild = message.guild
        found = guild.get_channel_or_thread(int(match.group(1))) if guild is not None else None
        return f"#{found.name}" if found is not None else "#channel"

    text = _USER_MENTION.sub(user, message.content)
    text = _ROLE_MENTION.sub(role, text)
    text = _CHANNEL_MENTION.sub(channel, text)
    text = _CUSTOM_EMOJI.sub(r"\1", text)
    return re.sub(r"[ \t]{2,}", " ", text).strip()  # a removed mention leaves a double space


def _is_my_role(role: discord.Role, me: Any) -> bool:
    """The role Discord gives a bot when it joins: people mention it thinking it is the bot."""
    tags = role.tags
    return me is not None and tags is not None and tags.bot_id == me.id


# ---------------------------------------------------------------------------- replies on Discord


class ChannelThrottle:
    """At most one write (edit or send) per ``interval`` seconds in each channel.

    Discord limits message edits per channel, so the pace is per channel: a reply
    streaming in one channel never slows a reply in another.
    """

    def __init__(self, interval: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.interval = interval
        self.clock = clock
        self._next: dict[int, float] = {}

    def ready(self, channel_id: int) -> bool:
        return self.clock() >= self._next.get(channel_id, 0.0)

    def wait_time(self, channel_id: int) -> float:
        return max(0.0, self._next.get(channel_id, 0.0) - self.clock())

    def wrote(self, channel_id: int) -> None:
        self._next[channel_id] = self.clock() + self.interval
        if len(self._next) > 10_000:  # forget channels long quiet
            now = self.clock()
            self._next = {k: v for k, v in self._next.items() if v > now}


class LiveReply:
    """The messages one reply occupies, brought up to date as its text grows.

    The first piece replies to the user's message (without pinging them, and still
    posted if that message was deleted meanwhile); the rest follow in the channel.
    Every request (a send, an edit, a delete) keeps the channel's pace. A reply that is
    complete within one interval goes out once, finished; a longer one shows its text so
    far with a trailing "…" until `finish`.

    Text over 2,000 characters is split with `adapters.discord_text.split_message` (at
    paragraph, line, sentence or word ends, never inside an emoji, code fences closed
    and reopened), used instead of `commands.Paginator` because that one only breaks at
    line ends and fails on a line longer than the limit.
    """

    def __init__(self, trigger: discord.Message, throttle: ChannelThrottle,
                 on_first_write: Callable[[], Any] = lambda: None) -> None:
        self.trigger = trigger
        self.throttle = throttle
        self.channel_id = trigger.channel.id
        self.messages: list[discord.Message] = []
        self._shown: list[str] = []
        self._text = ""
        self._started = throttle.clock()
        self._on_first_write = on_first_write

    @property
    def text(self) -> str:
        """The reply's text so far (what `update` or `finish` was last given)."""
        return self._text

    async def update(self, text: str) -> None:
        """The reply so far: shown now if the channel's pace allows, else at a later update."""
        self._text = text
        if not self.messages and self.throttle.clock() - self._started < self.throttle.interval:
            return  # a quick reply goes out once, finished, with no placeholder to edit away
        await self._write(f"{text} {PLACEHOLDER}", pace=False)

    async def finish(self, text: str, *, wait: bool = True) -> None:
        """Show the final text; ``wait=False`` skips the pace (a last edit on the way out)."""
        self._text = text
        await self._write(text, pace=wait, final=True)

    async def _write(self, text: str, *, pace: bool, final: bool = False) -> None:
        chunks = split_message(text.strip() or PLACEHOLDER)
        for i, chunk in enumerate(chunks):
            if i < len(self._shown) and self._shown[i] == chunk:
                continue
            if not await self._turn(pace, final):
                return  # not this channel's turn yet; a later update carries on
            if i < len(self.messages):
                await self.messages[i].edit(content=chunk, allowed_mentions=NO_MENTIONS)
                self._shown[i] = chunk
            else:
                self.messages.append(await self._send(chunk, first=i == 0))
                self._shown.append(chunk)
        while len(self.messages) > len(chunks):  # the text shrank (a final trim): drop the leftovers
            if not await self._turn(pace, final):
                return
            await self.messages.pop().delete()
            self._shown.pop()

    async def _turn(self, pace: bool, final: bool) -> bool:
        """Whether a request may go now: waits for the channel's pace when ``pace`` and ``final``."""
        if final:
            if pace:
                await asyncio.sleep(self.throttle.wait_time(self.channel_id))
        elif not self.throttle.ready(self.channel_id):
            return False
        self.throttle.wrote(self.channel_id)
        return True

    async def _send(self, content: str, *, first: bool) -> discord.Message:
        if not self.messages:
            self._on_first_write()
        if first:
            reference = self.trigger.to_reference(fail_if_not_exists=False)
            return await self.trigger.channel.send(content, reference=reference, mention_author=False,
                                                   allowed_mentions=NO_MENTIONS)
        return await self.trigger.channel.send(content, allowed_mentions=NO_MENTIONS)


# ---------------------------------------------------------------------------- the cog


class ChatCog(commands.Cog, name="Chat"):
    """Answers messages through the engine (the slash commands are `MemoryCommands`, beside it)."""

    def __init__(self, bot: commands.Bot, engine: ChatEngine, settings: DiscordSettings | None = None, *,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.bot = bot
        self.engine = engine
        self.settings = settings or engine.settings.section(DiscordSettings)
        st = self.settings
        self.channels = frozenset(st.channels)
        self.throttle = ChannelThrottle(st.edit_interval, clock)
        # discord.py's own cooldown buckets (keyed by author id), used outside a command.
        self.cooldown = commands.CooldownMapping.from_cooldown(
            st.cooldown_messages, st.cooldown_seconds, commands.BucketType.user)
        self._warned: dict[int, float] = {}
        self._clock = clock
        self._tasks: set[asyncio.Task[Any]] = set()
        self.closing = False
        speakers = {p.speaker for p in engine.personas().values()}
        self._reserved = frozenset(skeleton(s) for s in speakers | {engine.default_persona.speaker})

    # ------------------------------------------------------------------ who gets an answer

    def addressed(self, message: discord.Message) -> bool:
        """Whether this message is for the bot: a DM, a mention, a reply to it, or a configured channel."""
        me = self.bot.user
        if me is None or message.author.id == me.id or message.author.bot or message.webhook_id is not None:
            return False
        if message.type not in ANSWERED_TYPES:
            return False
        if message.guild is None:
            return True
        channel = message.channel
        if channel.id in self.channels or getattr(channel, "parent_id", None) in self.channels:
            return True
        if any(u.id == me.id for u in message.mentions):
            return True
        if any(_is_my_role(r, me) for r in message.role_mentions):
            return True
        replied = self._replied_to(message)
        return replied is not None and replied.author.id == me.id

    @staticmethod
    def _replied_to(message: discord.Message) -> discord.Message | None:
        ref = message.reference
        if ref is None:
            return None
        resolved = ref.resolved if ref.resolved is not None else ref.cached_message
        return resolved if isinstance(resolved, discord.Message) else None

    @commands.Cog.listener()
    async def on_message(self, message: discord.Message) -> None:
        if self.closing or not self.addressed(message):
            return
        task = asyncio.current_task()
        if task is not None:
            self._tasks.add(task)
        try:
            await self._answer(message)
        except discord.HTTPException as err:
            # Missing permissions in a channel, a deleted message: nothing to tell the user.
            log.warning("could not reply in channel %s: %s", message.channel.id, err)
        finally:
            if task is not None:
                self._tasks.discard(task)

    async def _answer(self, message: discord.Message) -> None:
        text = message_text(message, self.bot.user)
        replied = self._replied_to(message)
        if not text:
            return  # a bare mention, or only attachments: nothing to answer, nothing counted
        retry_after = self.cooldown.get_bucket(message).update_rate_limit()
        if retry_after:
            await self._cooldown_note(message, retry_after)
            return
        if len(self._tasks) > self.settings.max_pending:
            await self._note(message, self.settings.busy_reply)
            return
        conversation_id = conversation_id_for(message.channel, message.author)
        author = speaker_name(message.author, self._reserved)
        key = author_key_for(message.author)
        typing = asyncio.create_task(self._keep_typing(message.channel))
        live = LiveReply(message, self.throttle, on_first_write=typing.cancel)
        final: str | None = None
        try:
            async with asyncio.timeout(self.settings.reply_timeout):
                if replied is not None:
                    await self._remember_replied(replied, conversation_id)
                if self.settings.stream:
                    final = await self._stream(live, conversation_id, author, key, text)
                else:
                    final = (await self.engine.respond(conversation_id, author, text, author_key=key)).text
        except TimeoutError:
            log.warning("%s: reply timed out after %g s", conversation_id, self.settings.reply_timeout)
            final = await self._cut_short(live, message, "out of time", "Sorry, that took me too long. "
                                                                        "Try again in a moment?")
        except asyncio.CancelledError:
            # Shutting down past the grace: say so on the message rather than leave its "…".
            typing.cancel()
            if live.messages:
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(live.finish(f"{live.text} …(interrupted)", wait=False), 5)
            raise
        except EngineBusy:
            final = await self._cut_short(live, message, "busy", self.settings.busy_reply)
        except InputRejected as err:
            await self._note(message, f"I can't take that message: {err}.")
        except GenerationFailed:
            final = await self._cut_short(live, message, "stopped", "Sorry, something went wrong on my side. "
                                                                    "Your message is kept; try again?")
        except ChatbotError as err:
            if not self.closing:
                log.warning("%s: %s", conversation_id, err)
                final = await self._cut_short(live, message, "stopped", "Sorry, I can't answer right now.")
        finally:
            typing.cancel()
        if final is not None:
            # Outside the time limit: a reply that is finished (and stored) is shown whole.
            await live.finish(final)

    async def _stream(self, live: LiveReply, conversation_id: str, author: str, key: str, text: str) -> str:
        shown = ""
        async with self.engine.stream(conversation_id, author, text, author_key=key) as stream:
            async for piece in stream:
                shown += piece
                await live.update(shown)
        return stream.reply.text if stream.reply is not None else shown

    async def _cut_short(self, live: LiveReply, message: discord.Message, why: str, note: str) -> str | None:
        """A reply that cannot go on: its shown part ends with the reason, or the user gets ``note``."""
        if live.messages:
            return f"{live.text} …({why})"
        await self._note(message, note)
        return None

    async def _remember_replied(self, replied: discord.Message, conversation_id: str) -> None:
        """Context for a reply: the message replied to, if the window may not hold it.

        Someone else's message goes in as their own turn (so `/forget-me` finds it under
        their key); one of the bot's old replies goes in again when it has left the
        newest turns.
        """
        me = self.bot.user
        quoted = message_text(replied, me)
        if not quoted:
            return
        if len(quoted) > QUOTE_CHARS:
            quoted = quoted[:QUOTE_CHARS].rsplit(" ", 1)[0] + " …"
        mine = me is not None and replied.author.id == me.id
        await self.engine.remember(
            conversation_id, speaker_name(replied.author, self._reserved), quoted, role="bot" if mine else "user",
            author_key=None if mine else author_key_for(replied.author),
            unless_within=RECENT_BOT_TURNS if mine else RECENT_TURNS)

    async def _keep_typing(self, channel: Any) -> None:
        """Show "typing" until the first piece of the reply is out (one indicator lasts about 10 s)."""
        try:
            while True:
                await channel.typing()
                await asyncio.sleep(8)
        except discord.HTTPException as err:
            log.debug("no typing indicator in %s: %s", channel.id, err)

    async def _note(self, message: discord.Message, text: str) -> None:
        await message.channel.send(text, reference=message.to_reference(fail_if_not_exists=False),
                                   mention_author=False, allowed_mentions=NO_MENTIONS)

    async def _cooldown_note(self, message: discord.Message, retry_after: float) -> None:
        # One note per cooldown window: answering every extra message would be the spam
        # the cooldown is there to stop.
        now = self._clock()
        if self._warned.get(message.author.id, 0.0) > now:
            return
        self._warned = {k: v for k, v in self._warned.items() if v > now}
        self._warned[message.author.id] = now + retry_after
        await self._note(message, f"{self.settings.cooldown_reply} (try again in {retry_after:.0f} s)")

    # ------------------------------------------------------------------ shutdown

    async def cog_unload(self) -> None:
        # Also reached when a client that loaded the extension itself closes.
        await self.drain(self.settings.shutdown_grace)

    async def drain(self, grace: float) -> None:
        """Stop taking messages; let replies in progress finish for ``grace`` seconds, then cancel them."""
        self.closing = True
        tasks = {t for t in self._tasks if t is not asyncio.current_task()}
        if not tasks:
            return
        log.info("waiting up to %.0f s for %d replies in progress", grace, len(tasks))
        _, pending = await asyncio.wait(tasks, timeout=grace)
        for task in pending:
            task.cancel()
        if pending:
            await asyncio.wait(pending, timeout=5)


# ---------------------------------------------------------------------------- the client


def _intents() -> discord.Intents:
    intents = discord.Intents.default()
    # Privileged: without it messages that don't mention the bot (replies with the ping
    # turned off, configured channels) arrive with empty text.
    intents.message_content = True
    return intents


class _ChatClient:
    """What both client classes share: the engine, the extension, no prefix commands, a clean stop."""

    engine: ChatEngine
    chat_settings: DiscordSettings

    def _init_chat(self, engine: ChatEngine, settings: DiscordSettings) -> dict[str, Any]:
        self.engine = engine
        self.chat_settings = settings
        self._stopping: asyncio.Future[None] | None = None
        return {"command_prefix": commands.when_mentioned, "intents": _intents(), "help_command": None,
                "allowed_mentions": NO_MENTIONS}

    async def setup_hook(self) -> None:
        await self.load_extension(EXTENSION)  # type: ignore[attr-defined]
        if self.chat_settings.sync_commands:
            synced = await self.tree.sync()  # type: ignore[attr-defined]
            log.info("registered %d slash commands", len(synced))

    async def on_message(self, message: discord.Message) -> None:
        # All commands are slash commands; the cog's listener answers messages. The
        # default would also try to run "@bot hello" as a prefix command named "hello".
        return None

    async def close(self) -> None:
        # discord.py may call close() itself (a gateway that cannot resume) while a signal
        # already did: every caller waits for the one orderly stop.
        if self._stopping is None:
            self._stopping = asyncio.ensure_future(self._stop())
        await asyncio.shield(self._stopping)

    async def _stop(self) -> None:
        cog = self.get_cog("Chat")  # type: ignore[attr-defined]
        if isinstance(cog, ChatCog):
            await cog.drain(self.chat_settings.shutdown_grace)
        await self.engine.close()  # the memory store is flushed and closed here
        await super().close()  # type: ignore[misc]


class ChatBot(_ChatClient, commands.Bot):
    """One connection; right for bots in up to a couple of thousand servers."""

    def __init__(self, engine: ChatEngine, settings: DiscordSettings | None = None, **options: Any) -> None:
        settings = settings or engine.settings.section(DiscordSettings)
        super().__init__(**{**self._init_chat(engine, settings), **options})


class ShardedChatBot(_ChatClient, commands.AutoShardedBot):
    """As many connections (shards) as Discord asks for, all answered by the one engine in this process."""

    def __init__(self, engine: ChatEngine, settings: DiscordSettings | None = None, **options: Any) -> None:
        settings = settings or engine.settings.section(DiscordSettings)
        super().__init__(**{**self._init_chat(engine, settings), **options})


def make_bot(engine: ChatEngine, settings: DiscordSettings | None = None,
             **options: Any) -> ChatBot | ShardedChatBot:
    """The Discord client for ``engine``, with ``settings`` (default: the ``[discord]`` table of the
    engine's settings): sharded when `DiscordSettings.sharded` says so."""
    settings = settings or engine.settings.section(DiscordSettings)
    # The bot never joins voice: discord.py's start-up warnings that voice libraries are missing are noise.
    discord.VoiceClient.warn_nacl = discord.VoiceClient.warn_dave = False
    cls = ShardedChatBot if settings.sharded else ChatBot
    return cls(engine, settings, **options)


# ---------------------------------------------------------------------------- running


async def run_discord(settings: Settings, *, engine: ChatEngine | None = None) -> None:
    """Log in and answer until SIGTERM or Ctrl-C, then stop cleanly.

    Raises `ChatbotError` with what to do for a missing or refused token and for the
    Message Content intent not being enabled.
    """
    face = settings.section(DiscordSettings)
    if face.token is None:
        raise ChatbotError(NO_TOKEN)
    token = face.token.get_secret_value()
    if engine is None:
        engine = await asyncio.to_thread(ChatEngine.from_settings, settings)
    bot = make_bot(engine, face)
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        try:
            loop.add_signal_handler(sig, stop.set)
        except (NotImplementedError, RuntimeError):  # not the main thread, or Windows
            pass
    try:
        async with bot:
            runner = asyncio.create_task(bot.start(token))
            stopper = asyncio.create_task(stop.wait())
            await asyncio.wait({runner, stopper}, return_when=asyncio.FIRST_COMPLETED)
            stopper.cancel()
            if not runner.done():
                log.info("stopping: no new messages, finishing replies in progress")
                await bot.close()
            await runner  # raises what ended the connection (a refused token, say)
    except discord.LoginFailure:
        raise ChatbotError("Discord refused the token: check DISCORD_TOKEN (the bot token from the developer "
                           "portal's Bot page, not the client secret)") from None
    except discord.PrivilegedIntentsRequired:
        raise ChatbotError("Discord refused the connection: turn on MESSAGE CONTENT INTENT on the developer "
                           "portal's Bot page, then start the bot again") from None
    except (aiohttp.ClientError, OSError, discord.GatewayNotFound) as err:
        # Once connected, discord.py reconnects by itself; this is a failure to connect at all.
        raise ChatbotError(f"cannot reach Discord ({type(err).__name__}: {err}); check the network "
                           "and try again") from None
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                loop.remove_signal_handler(sig)
            except (NotImplementedError, RuntimeError):
                pass
        await engine.close()
