"""Repetition controls: two logits processors and plain-text duplicate detection.

The processors run inside ``model.generate`` and look only at what the bot itself said, so
the bot is free to answer in the user's words while being kept from parroting itself.
The text helpers compare whole replies after generation (is this reply a rerun of an
earlier one?) and measure repetitiveness over a set of replies.

``BotRepetitionPenalty`` and ``ReplyNoRepeatNGram`` subclass ``transformers.LogitsProcessor``,
which drags in torch (seconds of start-up). They are built on first access through the
module ``__getattr__`` below, so the text helpers, and anything that imports this module
for them, stay cheap: ``from chatbot.repetition import BotRepetitionPenalty`` works as usual.
"""

from __future__ import annotations

import difflib
import math
import re
import unicodedata
from collections.abc import Sequence
from functools import cache
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # pragma: no cover
    import torch
    from transformers import LogitsProcessor

__all__ = [
    "BotRepetitionPenalty",
    "ReplyNoRepeatNGram",
    "distinct_n",
    "is_repeat",
    "max_similarity",
    "normalize_for_comparison",
    "repeated_turn_rate",
    "similarity",
]

_PROCESSORS = ("BotRepetitionPenalty", "ReplyNoRepeatNGram")


# ---------------------------------------------------------------------------------------
# validation shared by the processors


def _check_int(name: str, value: Any, minimum: int) -> int:
    # bool is an int subclass; `ngram_size=True` is a mistake, not a 1.
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"`{name}` must be an integer, got {value!r}")
    if value < minimum:
        raise ValueError(f"`{name}` must be at least {minimum}, got {value}")
    return value


def _check_token_ids(name: str, ids: Any) -> tuple[int, ...]:
    if isinstance(ids, (str, bytes)) or not isinstance(ids, Sequence):
        raise ValueError(f"`{name}` must be a sequence of token ids, got {type(ids).__name__}")
    out = []
    for token in ids:
        if isinstance(token, bool) or not isinstance(token, int) or token < 0:
            raise ValueError(f"`{name}` must hold non-negative integer token ids, got {token!r}")
        out.append(token)
    return tuple(out)


def _check_batch(name: str, given: int, batch_size: int) -> None:
    if given != batch_size:
        raise ValueError(
            f"`{name}` has {given} row(s) but the batch has {batch_size}; give one entry per batch row "
            f"(beam search and num_return_sequences > 1 multiply the rows)"
        )


def _check_inputs(input_ids: torch.Tensor, scores: torch.Tensor, prompt_length: int) -> None:
    if input_ids.dim() != 2 or scores.dim() != 2 or input_ids.shape[0] != scores.shape[0]:
        raise ValueError(
            f"expected input_ids (batch, length) and scores (batch, vocab) with the same batch size, "
            f"got {tuple(input_ids.shape)} and {tuple(scores.shape)}"
        )
    if input_ids.shape[1] < prompt_length:
        raise ValueError(
            f"`prompt_length` is {prompt_length} but input_ids has only {input_ids.shape[1]} positions; "
            f"the processor was built for a different prompt"
        )


# ---------------------------------------------------------------------------------------
# the logits processors, defined on first use (see the module docstring)


@cache
def _processor_classes() -> dict[str, type]:
    import torch
    from transformers import LogitsProcessor

    class BotRepetitionPenalty(LogitsProcessor):
        """CTRL repetition penalty over the bot's own words only.

        For batch row ``i`` the penalised tokens are ``bot_token_ids[i]`` (the bot's earlier
        turns in the prompt, tokenised by the caller) plus every token the row has generated
        so far. A penalised logit is divided by ``penalty`` when positive and multiplied by it
        when negative, exactly as in transformers' ``RepetitionPenaltyLogitsProcessor``.

        Why not the stock processor: it penalises every token of the prompt, so the user's
        words, speaker names and separators all become less likely. That punishes the bot for
        answering in the user's words ("do you like tea?" -> "I like tea") and for writing the
        turn separator, while what we want to stop is the bot repeating itself.

        ``penalty`` 1.0 is a no-op. Token ids at or beyond the logits' vocabulary size are
        ignored, as in the stock processor: the model cannot produce them anyway.
        """

        # Rows are matched to `bot_token_ids` by position, which continuous batching reorders.
        supports_continuous_batching = False

        def __init__(self, penalty: float, bot_token_ids: Sequence[Sequence[int]], prompt_length: int):
            if isinstance(penalty, bool) or not isinstance(penalty, (int, float)):
                raise ValueError(f"`bot_repetition_penalty` must be a number, got {penalty!r}")
            # inf would turn repeated positive logits into 0, not a ban; NaN would poison every score.
            if not math.isfinite(penalty):
                raise ValueError(f"`bot_repetition_penalty` must be a finite number, got {penalty}")
            if penalty < 1.0:
                raise ValueError(f"`bot_repetition_penalty` must be at least 1, got {penalty}")
            if isinstance(bot_token_ids, (str, bytes)) or not isinstance(bot_token_ids, Sequence):
                raise ValueError(
                    f"`bot_token_ids` must be a sequence with one list of token ids per batch row, "
                    f"got {type(bot_token_ids).__name__}"
                )
            self.penalty = float(penalty)
            self.bot_token_ids = tuple(_check_token_ids(f"bot_token_ids[{i}]", row) for i, row in enumerate(bot_token_ids))
            self.prompt_length = _check_int("prompt_length", prompt_length, 0)
            self._bot_mask: torch.Tensor | None = None

        def _mask_for(self, scores: torch.Tensor) -> torch.Tensor:
            batch, vocab = scores.shape
            mask = self._bot_mask
            if mask is None or mask.shape[1] != vocab or mask.device != scores.device:
                # Built once per generate call (vocab and device do not change between steps).
                rows = [i for i, ids in enumerate(self.bot_token_ids) for t in ids if t < vocab]
                cols = [t for ids in self.bot_token_ids for t in ids if t < vocab]
                mask = torch.zeros((batch, vocab), dtype=torch.bool, device=scores.device)
                if rows:
                    mask[torch.tensor(rows, device=scores.device), torch.tensor(cols, device=scores.device)] = True
                self._bot_mask = mask
            return mask

        def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
            _check_inputs(input_ids, scores, self.prompt_length)
            _check_batch("bot_token_ids", len(self.bot_token_ids), scores.shape[0])
            if self.penalty == 1.0:
                return scores.clone()
            vocab = scores.shape[1]
            generated = input_ids[:, self.prompt_length:].to(scores.device)
            # One spare column takes generated ids beyond the logits' vocabulary (see the docstring).
            mask = torch.nn.functional.pad(self._mask_for(scores), (0, 1))
            mask = mask.scatter(1, generated.clamp(max=vocab), True)[:, :vocab]
            # -inf * penalty stays -inf, so banned tokens stay banned.
            penalised = torch.where(scores < 0, scores * self.penalty, scores / self.penalty)
            return torch.where(mask, penalised, scores)

    class ReplyNoRepeatNGram(LogitsProcessor):
        """Ban a next token that would repeat an n-gram the bot already produced.

        For batch row ``i`` an n-gram of ``ngram_size`` tokens is banned when it occurs in the
        reply generated so far (``input_ids[i, prompt_length:]``) or in one of the row's
        earlier bot turns, ``bot_turns[i]`` (one token-id sequence per turn; an n-gram never
        spans two turns). ``bot_turns=()`` checks the reply only. The n-gram being completed
        is taken from the reply alone, so the first ``ngram_size - 1`` reply tokens are free.
        Banned tokens get -inf.

        ``bot_turns`` ids at or beyond the logits' vocabulary size cannot be generated and are
        ignored.
        """

        # The stock NoRepeatNGramLogitsProcessor reads the whole sequence, prompt included, so
        # a phrase the user just typed can never be echoed ("what is your name?" -> "my name
        # is ..." loses "name is" if the prompt held it) and names and separators that recur in
        # every turn get banned. Looking only at the reply and the bot's own turns stops the
        # bot looping on itself without forbidding it to quote the user.

        supports_continuous_batching = False

        def __init__(self, ngram_size: int, prompt_length: int, bot_turns: Sequence[Sequence[Sequence[int]]] = ()):
            self.ngram_size = _check_int("ngram_size", ngram_size, 1)
            self.prompt_length = _check_int("prompt_length", prompt_length, 0)
            if isinstance(bot_turns, (str, bytes)) or not isinstance(bot_turns, Sequence):
                raise ValueError(
                    f"`bot_turns` must be a sequence with one list of turns per batch row, got {type(bot_turns).__name__}"
                )
            self._turn_bans: list[dict[tuple[int, ...], set[int]]] = []
            for i, turns in enumerate(bot_turns):
                if isinstance(turns, (str, bytes)) or not isinstance(turns, Sequence):
                    raise ValueError(f"`bot_turns[{i}]` must be a sequence of token-id lists, got {type(turns).__name__}")
                bans: dict[tuple[int, ...], set[int]] = {}
                for j, turn in enumerate(turns):
                    self._add_ngrams(bans, _check_token_ids(f"bot_turns[{i}][{j}]", turn))
                self._turn_bans.append(bans)
            self.bot_turns_given = len(self._turn_bans) > 0

        def _add_ngrams(self, bans: dict[tuple[int, ...], set[int]], tokens: Sequence[int]) -> None:
            n = self.ngram_size
            for k in range(len(tokens) - n + 1):
                bans.setdefault(tuple(tokens[k:k + n - 1]), set()).add(tokens[k + n - 1])

        def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
            _check_inputs(input_ids, scores, self.prompt_length)
            batch, vocab = scores.shape
            if self.bot_turns_given:
                _check_batch("bot_turns", len(self._turn_bans), batch)
            n = self.ngram_size
            rows: list[int] = []
            cols: list[int] = []
            # Loops over rows and reply tokens only (tens per step), never over the vocabulary.
            for i, reply in enumerate(input_ids[:, self.prompt_length:].tolist()):
                if len(reply) < n - 1:
                    continue
                prefix = tuple(reply[len(reply) - n + 1:])
                banned = set(self._turn_bans[i].get(prefix, ())) if self.bot_turns_given else set()
                banned.update(reply[k + n - 1] for k in range(len(reply) - n + 1) if tuple(reply[k:k + n - 1]) == prefix)
                for token in banned:
                    if token < vocab:
                        rows.append(i)
                        cols.append(token)
            mask = torch.zeros((batch, vocab), dtype=torch.bool, device=scores.device)
            if rows:
                mask[torch.tensor(rows, device=scores.device), torch.tensor(cols, device=scores.device)] = True
            return scores.masked_fill(mask, float("-inf"))

    for cls in (BotRepetitionPenalty, ReplyNoRepeatNGram):
        # Name them as module-level classes so pickling and reprs find them here.
        cls.__module__ = __name__
        cls.__qualname__ = cls.__name__
    return {"BotRepetitionPenalty": BotRepetitionPenalty, "ReplyNoRepeatNGram": ReplyNoRepeatNGram}


def __getattr__(name: str) -> Any:
    if name in _PROCESSORS:
        return _processor_classes()[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_PROCESSORS))


if TYPE_CHECKING:  # pragma: no cover
    class BotRepetitionPenalty(LogitsProcessor):
        def __init__(self, penalty: float, bot_token_ids: Sequence[Sequence[int]], prompt_length: int): ...
        def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor: ...

    class ReplyNoRepeatNGram(LogitsProcessor):
        def __init__(self, ngram_size: int, prompt_length: int,
                     bot_turns: Sequence[Sequence[Sequence[int]]] = ()): ...
        def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor: ...


# ---------------------------------------------------------------------------------------
# plain-text duplicate detection

# An apostrophe inside a word is dropped rather than spaced, so "don't" and "dont" agree.
_INNER_APOSTROPHE = re.compile(r"(?<=\w)['\u2019\u02bc](?=\w)")


def normalize_for_comparison(text: str) -> str:
    """NFKC, casefold, punctuation to spaces, whitespace collapsed: "Hi,  THERE!" -> "hi there".

    Only punctuation (Unicode category P*) goes; symbols and emoji carry meaning and stay.
    """
    text = unicodedata.normalize("NFKC", text).casefold()
    text = _INNER_APOSTROPHE.sub("", text)
    text = "".join(" " if unicodedata.category(ch).startswith("P") else ch for ch in text)
    return " ".join(text.split())


def _words(text: str) -> list[str]:
    return normalize_for_comparison(text).split()


def _check_threshold(threshold: float) -> float:
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not 0.0 < threshold <= 1.0:
        raise ValueError(f"`threshold` must be in (0, 1], got {threshold!r}")
    return float(threshold)


def similarity(a: str, b: str) -> float:
    """How alike two texts are, 0..1: difflib's ratio over their normalised word lists.

    Words, not characters, so "I like tea" and "I like trees" are not near-duplicates just
    because they share letters. Two texts that normalise to the same words (both empty
    included) score 1.0; an empty text against a non-empty one scores 0.0.
    """
    # autojunk off: on short replies its "popular element" heuristic would discard real words.
    return difflib.SequenceMatcher(None, _words(a), _words(b), autojunk=False).ratio()


def max_similarity(reply: str, previous: Sequence[str]) -> float:
    """The highest `similarity` of ``reply`` to any of ``previous``; 0.0 when there are none."""
    return max((similarity(reply, p) for p in previous), default=0.0)


def is_repeat(reply: str, previous: Sequence[str], threshold: float) -> bool:
    """Whether ``reply`` is at least ``threshold`` similar to one of ``previous``."""
    threshold = _check_threshold(threshold)
    return max_similarity(reply, previous) >= threshold


def distinct_n(texts: Sequence[str], n: int) -> float:
    """Distinct n-grams over all n-grams of the texts' normalised words (distinct-n).

    n-grams never span two texts. 1.0 means no n-gram repeats; 0.0 when there are no n-grams.
    """
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"`n` must be an integer of at least 1, got {n!r}")
    grams = [tuple(words[k:k + n]) for words in map(_words, texts) for k in range(len(words) - n + 1)]
    return len(set(grams)) / len(grams) if grams else 0.0


def repeated_turn_rate(replies: Sequence[str], threshold: float = 0.8, window: int = 5) -> float:
    """Share of replies after the first that repeat (`is_repeat`) one of the ``window`` before them.

    0.0 for fewer than two replies.
    """
    threshold = _check_threshold(threshold)
    if isinstance(window, bool) or not isinstance(window, int) or window < 1:
        raise ValueError(f"`window` must be an integer of at least 1, got {window!r}")
    if len(replies) < 2:
        return 0.0
    repeats = sum(is_repeat(replies[i], replies[max(0, i - window):i], threshold) for i in range(1, len(replies)))
    return repeats / (len(replies) - 1)
