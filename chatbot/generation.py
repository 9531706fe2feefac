"""The `Generator` contract and the local transformers implementation.

Models load through one function, `load_model`, whatever the source: the shipped model,
a local checkpoint directory, or a hub name that is already in the local cache.
torch and transformers are imported inside functions so that importing the package
stays cheap (`python bot.py --help` does not load torch).
"""

from __future__ import annotations

import contextlib
import copy
import functools
import logging
import os
import queue
import re
import threading
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Iterator, Literal, Protocol, Sequence

from .decoding import DecodingSettings, logits_pipeline
from .errors import ChatbotError, ModelNotFoundError
from .prompting import clean_text, cut_at_stop, format_name_for_model, make_format

if TYPE_CHECKING:  # pragma: no cover
    import torch

log = logging.getLogger(__name__)

PACKAGE_DIR = Path(__file__).resolve().parent
DEFAULT_MODEL = PACKAGE_DIR / "models" / "chitchat-gpt2"

FinishReason = Literal["stop", "length", "time"]
EMPTY_RETRIES = 2


@dataclass(frozen=True)
class GenerationRequest:
    prompt: str
    settings: DecodingSettings = field(default_factory=DecodingSettings)
    stop_strings: tuple[str, ...] = ()
    bot_texts: tuple[str, ...] = ()
    """The text of each of the bot's earlier turns in the prompt, oldest first; the repetition controls read it."""
    trim_to_sentence: bool = True
    """Cut a reply that ran out of tokens back to its last full sentence (chat); off for plain completion,
    where `generate` must give exactly the text `stream` shows."""
    cancel: threading.Event | None = field(default=None, compare=False, repr=False)
    """Set it (from any thread) to end this request at its next token: whoever asked has gone."""
    style: Any = None
    """The persona's `prompting.PersonaStyle`, for a generator that chooses among candidates; None: none."""
    context: tuple[tuple[str, str], ...] = ()
    """The conversation's turns in the prompt as (role, text), ``user`` or ``bot``, oldest first, the
    message being answered last: what a generator that searches replies people wrote reads
    (`response_bank`)."""

    def retry(self, attempt: int) -> GenerationRequest:
        """The same request for another try: a new seed, and sampling where this one is greedy
        (greedy decoding would only produce the same text again)."""
        update: dict[str, Any] = {"seed": None if self.settings.seed is None else self.settings.seed + 1000 * attempt}
        if self.settings.greedy:
            update["temperature"] = 0.7
        # A try of its own to cancel: ending an earlier try (an unsafe sentence) must not end this one.
        cancel = threading.Event() if self.cancel is not None else None
        return replace(self, settings=self.settings.model_copy(update=update), cancel=cancel)


@dataclass(frozen=True)
class GenerationResult:
    text: str
    """The reply without the prompt, cut at the first stop string."""
    prompt_tokens: int
    completion_tokens: int
    finish_reason: FinishReason
    seconds: float
    token_ids: tuple[int, ...] = ()
    """The generated token ids, where the generator keeps them (the batching one does)."""


class Generator(Protocol):
    """What the engine needs from a reply generator; `LocalGenerator` is the transformers one."""

    name: str
    format: Any
    """The `PromptFormat` the model was trained with."""
    context_size: int
    """Most tokens the model attends to: prompt plus reply."""

    def count_tokens(self, text: str) -> int:
        """Length of ``text`` in the model's tokens; safe to call from any thread."""

    def generate(self, requests: Sequence[GenerationRequest]) -> list[GenerationResult]:
        """One result per request, in order; the text excludes the prompt and stops before any stop string."""

    def stream(self, request: GenerationRequest) -> Iterator[str]:
        """The reply of one request in pieces whose concatenation is the reply.

        Closing the iterator early stops the generation.
        """


def pick_device(device: str = "auto") -> str:
    """CUDA, then Apple MPS, then CPU, unless a device is named."""
    import torch

    if device != "auto":
        try:
            kind = torch.device(device).type
        except RuntimeError:
            raise ChatbotError(f"`device` must be auto, cpu, cuda, cuda:N or mps, got {device!r}") from None
        if kind == "cuda" and not torch.cuda.is_available():
            raise ChatbotError(f"`device` is {device!r} but torch sees no CUDA GPU here; use --device cpu or auto")
        if kind == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
            raise ChatbotError(f"`device` is {device!r} but MPS is not available here; use --device cpu or auto")
        return device
    if torch.cuda.is_available():
        return "cuda"
    mps = getattr(torch.backends, "mps", None)
    if mps is not None and mps.is_available():
        return "mps"
    return "cpu"


def _dtype_for(device: str) -> "torch.dtype":
    import torch

    if device.startswith("cuda"):
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if device == "mps":
        return torch.float16
    if device == "cpu" and _cpu_has_bf16_matmul():
        return torch.bfloat16
    return torch.float32


def _cpu_has_bf16_matmul() -> bool:
    """Whether this CPU multiplies bfloat16 natively (AMX or AVX-512 BF16). Elsewhere (AVX2, say)
    bfloat16 weights are converted on every use and run slower than float32, so they are not used."""
    import torch

    cpu = getattr(torch, "cpu", None)
    checks = [getattr(cpu, name, None) for name in ("_is_amx_tile_supported", "_is_avx512_bf16_supported")]
    return any(check() for check in checks if check is not None)


def resolve_model(name_or_path: str | os.PathLike[str] | None) -> str:
    """The default model when none is given; a path as a string otherwise."""
    if name_or_path is None or str(name_or_path) == "":
        return str(DEFAULT_MODEL)
    return str(name_or_path)


def prompt_budget(context_size: int, settings: DecodingSettings) -> int:
    """Tokens left for the prompt once the reply's ``max_new_tokens`` are set aside; a
    `ChatbotError` when none are."""
    budget = context_size - settings.max_new_tokens
    if budget < 1:
        raise ChatbotError(f"`max_new_tokens` must be below the model's context of {context_size} tokens, "
                           f"got {settings.max_new_tokens}")
    return budget


TOKENIZER_FILES = ("tokenizer.json", "vocab.json", "tokenizer.model", "spiece.model", "vocab.txt")
"""A model directory holds at least one of these (fast tokenizer, GPT-2 BPE, sentencepiece, WordPiece)."""


_ROUND_TRIP = "hello there, how are you?"
"""Plain text every working tokenizer encodes and decodes back unchanged."""


@contextlib.contextmanager
def _no_progress_bars() -> Iterator[None]:
    """transformers' "Loading weights" bars off while a model loads: they are noise on a terminal
    chat, in a LangChain program or a Discord bot's log. Put back as they were afterwards."""
    from transformers.utils import logging as hf_logging

    shown = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if shown:
            hf_logging.enable_progress_bar()


def _not_found(name: str, why: str, option: str = "--model") -> ModelNotFoundError:
    return ModelNotFoundError(
        f"cannot load model {name!r} ({why}); point {option} at a local directory that holds a "
        f"Hugging Face model (config.json, weights, tokenizer), e.g. {DEFAULT_MODEL}"
    )


def load_model(
    name_or_path: str | os.PathLike[str] | None = None,
    *,
    device: str = "auto",
    allow_download: bool = False,
    option: str = "--model",
) -> tuple[Any, Any]:
    """Load ``(model, tokenizer)`` the same way for a directory or a hub name.

    Hub names are looked up in the local cache only unless ``allow_download`` is set,
    so an air-gapped machine gets an immediate, readable error instead of a network
    time-out. ``option`` is the option an error tells the user to change: a command-line
    one (``--model``) or, from Python, a field (```model```), which also names the download
    switch the same way.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    name = resolve_model(name_or_path)
    path = Path(name).expanduser()
    # "runs/mine" is a path when "runs" exists here, even if "mine" is a typo; otherwise
    # a name with at most one slash is a hub name.
    looks_like_path = (path.is_absolute() or name.startswith((".", "~")) or path.exists()
                       or Path(name.split("/")[0]).is_dir())
    if looks_like_path:
        if not path.is_dir():
            raise _not_found(name, "no such directory", option)
        if not (path / "config.json").is_file():
            raise _not_found(name, "the directory has no config.json", option)
        if not any((path / file).is_file() for file in TOKENIZER_FILES):
            # transformers would load a tokenizer of one token from such a directory, and fail at the first message.
            raise _not_found(name, f"the directory has no tokenizer: none of {', '.join(TOKENIZER_FILES)}", option)
        source = str(path)
    elif re.fullmatch(r"[\w.\-]+(/[\w.\-]+)?", name):
        source = name
    else:
        raise _not_found(name, "neither a directory nor a hub model name like 'org/model'", option)
    dev = pick_device(device)
    try:
        with _no_progress_bars():
            tokenizer = AutoTokenizer.from_pretrained(source, local_files_only=not allow_download)
            if len(tokenizer) <= len(set(tokenizer.all_special_ids)):
                raise _not_found(name, "its tokenizer has no ordinary tokens; the tokenizer files are missing "
                                       "or empty", option)
            back = tokenizer.decode(tokenizer(_ROUND_TRIP, add_special_tokens=False)["input_ids"])
            if back.strip() != _ROUND_TRIP:
                # A tokenizer.json read without its tokenizer_config.json, say, as another tokenizer class.
                raise _not_found(name, f"its tokenizer does not give back the text it encodes ({_ROUND_TRIP!r} "
                                       f"comes back as {back!r}); is tokenizer_config.json missing?", option)
            model = AutoModelForCausalLM.from_pretrained(
                source, local_files_only=not allow_download, dtype=_dtype_for(dev)
            )
    except ModelNotFoundError:
        raise
    except Exception as err:  # a bad model's files fail in many types (OSError, ValueError, safetensors' own)
        fetch = "--allow-download" if option.startswith("--") else "`allow_download=True`"
        if looks_like_path or allow_download:
            lines = str(err).strip().splitlines()
            why = f"{type(err).__name__}: {lines[0] if lines else 'no message'}"
        else:
            why = f"not available offline; {fetch} fetches it where there is network"
        raise _not_found(name, why, option) from None
    model.to(dev)
    model.eval()
    if tokenizer.pad_token is None:
        # GPT-2 has no pad token; padding positions are masked, so any id will do.
        tokenizer.pad_token = tokenizer.eos_token
    # GPT-2 positions are absolute: pad on the left so every prompt ends where the
    # reply begins.
    tokenizer.padding_side = "left"
    # An over-long prompt keeps its newest part (the end the reply continues from).
    tokenizer.truncation_side = "left"
    log.info("loaded %s on %s (%s)", name, dev, model.dtype)
    return model, tokenizer


class LocalGenerator:
    """Generates replies with a transformers causal LM held in this process."""

    def __init__(self, model: Any, tokenizer: Any, name: str = "model") -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.name = name
        self.format = make_format(format_name_for_model(name, model.config), tokenizer.eos_token)
        self.context_size = int(getattr(model.config, "n_positions", 1024))
        # Counting runs on other threads than generation (the engine builds windows off
        # the event loop), and a fast tokenizer switches its padding/truncation state on
        # each batched call, which fails ("Already borrowed") under concurrent use. So
        # counting gets its own copy, used under its own lock.
        self._counter = copy.deepcopy(tokenizer)
        self._counter_lock = threading.Lock()
        # One generation at a time, whichever thread asks (the engine's worker, LangChain's
        # thread pool): torch's seed is global and the tokenizer's padding state is shared.
        # Held by the thread that runs `model.generate`, never while a caller holds a stream.
        self._model_lock = threading.Lock()

    @classmethod
    def from_pretrained(
        cls, name_or_path: str | os.PathLike[str] | None = None, *, device: str = "auto", allow_download: bool = False,
        option: str = "--model",
    ) -> "LocalGenerator":
        """``option`` is what an error tells the user to change (`load_model`)."""
        model, tokenizer = load_model(name_or_path, device=device, allow_download=allow_download, option=option)
        return cls(model, tokenizer, resolve_model(name_or_path))

    @property
    def device(self) -> Any:
        return self.model.device

    def count_tokens(self, text: str) -> int:
        return len(self.encode(text))

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text`` (thread-safe: on the counting copy of the tokenizer)."""
        with self._counter_lock:
            return list(self._counter(text, add_special_tokens=False)["input_ids"])

    @functools.cached_property
    def blank_start_ids(self) -> list[int]:
        """Tokens that would make the reply empty if generated first (end-of-text, line breaks).

        Suppressing them at the first step costs nothing and removes empty replies, which
        small models produce often.
        """
        tok = self.tokenizer
        ids = {tok.eos_token_id}
        for i in range(len(tok)):
            piece = tok.decode([i])
            if piece and not piece.strip() and "\n" in piece:
                ids.add(i)
        return sorted(i for i in ids if i is not None)

    def generate(self, requests: Sequence[GenerationRequest]) -> list[GenerationResult]:
        """Generate one result per request; requests with equal settings share a batch.

        A sampled reply that comes out empty (the model closed its turn at once) is
        sampled again, at most `EMPTY_RETRIES` times.
        """
        with self._model_lock:
            return self._generate_locked(requests)

    def _generate_locked(self, requests: Sequence[GenerationRequest]) -> list[GenerationResult]:
        results: list[GenerationResult | None] = [None] * len(requests)
        pending = list(range(len(requests)))
        for attempt in range(EMPTY_RETRIES + 1):
            groups: dict[tuple, list[int]] = {}
            for i in pending:
                groups.setdefault((requests[i].settings, requests[i].stop_strings), []).append(i)
            for (settings, stops), idx in groups.items():
                batch = self._generate_batch([requests[i] for i in idx], settings_for_try(settings, attempt), stops)
                for i, res in zip(idx, batch):
                    results[i] = res
            pending = [i for i in pending if sample_again(results[i].text, requests[i].settings, attempt)]
            if not pending:
                break
        return [r for r in results if r is not None]

    def bot_turn_ids(self, bot_texts: Sequence[str]) -> list[list[int]]:
        """Token ids of each of the bot's turns as they are tokenised inside the prompt."""
        # In a transcript the turn's first word carries the space after "Name:" (one token
        # with it); a DialoGPT turn follows the end-of-text token directly. Cleaning the
        # text as the prompt does keeps the ids those the model actually saw.
        lead = " " if self.format.name == "transcript" else ""
        texts = [lead + text for text in map(clean_text, bot_texts) if text]
        if not texts:
            return []
        # The counting copy, under its lock: this can run while another thread counts.
        with self._counter_lock:
            return [list(ids) for ids in self._counter(texts, add_special_tokens=False)["input_ids"]]

    def pipeline(self, requests: Sequence[GenerationRequest], settings: DecodingSettings, prompt_length: int,
                 *, suppress_blank_start: bool = True) -> tuple[Any, Any]:
        """`decoding.logits_pipeline` for a batch of ``requests`` (row ``i`` is ``requests[i]``, with
        its own ``bot_texts``) whose replies begin at ``prompt_length``."""
        need_bot_ids = settings.bot_repetition_penalty > 1.0 or settings.bot_no_repeat_ngram_size > 0
        turns = [self.bot_turn_ids(r.bot_texts) if need_bot_ids else [] for r in requests]
        return logits_pipeline(settings, prompt_length=prompt_length, bot_turns=turns,
                               blank_start_ids=self.blank_start_ids if suppress_blank_start else ())

    def _prepare(self, requests: Sequence[GenerationRequest], settings: DecodingSettings,
                 stops: tuple[str, ...]) -> tuple[dict[str, Any], dict[str, Any]]:
        """Encoded, left-padded prompts and the `generate` keyword arguments for them.

        ``settings`` and ``stops`` apply to every request (their own are not read): the
        caller groups requests that share them, and may change the seed on a retry.
        """
        import torch

        tok = self.tokenizer
        budget = prompt_budget(self.context_size, settings)
        # The conversation window trims by turns; truncating here is the last guard
        # against running past the model's positions.
        enc = tok([r.prompt for r in requests], return_tensors="pt", padding=True, truncation=True,
                  max_length=budget, add_special_tokens=False)
        enc = {k: v.to(self.device) for k, v in enc.items()}
        processors, warpers = self.pipeline(requests, settings, enc["input_ids"].shape[1])
        if settings.seed is not None:
            torch.manual_seed(settings.seed)
        return enc, generate_kwargs(settings, tok, [*processors, *(warpers or ())], stops)

    @functools.cached_property
    def byte_piece_ids(self) -> frozenset[int]:
        """Ids of the tokenizer's byte-fallback pieces (``<0xE2>``); see `ReplyText`."""
        return frozenset(i for piece, i in self.tokenizer.get_vocab().items() if _BYTE_PIECE.fullmatch(piece))

    def reply_text(self, stops: Sequence[str]) -> ReplyText:
        """A `ReplyText` for one reply that ends at ``stops`` or the end-of-text token."""
        return ReplyText(self.tokenizer, [*stops, self.tokenizer.eos_token], self.byte_piece_ids)

    def stream(self, request: GenerationRequest) -> Iterator[str]:
        """Yield the reply in pieces as it is generated, never any part of a stop string.

        `generate` runs in a worker thread and hands over each new token; `ReplyText` decodes
        the reply as `generate` does and releases only what later tokens cannot change, so
        the pieces join to exactly the text `generate` returns. A reply cut by the token
        limit is not trimmed back to its last sentence as `generate` does: that text has
        already been shown. Closing the iterator early stops the generation at the next
        token.
        """
        self._model_lock.acquire()
        try:
            enc, kwargs = self._prepare([request], request.settings, request.stop_strings)
        except BaseException:
            self._model_lock.release()
            raise
        tokens = _TokenThread(self.model, enc, kwargs, request.cancel, self._model_lock)
        reply = self.reply_text(request.stop_strings)
        try:
            for ids in tokens.arriving(wait=request.settings.max_time + 30):
                reply.add(ids)
                piece = reply.release()
                if piece:
                    yield piece
                if reply.stopped:
                    break
        finally:
            tokens.stop()
        tokens.check()
        piece = reply.release(final=True)
        if piece:
            yield piece

    def score(self, prompt: str | Sequence[str], continuations: Sequence[str]) -> list[float]:
        """Each continuation's mean log-probability per token after ``prompt`` (the prompt's newest
        tokens that fit with it; one prompt for all, or one per continuation), counting the format's
        end of a turn: how well it fits there."""
        prompts = [prompt] * len(continuations) if isinstance(prompt, str) else list(prompt)
        if len(prompts) != len(continuations):
            raise ValueError(f"{len(prompts)} prompts for {len(continuations)} continuations")
        if not continuations:
            return []
        end = self.format.stop_strings()[0] if self.format.name == "transcript" else self.tokenizer.eos_token
        lead = " " if self.format.name == "transcript" else ""
        tails = [self.encode(lead + text.strip() + end)[: self.context_size - 1] for text in continuations]
        with self._model_lock:
            if isinstance(prompt, str):
                return self._score_after(self.encode(prompt), tails)
            heads = {p: self.encode(p) for p in set(prompts)}
            return self._score_rows([heads[p] for p in prompts], tails)

    def _score_after(self, head: list[int], tails: list[list[int]]) -> list[float]:
        """Mean log-probabilities of ``tails`` after one ``head``, read once: its keys and values are
        computed a single time and shared by every row."""
        import torch

        width = max(map(len, tails))
        head = head[-(self.context_size - width):] or [self.tokenizer.eos_token_id]
        with torch.inference_mode():
            first = self.model(input_ids=torch.tensor([head], device=self.device), use_cache=True)
            cache = first.get("cache", None) or first.get("past_key_values")
            cache.batch_repeat_interleave(len(tails))
            pad = self.tokenizer.eos_token_id
            ids = torch.tensor([t + [pad] * (width - len(t)) for t in tails], device=self.device)
            mask = torch.tensor([[1] * (len(head) + len(t)) + [0] * (width - len(t)) for t in tails],
                                device=self.device)
            positions = torch.arange(len(head), len(head) + width, device=self.device).expand(len(tails), -1)
            logits = self.model(input_ids=ids, attention_mask=mask, position_ids=positions,
                                **{_cache_argument(type(self.model)): cache}).logits.float()
            after_head = torch.log_softmax(first.logits[0, -1].float(), dim=-1)
            logp = torch.log_softmax(logits[:, :-1], dim=-1).gather(2, ids[:, 1:, None])[..., 0]
        return [float((after_head[t[0]] + logp[i, : len(t) - 1].sum()) / len(t)) for i, t in enumerate(tails)]

    def _score_rows(self, heads: list[list[int]], tails: list[list[int]]) -> list[float]:
        """Mean log-probabilities of each tail after its own head, in one padded batch."""
        import torch

        rows = [(h + t)[-self.context_size:] for h, t in zip(heads, tails)]
        width = max(map(len, rows))
        pad = self.tokenizer.eos_token_id
        ids = torch.tensor([r + [pad] * (width - len(r)) for r in rows], device=self.device)
        mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows], device=self.device)
        with torch.inference_mode():
            logits = self.model(input_ids=ids, attention_mask=mask).logits.float()
        logp = torch.log_softmax(logits[:, :-1], dim=-1).gather(2, ids[:, 1:, None])[..., 0]
        return [float(logp[i, len(r) - 1 - len(t): len(r) - 1].mean()) for i, (r, t) in enumerate(zip(rows, tails))]

    def _generate_batch(
        self, requests: Sequence[GenerationRequest], settings: DecodingSettings, stops: tuple[str, ...]
    ) -> list[GenerationResult]:
        """One result per request, generated as one batch under ``settings`` and ``stops``."""
        import torch

        tok = self.tokenizer
        enc, kwargs = self._prepare(requests, settings, stops)
        cancels = [r.cancel for r in requests]
        if any(c is not None for c in cancels):
            from transformers import StoppingCriteria, StoppingCriteriaList

            class _Cancelled(StoppingCriteria):
                # Per row: a cancelled request ends while the rest of the batch goes on.
                def __call__(self, input_ids: Any, scores: Any, **kw: Any) -> Any:
                    return torch.tensor([c is not None and c.is_set() for c in cancels], device=input_ids.device)

            kwargs["stopping_criteria"] = StoppingCriteriaList([_Cancelled()])
        start = time.perf_counter()
        with torch.inference_mode():
            out = self.model.generate(**enc, **kwargs)
        seconds = time.perf_counter() - start
        prompt_len = enc["input_ids"].shape[1]
        results = []
        for request, row, mask in zip(requests, out, enc["attention_mask"]):
            new = row[prompt_len:]
            raw = tok.decode(new, skip_special_tokens=False)
            text, stopped = cut_at_stop(raw, list(stops) + [tok.eos_token])
            n_new = _count_until_eos(new.tolist(), tok.eos_token_id)
            if stopped:
                reason: FinishReason = "stop"
            elif seconds >= settings.max_time:
                reason = "time"
            else:
                reason = "length"
            results.append(GenerationResult(final_text(text, reason, request), int(mask.sum()), n_new, reason,
                                            seconds))
        return results


def generate_kwargs(settings: DecodingSettings, tokenizer: Any, processors: Sequence[Any],
                    stops: Sequence[str]) -> dict[str, Any]:
    """The `model.generate` keyword arguments for a reply under ``settings``: its length and time,
    ``processors`` (all of `logits_pipeline`, warpers last) and its stop strings."""
    from transformers import LogitsProcessorList

    kwargs: dict[str, Any] = dict(
        max_new_tokens=settings.max_new_tokens,
        max_time=settings.max_time,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        # Every processor and warper comes from `logits_pipeline`; transformers' own are set to
        # do nothing, also where a model's generation_config asks for one (its n-gram ban reads
        # the whole prompt, so it would forbid echoing the user's words).
        repetition_penalty=1.0,
        no_repeat_ngram_size=0,
        begin_suppress_tokens=None,
        logits_processor=LogitsProcessorList(list(processors)),
    )
    if stops:
        kwargs.update(stop_strings=list(stops), tokenizer=tokenizer)
    if settings.greedy:
        kwargs.update(do_sample=False, temperature=None, top_k=None, top_p=None)
    else:
        kwargs.update(do_sample=True, temperature=1.0, top_k=0, top_p=1.0)
    return kwargs


class _TokenThread:
    """`model.generate` on a thread of its own, its new tokens handed over as they come (through
    transformers' streamer interface), stopped at the next token by `stop` or ``cancel``.

    ``lock`` is held by the caller on entry and released when the generation ends.
    """

    def __init__(self, model: Any, enc: dict[str, Any], kwargs: dict[str, Any], cancel: threading.Event | None,
                 lock: threading.Lock) -> None:
        from transformers import StoppingCriteria, StoppingCriteriaList
        from transformers.generation.streamers import BaseStreamer

        self.cancel = cancel
        self._closed = threading.Event()
        self._arrived: queue.Queue[list[int] | None] = queue.Queue()
        self._failure: list[BaseException] = []
        closed, arrived = self._closed, self._arrived

        class _Closed(StoppingCriteria):
            def __call__(self, input_ids: Any, scores: Any, **kw: Any) -> bool:
                return closed.is_set() or (cancel is not None and cancel.is_set())

        class _Tokens(BaseStreamer):
            """Token ids as `generate` makes them: the prompt first (skipped), then each new token."""

            prompt_seen = False

            def put(self, value: Any) -> None:
                if self.prompt_seen:
                    arrived.put(value.reshape(-1).tolist())
                self.prompt_seen = True

            def end(self) -> None:
                arrived.put(None)

        streamer = _Tokens()

        def run() -> None:
            import torch

            try:
                with torch.inference_mode():
                    model.generate(**enc, **kwargs, streamer=streamer,
                                   stopping_criteria=StoppingCriteriaList([_Closed()]))
            except BaseException as err:  # handed to the consumer in `arriving`
                self._failure.append(err)
                streamer.end()
            finally:
                lock.release()

        try:
            self._worker = threading.Thread(target=run, name="generate-stream", daemon=True)
            self._worker.start()
        except BaseException:
            lock.release()
            raise

    def arriving(self, *, wait: float) -> Iterator[list[int]]:
        """Each new token's ids until the generation ends or is cancelled (tokens made after a
        cancel are not given); then `stop` and `check`."""
        while True:
            try:
                ids = self._arrived.get(timeout=wait)
            except queue.Empty:
                raise ChatbotError(f"the model gave no token for {wait:g} s") from None
            if ids is None or (self.cancel is not None and self.cancel.is_set()):
                return
            yield ids

    def stop(self) -> None:
        """Stop at the next token and wait for the thread to end."""
        self._closed.set()
        self._worker.join()

    def check(self) -> None:
        """Raise the generation's error, if it failed."""
        if self._failure:
            raise self._failure[0]


_BYTE_PIECE = re.compile(r"<0x[0-9A-Fa-f]{2}>")


@functools.cache
def _cache_argument(kind: type) -> str:
    """The keyword a model class's forward takes its cache under: ``cache`` where transformers has
    renamed ``past_key_values`` (5.x warns on the old name), else ``past_key_values``."""
    import inspect

    return "cache" if "cache" in inspect.signature(kind.forward).parameters else "past_key_values"


class ReplyText:
    """A reply's text as its tokens arrive, decoded as the finished reply is, and the part of it
    that is final, so streamed pieces join to exactly the text that is returned and stored.

    Why by hand: transformers' `TextIteratorStreamer` decodes the tokens after each newline
    apart from those before, so a character whose bytes span that point decodes differently
    than in the whole reply (a different number of U+FFFD). Here the whole reply is decoded
    every time, and what later tokens could still change is held back:

    - a character still missing bytes (byte-level BPE decodes it as a trailing U+FFFD);
    - the text of a trailing run of byte-fallback pieces (``<0xF0>``, sentencepiece): one
      more byte can turn the whole run into other characters;
    - the possible beginning of a stop string, and trailing whitespace (stripped if the
      reply ends there).
    """

    def __init__(self, tokenizer: Any, stops: Sequence[str], byte_piece_ids: frozenset[int] = frozenset()) -> None:
        self._tokenizer = tokenizer
        self._stops = list(stops)
        self._byte_ids = byte_piece_ids
        self.ids: list[int] = []
        self.text = ""
        """The reply so far, cut before the first stop string."""
        self.stopped = False
        """A stop string (or the end-of-text token) has come for good: the reply is complete."""
        self._stable = 0
        self._sent = 0
        self._released = ""

    def _decode(self, ids: Sequence[int]) -> str:
        return self._tokenizer.decode(ids, skip_special_tokens=False)

    def add(self, ids: Iterable[int]) -> None:
        """The next token(s) of the reply."""
        if self.stopped:
            return
        self.ids.extend(ids)
        raw = self._decode(self.ids)
        self.text, found = cut_at_stop(raw, self._stops)
        self._stable = self._stable_len(raw)
        # A stop string counts once no later token can change it: a newline byte, say, can
        # still become part of an invalid byte run that decodes to U+FFFD instead.
        self.stopped = found and cut_at_stop(raw[: self._stable], self._stops)[1]

    def release(self, final: bool = False) -> str:
        """The text that became final since the last call ("" when none did). ``final``: no
        token will come, so the rest is released (without trailing whitespace)."""
        text = self.text
        if final or self.stopped:
            safe = len(text.rstrip())
        else:
            safe = min(self._stable, len(text) - _stop_prefix_len(text, self._stops))
            while safe > self._sent and text[safe - 1].isspace():
                safe -= 1
        if safe <= self._sent:
            return ""
        if not text.startswith(self._released):
            # Some tokenizer's decoding of the shorter reply was not a prefix of the longer one.
            log.warning("streamed text %r is not the start of the decoded reply %r", self._released, text)
            return ""
        out = text[self._sent:safe]
        if self._sent == 0:
            out = out.lstrip()
        self._sent = safe
        self._released = text[:safe]
        return out

    def _stable_len(self, text: str) -> int:
        """How much of ``text``, the decoded reply, no later token can change."""
        run = 0
        while run < len(self.ids) and self.ids[-1 - run] in self._byte_ids:
            run += 1
        n = len(text)
        if run:
            n = len(os.path.commonprefix([self._decode(self.ids[:-run]), text]))
        while n and text[n - 1] == "\ufffd":
            n -= 1
        return n


def _stop_prefix_len(text: str, stops: Sequence[str]) -> int:
    """Length of the longest end of ``text`` that is the start of some stop string."""
    longest = 0
    for stop in stops:
        for n in range(min(len(stop) - 1, len(text)), longest, -1):
            if text.endswith(stop[:n]):
                longest = n
                break
    return longest


def _count_until_eos(ids: list[int], eos: int | None) -> int:
    for n, t in enumerate(ids):
        if t == eos:
            return n + 1
    return len(ids)


_SENTENCE_END = re.compile(r"[.!?…](?=\s|$)")


def final_text(text: str, reason: str, request: GenerationRequest) -> str:
    """The text a generator returns for a reply that ended for ``reason``: stripped, and, when the
    token limit cut it and ``request.trim_to_sentence`` asks, ended at its last full sentence."""
    if reason == "length" and request.trim_to_sentence:
        text = _trim_to_sentence(text)
    return text.strip()


def sample_again(text: str, settings: DecodingSettings, tries: int) -> bool:
    """Whether a reply whose text came out empty (the model closed its turn at once) after
    ``tries`` earlier tries is sampled again: only when sampled (greedy would say the same again),
    at most `EMPTY_RETRIES` times."""
    return not text.strip() and not settings.greedy and tries < EMPTY_RETRIES


def settings_for_try(settings: DecodingSettings, tries: int) -> DecodingSettings:
    """``settings`` for the try after ``tries`` earlier ones: another seed when there is one."""
    if tries == 0 or settings.seed is None:
        return settings
    return settings.model_copy(update={"seed": settings.seed + tries})


def _trim_to_sentence(text: str) -> str:
    """A reply cut by the token limit ends at its last full sentence when it has one."""
    ends = [m.end() for m in _SENTENCE_END.finditer(text)]
    if ends and ends[-1] >= len(text) // 3:
        return text[: ends[-1]]
    return text
