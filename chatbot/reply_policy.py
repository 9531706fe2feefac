"""The reply policy: generate, check with the output filters, generate again what is unsafe or
repeats an earlier reply, and say when nothing usable came. One place for every face: the engine
(whole replies and streamed ones) and the LangChain models run it, so a change to how a reply
is checked and retried reaches all of them.

Two forms:

- `ReplyPolicy.whole`: whole replies for a batch of requests (one call on the model per round),
  each checked, the unsafe ones and repeats generated again, the least repetitive safe one kept;
- `ReplyPolicy.gated`: one streamed reply released a checked sentence at a time; a blocked first
  sentence is generated again, a blocked later one ends the reply at the last safe sentence
  (what was shown cannot be taken back).

Both run on the caller's worker thread (the model and the filters block); what a face does when
nothing usable came (its fallback text) stays with the face.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from .decoding import DecodingSettings
from .generation import GenerationRequest, GenerationResult
from .repetition import max_similarity
from .safety import FilterChain, FilterContext, gate_sentences

__all__ = ["Outcome", "RepeatCheck", "ReplyPolicy", "GatedReply"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RepeatCheck:
    """The bot's recent replies in a conversation, and the settings that say what counts as a repeat."""

    recent: tuple[str, ...]
    settings: DecodingSettings

    def similarity(self, text: str) -> float:
        return max_similarity(text, self.recent) if text.strip() else 0.0

    def try_again(self, similarity: float, repeats: int) -> bool:
        s = self.settings
        return s.avoid_repeats and similarity >= s.repeat_threshold and repeats < s.repeat_retries


@dataclass
class Outcome:
    """The reply kept among the attempts."""

    text: str
    """The checked (possibly redacted) text; empty when every attempt was unsafe or nothing came."""
    finish: str
    """The kept attempt's finish reason, or ``unsafe`` when every attempt was blocked."""
    reply_tokens: int
    reasons: list[str]
    """What the filters did over all attempts, without repeats."""
    attempts: int
    similarity: float = 0.0
    result: GenerationResult | None = None
    """The kept attempt's generation result; when every attempt was unsafe, the last one's (None when streamed)."""


@dataclass
class _Row:
    request: GenerationRequest
    context: FilterContext | None
    repeat: RepeatCheck | None
    attempts: int = 0
    unsafe: int = 0
    repeats: int = 0
    reasons: list[str] = field(default_factory=list)
    candidates: list[Outcome] = field(default_factory=list)
    last: GenerationResult | None = None
    done: bool = False

    def next_request(self) -> GenerationRequest:
        if self.attempts == 0:
            return self.request
        # A retry keeps the caller's cancel event: cancelling the reply cancels whichever try runs.
        return replace(self.request.retry(self.attempts), cancel=self.request.cancel)

    def note(self, reasons: Sequence[str]) -> None:
        self.reasons.extend(r for r in reasons if r not in self.reasons)

    def outcome(self) -> Outcome:
        if not self.candidates:
            return Outcome("", "unsafe", 0, self.reasons, self.attempts, result=self.last)
        best = min(self.candidates, key=lambda c: c.similarity)
        if self.repeats and self.repeat is not None and best.similarity >= self.repeat.settings.repeat_threshold:
            self.reasons.append(f"repeat: kept the least repetitive of {len(self.candidates)} replies")
        best.reasons, best.attempts = self.reasons, self.attempts
        return best


@dataclass(frozen=True)
class ReplyPolicy:
    """How replies are checked and retried: the output ``filters`` (a chain built by
    `safety.output_chain`, or any `FilterChain`), and how many times an unsafe reply is
    generated again before giving up."""

    filters: FilterChain | None
    """None checks nothing (a LangChain model with ``safety=False``)."""
    unsafe_retries: int = 2

    def whole(self, generator: Any, requests: Sequence[GenerationRequest],
              contexts: Sequence[FilterContext | None] | None = None,
              repeats: Sequence[RepeatCheck | None] | None = None) -> list[Outcome]:
        """One `Outcome` per request. Each round generates every request still going in one call
        on the model; a request whose ``cancel`` is set gets no further try."""
        rows = [_Row(r, contexts[i] if contexts else None, repeats[i] if repeats else None)
                for i, r in enumerate(requests)]
        while True:
            going = [row for row in rows if not row.done]
            if not going:
                break
            asked = [row.next_request() for row in going]
            for row in going:
                row.attempts += 1
            for row, result in zip(going, generator.generate(asked)):
                self._judge(row, result)
                if row.request.cancel is not None and row.request.cancel.is_set():
                    row.done = True
        return [row.outcome() for row in rows]

    def _judge(self, row: _Row, result: GenerationResult) -> None:
        row.last = result
        if self.filters is None:
            allowed, text = True, result.text
        else:
            verdict = self.filters.check(result.text, row.context)
            row.note(verdict.reasons)
            allowed, text = verdict.allowed, verdict.text
        if not allowed:
            log.info("%s: unsafe reply (%s)", row.context.conversation_id if row.context else "-",
                     "; ".join(verdict.reasons))
            row.unsafe += 1
            row.done = row.unsafe > self.unsafe_retries
            return
        similarity = row.repeat.similarity(text) if row.repeat is not None else 0.0
        row.candidates.append(Outcome(text, result.finish_reason, result.completion_tokens, row.reasons,
                                      row.attempts, similarity, result))
        if row.repeat is not None and row.repeat.try_again(similarity, row.repeats):
            row.repeats += 1
        else:
            row.done = True

    def gated(self, generator: Any, request: GenerationRequest, context: FilterContext | None = None) -> GatedReply:
        """A streamed reply under this policy: iterate `GatedReply.pieces`, then read its `outcome`."""
        return GatedReply(self, generator, request, context)


class GatedReply:
    """One streamed reply, released a checked sentence at a time (see `ReplyPolicy`).

    `pieces` is a blocking iterator (run it on a worker thread); `stop`, from any thread, ends
    the try that is running at its next token. After `pieces` ends, `outcome` holds the text
    shown, its finish reason (``stop``, or ``unsafe`` when nothing safe was shown), the filters'
    reasons and the number of tries.
    """

    def __init__(self, policy: ReplyPolicy, generator: Any, request: GenerationRequest,
                 context: FilterContext | None) -> None:
        self._policy = policy
        self._generator = generator
        self._request = request
        self._context = context
        self._current: GenerationRequest | None = None
        self._stopped = threading.Event()
        self.outcome: Outcome | None = None

    def stop(self) -> None:
        self._stopped.set()
        current = self._current
        if current is not None and current.cancel is not None:
            current.cancel.set()

    def pieces(self) -> Iterator[str]:
        reasons: list[str] = []
        shown = ""
        finish = "unsafe"
        attempts = 0
        for attempt in range(self._policy.unsafe_retries + 1):
            if self._stopped.is_set():
                break
            attempts = attempt + 1
            # Each try has a cancel event of its own: ending a try after an unsafe sentence must not end the next.
            request = self._request if attempt == 0 else self._request.retry(attempt)
            self._current = request
            if self._stopped.is_set():  # stopped while the try was being set up
                self.stop()
            blocked = False
            stream = self._generator.stream(request)
            try:
                if self._policy.filters is None:
                    for piece in stream:
                        shown += piece
                        yield piece
                else:
                    for out, verdict in gate_sentences(stream, self._policy.filters, self._context):
                        reasons.extend(r for r in verdict.reasons if r not in reasons)
                        if not verdict.allowed:
                            blocked = True
                            break
                        shown += out
                        yield out
            finally:
                getattr(stream, "close", lambda: None)()  # stops the model when the reply ended early
            if not blocked:
                finish = "stop"
                break
            if shown:
                break  # part of the reply is already out: it ends at the last safe sentence
        self.outcome = Outcome(shown, finish, 0, reasons, attempts)
