"""The HTTP face's Prometheus metrics (`prometheus-client`), named and meant as vLLM's are
(``vllm:e2e_request_latency_seconds`` here is ``chatbot_e2e_request_latency_seconds``), so a
dashboard made for one reads the other. Each app has a registry of its own: two servers in one
process (the tests) do not share counts."""

from __future__ import annotations

from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

__all__ = ["Metrics", "CONTENT_TYPE"]

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
"""The Prometheus text format's media type."""

_LATENCY = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0, 7.5, 10.0, 20.0, 40.0, 60.0)
_PER_TOKEN = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.5, 1.0)


class Metrics:
    """Every metric the server exports, in one registry (`render` writes them)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.http_requests = Counter("chatbot_http_requests", "HTTP requests by route, method and status.",
                                     ["route", "method", "status"], registry=r)
        self.e2e_latency = Histogram("chatbot_e2e_request_latency_seconds",
                                     "Seconds from a generation request's arrival to its last token.",
                                     buckets=_LATENCY, registry=r)
        self.time_to_first_token = Histogram("chatbot_time_to_first_token_seconds",
                                             "Seconds from a streamed request's arrival to its first text.",
                                             buckets=_LATENCY, registry=r)
        self.time_per_output_token = Histogram("chatbot_time_per_output_token_seconds",
                                               "Seconds of generation per reply token.",
                                               buckets=_PER_TOKEN, registry=r)
        self.queue_time = Histogram("chatbot_request_queue_time_seconds",
                                    "Seconds a reply waited for earlier messages of its conversation.",
                                    buckets=_LATENCY, registry=r)
        self.prompt_tokens = Counter("chatbot_prompt_tokens", "Prompt tokens read.", registry=r)
        self.generation_tokens = Counter("chatbot_generation_tokens", "Reply tokens written.", registry=r)
        self.requests_running = Gauge("chatbot_num_requests_running",
                                      "Generation requests accepted and not finished.", registry=r)
        self.request_success = Counter("chatbot_request_success", "Finished generation requests by finish reason.",
                                       ["finished_reason"], registry=r)
        self.safety_actions = Counter("chatbot_safety_actions", "What the safety filters did, by kind.",
                                      ["kind"], registry=r)
        self.rejected = Counter("chatbot_requests_rejected", "Requests turned away before generation, by reason.",
                                ["reason"], registry=r)

    def render(self) -> bytes:
        return generate_latest(self.registry)

    def reply(self, *, finish: str, prompt_tokens: int, reply_tokens: int, seconds: float,
              generate_seconds: float | None = None, queued: float | None = None,
              first_token: float | None = None, safety: Any = ()) -> None:
        """Count one finished reply (``finish`` is OpenAI's finish reason)."""
        self.request_success.labels(finish).inc()
        self.prompt_tokens.inc(prompt_tokens)
        self.generation_tokens.inc(reply_tokens)
        self.e2e_latency.observe(seconds)
        if first_token is not None:
            self.time_to_first_token.observe(first_token)
        if queued is not None:
            self.queue_time.observe(queued)
        if generate_seconds is not None and reply_tokens > 0:
            self.time_per_output_token.observe(generate_seconds / reply_tokens)
        for reason in safety:
            self.safety_actions.labels(safety_kind(reason)).inc()


def safety_kind(reason: str) -> str:
    """A filter's reason as a label of few values: ``toxicity: matched ...`` -> ``toxicity``,
    ``redacted email`` -> ``redacted``, ``input toxicity: ...`` -> ``input toxicity``."""
    head = reason.split(":", 1)[0].strip()
    words = head.split()
    if not words:
        return "other"
    if words[0] == "input" and len(words) > 1:
        return f"input {words[1]}"[:40]
    return words[0][:40]
