"""``bot.py discord``: the Discord face's command, registered by ``bot.py`` (the core's command
line knows no face). Light to import: discord.py loads only when the command runs."""

from __future__ import annotations

import argparse
import logging
from typing import Any

from adapters.cli import FaceCommand, config_option, memory_option, model_option, settings_from_args
from adapters.discord_settings import NO_TOKEN, DiscordSettings
from chatbot.errors import ChatbotError

DISCORD_MAX_BATCH = 8
"""`max_batch` of the Discord bot when the settings do not give one."""


def add_parser(sub: Any, common: argparse.ArgumentParser) -> argparse.ArgumentParser:
    d = sub.add_parser("discord", parents=[common], help="run the Discord bot (needs DISCORD_TOKEN)",
                       description="Log in to Discord with the token in DISCORD_TOKEN (or `token` in the [discord] "
                                   "table of the settings file) and answer mentions, replies, DMs and the configured "
                                   "channels until Ctrl-C or SIGTERM. Memory is the same SQLite file the terminal chat uses.")
    config_option(d)
    model_option(d)
    memory_option(d)
    d.add_argument("--persona", default=None, help="persona for channels that have not chosen one (default: the settings')")
    d.add_argument("--channel", type=int, action="append", default=None, metavar="ID",
                   help="answer every message in this channel, without a mention (repeatable)")
    d.add_argument("--sharded", action="store_true", help="run as an AutoShardedBot (very many servers)")
    d.add_argument("--no-sync", action="store_true", help="do not register the slash commands at start-up")
    return d


def run(args: argparse.Namespace) -> int:
    import asyncio

    settings = settings_from_args(args, persona=args.persona).with_section(
        DiscordSettings, channels=tuple(args.channel) if args.channel else None,
        sharded=True if args.sharded else None, sync_commands=False if args.no_sync else None,
    )
    if settings.section(DiscordSettings).token is None:
        raise ChatbotError(NO_TOKEN)
    if "max_batch" not in settings.model_fields_set:
        # A server's channels ask at once: decode their replies together unless told otherwise.
        settings = settings.model_copy(update={"max_batch": DISCORD_MAX_BATCH})
    if not args.verbose:
        logging.getLogger("discord").setLevel(logging.INFO)  # connection and shard events are worth seeing
        logging.getLogger("adapters.discord_bot").setLevel(logging.INFO)
    from adapters import discord_bot

    asyncio.run(discord_bot.run_discord(settings))
    return 0


COMMAND = FaceCommand("discord", add_parser, run)
