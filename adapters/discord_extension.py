"""The Discord chat cog and its slash commands as a discord.py extension:
``await bot.load_extension("adapters.discord_extension")``.

The client must carry its engine (`adapters.discord_bot.make_bot` builds such a client);
nothing here is global, so two clients in one process each answer with their own.
"""

from __future__ import annotations

from discord.ext import commands

from chatbot.engine import ChatEngine
from chatbot.errors import ChatbotError

from .discord_bot import ChatCog
from .discord_commands import MemoryCommands


async def setup(bot: commands.Bot) -> None:
    engine = getattr(bot, "engine", None)
    if not isinstance(engine, ChatEngine):
        raise ChatbotError("the chat extension needs a client made by adapters.discord_bot.make_bot "
                           "(one that carries its ChatEngine)")
    await bot.add_cog(ChatCog(bot, engine, getattr(bot, "chat_settings", None)))
    await bot.add_cog(MemoryCommands(engine))
