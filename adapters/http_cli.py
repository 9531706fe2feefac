"""``bot.py serve``: the HTTP face's command, registered by ``bot.py``. Light to import: FastAPI
and uvicorn load only when the command runs."""

from __future__ import annotations

import argparse
import logging
import socket
import sys
from typing import Any

from adapters.cli import FaceCommand, config_option, memory_option, model_option, settings_from_args
from adapters.http_settings import HttpSettings, is_loopback
from chatbot.errors import ChatbotError

__all__ = ["COMMAND", "serve"]

log = logging.getLogger(__name__)

SERVE_MAX_BATCH = 8
"""`max_batch` of the server when the settings do not give one: its clients' replies decode together."""


def add_parser(sub: Any, common: argparse.ArgumentParser) -> argparse.ArgumentParser:
    s = sub.add_parser("serve", parents=[common], help="serve an OpenAI-compatible HTTP API (default 127.0.0.1:8000)",
                       description="Answer /v1/chat/completions and /v1/completions as OpenAI's API does, with the "
                                   "engine's memory, personas and filters, until Ctrl-C or SIGTERM. Memory is the same "
                                   "SQLite file the terminal chat and the Discord bot use.")
    config_option(s)
    model_option(s)
    memory_option(s)
    s.add_argument("--host", default=None, help="address to listen on (default: the settings', 127.0.0.1); anything "
                                                "but loopback needs API keys")
    s.add_argument("--port", type=int, default=None, help="port (default: the settings', 8000; 0: any free one)")
    s.add_argument("--persona", default=None, help="persona for conversations that have not chosen one")
    return s


def run(args: argparse.Namespace) -> int:
    settings = settings_from_args(args, persona=args.persona).with_section(HttpSettings, host=args.host, port=args.port)
    if "max_batch" not in settings.model_fields_set:
        settings = settings.model_copy(update={"max_batch": SERVE_MAX_BATCH})
    if not args.verbose:
        logging.getLogger("adapters.http_api").setLevel(logging.INFO)
    return serve(settings)


def serve(settings: Any) -> int:
    """Listen, load the model, answer until SIGTERM or Ctrl-C; then drain. Returns the exit status."""
    import asyncio

    import uvicorn

    from adapters.http_api import create_app

    http = settings.section(HttpSettings)
    if not is_loopback(http.host) and not http.api_keys:
        raise ChatbotError(f"refusing to listen on {http.host} without API keys: anyone who can reach it could use "
                           "the bot; set `api_keys` in the [http] table or CHATBOT_API_KEYS, or listen on 127.0.0.1")
    try:
        family = socket.AF_INET6 if ":" in http.host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((http.host, http.port))
    except (OSError, UnicodeError) as err:
        raise ChatbotError(f"cannot listen on {http.host}:{http.port}: {err.strerror or err}") from None
    host, port = sock.getsockname()[:2]
    app = create_app(settings)
    config = uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=http.shutdown_grace,
                            access_log=False, lifespan="on")
    service = app.state.service

    class DrainingServer(uvicorn.Server):
        """uvicorn's server, which on SIGTERM or Ctrl-C first turns new requests away (503) while
        the streams in progress get `HttpSettings.shutdown_grace` to finish."""

        def handle_exit(self, sig: int, frame: Any) -> None:
            service.draining = True
            super().handle_exit(sig, frame)

    server = DrainingServer(config)
    failed: list[str] = []

    def load_failed(error: str) -> None:
        failed.append(error)
        server.should_exit = True

    app.state.on_load_failure = load_failed
    shown = f"[{host}]" if ":" in host else host
    print(f"serving on http://{shown}:{port} (OpenAI base URL http://{shown}:{port}/v1); loading the model, "
          f"/health says ok when it is ready. Ctrl-C stops.", flush=True)
    asyncio.run(server.serve(sockets=[sock]))
    if failed:
        print(f"error: the model failed to load: {failed[0]}", file=sys.stderr)
        return 2
    return 0


COMMAND = FaceCommand("serve", add_parser, run)
