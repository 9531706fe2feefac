"""Command-line entry: `python bot.py --help`."""

from chatbot.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
