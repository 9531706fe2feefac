"""The HTTP face: a real uvicorn server on a free loopback port, the real engine on a tiny GPT-2,
called by the real `openai` client (sync and async) and plain httpx."""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time

import httpx
import pytest

openai = pytest.importorskip("openai")

KEY = "test-key-123456"


class Server:
    """``create_app`` served by uvicorn on a thread, on a loopback port of its own."""

    def __init__(self, app) -> None:
        import uvicorn

        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on"))
        self.thread = threading.Thread(target=lambda: asyncio.run(self.server.serve(sockets=[self.sock])), daemon=True)
        self.thread.start()
        deadline = time.time() + 30
        while not self.server.started:
            assert time.time() < deadline, "server did not start"
            time.sleep(0.02)
        self.url = f"http://127.0.0.1:{self.port}"

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)


def _settings(tmp_path, tiny_dir, tiny_prompts, **http):
    from chatbot.config import Settings

    return Settings(model=str(tiny_dir), memory_path=str(tmp_path / "memory.sqlite3"), prompts_dir=tiny_prompts,
                    persona="tester", response_bank=(), sections={"http": http})


@pytest.fixture()
def served(tmp_path, tiny_dir, tiny_prompts):
    """Start a server for some [http] settings; every one started is stopped after the test."""
    from adapters.http_api import create_app

    servers = []

    def start(**http):
        settings = _settings(tmp_path, tiny_dir, tiny_prompts, **http)
        server = Server(create_app(settings))
        deadline = time.time() + 60
        while httpx.get(server.url + "/health").status_code != 200:  # the model loads in the background
            assert time.time() < deadline, "model did not load"
            time.sleep(0.05)
        servers.append(server)
        server.settings = settings
        return server

    yield start
    for server in servers:
        server.stop()


def client(server, key=KEY, **kw):
    return openai.OpenAI(base_url=server.url + "/v1", api_key=key, max_retries=0, **kw)


USER = [{"role": "user", "content": "hi there, how are you?"}]


def test_chat_stateless_and_streaming(served):
    server = served(api_keys=[KEY])
    c = client(server)
    reply = c.chat.completions.create(model="gpt2-chatbot", messages=USER, max_tokens=8, seed=1)
    choice = reply.choices[0]
    assert choice.message.role == "assistant" and choice.message.content
    assert choice.finish_reason in ("stop", "length")
    assert reply.usage.prompt_tokens > 0 and reply.usage.completion_tokens > 0
    assert reply.model_extra["chatbot"]["persona"] == "tester"
    # The same seed gives the same reply; stateless means nothing was kept between them.
    again = c.chat.completions.create(model="gpt2-chatbot", messages=USER, max_tokens=8, seed=1)
    assert again.choices[0].message.content == choice.message.content
    assert server.settings  # and the scratch conversations are gone
    chunks = list(c.chat.completions.create(model="gpt2-chatbot", messages=USER, max_tokens=8, seed=1, stream=True,
                                            stream_options={"include_usage": True}))
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    assert text == choice.message.content
    assert chunks[-1].usage.completion_tokens == reply.usage.completion_tokens
    assert [ch.choices[0].finish_reason for ch in chunks if ch.choices][-1] in ("stop", "length")
    several = c.chat.completions.create(model="gpt2-chatbot", messages=USER, max_tokens=6, seed=1, n=2)
    assert [ch.index for ch in several.choices] == [0, 1]


def test_stateless_history_is_the_messages(served):
    server = served()
    messages = [{"role": "user", "content": "what are you reading?"},
                {"role": "assistant", "content": "a book about the ocean"},
                {"role": "user", "content": "is it good?", "name": "cy"}]
    reply = client(server).chat.completions.create(model="gpt2-chatbot", messages=messages, max_tokens=6)
    assert reply.model_extra["chatbot"]["window_turns"] == 3
    assert reply.model_extra["conversation_id"] is None
    scratch = server.server.config.app.state.service.scratch
    assert scratch.store._turns == {} and scratch.store._options == {}


async def test_kept_conversation_shared_with_the_store(served, tmp_path):
    server = served()
    c = openai.AsyncOpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0)
    for text in ("hi there", "do you have any pets?"):
        await c.chat.completions.create(model="gpt2-chatbot", messages=[{"role": "user", "content": text}],
                                        max_tokens=6, extra_body={"conversation_id": "cli:local"})
    stream = await c.chat.completions.create(model="gpt2-chatbot", messages=[{"role": "user", "content": "nice"}],
                                             max_tokens=6, stream=True, extra_headers={"X-Conversation-Id": "cli:local"})
    async for _ in stream:
        pass
    history = httpx.get(server.url + "/v1/conversations/cli:local").json()
    assert [t["role"] for t in history["turns"]] == ["user", "bot"] * 3
    assert history["turns"][0]["text"] == "hi there"
    # The same SQLite file the terminal chat opens.
    from chatbot.memory import SQLiteMemoryStore

    store = SQLiteMemoryStore(str(tmp_path / "memory.sqlite3"))
    assert [t.text for t in await store.newest("cli:local", 10)][0] == "hi there"
    await store.close()
    export = httpx.get(server.url + "/v1/conversations/cli:local/export").json()
    assert len(export["turns"]) == 6
    assert httpx.delete(server.url + "/v1/conversations/cli:local").json()["deleted_turns"] == 6
    assert httpx.get(server.url + "/v1/conversations/cli:local").json()["count"] == 0


def test_forget_author_everywhere(served):
    server = served()
    c = client(server, key="none")
    for cid in ("api:a", "api:b"):
        c.chat.completions.create(model="gpt2-chatbot", messages=[{"role": "user", "content": "i have two dogs"}],
                                  max_tokens=4, user="maya", extra_body={"conversation_id": cid})
    assert len(httpx.get(server.url + "/v1/authors/api:user:maya/export").json()["conversations"]) == 2
    assert httpx.delete(server.url + "/v1/authors/api:user:maya").json()["deleted_turns"] == 2


def test_completions(served):
    server = served()
    c = client(server, key="none")
    done = c.completions.create(model="gpt2-chatbot", prompt="ada: hi there", max_tokens=6, seed=2, temperature=0)
    assert done.choices[0].text and done.usage.prompt_tokens > 0
    streamed = "".join(ch.choices[0].text for ch in c.completions.create(
        model="gpt2-chatbot", prompt="ada: hi there", max_tokens=6, seed=2, temperature=0, stream=True))
    assert streamed == done.choices[0].text
    # A stop string of several tokens ends the text before it.
    stopped = c.completions.create(model="gpt2-chatbot", prompt="ada: hi there", max_tokens=6, temperature=0,
                                   stop=[done.choices[0].text[2:5]])
    assert done.choices[0].text[2:5] not in stopped.choices[0].text


def test_errors_in_openai_shape(served):
    server = served(api_keys=[KEY], requests_per_minute=30, max_body_bytes=2048)
    with pytest.raises(openai.AuthenticationError):
        client(server, key="wrong-key-000").chat.completions.create(model="gpt2-chatbot", messages=USER)
    with pytest.raises(openai.AuthenticationError):
        client(server, key="wrong-key-000").models.list()
    c = client(server)
    assert [m.id for m in c.models.list()] == ["gpt2-chatbot"]
    cases = [
        ({"model": "gpt-4"}, openai.NotFoundError, "gpt-4"),
        ({"temperature": 5}, openai.BadRequestError, "temperature"),
        ({"frequency_penalty": 1.0}, openai.BadRequestError, "frequency_penalty"),
        ({"extra_body": {"persona": "nobody"}}, openai.BadRequestError, "nobody"),
        ({"extra_body": {"tempreature": 1}}, openai.BadRequestError, "tempreature"),
        ({"extra_body": {"decoding": {"top_kk": 3}}}, openai.BadRequestError, "top_kk"),
        ({"messages": [{"role": "system", "content": "be nice"}, *USER]}, openai.BadRequestError, "persona"),
        ({"messages": [*USER, {"role": "assistant", "content": "hi"}]}, openai.BadRequestError, "last message"),
        ({"messages": [{"role": "user", "content": "hi", "name": "Bot"}]}, openai.BadRequestError, "taken"),
        ({"extra_body": {"conversation_id": "no spaces allowed"}}, openai.BadRequestError, "conversation id"),
        ({"stop": ["a", "b", "c", "d", "e"]}, openai.BadRequestError, "stop"),
    ]
    for change, error, words in cases:
        kw = {"model": "gpt2-chatbot", "messages": USER, "max_tokens": 4, **change}
        with pytest.raises(error) as caught:
            c.chat.completions.create(**kw)
        assert words in caught.value.message, (change, caught.value.message)
        assert caught.value.body["param"] is not None or error is openai.NotFoundError
    # With a conversation id, the server keeps the replies: sending one back is a mistake, and nothing is stored.
    with pytest.raises(openai.BadRequestError):
        c.chat.completions.create(model="gpt2-chatbot", messages=[*USER, {"role": "assistant", "content": "x"}, *USER],
                                  extra_body={"conversation_id": "api:x"})
    headers = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
    assert httpx.get(server.url + "/v1/conversations/api:x", headers=headers).json()["count"] == 0
    big = httpx.post(server.url + "/v1/chat/completions", headers=headers, content=b"{" + b" " * 4096 + b"}")
    assert big.status_code == 413 and "larger" in big.json()["error"]["message"]
    bad = httpx.post(server.url + "/v1/chat/completions", headers=headers, content=b"{not json")
    assert bad.status_code == 400 and bad.json()["error"]["code"] == "invalid_json"
    assert httpx.get(server.url + "/nowhere").json()["error"]["type"] == "not_found"
    # Over the key's rate: 429 with Retry-After.
    statuses = [httpx.get(server.url + "/v1/models", headers=headers) for _ in range(40)]
    limited = [r for r in statuses if r.status_code == 429]
    assert limited and int(limited[0].headers["Retry-After"]) >= 1


def test_deadline_and_busy(served):
    server = served(request_timeout=0.05, max_pending=1)
    c = client(server, key="none")
    slow = {"decoding": {"max_time": 30, "max_new_tokens": 10}}
    gen = server.server.config.app.state.service.engine.generator
    real = gen.generate

    def slow_generate(requests):  # the tiny model is too quick to miss a deadline on its own
        time.sleep(0.3)
        return real(requests)

    gen.generate = slow_generate
    try:
        with pytest.raises(openai.APIStatusError) as caught:
            c.chat.completions.create(model="gpt2-chatbot", messages=USER, extra_body=slow)
        assert caught.value.status_code == 504
        with pytest.raises(openai.APIError) as caught:
            for _ in c.chat.completions.create(model="gpt2-chatbot", messages=USER, stream=True, extra_body=slow):
                pass
        assert "request_timeout" in caught.value.message
        # The one place is taken by a slow reply: the next request gets 429 and stores nothing.
        service = server.server.config.app.state.service
        deadline = time.time() + 10
        while service.pending:  # the timed-out stream's generator finishes after its client has gone
            assert time.time() < deadline
            time.sleep(0.02)
        service.pending = 1
        with pytest.raises(openai.RateLimitError):
            c.chat.completions.create(model="gpt2-chatbot", messages=USER, extra_body={"conversation_id": "api:busy"})
        service.pending = 0
        assert httpx.get(server.url + "/v1/conversations/api:busy").json()["count"] == 0
    finally:
        gen.generate = real


def test_metrics_count_what_happened(served):
    server = served()
    c = client(server, key="none")
    c.chat.completions.create(model="gpt2-chatbot", messages=USER, max_tokens=4)
    with pytest.raises(openai.BadRequestError):
        c.chat.completions.create(model="gpt2-chatbot", messages=USER, temperature=9)
    text = httpx.get(server.url + "/metrics").text
    assert 'chatbot_http_requests_total{method="POST",route="/v1/chat/completions",status="200"} 1.0' in text
    assert 'chatbot_http_requests_total{method="POST",route="/v1/chat/completions",status="400"} 1.0' in text
    assert "chatbot_e2e_request_latency_seconds_count 1.0" in text
    assert "chatbot_generation_tokens_total" in text and "chatbot_prompt_tokens_total" in text


def test_loading_is_503_then_ok(tmp_path, tiny_dir, tiny_prompts):
    from adapters.http_api import create_app
    from chatbot.engine import ChatEngine

    gate = threading.Event()

    def slow_load(settings):
        gate.wait(30)
        return ChatEngine.from_settings(settings)

    server = Server(create_app(_settings(tmp_path, tiny_dir, tiny_prompts), load=slow_load))
    try:
        assert httpx.get(server.url + "/health").status_code == 503
        early = httpx.post(server.url + "/v1/chat/completions", json={"messages": USER})
        assert early.status_code == 503 and early.json()["error"]["code"] == "loading"
        gate.set()
        deadline = time.time() + 30
        while httpx.get(server.url + "/health").status_code != 200:
            assert time.time() < deadline
            time.sleep(0.05)
    finally:
        server.stop()


def test_serve_refuses_open_host_without_keys(tmp_path):
    from adapters.http_cli import serve
    from adapters.http_settings import HttpSettings
    from chatbot.config import Settings
    from chatbot.errors import ChatbotError

    settings = Settings(memory_path=str(tmp_path / "m.sqlite3")).with_section(HttpSettings, host="0.0.0.0")
    with pytest.raises(ChatbotError, match="without API keys"):
        serve(settings)
    with pytest.raises(ValueError, match="at least 8"):
        HttpSettings(api_keys=["short"])
    assert json.dumps(str(HttpSettings(api_keys=[KEY]))).count(KEY) == 0  # never printed
