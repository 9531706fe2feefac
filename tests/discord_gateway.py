"""Discord's side of the wire, in memory, for tests of the Discord face.

Only the network edge is replaced: `HTTPClient.request` (every REST call the bot makes)
and `AsyncWebhookAdapter.request` (interaction responses) are answered here and
recorded, and gateway events are fed to the real `ConnectionState` parsers. The client,
its cache, messages, channels, threads, interactions, the command tree, cooldowns and
the cog are the real discord.py objects, so what a test asserts on is the exact payload
Discord would receive (content, allowed mentions, reply reference, files).
"""

from __future__ import annotations

import asyncio
import itertools
import json
import time
from dataclasses import dataclass, field
from typing import Any

import discord
from discord.webhook.async_ import AsyncWebhookAdapter

BOT_ID = 1000
OTHER_BOT_ID = 1001
GUILD_ID = 10
CHANNEL_ID = 20
QUIET_CHANNEL_ID = 21
"""A channel the bot may be configured to answer in without a mention."""
THREAD_ID = 30
BOT_ROLE_ID = 40
MANAGE_MESSAGES = str(discord.Permissions(manage_messages=True).value)
NO_PERMISSIONS = "0"
TIMESTAMP = "2026-11-22T00:00:00+00:00"


def user_payload(user_id: int, name: str, *, bot: bool = False, global_name: str | None = None) -> dict[str, Any]:
    return {"id": str(user_id), "username": name, "global_name": global_name, "discriminator": "0",
            "avatar": None, "bot": bot}


@dataclass
class Request:
    """One REST call the bot made."""

    method: str
    path: str
    url: str
    json: dict[str, Any] | None
    files: list[tuple[str, bytes]] = field(default_factory=list)
    at: float = field(default_factory=time.monotonic)
    """When the bot made the call (`time.monotonic()`), for checks on pace and deadlines."""

    @property
    def channel_id(self) -> int | None:
        parts = self.url.split("/channels/")
        return int(parts[1].split("/")[0]) if len(parts) > 1 else None


class FakeDiscord:
    """A guild with two channels and a thread, people, and the bot, all behind a recorded wire."""

    def __init__(self, bot: discord.Client, monkeypatch: Any, *, clock: Any = None) -> None:
        self.bot = bot
        self.requests: list[Request] = []
        self.interaction_responses: list[Request] = []
        self._ids = itertools.count(5000)
        self._message_delay = 0.0
        self._shown: dict[tuple[int, int], str] = {}
        bot.http.request = self._request  # type: ignore[method-assign]
        fake = self

        async def webhook_request(adapter: Any, route: Any, session: Any = None, **kw: Any) -> Any:
            return await fake._webhook_request(route, **kw)

        monkeypatch.setattr(AsyncWebhookAdapter, "request", webhook_request)

    # ------------------------------------------------------------------ start-up

    async def connect(self) -> None:
        """What login and READY would do: the bot's user, its application id, setup_hook, the guild."""
        bot = self.bot
        await bot._async_setup_hook()
        state = bot._connection
        state.user = discord.ClientUser(state=state, data=user_payload(BOT_ID, "chatbot", bot=True))
        state.application_id = BOT_ID
        await bot.setup_hook()
        everyone = {"id": str(GUILD_ID), "name": "@everyone", "permissions": "0", "position": 0, "color": 0,
                    "hoist": False, "managed": False, "mentionable": False}
        bot_role = {"id": str(BOT_ROLE_ID), "name": "chatbot", "permissions": "0", "position": 1, "color": 0,
                    "hoist": False, "managed": True, "mentionable": True, "tags": {"bot_id": str(BOT_ID)}}

        def text_channel(cid: int, name: str) -> dict[str, Any]:
            return {"id": str(cid), "type": 0, "name": name, "position": 0, "guild_id": str(GUILD_ID),
                    "permission_overwrites": []}

        thread = {"id": str(THREAD_ID), "type": 11, "name": "a thread", "guild_id": str(GUILD_ID),
                  "parent_id": str(CHANNEL_ID), "owner_id": "1", "message_count": 0, "member_count": 1,
                  "rate_limit_per_user": 0,
                  "thread_metadata": {"archived": False, "auto_archive_duration": 1440, "locked": False,
                                      "archive_timestamp": TIMESTAMP}}
        state.parse_guild_create({
            "id": str(GUILD_ID), "name": "a server", "owner_id": "1", "roles": [everyone, bot_role],
            "channels": [text_channel(CHANNEL_ID, "general"), text_channel(QUIET_CHANNEL_ID, "bot-chat")],
            "threads": [thread], "members": [], "emojis": [], "stickers": [], "features": [], "member_count": 3,
        })

    # ------------------------------------------------------------------ the gateway, inbound

    def message(self, content: str, *, author_id: int = 1, name: str = "ada", channel_id: int = CHANNEL_ID,
                guild: bool = True, mentions: tuple[int, ...] = (), role_mentions: tuple[int, ...] = (),
                reply_to: discord.Message | dict[str, Any] | None = None, bot: bool = False,
                webhook_id: int | None = None, message_type: int = 0, global_name: str | None = None) -> int:
        """A MESSAGE_CREATE event; returns the message id."""
        mid = next(self._ids)
        author = user_payload(author_id, name, bot=bot, global_name=global_name)
        data: dict[str, Any] = {
            "id": str(mid), "channel_id": str(channel_id), "content": content, "author": author,
            "type": 19 if reply_to is not None else message_type, "tts": False, "mention_everyone": False,
            "mentions": [user_payload(uid, "chatbot" if uid == BOT_ID else f"user{uid}", bot=uid == BOT_ID)
                         for uid in mentions],
            "mention_roles": [str(r) for r in role_mentions], "attachments": [], "embeds": [], "pinned": False,
            "timestamp": TIMESTAMP, "edited_timestamp": None, "flags": 0, "components": [],
        }
        if guild:
            data["guild_id"] = str(GUILD_ID)
            data["member"] = {"roles": [], "joined_at": TIMESTAMP, "deaf": False, "mute": False}
        if webhook_id is not None:
            data["webhook_id"] = str(webhook_id)
        if reply_to is not None:
            ref = reply_to if isinstance(reply_to, dict) else self._payload_of(reply_to)
            data["message_reference"] = {"message_id": ref["id"], "channel_id": ref["channel_id"],
                                         **({"guild_id": str(GUILD_ID)} if guild else {})}
            data["referenced_message"] = ref
        self.bot._connection.parse_message_create(data)
        return mid

    def interaction(self, command: str, *, user_id: int = 1, name: str = "ada", channel_id: int = CHANNEL_ID,
                    guild: bool = True, permissions: str = MANAGE_MESSAGES,
                    options: dict[str, Any] | None = None) -> int:
        """An INTERACTION_CREATE event for a slash command; returns the interaction id."""
        iid = next(self._ids)
        data: dict[str, Any] = {
            "id": str(iid), "application_id": str(BOT_ID), "type": 2, "token": f"token-{iid}", "version": 1,
            "channel_id": str(channel_id), "locale": "en-US", "app_permissions": MANAGE_MESSAGES,
            "entitlements": [], "authorizing_integration_owners": {}, "context": 0 if guild else 1,
            "attachment_size_limit": 10 * 1024 * 1024,
            "data": {"id": str(next(self._ids)), "name": command, "type": 1,
                     "options": [{"name": k, "type": 3, "value": v} for k, v in (options or {}).items()]},
        }
        user = user_payload(user_id, name)
        if guild:
            data["guild_id"] = str(GUILD_ID)
            data["channel"] = {"id": str(channel_id), "type": 11 if channel_id == THREAD_ID else 0,
                               "guild_id": str(GUILD_ID), "name": "general", "position": 0,
                               "permission_overwrites": [], "parent_id": str(CHANNEL_ID)}
            data["member"] = {"user": user, "roles": [], "joined_at": TIMESTAMP, "deaf": False, "mute": False, "flags": 0,
                              "permissions": permissions}
        else:
            data["channel"] = {"id": str(channel_id), "type": 1, "recipients": [user]}
            data["user"] = user
        self.bot._connection.parse_interaction_create(data)
        return iid

    async def settle(self, timeout: float = 60.0) -> None:
        """Wait until every event handler the gateway started has finished."""
        async def wait() -> None:
            while True:
                tasks = [t for t in asyncio.all_tasks() if t.get_name().startswith(("discord.py:", "CommandTree"))
                         and t is not asyncio.current_task() and not t.done()]
                if not tasks:
                    return
                await asyncio.wait(tasks)

        await asyncio.wait_for(wait(), timeout)

    # ------------------------------------------------------------------ the REST API, outbound

    def slow_down(self, seconds: float) -> None:
        """Make every message send and edit take this long (a slow network)."""
        self._message_delay = seconds

    async def _request(self, route: Any, *, files: Any = None, form: Any = None, **kw: Any) -> Any:
        payload = kw.get("json")
        attached = []
        if form:
            for part in form:
                if part["name"] == "payload_json":
                    payload = json.loads(part["value"])
        for f in files or []:
            f.reset()
            attached.append((f.filename, f.fp.read()))
        request = Request(route.method, route.path, route.url, payload, attached)
        self.requests.append(request)
        if route.path.endswith("/messages") or "/messages/{message_id}" in route.path:
            await asyncio.sleep(self._message_delay)
        if route.method == "POST" and route.path == "/channels/{channel_id}/messages":
            data = self._bot_message(request.channel_id or 0, payload or {})
            self._shown[(request.channel_id or 0, int(data["id"]))] = data["content"]
            return data
        if route.path == "/channels/{channel_id}/messages/{message_id}":
            key = (request.channel_id or 0, int(route.url.rsplit("/", 1)[1]))
            if route.method == "DELETE":
                self._shown.pop(key, None)
                return None
            self._shown[key] = (payload or {}).get("content", self._shown.get(key, ""))
            return self._bot_message(key[0], payload or {}, message_id=key[1])
        if route.method == "PUT" and route.path.endswith("/commands"):
            return [{**cmd, "id": str(next(self._ids)), "application_id": str(BOT_ID), "version": "1",
                     "default_member_permissions": cmd.get("default_member_permissions"), "type": cmd.get("type", 1)}
                    for cmd in payload or []]
        return None  # typing, delete: no content

    def _bot_message(self, channel_id: int, payload: dict[str, Any], message_id: int | None = None) -> dict[str, Any]:
        data = {
            "id": str(message_id or next(self._ids)), "channel_id": str(channel_id),
            "content": payload.get("content", ""), "author": user_payload(BOT_ID, "chatbot", bot=True),
            "type": 19 if payload.get("message_reference") else 0, "tts": False, "mention_everyone": False,
            "mentions": [], "mention_roles": [], "attachments": [], "embeds": [], "pinned": False,
            "timestamp": TIMESTAMP, "edited_timestamp": TIMESTAMP if message_id else None, "flags": 0,
            "components": [],
        }
        if channel_id in (CHANNEL_ID, QUIET_CHANNEL_ID, THREAD_ID):
            data["guild_id"] = str(GUILD_ID)
        return data

    async def _webhook_request(self, route: Any, *, payload: Any = None, multipart: Any = None,
                               files: Any = None, **kw: Any) -> Any:
        body = payload
        for part in multipart or []:
            if part["name"] == "payload_json":
                body = json.loads(part["value"])
        attached = []
        for f in files or []:
            f.reset()
            attached.append((f.filename, f.fp.read()))
        request = Request(route.method, route.path, route.url, body, attached)
        self.interaction_responses.append(request)
        if route.path.startswith("/webhooks/"):  # a follow-up message after a deferred response
            data = self._bot_message(0, body or {})
            data["webhook_id"] = str(route.webhook_id)
            return data
        return {"interaction": {"id": str(route.webhook_id), "type": 2}}

    # ------------------------------------------------------------------ what the bot did

    def sends(self, channel_id: int | None = None) -> list[Request]:
        return [r for r in self.requests if r.method == "POST" and r.path == "/channels/{channel_id}/messages"
                and (channel_id is None or r.channel_id == channel_id)]

    def edits(self, channel_id: int | None = None) -> list[Request]:
        return [r for r in self.requests if r.method == "PATCH" and r.path == "/channels/{channel_id}/messages/{message_id}"
                and (channel_id is None or r.channel_id == channel_id)]

    def writes(self, channel_id: int | None = None) -> list[Request]:
        """Sends and edits, in the order the bot made them."""
        return [r for r in self.requests if r.method in ("POST", "PATCH") and r.path.startswith("/channels/{channel_id}/messages")
                and (channel_id is None or r.channel_id == channel_id)]

    def typing(self) -> list[Request]:
        return [r for r in self.requests if r.path.endswith("/typing")]

    def shown(self, channel_id: int | None = None) -> list[str]:
        """What the channel shows now: the latest content of each bot message still there, oldest first."""
        return [content for (cid, _), content in self._shown.items() if channel_id is None or cid == channel_id]

    def bot_message(self, index: int = -1, channel_id: int = CHANNEL_ID) -> discord.Message:
        """One of the bot's messages as the client would have it (to reply to it)."""
        (cid, mid), content = list((k, v) for k, v in self._shown.items() if k[0] == channel_id)[index]
        data = self._bot_message(cid, {"content": content}, message_id=mid)
        channel = self.bot.get_channel(cid)
        return discord.Message(state=self.bot._connection, channel=channel, data=data)  # type: ignore[arg-type]

    def _payload_of(self, message: discord.Message) -> dict[str, Any]:
        return {"id": str(message.id), "channel_id": str(message.channel.id), "content": message.content,
                "author": user_payload(message.author.id, message.author.name, bot=message.author.bot),
                "type": 0, "tts": False, "mention_everyone": False, "mentions": [], "mention_roles": [],
                "attachments": [], "embeds": [], "pinned": False, "timestamp": TIMESTAMP, "edited_timestamp": None,
                "flags": 0, "components": []}
