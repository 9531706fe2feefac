"""Command-line entry: `python bot.py --help`. The core's commands, plus each face's own."""

from adapters.discord_cli import COMMAND as DISCORD
from chatbot.cli import main as cli_main

FACES = (DISCORD,)
"""Faces that add a command; a new face adds its `FaceCommand` here."""


def main(argv=None) -> int:
    return cli_main(argv, faces=FACES)


if __name__ == "__main__":
    raise SystemExit(main())
