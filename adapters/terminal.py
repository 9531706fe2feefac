"""``bot.py chat``: the terminal face. A conversation with the engine in a terminal, or over a
pipe one line out per line in; the only place besides the command line's reports that prints.
Registered by ``bot.py`` like every face."""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from typing import Any

from adapters.cli import FaceCommand, config_option, decoding_options, memory_option, model_option, settings_from_args
from chatbot.errors import ChatbotError


def add_parser(sub: Any, common: argparse.ArgumentParser) -> argparse.ArgumentParser:
    c = sub.add_parser("chat", parents=[common], help="talk to the bot in the terminal; it remembers across runs",
                       description="A conversation with the engine: what is said is stored (SQLite, see --memory) and "
                                   "the bot remembers it the next time. Reads lines from stdin when piped and prints "
                                   "one line per line read. Inside the chat, /help lists the commands.")
    config_option(c)
    model_option(c)
    memory_option(c)
    c.add_argument("--conversation", default="cli:local",
                   help="conversation id, 'scope:key' (default %(default)s); each id has its own memory")
    c.add_argument("--persona", default=None,
                   help="persona for this conversation, kept for later runs (see /persona); default: the settings'")
    c.add_argument("--name", default="User", help="your name in the conversation (default %(default)s)")
    c.add_argument("--reset", action="store_true", help="forget this conversation before starting")
    decoding_options(c, preset_help="decoding preset for this conversation, kept for later runs "
                                         "(default: the persona's)")
    return c


def run(args: argparse.Namespace) -> int:
    settings = settings_from_args(args)
    return run_chat(settings, conversation_id=args.conversation, name=args.name, persona=args.persona,
                    preset=args.preset, reset=args.reset)


CHAT_HELP = """commands:
  /help            this list
  /reset           forget this conversation (persona and preset choices stay)
  /persona         list personas; /persona NAME talks to another one from now on
  /preset          list decoding presets; /preset NAME switches; /preset default goes back to the persona's
  /quit            leave (Ctrl-D works too)"""


def run_chat(settings: Any, *, conversation_id: str, name: str, persona: str | None = None,
             preset: str | None = None, reset: bool = False) -> int:
    """The terminal conversation, on the engine and its persistent memory.

    Interactive, replies stream in as they are generated and Ctrl-C stops a reply. Piped,
    every line read gives exactly one line out (the reply, or a note in parentheses for
    a command, an empty line or a refused message), so a script can pair them up.
    """
    import asyncio

    from chatbot.conversation import check_author, check_conversation_id
    from chatbot.engine import ChatEngine

    check_conversation_id(conversation_id)
    try:
        check_author(name)
    except ChatbotError as err:
        raise ChatbotError(f"--name {name!r}: {err}") from None
    interactive = sys.stdin.isatty()
    engine = ChatEngine.from_settings(settings)
    loop = asyncio.new_event_loop()
    try:
        engine.check_author(name)
    except ChatbotError:
        loop.run_until_complete(engine.close())
        loop.close()
        raise

    def run(coro: Any) -> Any:
        return loop.run_until_complete(coro)

    try:
        # The choices first: a mistyped persona must not cost the conversation --reset forgets.
        if persona is not None:
            run(engine.set_persona(conversation_id, persona))
        if preset is not None:
            run(engine.set_preset(conversation_id, preset))
        if reset:
            run(engine.reset(conversation_id))
        if interactive:
            _greet(run, engine, settings, conversation_id, name)
        while True:
            try:
                line = input(f"{name}> " if interactive else "")
            except EOFError:
                if interactive:
                    print()  # Ctrl-D: the shell's prompt starts on a line of its own
                break
            except KeyboardInterrupt:
                print()
                break
            text = line.strip()
            if not text:
                if not interactive:  # still one line out, so a script's lines stay paired
                    print("(empty message ignored)", flush=True)
                continue
            if text.startswith("/"):
                out = _chat_command(run, engine, conversation_id, text, interactive=interactive)
                if out is None:
                    if not interactive:
                        print("(bye)", flush=True)  # one line out per line in, /quit too
                    break
                print(out, flush=True)
                continue
            try:
                if interactive:
                    _stream_reply(loop, engine, conversation_id, name, text)
                    continue
                answered = _until_interrupted(loop, engine.respond(conversation_id, name, text))
                if answered.result is not None:  # stored, so shown, even when Ctrl-C came meanwhile
                    print(answered.result.text, flush=True)
                if answered.interrupted:
                    raise KeyboardInterrupt
            except ChatbotError as err:
                # A refused message, a busy conversation or a failed reply: say so and go on.
                print(f"({err})", flush=True)
    finally:
        run(engine.close())
        loop.close()
    return 0


def _greet(run: Any, engine: Any, settings: Any, conversation_id: str, name: str) -> None:
    persona, preset = run(engine.choices(conversation_id))
    earlier = run(engine.history(conversation_id, 4))
    total = run(engine.count(conversation_id))
    where = "kept in this run only" if settings.memory_path == ":memory:" else f"kept in {settings.memory_path}"
    print(f"Talking to {persona.speaker} (persona {persona.name}, preset {preset}) in {conversation_id}; "
          f"{total} earlier turns, {where}.")
    for turn in earlier:
        print(f"  {turn.author}: {turn.text}")
    print("/help lists commands; Ctrl-D or /quit leaves.")


def _stream_reply(loop: Any, engine: Any, conversation_id: str, name: str, text: str) -> None:
    async def show() -> None:
        started = False
        async with engine.stream(conversation_id, name, text) as stream:
            async for piece in stream:
                if not started:
                    persona, _ = await engine.choices(conversation_id)
                    print(f"{persona.speaker}> ", end="", flush=True)
                    started = True
                print(piece, end="", flush=True)
        print()

    # Ctrl-C stops this reply, not the chat: closing the stream stops the model at its next
    # token, and no bot turn is stored (the user's stays).
    if _until_interrupted(loop, show()).cancelled:
        print(" (stopped)")


@dataclass
class _Run:
    result: Any = None
    cancelled: bool = False
    """Ctrl-C stopped the work before its end."""
    interrupted: bool = False
    """Ctrl-C came while it ran (it may have finished all the same)."""


def _until_interrupted(loop: Any, coro: Any) -> _Run:
    """Run ``coro`` on ``loop``; Ctrl-C (SIGINT) cancels it at its next await instead of raising
    wherever Python happens to be. The engine stores a bot turn only in a reply that is then
    returned, so a reply the user was not shown is never left stored."""
    import asyncio
    import signal

    task = loop.create_task(coro)
    run = _Run()

    def on_sigint() -> None:
        run.interrupted = True
        task.cancel()

    try:
        loop.add_signal_handler(signal.SIGINT, on_sigint)
        handled = True
    except (NotImplementedError, RuntimeError, ValueError):  # Windows, or not the main thread
        handled = False
    try:
        run.result = loop.run_until_complete(task)
    except asyncio.CancelledError:
        run.cancelled = True
    except KeyboardInterrupt:  # where no handler could be installed
        run.interrupted = True
        task.cancel()
        try:
            run.result = loop.run_until_complete(task)
        except asyncio.CancelledError:
            run.cancelled = True
    finally:
        if handled:
            loop.remove_signal_handler(signal.SIGINT)
    return run


def _chat_command(run: Any, engine: Any, conversation_id: str, text: str, *, interactive: bool = True) -> str | None:
    """Run one /command; returns what to print (one line when piped), or None to leave."""
    from chatbot.decoding import PRESETS

    command, _, arg = text.partition(" ")
    arg = arg.strip()
    try:
        if command in ("/quit", "/exit"):
            return None
        if command == "/help":
            return CHAT_HELP if interactive else "(commands: " + "; ".join(
                " ".join(line.split()) for line in CHAT_HELP.splitlines()[1:]) + ")"
        if command == "/reset":
            if arg:  # forgetting is not undone: "/reset cli:other" must not forget this one instead
                return f"(/reset takes no argument; it forgets this conversation, {conversation_id})"
            removed = run(engine.reset(conversation_id))
            return f"(forgot {removed} turns of {conversation_id})"
        if command == "/persona":
            if not arg:
                current, _ = run(engine.choices(conversation_id))
                return "(personas: " + ", ".join(
                    f"{n}{' *' if n == current.name else ''} ({p.speaker})" for n, p in engine.personas().items()) + ")"
            chosen = run(engine.set_persona(conversation_id, arg))
            return f"(now talking to {chosen.speaker}, persona {chosen.name})"
        if command == "/preset":
            if not arg:
                _, current = run(engine.choices(conversation_id))
                return "(presets: " + ", ".join(f"{n}{' *' if n == current else ''}" for n in PRESETS) + ")"
            chosen = run(engine.set_preset(conversation_id, None if arg == "default" else arg))
            return f"(decoding preset {chosen})"
    except ChatbotError as err:
        return f"({err})"
    return f"(unknown command {command}; /help lists them)"


COMMAND = FaceCommand("chat", add_parser, run)
