"""`PersonaBook`: the personas an engine knows, which persona and decoding preset a conversation
uses, the decoding settings they compose to, and the names only the bot may speak under."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from .conversation import check_author
from .decoding import DecodingSettings, compose, get_preset
from .errors import ChatbotError, InputRejected
from .prompting import Persona, clean_speaker, get_persona, list_personas
from .safety import skeleton

__all__ = ["PersonaBook"]

log = logging.getLogger(__name__)


class PersonaBook:
    """Persona files read from ``prompts_dir`` (each read once), with the settings' defaults."""

    def __init__(self, prompts_dir: Path, default: str, preset: str | None, decoding: Any) -> None:
        self.prompts_dir = prompts_dir
        self._preset = preset
        self._decoding = decoding
        self._cache: dict[str, Persona] = {}
        self._bad_files: set[str] = set()
        self.default = self.get(default)  # fail now, not at the first message
        self.speakers = {p.speaker for p in self.all().values()} | {self.default.speaker}
        """Every persona's speaker name: names nobody else may speak under."""
        self._skeletons = {skeleton(s) for s in self.speakers}

    def get(self, name: str) -> Persona:
        """A persona by file name (cached after the first read)."""
        if name not in self._cache:
            self._cache[name] = get_persona(name, self.prompts_dir)
        return self._cache[name]

    def all(self) -> dict[str, Persona]:
        """Every persona available, by name. A malformed file is left out, so one broken file
        does not stop the bot or its persona list; it is logged once, and choosing it is an error
        that names the mistake."""
        def warn_once(err: ChatbotError) -> None:
            if str(err) not in self._bad_files:
                self._bad_files.add(str(err))
                log.warning("%s", err)

        found = list_personas(self.prompts_dir, on_error=warn_once)
        self._cache.update(found)
        return found

    def resolve(self, options: dict[str, str], persona: str | None = None,
                preset: str | None = None) -> tuple[Persona, str]:
        """The persona and preset for a reply: this call's, else the conversation's stored
        choice (``options``), else the settings', else (for the preset) the persona's own."""
        chosen = self.get(persona or options.get("persona") or self.default.name)
        preset_name = preset or options.get("preset") or self._preset or chosen.preset
        get_preset(preset_name)
        return chosen, preset_name

    def decoding(self, persona: Persona, preset: str, overrides: Any) -> DecodingSettings:
        """The preset, then the persona's decoding table, then the settings', then this call's."""
        return compose(preset, persona.decoding, self._decoding, overrides)

    def check_author(self, author: str) -> str:
        """``author`` if a person may speak under that name; `InputRejected` when it is one of the
        bot's own speaker names ("Sam", "sam:", "S.a.m"), whose lines would read as the bot's turns."""
        check_author(author)
        if skeleton(clean_speaker(author)) in self._skeletons:
            taken = ", ".join(sorted(self.speakers))
            raise InputRejected(f"the name {author!r} is taken by the bot ({taken}): a person's lines under it "
                                "would read as the bot's own; use another name")
        return author
