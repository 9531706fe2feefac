"""Command-line entry: `python bot.py --help`. The command line's own commands (training,
evaluation, the tools), plus each face's."""

from adapters.cli import main as cli_main
from adapters.discord_cli import COMMAND as DISCORD
from adapters.http_cli import COMMAND as SERVE
from adapters.terminal import COMMAND as CHAT

FACES = (CHAT, DISCORD, SERVE)
"""Faces that add a command; a new face adds its `FaceCommand` here."""


def main(argv=None) -> int:
    return cli_main(argv, faces=FACES)


if __name__ == "__main__":
    raise SystemExit(main())
