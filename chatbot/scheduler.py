"""`BatchingGenerator`: many conversations' replies decoded together on one model.

Why not `model.generate` on a padded batch: on a CPU, reading a prompt (prefill) is
compute-bound and costs about as much per token at batch 16 as at batch 1, so padding 16
prompts to the longest one multiplies the dominant cost, and re-reading a whole history
every turn repeats it. Decoding is the part that batches well: a step for 16 rows costs
about four rows' steps. So this scheduler:

- reads each new prompt on its own (no padding), starting from the cached keys/values of
  the longest prefix it has already seen (the same conversation's previous prompt and the
  reply generated to it: the window drops old turns in chunks precisely so that this
  prefix stays the same), at most `prefill_chunk` tokens between two decode steps (of up
  to `STAGE_ROWS` prompts), so a long prompt never holds up the replies already under way
  for long;
- on GPT-2, runs those prompt pieces and every decoding row's next token through the
  model in one pass (`gpt2_step.PackedStep`), so the rows ride along in the prompt's
  matrix products; other models read prompts and decode rows in separate forwards;
- lets the read prompt join the running batch between two decode steps (continuous
  batching). The batch's keys/values live in one block allocated once, one row per
  request, and every row writes its next token at the same column; rows are left-padded
  to that column and GPT-2's absolute positions are given per row, so padding never
  shifts a position. Joining and leaving copy only the row concerned;
- decodes one token per step for every row, with each request's own decoding settings,
  repetition controls, stop strings, deadline and cancellation; a finished row leaves at
  once and its keys/values go to the prefix cache (bounded in bytes, least recently used
  evicted);
- streams each request's text as its tokens come;
- out of memory, decodes the step's rows in two halves (down to one row, which alone
  fails) and reads a prompt in smaller pieces, so one big request does not take the
  others down.

transformers' continuous-batching manager (`generate_batch`) was not used: it has no
per-request logits processors or stop strings, which the repetition controls and the
speaker-tag stops need. The decoding pieces themselves are transformers' (logits
warpers, the repetition processors in `repetition.py`, the cache-layer interface).
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field, replace
from typing import Any

from .errors import ChatbotError, GeneratorBusy
from .generation import (
    GenerationRequest,
    GenerationResult,
    LocalGenerator,
    ReplyText,
    final_text,
    prompt_budget,
    sample_again,
    settings_for_try,
)
from .kv_cache import KVBlock, PrefixCache, RowBatch
from .model_runner import ModelRunner

__all__ = ["BatchingGenerator", "BatchLoop", "PromptPlanner", "RequestQueue", "PrefixCache"]

log = logging.getLogger(__name__)


SPARE_COLUMNS = 128
"""Columns a batch's block keeps beyond the model's context, so compacting it is rare."""

STAGE_ROWS = 4
"""Prompts read at once at most (each in a staging row of the model's context): a step can read
the short new messages of several conversations together instead of one per step."""

@dataclass
class _Sequence:
    """One request in flight."""

    request: GenerationRequest
    ids: list[int]
    """Prompt then generated tokens; the cache holds all but the last."""
    prompt_len: int
    processors: Any
    warpers: Any
    sampler: Any
    deadline: float
    started: float
    future: Future[GenerationResult] | None = None
    pieces: queue.Queue[tuple[str, Any]] | None = None
    reply: ReplyText | None = None
    """The reply's text as its tokens come (`ReplyText`), with the request's stop strings."""
    text: str = ""
    done: str | None = None
    generated: list[int] = field(default_factory=list)
    delivered: bool = False
    first_token_at: float = 0.0
    """`time.perf_counter()` when the first reply token was decoded."""
    read: int = 0
    """Prompt tokens whose keys/values are in its staging row."""
    stage_row: int = 0
    abandoned: bool = False
    """The stream's consumer left: end the row even without a cancel event."""
    attempt: int = 0
    """Earlier tries that came out empty (sampled replies are tried again)."""

    def cancelled(self) -> bool:
        """Its caller cancelled it, or its stream's reader left."""
        return self.abandoned or (self.request.cancel is not None and self.request.cancel.is_set())

    def gone(self) -> bool:
        """Cancelled, or out of time."""
        return self.cancelled() or time.perf_counter() > self.deadline

    def choose(self, scores: Any) -> int:
        """The next token: the request's processors, then greedy or its own sampler."""
        import torch

        if not self.processors and self.warpers is None:
            return int(scores.argmax(dim=-1))
        row_ids = torch.tensor([self.ids], device=scores.device)
        if self.processors:
            scores = self.processors(row_ids, scores)
        if self.warpers is None:
            return int(scores.argmax(dim=-1))
        probs = torch.softmax(self.warpers(row_ids, scores), dim=-1)
        return int(torch.multinomial(probs, 1, generator=self.sampler))

    def take(self, token: int, *, eos: int | None, context_size: int) -> None:
        """Record the next token: the text so far, and whether a stop string, a limit, the
        deadline or a cancellation ends the reply (``eos``: the end-of-text id, None when it is
        an ordinary token); a stream gets what became final."""
        self.ids.append(token)
        self.generated.append(token)
        if len(self.generated) == 1:
            self.first_token_at = time.perf_counter()
        assert self.reply is not None
        if token == eos:
            self.done = "stop"
        else:
            self.reply.add([token])
            self.text = self.reply.text
            if self.reply.stopped:
                self.done = "stop"
        if self.done is None:
            if len(self.generated) >= self.request.settings.max_new_tokens:
                self.done = "length"
            elif time.perf_counter() > self.deadline:
                self.done = "time"
            elif self.cancelled():
                self.done = "cancelled"
            elif len(self.ids) >= context_size:
                self.done = "length"
        if self.pieces is not None:
            piece = self.reply.release(final=self.done is not None)
            if piece:
                self.pieces.put(("piece", piece))

    def deliver(self) -> None:
        """Hand the finished reply to whoever waits (a future, or a stream's reader)."""
        self.delivered = True
        reason = self.done or "stop"
        result = GenerationResult(final_text(self.text, reason, self.request), self.prompt_len, len(self.generated),
                                  "stop" if reason == "cancelled" else reason,  # type: ignore[arg-type]
                                  time.perf_counter() - self.started, tuple(self.generated))
        if self.future is not None and not self.future.done():
            self.future.set_result(result)
        if self.pieces is not None:
            self.pieces.put(("end", result))

    def fail(self, err: BaseException) -> None:
        if self.delivered:
            return
        self.delivered = True
        self.done = "error"
        if self.future is not None and not self.future.done():
            self.future.set_exception(err)
        if self.pieces is not None:
            self.pieces.put(("error", err))


class PromptPlanner:
    """Which prompts are read at the next step, into which staging row, and how many of their
    tokens: plain Python on token counts, so it is tested without a model.

    A request goes from `pending` (taken from the queue, its batch row reserved) to `staged`
    (its prompt being read into a staging row, from the longest cached prefix on) to the batch
    (placed once read). A sequence here needs ``ids`` (prompt, then the token to decode from),
    ``read`` (prompt tokens already in its staging row) and ``stage_row``.
    """

    def __init__(self, max_batch: int, stage_rows: int) -> None:
        self.max_batch = max_batch
        self.stage_rows = stage_rows
        self.pending: deque[Any] = deque()
        self.staged: list[Any] = []

    def room(self, decoding: int) -> int:
        """Requests that may still be taken from the queue, with ``decoding`` rows in the batch."""
        return self.max_batch - decoding - len(self.pending) - len(self.staged)

    def waiting(self) -> list[Any]:
        return [*self.staged, *self.pending]

    def clear(self) -> None:
        self.pending, self.staged = deque(), []

    def plan(self, budget: int, *, over: Callable[[Any], bool], start: Callable[[Any], None],
             place: Callable[[Any], None]) -> list[tuple[Any, int]]:
        """The prompts to read this step and how many tokens of each, ``budget`` tokens in all.

        Prompts are taken in the order they came, each into a free staging row, where ``start``
        sets how much of it is already read (a cached prefix); one read whole joins the batch at
        once (``place``). ``over(seq)`` ends a request that was cancelled or ran out of time.
        """
        # Cancelled or out of time: ended now, not when the budget reaches them.
        self.staged = [seq for seq in self.staged if not over(seq)]
        self.pending = deque(seq for seq in self.pending if not over(seq))
        plan: list[tuple[Any, int]] = []
        k = 0
        while budget > 0:
            if k < len(self.staged):
                seq = self.staged[k]
            elif self.pending and len(self.staged) < self.stage_rows:
                seq = self.pending.popleft()
                used = {s.stage_row for s in self.staged}
                seq.stage_row = min(set(range(self.stage_rows)) - used)
                self.staged.append(seq)  # from here until it is in the batch, a failure reaches it here
                start(seq)
            else:
                break
            todo = len(seq.ids) - 1 - seq.read
            if not todo:
                place(seq)  # then unstaged: a failure while placing must still find it staged
                self.staged.pop(k)
                continue
            plan.append((seq, min(todo, budget)))
            budget -= plan[-1][1]
            k += 1
        return plan

    def read(self, seq: Any, m: int, place: Callable[[Any], None]) -> None:
        """``m`` more tokens of a staged prompt were read; a prompt read to the end joins the batch."""
        seq.read += m
        if seq.read == len(seq.ids) - 1:
            place(seq)  # then unstaged: a failure while placing must still find it staged
            self.staged.remove(seq)


class RequestQueue:
    """Requests submitted and not yet taken by the scheduler thread: at most ``max_size``, thread-safe."""

    def __init__(self, max_size: int) -> None:
        self.max_size = max_size
        self._waiting: deque[_Sequence] = deque()
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self.closed = False

    def put(self, seq: _Sequence) -> None:
        """Queue ``seq``; a full queue is `GeneratorBusy` at once, a closed one an error."""
        with self._lock:
            if self.closed:
                raise ChatbotError("the generator is closed")
            if len(self._waiting) >= self.max_size:
                raise GeneratorBusy(f"the model has {self.max_size} replies waiting; try again in a moment")
            self._waiting.append(seq)
        self._wake.set()

    def take(self, room: int) -> tuple[list[_Sequence], list[_Sequence]]:
        """The queued requests that were cancelled or ran out of time (removed, so their places are
        free at once), and up to ``room`` others, oldest first."""
        with self._lock:
            gone = [seq for seq in self._waiting if seq.gone()]
            if gone:
                ended = {id(seq) for seq in gone}
                self._waiting = deque(seq for seq in self._waiting if id(seq) not in ended)
            taken = [self._waiting.popleft() for _ in range(min(room, len(self._waiting)))]
        return gone, taken

    def wait(self, seconds: float) -> None:
        """Sleep until a request comes (or the queue closes), ``seconds`` at most."""
        self._wake.wait(seconds)
        self._wake.clear()

    def close(self) -> None:
        with self._lock:  # no request can be queued after this
            self.closed = True
        self._wake.set()

    def drain(self) -> list[_Sequence]:
        with self._lock:
            left, self._waiting = list(self._waiting), deque()
        return left


class BatchingGenerator:
    """A `Generator` that batches concurrent requests on one `LocalGenerator`'s model.

    Thread-safe: `generate` and `stream` may be called from many threads at once; a
    single scheduler thread (`BatchLoop`) runs the model. Queue full: `GeneratorBusy` at once.
    """

    def __init__(self, base: LocalGenerator, *, max_batch: int = 16, max_queue: int = 64,
                 cache_bytes: int = 512 * 2**20, prefill_chunk: int = 256, ignore_eos: bool = False,
                 packed: bool = True) -> None:
        if max_batch < 1:
            raise ChatbotError(f"`max_batch` must be at least 1, got {max_batch}")
        if max_queue < 1:
            raise ChatbotError(f"`max_queue` must be at least 1, got {max_queue}")
        if prefill_chunk < 1:
            raise ChatbotError(f"`prefill_chunk` must be at least 1, got {prefill_chunk}")
        self.base = base
        self.model = base.model
        self.tokenizer = base.tokenizer
        self.name = base.name
        self.format = base.format
        self.context_size = base.context_size
        self.max_batch = max_batch
        self.max_queue = max_queue
        self.max_concurrency = max_batch + max_queue
        """How many callers may usefully wait on this generator at once (the engine sizes its pool by it)."""
        self.cache = PrefixCache(cache_bytes)
        self.prefill_chunk = prefill_chunk
        """Prompt tokens read between two decode steps at most (the rows decoding wait that long)."""
        self.ignore_eos = ignore_eos
        """Decode exactly `max_new_tokens` (benchmarks: both arms then do the same work)."""
        self.queue = RequestQueue(max_queue)
        # Allocated once, here, so that a `max_batch` too large for the device fails now.
        import torch

        from .gpt2_step import PackedStep

        try:
            rows = RowBatch(KVBlock(self.model, max_batch, self.context_size + SPARE_COLUMNS))
            stage = KVBlock(self.model, min(STAGE_ROWS, max_batch), self.context_size)
            self.runner = ModelRunner(self.model, rows, stage, self.cache,
                                      PackedStep(self.model) if packed and PackedStep.supports(self.model) else None)
        except (MemoryError, torch.OutOfMemoryError) as err:
            raise ChatbotError(f"no memory for the keys/values of `max_batch` {max_batch} replies of up to "
                               f"{self.context_size} tokens ({type(err).__name__}); lower `max_batch`") from None
        self.loop = BatchLoop(self, rows, stage)
        self._thread = threading.Thread(target=self.loop.run, name="batch-scheduler", daemon=True)
        self._thread.start()

    @classmethod
    def from_pretrained(cls, name_or_path: Any = None, *, device: str = "auto", allow_download: bool = False,
                        **options: Any) -> BatchingGenerator:
        return cls(LocalGenerator.from_pretrained(name_or_path, device=device, allow_download=allow_download),
                   **options)

    def count_tokens(self, text: str) -> int:
        return self.base.count_tokens(text)

    def encode(self, text: str) -> list[int]:
        return self.base.encode(text)

    def close(self) -> None:
        self.queue.close()
        self._thread.join(timeout=10)

    # ------------------------------------------------------------------ the Generator contract

    def generate(self, requests: Sequence[GenerationRequest]) -> list[GenerationResult]:
        """One result per request; they run batched with whatever else is in flight."""
        futures = [self.submit(r).future for r in requests]
        return [f.result() for f in futures]  # type: ignore[union-attr]

    def submit(self, request: GenerationRequest, *, prompt_ids: Sequence[int] | None = None) -> _Sequence:
        """Queue one request; its ``future`` gives the result and ``first_token_at`` when decoding began.

        ``prompt_ids``, when given, are read instead of encoding ``request.prompt`` (a caller that
        keeps a conversation as token ids, as the benchmark does, so no text round trip changes them).
        """
        seq = self.new_sequence(request, prompt_ids)
        seq.future = Future()
        self.queue.put(seq)
        return seq

    def stream(self, request: GenerationRequest) -> Iterator[str]:
        """The reply in pieces as its tokens are decoded (never any part of a stop string)."""
        seq = self.new_sequence(request)
        seq.pieces = queue.Queue()
        self.queue.put(seq)
        try:
            while True:
                kind, value = seq.pieces.get()
                if kind == "piece":
                    if request.cancel is not None and request.cancel.is_set():
                        continue  # cancelled: pieces made meanwhile are not shown; the end follows
                    yield value
                elif kind == "error":
                    raise value
                else:
                    return
        finally:
            if seq.done is None:  # the consumer left early: the row ends at its next step
                seq.abandoned = True
                if request.cancel is not None:
                    request.cancel.set()

    def new_sequence(self, request: GenerationRequest, prompt_ids: Sequence[int] | None = None) -> _Sequence:
        """``request`` ready to be read and decoded: its prompt's ids (the newest that fit), its
        logits processors and warpers, its own sampler, its reply text with its stop strings."""
        import torch

        s = request.settings
        budget = prompt_budget(self.context_size, s)
        ids = list(prompt_ids if prompt_ids is not None else self.base.encode(request.prompt))[-budget:]
        if not ids:
            ids = [self.tokenizer.eos_token_id]
        # With `ignore_eos` (benchmarks) a reply may well begin with end-of-text.
        processors, warpers = self.base.pipeline([request], s, len(ids), suppress_blank_start=not self.ignore_eos)
        sampler = None
        if warpers is not None:
            sampler = torch.Generator(device=self.model.device)
            if s.seed is not None:
                sampler.manual_seed(s.seed)
            else:
                sampler.seed()
        now = time.perf_counter()
        # With `ignore_eos` (benchmarks) end-of-text is an ordinary token, in the ids and in the text.
        reply = (ReplyText(self.tokenizer, request.stop_strings, self.base.byte_piece_ids) if self.ignore_eos
                 else self.base.reply_text(request.stop_strings))
        return _Sequence(request, list(ids), len(ids), processors, warpers, sampler, now + s.max_time, now,
                         reply=reply)

    # ------------------------------------------------------------------ what the loop has done

    def in_flight(self) -> int:
        """Requests being read or decoded now (those still queued not counted)."""
        return len(self.loop.in_flight())

    @property
    def steps(self) -> int:
        """Decode steps run."""
        return self.loop.steps

    @property
    def rows_stepped(self) -> int:
        """Rows decoded, over all steps (over `steps`: the mean batch)."""
        return self.loop.rows_stepped

    @property
    def moves(self) -> int:
        """Times every row's keys/values were moved (a long prompt joining, or compaction)."""
        return self.loop.rows.moves

    @property
    def splits(self) -> int:
        """Decode steps split in two because memory ran out."""
        return self.runner.splits

    @property
    def oom_retries(self) -> int:
        return self.runner.oom_retries


class BatchLoop:
    """The scheduler thread of a `BatchingGenerator`: takes queued requests, reads their prompts,
    decodes a token for every row each step, and hands each reply over as it ends."""

    def __init__(self, owner: BatchingGenerator, rows: RowBatch, stage: KVBlock) -> None:
        self.owner = owner
        self.queue = owner.queue
        self.runner = owner.runner
        self.cache = owner.cache
        self.rows = rows
        """The decoding rows (a `RowBatch`)."""
        self.stage = stage
        """The prompts being read, each into its own row (`planner`)."""
        self.planner = PromptPlanner(owner.max_batch, min(STAGE_ROWS, owner.max_batch))
        self.eos = None if owner.ignore_eos else owner.tokenizer.eos_token_id
        self.steps = 0
        self.rows_stepped = 0

    def run(self) -> None:
        import torch

        while not self.queue.closed:
            self.admit()
            if not (self.batch or self.planner.waiting()):
                self.runner.batch_emptied()
                self.queue.wait(0.05)
                continue
            try:
                with torch.inference_mode():
                    if self.runner.packing:
                        self.packed_step()
                    else:
                        self.read_prompts()
                        if self.batch:
                            self.step()
                    if self.batch:
                        self.leave()
            except Exception as err:  # a model failure fails every request in flight, not the thread
                log.exception("batched generation failed")
                for seq in self.in_flight():
                    seq.fail(err)
                self.rows.clear()
                self.planner.clear()
                if isinstance(err, torch.OutOfMemoryError) and torch.cuda.is_available():
                    torch.cuda.empty_cache()
        closed = ChatbotError("the generator is closed")
        for seq in [*self.in_flight(), *self.queue.drain()]:
            seq.fail(closed)

    @property
    def batch(self) -> list[_Sequence]:
        """The decoding rows' requests, in row order."""
        return self.rows.seqs

    def in_flight(self) -> list[_Sequence]:
        return [*self.batch, *self.planner.waiting()]

    def admit(self) -> None:
        """End queued requests that were cancelled or ran out of time (their callers and queue
        places are freed at once), and take the others while the batch has room for them."""
        gone, taken = self.queue.take(self.planner.room(len(self.batch)))
        for seq in gone:
            self.over(seq)
        self.planner.pending.extend(taken)

    def over(self, seq: _Sequence) -> bool:
        """Ends a request that was cancelled or ran out of time before it could start decoding."""
        if seq.delivered:
            return True
        if seq.cancelled():
            seq.done = "cancelled"
        elif time.perf_counter() > seq.deadline:
            seq.done = "time"
        else:
            return False
        self.finish(seq)
        return True

    def read_prompts(self) -> None:
        """Read waiting prompts with the model's own forward, `prefill_chunk` tokens between two
        decode steps at most (any number while nothing is decoding).

        Each prompt is read on its own (on a CPU, reading is compute-bound, so padding
        prompts together would only add work), into its staging row; when it is read, the row
        moves into the batch. A long prompt is read over several steps, so the rows already
        decoding are never held up by more than one chunk.
        """
        import torch

        while True:
            plan = self.plan()
            for seq, m in plan:
                try:
                    m = self.runner.read_chunk(seq, m)
                except torch.OutOfMemoryError as err:  # even one token at a time did not fit: this request fails
                    self.planner.staged.remove(seq)
                    seq.fail(err)
                    continue
                # Outside the `try`: running out of memory while joining the batch may leave the
                # batch's rows half moved, so it must fail every request, as any other failure does.
                self.planner.read(seq, m, self.place)
            if self.batch or not plan:
                return

    def plan(self) -> list[tuple[_Sequence, int]]:
        return self.planner.plan(self.owner.prefill_chunk, over=self.over, start=self.runner.start_reading,
                                 place=self.place)

    def place(self, seq: _Sequence) -> None:
        """Move a read prompt into the batch."""
        self.rows.place(seq, self.stage, seq.stage_row, len(seq.ids) - 1)

    def step(self) -> None:
        """One token for every row of the batch."""
        self.take(self.runner.decode(lambda seq, err: seq.fail(err)))

    def packed_step(self) -> None:
        """GPT-2: one token for every row and the next pieces of the prompts being read, in one pass."""
        plan = self.plan()
        n = len(self.batch)
        if not (plan or n):  # every waiting request was cancelled or out of time
            return
        done, logits = self.runner.packed_pass(plan)
        if not done:
            return
        for seq, m in plan:
            self.planner.read(seq, m, self.place)
        if logits is not None:
            self.take(logits, n)

    def take(self, logits: Any, rows: int | None = None) -> None:
        """Choose and record the next token of the first ``rows`` rows (all of them by default)."""
        batch = self.batch if rows is None else self.batch[:rows]
        self.steps += 1
        self.rows_stepped += len(batch)
        for row, seq in enumerate(batch):
            if seq.done is not None:
                continue
            try:
                token = seq.choose(logits[row: row + 1])
            except Exception as err:  # one request's settings or processors failing end that request only
                log.exception("choosing a token failed")
                seq.fail(err)
                continue
            self.advance(seq, token)

    def advance(self, seq: _Sequence, token: int) -> None:
        """The row's next token is ``token``: recorded, and the reply finished when it ends."""
        seq.take(token, eos=self.eos, context_size=self.owner.context_size)
        if seq.done is not None:
            self.finish(seq)

    def finish(self, seq: _Sequence) -> None:
        if seq.delivered:
            return
        # Only a reply that ended by itself: a cancelled, late or failed one is not tried again.
        if seq.done == "stop" and sample_again(seq.text, seq.request.settings, seq.attempt):
            self.sample_again(seq)
            return
        seq.deliver()

    def sample_again(self, seq: _Sequence) -> None:
        """A sampled reply that came out empty is sampled again with another seed, as
        `LocalGenerator.generate` does; its caller sees only the new try."""
        request = replace(seq.request, settings=settings_for_try(seq.request.settings, seq.attempt + 1))
        again = self.owner.new_sequence(request, seq.ids[: seq.prompt_len])
        again.request = seq.request  # the caller's cancel event and settings stay the ones it holds
        again.future, again.pieces, again.attempt = seq.future, seq.pieces, seq.attempt + 1
        again.deadline, again.started = seq.deadline, seq.started
        seq.delivered = True  # this try is over; its row leaves as usual
        self.planner.pending.appendleft(again)

    def leave(self) -> None:
        """Finished rows leave; their keys/values go to the prefix cache, and the last row takes their place."""
        import torch

        rows = self.rows
        for i in reversed([i for i, s in enumerate(self.batch) if s.done is not None]):
            seq = self.batch[i]
            if seq.done != "error" and self.cache.max_bytes:
                # The row holds ids[:-1]: the prompt and the reply but its last token.
                try:
                    self.cache.put(seq.ids[: rows.end - rows.starts[i]], rows.kept(i))
                except torch.OutOfMemoryError:  # keeping it is only a saving for later
                    self.runner.after_oom()
            rows.remove(i)
        if not self.batch:
            self.runner.batch_emptied()
