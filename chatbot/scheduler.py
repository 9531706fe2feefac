"""`BatchingGenerator`: many conversations' replies decoded together on one model.

Why not `model.generate` on a padded batch: on a CPU, reading a prompt (prefill) costs
about as much per token at batch 16 as at batch 1, so padding 16 prompts to the longest
one multiplies the dominant cost, and re-reading a whole history every turn repeats it.
Decoding is the part that batches well (one step for 16 rows costs about one row's step).
So this scheduler:

- reads each new prompt on its own (no padding), starting from the cached keys/values of
  the longest prefix it has already seen (the same conversation's previous turn: the
  window drops old turns in chunks precisely so that this prefix stays the same);
- lets it join the running batch between two decode steps (continuous batching): its
  cache is left-padded to the batch's length, and GPT-2's absolute positions are given
  per row, so padding never shifts a position;
- decodes one token per step for every row, with each request's own decoding settings,
  repetition controls, stop strings, deadline and cancellation; a finished row leaves at
  once and its keys/values go to the prefix cache (bounded in bytes, least recently used
  evicted);
- streams each request's text as its tokens come.

transformers' continuous-batching manager (`generate_batch`) was not used: it has no
per-request logits processors or stop strings, which the repetition controls and the
speaker-tag stops need. The decoding pieces themselves are transformers' (logits
warpers, the repetition processors in `repetition.py`, `DynamicCache`).
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

from .errors import ChatbotError
from .generation import GenerationRequest, GenerationResult, LocalGenerator, _stop_prefix_len, _trim_to_sentence
from .prompting import cut_at_stop

__all__ = ["BatchingGenerator", "GeneratorBusy", "PrefixCache"]

log = logging.getLogger(__name__)


class GeneratorBusy(ChatbotError):
    """The generator's queue is full; try again in a moment."""


class PrefixCache:
    """Keys/values of token sequences already read, for reuse by a later prompt that starts the same way.

    Bounded by bytes; the least recently used entries go first.
    """

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self._entries: OrderedDict[tuple[int, ...], list[tuple[Any, Any]]] = OrderedDict()
        self._bytes = 0
        self.hits = 0
        self.reused_tokens = 0

    @staticmethod
    def _size(kv: list[tuple[Any, Any]]) -> int:
        return sum(k.numel() * k.element_size() + v.numel() * v.element_size() for k, v in kv)

    def put(self, ids: Sequence[int], kv: list[tuple[Any, Any]]) -> None:
        key = tuple(ids)
        size = self._size(kv)
        if not key or size > self.max_bytes:
            return
        if key in self._entries:
            self._bytes -= self._size(self._entries.pop(key))
        # A shorter entry that this one extends is redundant: drop it.
        for old in [k for k in self._entries if len(k) < len(key) and key[: len(k)] == k]:
            self._bytes -= self._size(self._entries.pop(old))
        self._entries[key] = kv
        self._bytes += size
        while self._bytes > self.max_bytes and self._entries:
            _, evicted = self._entries.popitem(last=False)
            self._bytes -= self._size(evicted)

    def longest(self, ids: Sequence[int]) -> tuple[int, list[tuple[Any, Any]] | None]:
        """The longest cached common prefix of ``ids``: its length and the keys/values cut to it."""
        best, best_key = 0, None
        for key in self._entries:
            n = _common_prefix(key, ids)
            if n > best:
                best, best_key = n, key
        if best_key is None:
            return 0, None
        self._entries.move_to_end(best_key)
        self.hits += 1
        self.reused_tokens += best
        return best, [(k[:, :, :best], v[:, :, :best]) for k, v in self._entries[best_key]]

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def bytes(self) -> int:
        return self._bytes


_GROWING: Any = None
SPARE_COLUMNS = 64
"""Room a batch's cache keeps for tokens to come; it grows by doubling when used up."""


def _growing_layer(keys: Any, values: Any) -> Any:
    """A cache layer that writes new columns into spare room instead of concatenating.

    `DynamicCache` grows by `torch.cat`, copying every row's keys and values at every
    step; at batch 14 with 800-token contexts that copy, not the model, took most of a
    decode step (617 ms against 190 ms with this layer, measured on this project's CPU).
    """
    global _GROWING
    if _GROWING is None:
        from transformers.cache_utils import DynamicLayer

        class GrowingLayer(DynamicLayer):
            def __init__(self, keys: Any, values: Any) -> None:
                super().__init__()
                self.dtype, self.device = keys.dtype, keys.device
                self.is_initialized = True
                self._n = 0
                self._k = keys.new_empty((*keys.shape[:2], keys.shape[2] + SPARE_COLUMNS, keys.shape[3]))
                self._v = values.new_empty(self._k.shape)
                self._write(keys, values)

            def _write(self, keys: Any, values: Any) -> None:
                m = keys.shape[2]
                if self._n + m > self._k.shape[2]:
                    room = max(2 * self._k.shape[2], self._n + m + SPARE_COLUMNS)
                    k = self._k.new_empty((*self._k.shape[:2], room, self._k.shape[3]))
                    v = self._v.new_empty(k.shape)
                    k[:, :, : self._n] = self._k[:, :, : self._n]
                    v[:, :, : self._n] = self._v[:, :, : self._n]
                    self._k, self._v = k, v
                self._k[:, :, self._n: self._n + m] = keys
                self._v[:, :, self._n: self._n + m] = values
                self._n += m
                self.keys, self.values = self._k[:, :, : self._n], self._v[:, :, : self._n]

            def update(self, key_states: Any, value_states: Any, *args: Any, **kwargs: Any) -> tuple[Any, Any]:
                self._write(key_states, value_states)
                return self.keys, self.values

            def batch_select_indices(self, indices: Any) -> None:
                self._k, self._v = self._k[indices], self._v[indices]
                self.keys, self.values = self._k[:, :, : self._n], self._v[:, :, : self._n]

            def drop_front(self, columns: int) -> None:
                """Forget the first ``columns`` (padding in every row); a view, no copy."""
                self._k, self._v = self._k[:, :, columns:], self._v[:, :, columns:]
                self._n -= columns
                self.keys, self.values = self._k[:, :, : self._n], self._v[:, :, : self._n]

        _GROWING = GrowingLayer
    return _GROWING(keys, values)


def _common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


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
    stops: tuple[str, ...] = ()
    text: str = ""
    sent: int = 0
    done: str | None = None
    kv: list[tuple[Any, Any]] | None = None
    """Keys/values of ``ids[:-1]`` while waiting to join the batch."""
    generated: list[int] = field(default_factory=list)
    delivered: bool = False
    first_token_at: float = 0.0
    """`time.perf_counter()` when the first reply token was decoded."""


class BatchingGenerator:
    """A `Generator` that batches concurrent requests on one `LocalGenerator`'s model.

    Thread-safe: `generate` and `stream` may be called from many threads at once; a
    single scheduler thread runs the model. Queue full: `GeneratorBusy` at once.
    """

    def __init__(self, base: LocalGenerator, *, max_batch: int = 16, max_queue: int = 64,
                 cache_bytes: int = 512 * 2**20, ignore_eos: bool = False) -> None:
        if max_batch < 1:
            raise ChatbotError(f"`max_batch` must be at least 1, got {max_batch}")
        if max_queue < 1:
            raise ChatbotError(f"`max_queue` must be at least 1, got {max_queue}")
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
        self.ignore_eos = ignore_eos
        """Decode exactly `max_new_tokens` (benchmarks: both arms then do the same work)."""
        self._incoming: queue.Queue[_Sequence] = queue.Queue(maxsize=max_queue)
        self._wake = threading.Event()
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="batch-scheduler", daemon=True)
        self._thread.start()
        self.steps = 0
        self.rows_stepped = 0

    @classmethod
    def from_pretrained(cls, name_or_path: Any = None, *, device: str = "auto", allow_download: bool = False,
                        **options: Any) -> BatchingGenerator:
        return cls(LocalGenerator.from_pretrained(name_or_path, device=device, allow_download=allow_download),
                   **options)

    def count_tokens(self, text: str) -> int:
        return self.base.count_tokens(text)

    def close(self) -> None:
        self._closed = True
        self._wake.set()
        self._thread.join(timeout=10)

    # ------------------------------------------------------------------ the Generator contract

    def generate(self, requests: Sequence[GenerationRequest]) -> list[GenerationResult]:
        """One result per request; they run batched with whatever else is in flight."""
        futures = [self.submit(r).future for r in requests]
        return [f.result() for f in futures]  # type: ignore[union-attr]

    def submit(self, request: GenerationRequest) -> _Sequence:
        """Queue one request; its ``future`` gives the result and ``first_token_at`` when decoding began."""
        return self._submit(request, stream=False)

    def stream(self, request: GenerationRequest) -> Iterator[str]:
        """The reply in pieces as its tokens are decoded (never any part of a stop string)."""
        seq = self._submit(request, stream=True)
        assert seq.pieces is not None
        try:
            while True:
                kind, value = seq.pieces.get()
                if kind == "piece":
                    yield value
                elif kind == "error":
                    raise value
                else:
                    return
        finally:
            if seq.done is None and request.cancel is not None:
                request.cancel.set()  # the consumer left early: the row ends at its next step

    # ------------------------------------------------------------------ submitting

    def _submit(self, request: GenerationRequest, *, stream: bool) -> _Sequence:
        if self._closed:
            raise ChatbotError("the generator is closed")
        seq = self._new_sequence(request)
        if stream:
            seq.pieces = queue.Queue()
        else:
            seq.future = Future()
        try:
            self._incoming.put_nowait(seq)
        except queue.Full:
            raise GeneratorBusy(f"the model has {self.max_queue} replies waiting; try again in a moment") from None
        self._wake.set()
        return seq

    def _new_sequence(self, request: GenerationRequest) -> _Sequence:
        import torch

        s = request.settings
        budget = self.context_size - s.max_new_tokens
        if budget < 1:
            raise ChatbotError(f"`max_new_tokens` must be below the model's context of {self.context_size} tokens, "
                               f"got {s.max_new_tokens}")
        ids = self.base.encode(request.prompt)[-budget:]
        if not ids:
            ids = [self.tokenizer.eos_token_id]
        processors = self.base._logits_processors([request], s, len(ids))
        if s.repetition_penalty != 1.0:
            from transformers import RepetitionPenaltyLogitsProcessor

            processors.append(RepetitionPenaltyLogitsProcessor(s.repetition_penalty))
        warpers = None
        sampler = None
        if not s.greedy:
            from transformers import LogitsProcessorList, TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

            warpers = LogitsProcessorList([TemperatureLogitsWarper(s.temperature)])
            if s.top_k:
                warpers.append(TopKLogitsWarper(s.top_k))
            if s.top_p < 1.0:
                warpers.append(TopPLogitsWarper(s.top_p))
            sampler = torch.Generator(device=self.model.device)
            if s.seed is not None:
                sampler.manual_seed(s.seed)
            else:
                sampler.seed()
        now = time.perf_counter()
        return _Sequence(request, list(ids), len(ids), processors, warpers, sampler, now + s.max_time, now,
                         stops=tuple(request.stop_strings) + (self.tokenizer.eos_token,))

    # ------------------------------------------------------------------ the scheduler thread

    def _run(self) -> None:
        import torch

        batch: list[_Sequence] = []
        cache = None  # DynamicCache for the rows of `batch`
        mask = None  # [rows, cached length]: 1 where a row has a real token
        while not self._closed:
            joining = self._take(len(batch))
            if not batch and not joining:
                self._wake.wait(0.05)
                self._wake.clear()
                continue
            try:
                with torch.inference_mode():
                    for seq in joining:
                        self._prefill(seq)
                    live = [s for s in joining if s.done is None]
                    for s in joining:
                        if s.done is not None:
                            self._finish(s)
                    if live:
                        batch, cache, mask = self._join(batch, cache, mask, live)
                    if batch:
                        mask = self._step(batch, cache, mask)
                        finished = [i for i, s in enumerate(batch) if s.done is not None]
                        if finished:
                            batch, cache, mask = self._leave(batch, cache, mask, finished)
            except Exception as err:  # a model failure fails every request in flight, not the thread
                log.exception("batched generation failed")
                for seq in [*batch, *joining]:
                    self._fail(seq, err)
                batch, cache, mask = [], None, None
                if isinstance(err, torch.OutOfMemoryError) and torch.cuda.is_available():
                    torch.cuda.empty_cache()
        for seq in batch:
            self._fail(seq, ChatbotError("the generator is closed"))

    def _take(self, running: int) -> list[_Sequence]:
        out = []
        while running + len(out) < self.max_batch:
            try:
                out.append(self._incoming.get_nowait())
            except queue.Empty:
                break
        return out

    def _prefill(self, seq: _Sequence) -> None:
        """Read the prompt (all but its last token), from the longest cached prefix on."""
        import torch
        from transformers import DynamicCache

        if seq.request.cancel is not None and seq.request.cancel.is_set():
            seq.done = "cancelled"
            return
        if time.perf_counter() > seq.deadline:
            seq.done = "time"
            return
        head = seq.ids[:-1]
        n, kv = self.cache.longest(head)
        if n < len(head):
            past = DynamicCache(ddp_cache_data=kv) if kv else DynamicCache()
            ids = torch.tensor([head[n:]], device=self.model.device)
            positions = torch.arange(n, len(head), device=self.model.device)[None]
            out = self.model(input_ids=ids, position_ids=positions, past_key_values=past, use_cache=True)
            kv = [(layer.keys, layer.values) for layer in out.past_key_values.layers]
        seq.kv = kv or []

    def _join(self, batch: list[_Sequence], cache: Any, mask: Any, new: list[_Sequence]) -> tuple[Any, Any, Any]:
        """The batch with ``new`` rows added, every row's cache left-padded to one length."""
        import torch
        from transformers import DynamicCache

        old_len = mask.shape[1] if mask is not None else 0
        lengths = [len(s.ids) - 1 for s in new]
        length = max([old_len, *lengths])
        rows_k: list[list[Any]] = []
        rows_v: list[list[Any]] = []
        masks = []
        dev = self.model.device

        def pad(t: Any, to: int) -> Any:
            missing = to - t.shape[2]
            if missing == 0:
                return t
            return torch.cat([t.new_zeros((t.shape[0], t.shape[1], missing, t.shape[3])), t], dim=2)

        n_layers = self.model.config.num_hidden_layers
        if cache is not None:
            rows_k.append([pad(cache.layers[i].keys, length) for i in range(n_layers)])
            rows_v.append([pad(cache.layers[i].values, length) for i in range(n_layers)])
            masks.append(torch.cat([mask.new_zeros((mask.shape[0], length - old_len)), mask], dim=1))
        for seq, n in zip(new, lengths):
            if n == 0:  # a one-token prompt: nothing cached yet
                k0 = self._empty_kv(n_layers)
                rows_k.append([pad(k, length) for k, _ in k0])
                rows_v.append([pad(v, length) for _, v in k0])
            else:
                rows_k.append([pad(k, length) for k, _ in seq.kv])  # type: ignore[union-attr]
                rows_v.append([pad(v, length) for _, v in seq.kv])  # type: ignore[union-attr]
            row_mask = torch.zeros((1, length), dtype=torch.long, device=dev)
            row_mask[0, length - n:] = 1
            masks.append(row_mask)
            seq.kv = None
        merged = DynamicCache()
        merged.layers = [_growing_layer(torch.cat([r[i] for r in rows_k], dim=0),
                                        torch.cat([r[i] for r in rows_v], dim=0)) for i in range(n_layers)]
        return [*batch, *new], merged, torch.cat(masks, dim=0)

    def _empty_kv(self, n_layers: int) -> list[tuple[Any, Any]]:
        import torch

        cfg = self.model.config
        heads = cfg.n_head
        dim = cfg.n_embd // heads
        z = torch.zeros((1, heads, 0, dim), dtype=self.model.dtype, device=self.model.device)
        return [(z, z) for _ in range(n_layers)]

    def _step(self, batch: list[_Sequence], cache: Any, mask: Any) -> Any:
        """One token for every row; returns the mask grown by the column just read."""
        import torch

        dev = self.model.device
        ids = torch.tensor([[s.ids[-1]] for s in batch], device=dev)
        positions = torch.tensor([[len(s.ids) - 1] for s in batch], device=dev)
        full_mask = torch.cat([mask, mask.new_ones((len(batch), 1))], dim=1)
        out = self.model(input_ids=ids, attention_mask=full_mask, position_ids=positions, past_key_values=cache,
                         use_cache=True)
        logits = out.logits[:, -1, :].float()
        self.steps += 1
        self.rows_stepped += len(batch)
        suppress = self.base._blank_start_ids()
        for row, seq in enumerate(batch):
            scores = logits[row: row + 1]
            if seq.done is not None:
                continue
            if len(seq.ids) == seq.prompt_len and not self.ignore_eos:  # the first reply token: not an empty turn
                scores = scores.clone()
                scores[:, suppress] = float("-inf")
            row_ids = torch.tensor([seq.ids], device=dev)
            if seq.processors:
                scores = seq.processors(row_ids, scores)
            if seq.warpers is None:
                token = int(scores.argmax(dim=-1))
            else:
                scores = seq.warpers(row_ids, scores)
                probs = torch.softmax(scores, dim=-1)
                token = int(torch.multinomial(probs, 1, generator=seq.sampler))
            seq.ids.append(token)
            seq.generated.append(token)
            if len(seq.generated) == 1:
                seq.first_token_at = time.perf_counter()
            self._advance(seq, token)
        return full_mask

    def _advance(self, seq: _Sequence, token: int) -> None:
        """Text so far, stop strings, limits; streamed pieces released."""
        tok = self.tokenizer
        s = seq.request.settings
        if token == tok.eos_token_id and not self.ignore_eos:
            seq.done = "stop"
        else:
            seq.text = tok.decode(seq.generated, skip_special_tokens=False)
            kept, stopped = cut_at_stop(seq.text, seq.stops)
            if stopped:
                seq.text, seq.done = kept, "stop"
        if seq.done is None:
            if len(seq.generated) >= s.max_new_tokens:
                seq.done = "length"
            elif time.perf_counter() > seq.deadline:
                seq.done = "time"
            elif seq.request.cancel is not None and seq.request.cancel.is_set():
                seq.done = "cancelled"
            elif len(seq.ids) >= self.context_size:
                seq.done = "length"
        if seq.pieces is not None:
            self._release(seq)
        if seq.done is not None:
            self._finish(seq)

    def _release(self, seq: _Sequence) -> None:
        text = seq.text
        if seq.done is None:
            # Whole words only, as transformers' TextIteratorStreamer releases them: the
            # bytes of a character split over several tokens decode differently until all
            # have arrived. Trailing spaces wait too (a stop string may follow).
            safe = min(len(text) - _stop_prefix_len(text, seq.stops), max(text.rfind(" "), text.rfind("\n")) + 1)
            while safe > seq.sent and text[safe - 1].isspace():
                safe -= 1
        else:
            safe = len(text.rstrip())
        if safe > seq.sent:
            out = text[seq.sent: safe]
            if seq.sent == 0:
                out = out.lstrip()
            if out:
                seq.pieces.put(("piece", out))  # type: ignore[union-attr]
            seq.sent = safe

    def _finish(self, seq: _Sequence) -> None:
        if seq.delivered:
            return
        seq.delivered = True
        reason = seq.done or "stop"
        text = seq.text
        if reason == "length" and seq.request.trim_to_sentence:
            text = _trim_to_sentence(text)
        n_new = len(seq.generated)
        result = GenerationResult(text.strip(), seq.prompt_len, n_new,
                                  "stop" if reason == "cancelled" else reason,  # type: ignore[arg-type]
                                  time.perf_counter() - seq.started, tuple(seq.generated))
        if seq.future is not None and not seq.future.done():
            seq.future.set_result(result)
        if seq.pieces is not None:
            seq.pieces.put(("end", result))

    def _fail(self, seq: _Sequence, err: BaseException) -> None:
        if seq.delivered:
            return
        seq.delivered = True
        seq.done = "error"
        if seq.future is not None and not seq.future.done():
            seq.future.set_exception(err)
        if seq.pieces is not None:
            seq.pieces.put(("error", err))

    def _leave(self, batch: list[_Sequence], cache: Any, mask: Any, finished: list[int]) -> tuple[Any, Any, Any]:
        """Finished rows leave; their keys/values go to the prefix cache."""
        import torch

        for i in finished:
            seq = batch[i]
            real = int(mask[i].sum())
            # The cache row holds ids[:-1]; keep its real (unpadded) columns.
            kv = [(layer.keys[i: i + 1, :, -real:].clone(), layer.values[i: i + 1, :, -real:].clone())
                  for layer in cache.layers]
            self.cache.put(seq.ids[: real], kv)
        gone = set(finished)
        keep = [i for i in range(len(batch)) if i not in gone]
        if not keep:
            return [], None, None
        index = torch.tensor(keep, device=mask.device)
        cache.batch_select_indices(index)
        mask = mask[index]
        # Columns that are padding in every remaining row are dropped.
        first = int((mask.sum(dim=0) > 0).nonzero()[0]) if mask.numel() else 0
        if first:
            mask = mask[:, first:]
            for layer in cache.layers:
                layer.drop_front(first)
        return [batch[i] for i in keep], cache, mask
