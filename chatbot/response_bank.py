"""Replies people wrote, as candidates beside the model's own.

A `ResponseBank` holds (context, reply) pairs: the bundled chit-chat corpus's consecutive
messages (``chitchat``), or an operator's own file of FAQ answers and persona lines (JSON lines,
``{"context": "...", "reply": "..."}``). It is searched with TF-IDF over the contexts' words and
word pairs (scikit-learn's `TfidfVectorizer`: the standard sparse index, no model weights to ship).

`BankedGenerator` wraps a generator: for each request it takes the bank's best matches for the
conversation's newest turns (`GenerationRequest.context`) and the model's own reply, scores each
(`candidate_scores`: how much more likely the model finds it after this prompt than after the
bare speaker name, how much more likely the message being answered becomes after it, and how
closely its context matched), and returns the best. A small model judges fit far better than it
writes: see the judged figures in the README's model section.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
import pickle
import random
import re
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np

from .corpus import chitchat_conversations
from .errors import ChatbotError, CorpusError
from .generation import GenerationRequest, GenerationResult, final_text
from .recall import recall

__all__ = ["ResponseBank", "BankHit", "BankedGenerator", "BUNDLED_BANK", "cache_folder", "banked", "candidate_scores",
           "meaning_scores"]

log = logging.getLogger(__name__)

BUNDLED_BANK = "chitchat"
"""The name that means the bundled chit-chat corpus (the `chitchat-dataset` package)."""
MAX_REPLY_WORDS = 30
"""Corpus replies longer than this are left out of the bundled bank: long ones rarely fit another conversation."""
PREVIOUS_TURN_WEIGHT = 0.3
"""How much the turn before the message being answered counts in the search, against 1 for the message."""
SIMILARITY_WEIGHT = 2.0
"""How much a close match of the contexts counts in a candidate's score, against the model's judgement."""
PICK_SHARPNESS = 4.0
"""How strongly sampling settings favour the best-scored candidate over the next two."""
STYLE_WEIGHT = 0.5
"""What each preferred (or avoided) word of a persona's `style` adds to (or takes from) a candidate's score."""
BACKWARD_WEIGHT = 2.0
"""How much the backward score (the message following the candidate) counts; 0 leaves it out."""
UNCONDITIONAL_WEIGHT = 1.0
"""How much a candidate's likelihood without the conversation is taken off (1: pointwise mutual information)."""
MEANING_WEIGHT = 6.0
"""How much the cosine of a candidate's and the conversation's sentence embeddings counts
(`SentenceEncoder`); a cosine's spread among candidates is about a third of the model's scores'."""
MEANING_FLOOR = 0.5
"""Where a context's closeness by meaning starts to count as a match (`ResponseBank.search`): a
cosine of a half is about as close as two unrelated chat lines come."""
MEANING_TURNS = 3
"""The conversation's newest turns that a candidate's meaning is compared with."""
ECHO_COSINE = 0.7
"""A candidate closer than this in meaning to one of those turns starts to say it back, not answer it."""
ECHO_WEIGHT = 20.0
"""What each step of cosine beyond `ECHO_COSINE` takes off: "good morning!" to "good morning!!" is
left just above nothing, and the question the person asked two turns ago is not asked back."""


@dataclass(frozen=True)
class BankHit:
    reply: str
    similarity: float
    """How closely the conversation's newest turns matched the context this reply answered, 0 to 1:
    their cosine (TF-IDF), or by meaning how far the embeddings' cosine passes `MEANING_FLOOR`."""


class ResponseBank:
    """(context, reply) pairs, searched by the words of a conversation's newest turns."""

    def __init__(self, pairs: Sequence[tuple[str, str]], name: str = "bank", meaning: Any = None) -> None:
        from sklearn.feature_extraction.text import TfidfVectorizer

        cleaned = _cleaned(pairs)
        if not cleaned:
            raise ChatbotError(f"response bank {name}: no (context, reply) pairs with text")
        if meaning is not None and len(meaning) != len(cleaned):
            raise ChatbotError(f"response bank {name}: a meaning index of {len(meaning)} rows for {len(cleaned)} pairs")
        self.name = name
        self.meaning = meaning
        """The contexts' `MeaningIndex` (searched by meaning), or None (searched by words only)."""
        self.contexts = [c for c, _ in cleaned]
        self.replies = [r for _, r in cleaned]
        # Word pairs catch "do you like ..." questions; terms seen once are noise in a bank this size.
        self._vectorizer = TfidfVectorizer(ngram_range=(1, 2), min_df=2 if len(cleaned) > 1000 else 1,
                                           sublinear_tf=True)
        self._matrix = self._vectorizer.fit_transform(self.contexts)
        # The terms left out for being rare: only for introspection (scikit-learn's advice is to drop
        # them before pickling), and the largest part of a kept bank.
        self._vectorizer.stop_words_ = None
        self.contexts = []  # searched through the index from here on

    def __len__(self) -> int:
        return len(self.replies)

    @classmethod
    def load(cls, sources: str | Path | Sequence[str | Path], *, cache: Path | None = None,
             encoder: Any = None) -> ResponseBank:
        """One bank of every source's pairs: ``chitchat`` (the bundled corpus) or a JSON lines file of
        ``{"context", "reply"}`` objects. An operator's file beside the corpus is how FAQ answers
        win where they fit and stay out where they do not. With a `SentenceEncoder`, the contexts
        are indexed by meaning too (`MeaningIndex`; the bundled corpus's index ships with the project).

        Indexing takes seconds (an operator's file by meaning, about 300 contexts a second), so a
        built bank is kept in ``cache`` (default: the user's cache folder, `cache_folder`) and read
        from there next time, for as long as its sources, the encoder, this module's rules and
        scikit-learn's version stay the same.
        """
        names = check_sources(sources)
        # The bundled corpus first: its shipped index is then the start of the bank's.
        names = sorted(names, key=lambda n: n != BUNDLED_BANK)
        folder = cache_folder() if cache is None else cache
        kept = folder / f"bank-{_identity(names, encoder)}.pickle" if folder is not None else None
        if kept is not None and kept.is_file():
            try:
                with kept.open("rb") as f:
                    bank = pickle.load(f)  # only ever a file this function wrote (see below)
                if isinstance(bank, cls):
                    os.utime(kept)  # in use: the newest are the ones kept (`KEPT_BANKS`)
                    return bank
            except Exception as err:  # a damaged or foreign file: built again and replaced
                log.warning("response bank cache %s unreadable (%s); building it again", kept, err)
        parts = [_cleaned(_chitchat_pairs() if name == BUNDLED_BANK else _file_pairs(Path(name))) for name in names]
        pairs = [pair for part in parts for pair in part]
        meaning = _meaning_index(names, parts, encoder) if encoder is not None and pairs else None
        bank = cls(pairs, " + ".join(names), meaning)
        if kept is not None:
            _keep(bank, kept)
        return bank

    def search(self, turns: Sequence[str], k: int = 30, encoder: Any = None) -> list[BankHit]:
        """The replies to the ``k`` contexts most like the newest of ``turns`` (the one before counts
        `PREVIOUS_TURN_WEIGHT`), best first, each reply once: by meaning when the bank has a
        `MeaningIndex` and ``encoder`` is the `SentenceEncoder` that made it, else by words."""
        turns = [_clean(t) for t in turns if t and t.strip()][-2:]
        if not turns or k < 1:
            return []
        weights = [PREVIOUS_TURN_WEIGHT, 1.0][-len(turns):]
        by_meaning = encoder is not None and self.meaning is not None and encoder.name == self.meaning.encoder
        if by_meaning:
            scores = self.meaning.search(encoder.embed(turns), weights)
        else:
            scores = sum(w * (self._matrix @ self._vectorizer.transform([t]).T).toarray().ravel()
                         for w, t in zip(weights, turns))
        # The best 2k, then only those sorted: a full sort of the corpus costs more than the search.
        best = np.argpartition(-scores, 2 * k)[: 2 * k] if len(scores) > 2 * k else np.arange(len(scores))
        found: dict[str, float] = {}
        for i in best[np.argsort(-scores[best], kind="stable")]:
            if len(found) == k or (not by_meaning and scores[i] <= 0):
                break  # by words, a context with none of them is no match at all
            # By meaning every context is somewhat close; only what passes the floor is a match,
            # and the same context again is 1, as by words.
            similarity = (max(0.0, (float(scores[i]) / sum(weights) - MEANING_FLOOR) / (1 - MEANING_FLOOR))
                          if by_meaning else float(scores[i]))
            found.setdefault(self.replies[i], similarity)
        return [BankHit(reply, sim) for reply, sim in found.items()]


class BankedGenerator:
    """A `Generator` that answers with the best of the bank's matches and the model's own reply,
    or, when the person asks what they said about themselves, with that (`recall.recall`).

    The model behind it (``base``, a `LocalGenerator` or anything with its ``score``) writes one
    candidate and scores them all. Sampling settings choose among the best few with the request's
    seed (so a retry gets another reply); greedy ones take the best. A candidate the bot said
    recently, or longer than ``max_new_tokens``, is never chosen.
    """

    def __init__(self, base: Any, bank: ResponseBank, *, candidates: int = 30, encoder: Any = None) -> None:
        if candidates < 1:
            raise ChatbotError(f"`bank_candidates` must be at least 1, got {candidates}")
        self.base = base
        self.bank = bank
        self.candidates = candidates
        self.encoder = encoder
        """A `SentenceEncoder` whose cosines count in the scores (`MEANING_WEIGHT`), or None."""
        self.name = base.name
        self.format = base.format
        self.context_size = base.context_size
        self.tokenizer = getattr(base, "tokenizer", None)
        self.max_concurrency = getattr(base, "max_concurrency", 1)
        self._scorer = getattr(base, "base", base)  # a batching generator scores on its local one

    def count_tokens(self, text: str) -> int:
        return self.base.count_tokens(text)

    def encode(self, text: str) -> list[int]:
        return self.base.encode(text)

    def close(self) -> None:
        if hasattr(self.base, "close"):
            self.base.close()

    def generate(self, requests: Sequence[GenerationRequest]) -> list[GenerationResult]:
        own = self.base.generate(requests)
        return [self._choose(request, result) for request, result in zip(requests, own)]

    def stream(self, request: GenerationRequest) -> Iterator[str]:
        """The chosen reply in one piece (it is chosen whole, so nothing comes sooner)."""
        result = self.generate([request])[0]
        if result.text:
            yield result.text

    def _choose(self, request: GenerationRequest, own: GenerationResult) -> GenerationResult:
        if request.cancel is not None and request.cancel.is_set():
            return own
        started = time.perf_counter()
        said = {_key(t) for t in request.bot_texts}
        limit = request.settings.max_new_tokens
        style = request.style
        answer = recall(request.context)
        if answer is not None and style is not None:
            answer = style.write(answer)
        if answer is not None and _key(answer) not in said and self.count_tokens(answer) <= limit:
            # What the person told the bot about themselves, asked back: only the conversation knows it.
            return GenerationResult(answer, own.prompt_tokens, self.count_tokens(answer), "stop",
                                    own.seconds + time.perf_counter() - started)
        texts: list[str] = []
        sims: list[float] = []
        for hit in self.bank.search([text for _, text in request.context], self.candidates, self.encoder):
            if _key(hit.reply) in said or self.count_tokens(hit.reply) > limit or _stopped(hit.reply, request):
                continue
            if style is not None and not style.allows(hit.reply):
                continue
            texts.append(hit.reply)
            sims.append(hit.similarity)
        if own.text and _key(own.text) not in said:
            texts.append(own.text)
            sims.append(0.0)
        if not texts:
            return own
        message = next((text for role, text in reversed(request.context) if role == "user"), "")
        scores = candidate_scores(self._scorer, self.format, request.prompt, texts, sims, message)
        if self.encoder is not None:
            scores = [s + m for s, m in zip(scores, meaning_scores(self.encoder, request.context, texts))]
        if style is not None:
            scores = [s + STYLE_WEIGHT * style.fit(t) for s, t in zip(scores, texts)]
        best = self._pick(scores, request)
        text = style.write(texts[best]) if style is not None else texts[best]
        if text == own.text:
            return own
        return GenerationResult(final_text(text, "stop", request), own.prompt_tokens, self.count_tokens(text), "stop",
                                own.seconds + time.perf_counter() - started)

    @staticmethod
    def _pick(scores: list[float], request: GenerationRequest) -> int:
        order = sorted(range(len(scores)), key=lambda i: -scores[i])
        settings = request.settings
        if settings.greedy:
            return order[0]
        # Among the best three, the best most often: a score is a log-probability per token, and a
        # candidate half a nat behind is about 12 times less likely to be taken at temperature 0.8
        # (`PICK_SHARPNESS`). The request's seed makes it repeatable, and a retry's seed another pick.
        top = order[:3]
        weights = [math.exp((scores[i] - scores[top[0]]) * PICK_SHARPNESS / max(settings.temperature, 0.05))
                   for i in top]
        rng = random.Random(settings.seed)
        return rng.choices(top, weights)[0]


def check_sources(sources: str | Path | Sequence[str | Path]) -> list[str]:
    """The names of a bank's sources, each one checked: ``chitchat`` or a file that exists."""
    names = [str(sources)] if isinstance(sources, (str, Path)) else [str(s) for s in sources]
    if not names:
        raise ChatbotError("response bank: no source given")
    for name in names:
        if name != BUNDLED_BANK and not Path(name).is_file():
            raise ChatbotError(f"response bank {name}: no such file (give `{BUNDLED_BANK}` or a .jsonl file "
                               "of {\"context\": ..., \"reply\": ...} lines)")
    return names


SHIPPED_INDEX = Path(__file__).parent / "data" / "chitchat-meaning.npz"
"""The bundled corpus's contexts indexed by meaning (`bot.py bank-index` makes it)."""
KEPT_BANKS = 3
"""Built banks kept in the cache folder at most; the least recently used go first."""
BANK_RULES = 2
"""Changes when what goes into a bank, or how it is indexed, changes: older cached banks are then rebuilt."""


def cache_folder() -> Path | None:
    """Where built banks are kept: ``$CHATBOT_CACHE``, else ``$XDG_CACHE_HOME/gpt2-chatbot``, else
    ``~/.cache/gpt2-chatbot``; None when ``CHATBOT_CACHE`` is set empty (nothing kept)."""
    if "CHATBOT_CACHE" in os.environ:
        return Path(os.environ["CHATBOT_CACHE"]) if os.environ["CHATBOT_CACHE"].strip() else None
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "gpt2-chatbot"


def _identity(names: Sequence[str], encoder: Any = None) -> str:
    """A name for a bank's exact inputs: its source files (path, size, time), the rules, scikit-learn,
    and the encoder and the shipped meaning index when it is indexed by meaning."""
    import sklearn

    parts = [str(BANK_RULES), str(MAX_REPLY_WORDS), sklearn.__version__]
    if encoder is not None:
        parts.append(f"encoder {encoder.name}")
        if SHIPPED_INDEX.is_file():
            parts.append(f"{SHIPPED_INDEX}|{SHIPPED_INDEX.stat().st_size}|{SHIPPED_INDEX.stat().st_mtime_ns}")
    for name in names:
        if name == BUNDLED_BANK:
            import chitchat_dataset

            where = Path(chitchat_dataset.__file__).parent / "dataset.json"
        else:
            where = Path(name).resolve()
        stat = where.stat()
        parts.append(f"{where}|{stat.st_size}|{stat.st_mtime_ns}")
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:20]


def _meaning_index(names: Sequence[str], parts: Sequence[list[tuple[str, str]]], encoder: Any) -> Any:
    """The `MeaningIndex` of every part's contexts, in order: the shipped one for the bundled
    corpus when it was made from these very contexts by this encoder, the rest embedded now."""
    from .sentence_encoder import MeaningIndex, fingerprint

    index = None
    todo = list(zip(names, parts))
    if todo and todo[0][0] == BUNDLED_BANK and SHIPPED_INDEX.is_file():
        shipped, made_from = MeaningIndex.read(SHIPPED_INDEX)
        if shipped.encoder == encoder.name and made_from == fingerprint([c for c, _ in todo[0][1]]):
            index, todo = shipped, todo[1:]
        else:
            log.warning("the shipped meaning index (%s) was made from other contexts or by another encoder; "
                        "embedding the bundled corpus instead (minutes; kept in the cache folder after)",
                        SHIPPED_INDEX)
    contexts = [c for _, part in todo for c, _ in part]
    if contexts:
        started = time.perf_counter()
        vectors = encoder.embed(contexts, progress=len(contexts) > 5000)
        log.info("response bank: %d contexts embedded in %.1f s", len(contexts), time.perf_counter() - started)
        index = MeaningIndex.fit(encoder.name, vectors) if index is None else index.extended(vectors)
    return index


def _keep(bank: ResponseBank, path: Path) -> None:
    """Write ``bank`` to ``path`` whole or not at all; a cache that cannot be written only costs time."""
    temporary = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=".bank-")
        with os.fdopen(handle, "wb") as f:
            pickle.dump(bank, f, protocol=pickle.HIGHEST_PROTOCOL)
        os.replace(temporary, path)
        # Banks of sources that changed or went away (an edited file, another install of the
        # corpus) would pile up: the least recently used beyond `KEPT_BANKS` go.
        kept = sorted(path.parent.glob("bank-*.pickle"), key=lambda p: p.stat().st_mtime, reverse=True)
        for old in kept[KEPT_BANKS:]:
            old.unlink(missing_ok=True)
    except OSError as err:
        log.warning("response bank not kept in %s (%s); it is built again at the next start", path.parent, err)
        if temporary is not None:
            with contextlib.suppress(OSError):
                os.unlink(temporary)


def candidate_scores(scorer: Any, fmt: Any, prompt: str, texts: Sequence[str],
                     similarities: Sequence[float], message: str = "") -> list[float]:
    """How well each text fits as the reply to ``prompt``, the sum of:

    - forward: how much more likely ``scorer`` (a `LocalGenerator`) finds the text after the prompt
      than after the bot's name alone, per token (pointwise mutual information);
    - backward (`BACKWARD_WEIGHT`): how much more likely it finds ``message``, the one being
      answered, right after the text than with nothing before it. The same model read the other
      way, as DialoGPT's maximum-mutual-information reranking uses a backward model: a reply that
      could have led to the message is about it;
    - `SIMILARITY_WEIGHT` times how closely the text's own context matched (0 where there was none).
    """
    fit = scorer.score(prompt, texts)
    common = scorer.score(_bare_prompt(prompt, fmt), texts)
    scores = [f - UNCONDITIONAL_WEIGHT * c + SIMILARITY_WEIGHT * s for f, c, s in zip(fit, common, similarities)]
    speakers = _speakers(prompt, fmt)
    if message.strip() and BACKWARD_WEIGHT and speakers is not None:
        from .prompting import Utterance

        bot, user = speakers
        led = scorer.score([fmt.build_prompt([Utterance(bot, t)], user) for t in texts], [message] * len(texts))
        alone = scorer.score(fmt.build_prompt([], user), [message])[0]
        scores = [s + BACKWARD_WEIGHT * (b - alone) for s, b in zip(scores, led)]
    return scores


def meaning_scores(encoder: Any, context: Sequence[tuple[str, str]], texts: Sequence[str]) -> list[float]:
    """How close in meaning each text is to the conversation's newest turns (``context``: (role,
    text) pairs, oldest first), by ``encoder``'s sentence embeddings: `MEANING_WEIGHT` times the
    cosine with those turns together, less `ECHO_WEIGHT` times how far the cosine with any one of
    them passes `ECHO_COSINE` (a reply that says a turn again is close to it, and no answer)."""
    turns = [text for _, text in context[-MEANING_TURNS:] if text.strip()]
    if not turns or not texts:
        return [0.0] * len(texts)
    together = [" ".join(turns)] if len(turns) > 1 else []
    rows = encoder.cosines([*together, *turns], texts)
    scores = []
    for n in range(len(texts)):
        echo = max(row[n] for row in rows[len(together):])
        scores.append(MEANING_WEIGHT * rows[0][n] - ECHO_WEIGHT * max(0.0, echo - ECHO_COSINE))
    return scores


def _speakers(prompt: str, fmt: Any) -> tuple[str, str] | None:
    """The bot's and the person's names in a transcript prompt (``...\nUser: hi\nSam:``)."""
    if getattr(fmt, "name", "") != "transcript":
        return None
    lines = prompt.rsplit("\n", 2)
    if len(lines) < 2 or ":" not in lines[-2]:
        return None
    return lines[-1].rstrip(":").strip(), lines[-2].split(":", 1)[0].strip()


def _bare_prompt(prompt: str, fmt: Any) -> str:
    """The prompt's last line alone (``Sam:``): what a reply's likelihood is compared against."""
    if getattr(fmt, "name", "") == "transcript" and "\n" in prompt:
        return prompt.rsplit("\n", 1)[1]
    return getattr(fmt, "eos_token", "")


def _stopped(text: str, request: GenerationRequest) -> bool:
    """Whether ``text`` holds one of the request's stop strings (another speaker's turn would begin)."""
    return any(stop and stop in text for stop in request.stop_strings if stop != "\n")


def _key(text: str) -> str:
    return " ".join(text.casefold().split())


_SPACE = re.compile(r"\s+")


def _clean(text: Any) -> str:
    return _SPACE.sub(" ", str(text)).strip()


def _cleaned(pairs: Sequence[tuple[Any, Any]]) -> list[tuple[str, str]]:
    """``pairs`` with their spaces made single, those without a context or a reply left out."""
    cleaned = [(_clean(c), _clean(r)) for c, r in pairs]
    return [(c, r) for c, r in cleaned if c and r]


def _file_pairs(path: Path) -> list[tuple[str, str]]:
    """The (context, reply) pairs of an operator's JSON lines file; a bad line is an error naming it."""
    pairs = []
    with path.open(encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                item = json.loads(line)
                pair = (item["context"], item["reply"])
            except (ValueError, KeyError, TypeError):
                raise CorpusError(f"{path}:{n}: expected a JSON object with \"context\" and \"reply\" "
                                  "strings") from None
            if not all(isinstance(x, str) for x in pair):
                raise CorpusError(f"{path}:{n}: \"context\" and \"reply\" must be strings")
            pairs.append(pair)
    return pairs


def _chitchat_pairs() -> list[tuple[str, str]]:
    """Each message of the chit-chat corpus and the message that answered it."""
    pairs = []
    for _, said in chitchat_conversations():
        messages = [text for _, text in said]
        for context, reply in zip(messages, messages[1:]):
            if 2 <= len(reply.split()) <= MAX_REPLY_WORDS and len(context) < 300:
                pairs.append((context, reply))
    return pairs


def build_shipped_index(out: Path = SHIPPED_INDEX, encoder: str | None = None) -> int:
    """Embed the bundled corpus's contexts with ``encoder`` (default: the bundled one) and write
    their `MeaningIndex` to ``out`` (what `bot.py bank-index` does; minutes on two cores).
    Returns how many contexts it holds."""
    from .sentence_encoder import BUNDLED_ENCODER, MeaningIndex, fingerprint, load_encoder

    if not out.parent.is_dir():
        raise ChatbotError(f"{out.parent}: no such folder")
    model = load_encoder(encoder or BUNDLED_ENCODER)
    contexts = [c for c, _ in _cleaned(_chitchat_pairs())]
    index = MeaningIndex.fit(model.name, model.embed(contexts, progress=True))
    index.save(out, fingerprint(contexts))
    return len(index)


def banked(generator: Any, sources: Sequence[str], candidates: int, encoder: str | None = None) -> BankedGenerator:
    """``generator`` answering with the bank of ``sources`` as well (`ResponseBank.load`), its
    candidates' meanings compared by the sentence ``encoder`` (`load_encoder`) unless it is empty."""
    from .sentence_encoder import load_encoder

    started = time.perf_counter()
    meaning = load_encoder(encoder) if encoder else None
    bank = ResponseBank.load(sources, encoder=meaning)
    log.info("response bank %s: %d replies, indexed in %.1f s", bank.name, len(bank), time.perf_counter() - started)
    return BankedGenerator(generator, bank, candidates=candidates, encoder=meaning)

