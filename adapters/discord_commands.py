"""The Discord face's slash commands: /reset, /persona, /style, /forget-me, /export.

A cog of their own (``Memory``) beside the chat cog: they manage what the engine keeps and
how a channel's bot speaks, and answer only the person who asked where that is private.
"""

from __future__ import annotations

import io
import logging

import discord
from discord import app_commands
from discord.ext import commands

from chatbot.decoding import PRESETS
from chatbot.engine import ChatEngine
from chatbot.errors import ChatbotError
from chatbot.memory import export_json

from .discord_bot import NO_MENTIONS, author_key_for, conversation_id_for

__all__ = ["MemoryCommands"]

log = logging.getLogger(__name__)


class MemoryCommands(commands.Cog, name="Memory"):
    """The slash commands that manage a channel's memory, persona and style, and a user's data."""

    def __init__(self, engine: ChatEngine) -> None:
        self.engine = engine

    @staticmethod
    def _may_manage(interaction: discord.Interaction) -> bool:
        """Changing a server channel's memory or voice needs Manage Messages; a DM is the user's own."""
        return interaction.guild is None or interaction.permissions.manage_messages

    async def _deny(self, interaction: discord.Interaction, what: str) -> None:
        await interaction.response.send_message(
            f"You need the Manage Messages permission in this channel to {what}.", ephemeral=True,
            allowed_mentions=NO_MENTIONS)

    @app_commands.command(name="reset", description="Forget this channel's conversation (Manage Messages)")
    @app_commands.default_permissions(manage_messages=True)
    async def reset_command(self, interaction: discord.Interaction) -> None:
        if not self._may_manage(interaction):
            await self._deny(interaction, "reset the bot's memory")
            return
        # Resetting waits for a reply in progress here to finish; Discord wants an answer
        # within 3 s, so acknowledge first and say what happened when it is done.
        await interaction.response.defer(thinking=True)
        conversation_id = conversation_id_for(interaction.channel, interaction.user)
        removed = await self.engine.reset(conversation_id)
        log.info("%s reset by %s (%d turns)", conversation_id, interaction.user.id, removed)
        await interaction.followup.send(
            f"Done: I forgot this conversation ({removed} messages). Persona and style stay as they were.",
            allowed_mentions=NO_MENTIONS)

    async def _persona_names(self, interaction: discord.Interaction, current: str) -> list[app_commands.Choice[str]]:
        personas = self.engine.personas()
        return [app_commands.Choice(name=f"{name} ({p.speaker})", value=name) for name, p in sorted(personas.items())
                if current.casefold() in name.casefold()][:25]

    @app_commands.command(name="persona", description="Show the personas, or choose this channel's")
    @app_commands.describe(name="persona to use from now on (leave empty to list them)")
    @app_commands.autocomplete(name=_persona_names)
    async def persona_command(self, interaction: discord.Interaction, name: str | None = None) -> None:
        conversation_id = conversation_id_for(interaction.channel, interaction.user)
        if name is None:
            current, _ = await self.engine.choices(conversation_id)
            lines = [f"{'→' if n == current.name else '•'} **{n}** ({p.speaker}){_first_line(p.description)}"
                     for n, p in sorted(self.engine.personas().items())]
            await interaction.response.send_message("\n".join(lines) + "\n\n`/persona name` switches.",
                                                    ephemeral=True, allowed_mentions=NO_MENTIONS)
            return
        if not self._may_manage(interaction):
            await self._deny(interaction, "change the bot's persona")
            return
        persona = await self.engine.set_persona(conversation_id, name)
        await interaction.response.send_message(f"From now on you're talking to {persona.speaker} "
                                                f"(persona {persona.name}).", allowed_mentions=NO_MENTIONS)

    @app_commands.command(name="style", description="Show the decoding styles, or choose this channel's")
    @app_commands.describe(preset="style to use from now on; 'default' goes back to the persona's")
    @app_commands.choices(preset=[app_commands.Choice(name=n, value=n) for n in (*PRESETS, "default")])
    async def style_command(self, interaction: discord.Interaction, preset: str | None = None) -> None:
        conversation_id = conversation_id_for(interaction.channel, interaction.user)
        if preset is None:
            _, current = await self.engine.choices(conversation_id)
            lines = [f"{'→' if n == current else '•'} **{n}**: {_describe_preset(n)}" for n in PRESETS]
            await interaction.response.send_message("\n".join(lines) + "\n\n`/style preset` switches.",
                                                    ephemeral=True, allowed_mentions=NO_MENTIONS)
            return
        if not self._may_manage(interaction):
            await self._deny(interaction, "change the bot's style")
            return
        chosen = await self.engine.set_preset(conversation_id, None if preset == "default" else preset)
        await interaction.response.send_message(f"Style is now **{chosen}**.", allowed_mentions=NO_MENTIONS)

    @app_commands.command(name="forget-me", description="Erase everything you said to the bot, in every channel")
    @app_commands.checks.cooldown(1, 10.0)  # per user
    async def forget_me_command(self, interaction: discord.Interaction) -> None:
        removed = await self.engine.forget_author(author_key_for(interaction.user))
        log.info("forgot %d turns for a user on request", removed)
        await interaction.response.send_message(f"Done: {removed} of your messages are erased, everywhere.",
                                                ephemeral=True, allowed_mentions=NO_MENTIONS)

    @app_commands.command(name="export", description="Get everything you said to the bot as a file (only you see it)")
    @app_commands.checks.cooldown(1, 30.0)  # per user
    async def export_command(self, interaction: discord.Interaction) -> None:
        data = await self.engine.export_author(author_key_for(interaction.user))
        count = sum(len(turns) for turns in data["conversations"].values())
        file = discord.File(io.BytesIO(export_json(data).encode("utf-8")), filename="chatbot-export.json")
        await interaction.response.send_message(
            f"Here is what I keep from you: {count} messages in {len(data['conversations'])} conversations.",
            file=file, ephemeral=True, allowed_mentions=NO_MENTIONS)

    async def cog_app_command_error(self, interaction: discord.Interaction,
                                    error: app_commands.AppCommandError) -> None:
        cause = getattr(error, "original", error)
        if isinstance(error, app_commands.CommandOnCooldown):
            text = f"Once more in {error.retry_after:.0f} s, please."
        elif isinstance(cause, ChatbotError):
            text = str(cause)
        elif isinstance(error, app_commands.CheckFailure):
            text = "You can't use that command here."
        else:
            log.error("slash command /%s failed", interaction.command and interaction.command.name, exc_info=cause)
            text = "Sorry, that didn't work."
        send = interaction.followup.send if interaction.response.is_done() else interaction.response.send_message
        await send(text, ephemeral=True, allowed_mentions=NO_MENTIONS)


def _first_line(text: str) -> str:
    line = next((ln.strip() for ln in text.splitlines() if ln.strip()), "")
    return f": {line[:80]}" if line else ""


def _describe_preset(name: str) -> str:
    s = PRESETS[name]
    if s.temperature == 0:
        return "greedy: the most likely words, always the same"
    return f"sampling at temperature {s.temperature:g}, top-p {s.top_p:g}"


