"""The style lab's numbers: what one cell of the grid (persona x preset x model) did.

Every function here is pure and works on plain transcripts, so the definitions can be
checked on hand-made examples (tests/unit/test_lab_metrics.py):

* distinct-n: distinct word n-grams over all n-grams of all the cell's replies
  (`repetition.distinct_n`, the selfchat definition).
* repeated-turn rate: of the bot replies that have an earlier bot reply in the same
  transcript, the share that are near-duplicates (`repetition.similarity` at least 0.8,
  the engine's `repeat_threshold`) of any earlier one.
* self-BLEU: how alike the samples of one turn are. Each sample's reply to a turn is a
  hypothesis and the other samples' replies to the same turn are its references; BLEU is
  taken over all turns at once (corpus-level, sacrebleu). 100 means every sample said the
  same; lower means more varied. Needs at least two samples.
* BLEU and chrF: the replies to turns that carry reference replies, scored against them
  (sacrebleu, corpus-level, default signatures).
* perplexity: exp of the mean negative log-likelihood per reply token, each reply scored
  under the model conditioned on the exact prompt the engine gave it (its window, persona
  and examples); token-weighted over the cell.
"""

from __future__ import annotations

import math
import statistics
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from ..repetition import distinct_n, is_repeat, normalize_for_comparison

__all__ = [
    "REPEAT_THRESHOLD",
    "SAFETY_KINDS",
    "LabTurn",
    "distinct",
    "repeated_turn_rate",
    "self_bleu",
    "reference_scores",
    "safety_counts",
    "latency_summary",
    "reply_nll",
    "perplexity",
    "cell_metrics",
]

REPEAT_THRESHOLD = 0.8
"""Similarity from which a reply counts as a repeat: the engine's default `repeat_threshold`."""

SAFETY_KINDS = ("clean", "toxic_regenerated", "unsafe_fallback", "redacted", "mentions", "filter_error",
                "refused_input")
"""What the safety counts count, per reply. ``clean``: no filter did anything. ``toxic_regenerated``:
an attempt was flagged as toxic and a later one went out. ``unsafe_fallback``: every attempt was
flagged and the unsafe fallback went out. ``redacted``: personal data was replaced. ``mentions``:
mass mentions were made inert. ``filter_error``: a filter raised (the attempt was blocked).
``refused_input``: the user line itself was refused as abusive. A reply may count in several
kinds except ``clean``."""


@dataclass(frozen=True)
class LabTurn:
    """One exchange of a transcript: the user's line and what the engine answered."""

    user: str
    reply: str
    reply_tokens: int = 0
    finish_reason: str = "stop"
    safety: tuple[str, ...] = ()
    attempts: int = 1
    refused: bool = False
    latency: float | None = None
    """Seconds the engine took for the whole exchange (`Reply.timings["total"]`); None for a
    refused line, which never reached the model and has no timing."""
    references: tuple[str, ...] = ()

    @property
    def model_written(self) -> bool:
        """The reply is the model's text, not a fallback or refusal the engine substituted."""
        return not self.refused and self.finish_reason not in ("fallback", "unsafe", "refused")


def distinct(replies: Sequence[str], n: int) -> float | None:
    """distinct-n over ``replies``; None when they hold no n-gram at all."""
    grams = sum(max(len(normalize_for_comparison(r).split()) - n + 1, 0) for r in replies)
    return distinct_n(replies, n) if grams else None


def repeated_turn_rate(transcripts: Sequence[Sequence[str]], threshold: float = REPEAT_THRESHOLD) -> float | None:
    """Share of bot replies that near-duplicate an earlier bot reply of the same transcript.

    Only replies that have an earlier one count in the denominator; None when no
    transcript has two replies.
    """
    pairs = repeats = 0
    for replies in transcripts:
        for i in range(1, len(replies)):
            pairs += 1
            repeats += is_repeat(replies[i], replies[:i], threshold)
    return repeats / pairs if pairs else None


def _bleu() -> Any:
    from sacrebleu.metrics import BLEU

    return BLEU()


def self_bleu(groups: Sequence[Sequence[str]]) -> float | None:
    """Corpus BLEU (0-100) of every sample against the other samples of its group.

    A group is the replies of all samples to one turn. All groups must be the same size
    (sacrebleu needs a fixed number of reference streams); None for fewer than two samples.
    """
    groups = [list(g) for g in groups if g]
    if not groups or len(groups[0]) < 2:
        return None
    k = len(groups[0])
    if any(len(g) != k for g in groups):
        raise ValueError(f"every group needs the same number of samples, got {sorted({len(g) for g in groups})}")
    hypotheses = [g[i] for g in groups for i in range(k)]
    # Stream j holds, for each hypothesis, the j-th of the *other* samples of its group.
    streams = [[g[j if j < i else j + 1] for g in groups for i in range(k)] for j in range(k - 1)]
    return _bleu().corpus_score(hypotheses, streams).score


def reference_scores(pairs: Sequence[tuple[str, Sequence[str]]]) -> tuple[float | None, float | None]:
    """Corpus (BLEU, chrF), 0-100, of replies against their reference replies.

    ``pairs`` holds (reply, references); turns may have different numbers of references.
    (None, None) when no reply has a reference.
    """
    from sacrebleu.metrics import CHRF

    pairs = [(hyp, list(refs)) for hyp, refs in pairs if refs]
    if not pairs:
        return None, None
    width = max(len(refs) for _, refs in pairs)
    hypotheses = [hyp for hyp, _ in pairs]
    # sacrebleu takes one stream per reference position; a turn with fewer references pads with None.
    streams = [[refs[j] if j < len(refs) else None for _, refs in pairs] for j in range(width)]
    return _bleu().corpus_score(hypotheses, streams).score, CHRF().corpus_score(hypotheses, streams).score


def safety_counts(turns: Sequence[LabTurn]) -> dict[str, int]:
    """How many replies fell in each of `SAFETY_KINDS` (``other`` for a filter note of a kind not listed)."""
    counts = dict.fromkeys((*SAFETY_KINDS, "other"), 0)
    for turn in turns:
        kinds = set()
        if turn.refused:
            kinds.add("refused_input")
        if turn.finish_reason == "unsafe":
            kinds.add("unsafe_fallback")
        for reason in turn.safety:
            if reason.startswith(("repeat:", "input ")):
                continue  # a regenerated repeat is not a safety matter; input notes come with `refused`
            if "filter error" in reason:
                kinds.add("filter_error")
            elif reason.startswith("toxicity"):
                kinds.add("unsafe_fallback" if turn.finish_reason == "unsafe" else "toxic_regenerated")
            elif reason.startswith("redacted"):
                kinds.add("redacted")
            elif reason == "neutralised mentions":
                kinds.add("mentions")
            else:
                kinds.add("other")
        for kind in kinds or ("clean",):
            counts[kind] += 1
    if not counts["other"]:
        del counts["other"]
    return counts


def latency_summary(seconds: Sequence[float | None]) -> tuple[float | None, float | None]:
    """(median, mean) of the per-reply latencies that were measured; (None, None) for none."""
    seconds = [s for s in seconds if s is not None]
    if not seconds:
        return None, None
    return statistics.median(seconds), statistics.fmean(seconds)


def reply_nll(model: Any, prompt_ids: Sequence[int], reply_ids: Sequence[int], context: int) -> tuple[float, int]:
    """Summed negative log-likelihood (nats) of ``reply_ids`` following ``prompt_ids`` under
    ``model``, and how many reply tokens it covers.

    Prompt and reply together are kept within ``context`` tokens: the prompt keeps its newest
    part, as generation does, and at least one token of it stays to predict the reply's first;
    a reply longer than that (its re-encoded text can outgrow what was generated) is scored
    on its beginning.
    """
    import torch
    import torch.nn.functional as F

    reply_ids = list(reply_ids)[:context - 1]
    if not reply_ids:
        return 0.0, 0
    prompt_ids = list(prompt_ids)[-(context - len(reply_ids)):] or [reply_ids[0]]
    ids = torch.tensor([prompt_ids + reply_ids], device=model.device)
    with torch.inference_mode():
        logits = model(input_ids=ids).logits[0].float()
    # The logits at position i predict token i + 1: the reply's tokens are predicted from
    # the last prompt position up to the second-to-last reply position.
    start = len(prompt_ids) - 1
    predicted = logits[start:start + len(reply_ids)]
    target = ids[0, start + 1:start + 1 + len(reply_ids)]
    return F.cross_entropy(predicted, target, reduction="sum").item(), len(reply_ids)


def perplexity(nll_sum: float, tokens: int) -> float | None:
    """exp(nll / tokens); None for no tokens."""
    return math.exp(nll_sum / tokens) if tokens else None


def cell_metrics(transcripts: Sequence[Sequence[LabTurn]], *, samples: int,
                 nll: tuple[float, int] | None = None) -> dict[str, Any]:
    """Every number of one cell, from its transcripts.

    ``transcripts`` is ordered sample by sample, each sample holding the same
    conversations in the same order (so replies to the same turn line up across samples).
    ``nll`` is (summed negative log-likelihood, scored tokens) over the model-written replies.
    """
    turns = [t for tr in transcripts for t in tr]
    replies = [t.reply for t in turns]
    per_sample = len(transcripts) // samples if samples else 0
    groups: list[list[str]] = []
    if samples >= 2 and per_sample * samples == len(transcripts):
        for c in range(per_sample):
            rows = [transcripts[s * per_sample + c] for s in range(samples)]
            groups.extend([row[t].reply for row in rows] for t in range(len(rows[0])))
    bleu, chrf = reference_scores([(t.reply, t.references) for t in turns])
    p50, mean = latency_summary([t.latency for t in turns])
    # A refusal or fallback is the engine's canned text, counted as 0 tokens: not a length the model chose.
    tokens = [t.reply_tokens for t in turns if t.model_written]
    return {
        "replies": len(turns),
        "reply_tokens": statistics.fmean(tokens) if tokens else None,
        "distinct_1": distinct(replies, 1),
        "distinct_2": distinct(replies, 2),
        "repeated_turn_rate": repeated_turn_rate([[t.reply for t in tr] for tr in transcripts]),
        "self_bleu": self_bleu(groups) if groups else None,
        "perplexity": perplexity(*nll) if nll else None,
        "bleu": bleu,
        "chrf": chrf,
        "latency_p50": p50,
        "latency_mean": mean,
        "regenerated": sum(t.attempts > 1 for t in turns),
        "safety": safety_counts(turns),
        "finish": dict(sorted(Counter(t.finish_reason for t in turns).items())),
    }


METRICS: Mapping[str, tuple[str, str, str, str]] = {
    # key: (label, number format, a few words for a chart title, the definition)
    "reply_tokens": ("reply tokens", "{:.1f}", "mean length",
                     "mean reply length in the model's tokens (fallback and refusal texts left out)"),
    "distinct_1": ("distinct-1", "{:.3f}", "higher = more varied words",
                   "distinct words over all words of the cell's replies (lower-cased, punctuation removed)"),
    "distinct_2": ("distinct-2", "{:.3f}", "higher = more varied",
                   "distinct adjacent word pairs over all pairs; a pair never spans two replies"),
    "repeated_turn_rate": ("repeated turns", "{:.3f}", "lower = fewer repeats",
                           "of the replies that have an earlier reply in the same transcript, the share at least "
                           f"{REPEAT_THRESHOLD} similar (word-level difflib ratio) to one of them"),
    "self_bleu": ("self-BLEU", "{:.1f}", "lower = samples differ more",
                  "corpus BLEU of each sample's reply against the other samples' replies to the same line; "
                  "100 = every sample said the same"),
    "perplexity": ("perplexity", "{:.1f}", "of the replies under the model",
                   "exp of the mean negative log-likelihood per reply token, each reply scored under the model "
                   "given the exact prompt the engine built for it (fallback and refusal texts left out)"),
    "bleu": ("BLEU", "{:.1f}", "against references",
             "corpus BLEU (sacrebleu defaults: 13a tokens, case-sensitive, exp smoothing) of the replies to lines "
             "that have reference replies, against those references"),
    "chrf": ("chrF", "{:.1f}", "against references",
             "corpus chrF (sacrebleu defaults: character 6-grams, beta 2) of the same replies"),
    "latency_p50": ("latency p50 s", "{:.2f}", "median seconds per reply",
                    "median seconds from message to stored reply (the engine's total time), retries included; "
                    "refused lines, which never reach the model, left out"),
    "latency_mean": ("latency mean s", "{:.2f}", "mean seconds per reply",
                     "mean seconds from message to stored reply, refused lines left out"),
}
"""The numeric metrics in display order."""
