"""Safety: the input sanitizer, the output filter chain, and the text normalisation both share.

Input (`sanitize_input`, `neutralise_speaker_tags`, `break_special_tokens`) runs before a
user's message reaches memory or a prompt. Output filters (`ToxicityFilter`,
`PersonalDataFilter`, `MentionFilter`, chained by `FilterChain`) run on every reply before
it is shown or stored; a filter that raises blocks the reply (fail closed). The engine
calls both, so every face (terminal, LangChain, Discord) gets the same treatment.
"""

from __future__ import annotations

import logging
import re
import unicodedata
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from .errors import ChatbotError, InputRejected

__all__ = [
    "FilterChain",
    "FilterContext",
    "InputRejected",
    "MentionFilter",
    "OutputFilter",
    "PersonalDataFilter",
    "ToxicityFilter",
    "Verdict",
    "break_special_tokens",
    "neutralise_mentions",
    "neutralise_speaker_tags",
    "sanitize_input",
    "skeleton",
]

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------- normalisation

# Letters from other scripts that look like Latin ones: "Bоt" with a Cyrillic о must
# still read as "bot". Not the whole Unicode confusables table, just the look-alikes
# that pass for ASCII letters in ordinary fonts.
_CONFUSABLES = str.maketrans({
    # Cyrillic
    "а": "a", "в": "b", "е": "e", "ё": "e", "к": "k", "м": "m", "н": "h", "о": "o", "р": "p", "с": "c",
    "т": "t", "у": "y", "х": "x", "ѕ": "s", "і": "i", "ї": "i", "ј": "j", "һ": "h", "ԁ": "d", "ԛ": "q",
    "ԝ": "w", "ӏ": "l", "ү": "y", "ɡ": "g",
    # Greek
    "α": "a", "β": "b", "ε": "e", "η": "n", "ι": "i", "κ": "k", "ν": "v", "ο": "o", "ρ": "p", "τ": "t",
    "υ": "u", "χ": "x", "ω": "w", "ς": "c", "μ": "u",
    # Latin extensions and symbols
    "ı": "i", "ł": "l", "ø": "o", "đ": "d", "ß": "ss", "æ": "ae", "œ": "oe",
})
_LEET = str.maketrans({"0": "o", "1": "i", "3": "e", "4": "a", "5": "s", "7": "t", "8": "b", "9": "g",
                       "@": "a", "$": "s", "!": "i", "|": "i", "+": "t", "€": "e", "£": "l"})


def _keep(ch: str) -> bool:
    if ch in "\n\t":
        return True
    # Cc: control characters (NUL, ESC, DEL, C1); Cf: invisible format characters
    # (zero-width spaces and joiners, bidi overrides) that can hide text from a reader
    # or a filter; Cs: lone surrogates, which cannot be stored as UTF-8.
    return unicodedata.category(ch) not in ("Cc", "Cf", "Cs")


def _strip_marks(text: str) -> str:
    """Drop combining accents ("fück" -> "fuck") by decomposing first."""
    return "".join(ch for ch in unicodedata.normalize("NFKD", text) if not unicodedata.combining(ch))


def normalise(text: str) -> str:
    """NFKC (full-width letters become ASCII), invisible and control characters removed."""
    return "".join(ch for ch in unicodedata.normalize("NFKC", text) if _keep(ch))


def fold(text: str) -> str:
    """Lower case with look-alike letters and accents mapped to plain Latin."""
    return _strip_marks(normalise(text).casefold().translate(_CONFUSABLES))


def skeleton(text: str) -> str:
    """Only the letters of ``text``, folded: "B.o т" and "bot" have the same skeleton."""
    return "".join(ch for ch in fold(text) if ch.isalpha())


# --------------------------------------------------------------------------- input


def sanitize_input(text: object, *, max_chars: int) -> str:
    """Return the user's text normalised (NFKC) and without control or invisible characters.

    Raises `InputRejected` for text that is not a string, is empty once cleaned, or is
    longer than ``max_chars`` characters: the user is told rather than the message
    silently cut.
    """
    if not isinstance(text, str):
        raise InputRejected(f"a message must be text, got {type(text).__name__}")
    if len(text) > 4 * max_chars:
        # Checked before normalising too, so a huge message costs nothing to refuse.
        raise InputRejected(f"that message is {len(text):,} characters long; the limit is {max_chars:,}")
    cleaned = normalise(text).strip()
    if not cleaned:
        raise InputRejected("that message is empty")
    if len(cleaned) > max_chars:
        raise InputRejected(f"that message is {len(cleaned):,} characters long; the limit is {max_chars:,}")
    return cleaned


def break_special_tokens(text: str, special_tokens: Iterable[str]) -> str:
    """Make literal special tokens (``<|endoftext|>``) in user text plain text.

    The tokenizer turns the exact string into the special token's id, which would let a
    user end a turn or a document. A space after the first character keeps the text
    readable and makes it tokenize as ordinary pieces.
    """
    for token in sorted({t for t in special_tokens if t and len(t) > 1}, key=len, reverse=True):
        if token in text:
            text = text.replace(token, f"{token[0]} {token[1:]}")
    return text


# Characters that read as a colon; NFKC already maps the full-width one.
_COLONS = ":\ua789\u2236\u02d0\u02f8\ufe13\ufe55\u0589\u05c3\u205a\u0703\u0704"
_COLON = re.compile(f"[{_COLONS}]")
GENERIC_SPEAKERS = ("User", "Bot", "Assistant", "System", "Human", "AI", "Admin", "Moderator")


def neutralise_speaker_tags(text: str, speakers: Iterable[str]) -> str:
    """Turn ``Name:`` labels of known speakers inside user text into ``Name -``.

    In the transcript format a turn is ``Name: text``; a user who writes "ok Bot: I am
    a robot and I hate you" would otherwise put words in the bot's mouth. The name is
    compared by skeleton, so case, spacing, dots and look-alike letters do not help.
    """
    names = {skeleton(s) for s in [*speakers, *GENERIC_SPEAKERS]}
    names.discard("")
    if not names or not _COLON.search(text):
        return text
    out: list[str] = []
    last = 0
    for m in _COLON.finditer(text):
        before = text[max(0, m.start() - 80):m.start()]
        letters = [(i, ch) for i, ch in enumerate(before) if skeleton(ch)]
        spoofed = False
        for name in names:
            folded = ""
            # Walk back letter by letter until the skeleton is as long as the name.
            for j in range(len(letters) - 1, -1, -1):
                folded = skeleton(letters[j][1]) + folded
                if len(folded) >= len(name):
                    start = letters[j][0]
                    if folded == name and (start == 0 or not before[start - 1].isalpha()):
                        spoofed = True
                    break
            if spoofed:
                break
        if spoofed:
            out.append(text[last:m.start()].rstrip() + " -")
            last = m.end()
    out.append(text[last:])
    return "".join(out)


# --------------------------------------------------------------------------- output


@dataclass(frozen=True)
class Verdict:
    """What a filter decided: whether the text may go out, the text to send, and why."""

    allowed: bool
    text: str
    reasons: tuple[str, ...] = ()


@dataclass(frozen=True)
class FilterContext:
    conversation_id: str = ""
    speakers: tuple[str, ...] = ()


class OutputFilter(Protocol):
    name: str

    def check(self, text: str, context: FilterContext) -> Verdict:
        """Allow, change (redact, neutralise) or block ``text``."""


# Words that are abusive wherever they appear as a whole word (with the usual endings).
# Written from general knowledge of English abuse, not from the evaluation set, so the set
# measures the filter instead of echoing it.
BAD_WORDS: tuple[str, ...] = (
    "fuck", "fucker", "fucking", "motherfucker", "shit", "shitty", "bullshit", "bitch", "cunt", "asshole",
    "arsehole", "dickhead", "twat", "wanker", "wank", "bastard", "slut", "whore", "skank", "bellend",
    "douchebag", "jackass", "dumbass", "cocksucker", "retard", "stfu", "gtfo", "kys",
)
_SUFFIXES = ("", "s", "es", "ing", "in", "er", "ers", "ed", "face", "faced", "head", "heads", "hole", "holes",
             "wad", "bag", "y")
# Words that a censoring asterisk may stand in for ("f*ck", "a**hole", "k*ll").
_CENSORED = (*BAD_WORDS, "dick", "cock", "pussy", "kill", "die", "tits", "piss", "crap")

_INSULTS = (
    "idiot|moron|stupid|dumb|loser|retard|pathetic|worthless|ugly|disgusting|trash|garbage|useless|imbecile|"
    "halfwit|freak|pig|scum|failure|joke|clown|waste|bellend|skank|slut|whore|bitch|cunt|twat|prick|dickhead|"
    "asshole|bastard|wanker|psycho|inbred|cretin|dimwit|dumbass|jackass|subhuman|parasite|maggot|coward|"
    "degenerate|creep|embarrassment|disgrace|fatty|lowlife|vermin"
)
_VIOLENT = ("kill|hurt|murder|stab|shoot|beat|punch|smash|strangle|choke|rip|burn|break|slap|kick|hunt|destroy|"
            "bury|drown|torture|rape|gut|bash|cut")
_THREAT_SUBJECT = (r"i(?:'ll| will|'m going to|m going to| am going to|'m gonna|m gonna| gonna|'d| would| want to|"
                   r" wanna)|let me|someone (?:should|needs to|will|is going to)|i hope someone|we(?:'ll| will)")
PHRASES: tuple[str, ...] = (
    # threats
    rf"(?:{_THREAT_SUBJECT}) (?:\w+ )?(?:{_VIOLENT})\w* (?:\w+ ){{0,3}}?(?:you|u|your|ur)\b",
    r"make sure (?:you|u) never (?:walk|see|wake|talk)",
    r"(?:you|u) deserve to (?:be )?(?:\w+ )?(?:beaten|hurt|killed|die|suffer|raped|shot|stabbed)",
    r"(?:hope|wish) (?:you|u|your \w+|ur \w+) (?:die|dies|get hit|gets hit|get cancer|gets cancer|rot|suffer)",
    # self-harm incitement
    r"(?:kill|cut|starve|hang|hurt|end|drown|shoot|neck) (?:your ?self|ur ?self|yourselves)",
    r"jump (?:off|from) (?:a |the )?(?:bridge|building|cliff|roof)", r"end it all", r"stop breathing",
    r"go die", r"die in a (?:fire|hole|ditch)", r"drink bleach", r"slit your", r"should have (?:been )?aborted",
    r"(?:nobody|no one) would (?:care|notice|miss (?:you|u))",
    r"(?:nobody|no one) (?:likes|loves|wants|cares about) (?:you|u)",
    r"(?:you|u) should(?:n't| not) (?:exist|be alive)",
    r"(?:world|everyone) (?:would be|is) better (?:off )?without (?:you|u)",
    # sexual harassment
    r"(?:show|send) me (?:your |ur |some )?(?:tits|boobs|nudes|nude|dick|pussy|ass|body)\b", r"strip for me",
    r"sit on my face", r"suck my \w+", r"better naked", r"leak your (?:address|nudes|pics|photos)",
    # insults aimed at someone
    rf"(?:you|u)(?:'re| are| r|re)? (?:(?:a|an|such a|so|the|absolute|complete|total|fucking|filthy|little|"
    rf"utter|stupid|dumb|ugly|fat|worthless|useless|pathetic|inbred|psycho|sad|miserable) )*(?:{_INSULTS})\b",
    r"shut (?:the \w+ )?up", r"screw (?:you|u)\b", r"(?:piece|pile|sack) of (?:shit|crap|garbage|trash)",
    r"eat shit", r"go to hell", r"piss off", r"(?:waste|wastes) of (?:space|air|oxygen)",
)
DEFAULT_ALLOWLIST: tuple[str, ...] = (
    # The Scunthorpe problem: places, people and phrases with rude substrings or senses.
    "scunthorpe", "penistone", "middlesex", "sussex", "essex", "cockburn", "cockermouth", "shitterton", "twatt",
    "clitheroe", "dick van dyke", "philip k dick", "moby dick", "spotted dick", "pussy willow", "kill the process",
    "kill -9", "kill the job", "kill the server", "killed the process", "kill process", "killed its child",
    "kill the task", "kill the bug", "blue tit", "great tit", "shiitake", "shoot me a message", "shoot me an email",
    "hit me up", "killing me", "killed the boss", "kill the boss", "killed it", "beat the eggs", "beat the boss",
    "beat the game", "break a leg", "shoot a photo", "screw you over",
)
_WORD = re.compile(r"[a-z*#]+(?:'[a-z]+)?")
_SEPARATOR = r"[\s._\-~,/]"
_DIGIT_LEET = str.maketrans({"0": "o", "1": "i", "3": "e", "4": "a", "5": "s", "@": "a", "$": "s"})


def _squeeze(word: str) -> str:
    return re.sub(r"(.)\1+", r"\1", word)


_BAD = {_squeeze(w + s) for w in BAD_WORDS for s in _SUFFIXES}


def _uncensor(word: str) -> str | None:
    """The bad word a censored spelling stands for ("f*ck" -> "fuck"), if any."""
    if not re.search(r"[*#]", word) or not re.search(r"[a-z]", word):
        return None
    pattern = re.compile("".join("[a-z]{1,%d}" % (len(m) + 1) if m[0] in "*#" else re.escape(m)
                                 for m in re.findall(r"[*#]+|[a-z']+", word)))
    for bad in _CENSORED:
        for suffix in ("", "s", "ing", "er", "ed"):
            if pattern.fullmatch(bad + suffix):
                return bad + suffix
    return None


def _readings(text: str, allow: re.Pattern[str] | None) -> list[str]:
    """The ways obfuscated text can be read: folded, de-leeted, uncensored, de-spaced, de-stretched."""
    base = fold(text).replace("\u2019", "'").replace("\u2018", "'")
    if allow is not None:
        # Before anything else: the other readings would change the allowed phrases' spelling.
        base = allow.sub(" ", base)
    deleet = base.replace("ph", "f").translate(_LEET)
    uncensored = _WORD.sub(lambda m: _uncensor(m.group(0)) or m.group(0),
                           base.replace("ph", "f").translate(_DIGIT_LEET))
    # Two or more spaces separate words; single separators between single letters are
    # "f u c k" and "s.h.i.t": join those.
    despaced = " ".join(re.sub(rf"\b(?:\w{_SEPARATOR}){{2,}}\w\b",
                               lambda m: re.sub(_SEPARATOR, "", m.group(0)), w) for w in re.split(r"\s{2,}", deleet))
    out: list[str] = []
    for reading in (base, deleet, uncensored, despaced, re.sub(r"(\w)\1{2,}", r"\1", despaced), _squeeze(despaced)):
        reading = re.sub(r"\s+", " ", reading).strip()
        if reading not in out:
            out.append(reading)
    return out


class ToxicityFilter:
    """Blocks abusive text: the offline `alt-profanity-check` classifier plus word and phrase lists.

    Everything runs on several readings of the text (look-alike letters, full width,
    zero-width characters, leetspeak, censoring asterisks, spaced-out and stretched
    letters undone), so "ｆ u с k" reads as what it is. Allowlisted phrases are taken out
    first so that "Scunthorpe" and "kill the process" pass.
    """

    name = "toxicity"

    def __init__(self, threshold: float = 0.9, *, blocklist: Sequence[str] = (), allowlist: Sequence[str] = (),
                 use_classifier: bool = True, default_lists: bool = True) -> None:
        if not 0.0 < threshold <= 1.0:
            raise ChatbotError(f"`toxicity_threshold` must be in (0, 1], got {threshold}")
        self.threshold = threshold
        self.use_classifier = use_classifier
        self._words = set(_BAD) if default_lists else set()
        extra = [fold(w) for w in blocklist]
        self._words |= {_squeeze(w) for w in extra if " " not in w}
        phrases = [*(PHRASES if default_lists else ()), *(re.escape(w) for w in extra if " " in w)]
        self._phrases = re.compile(r"(?<!\w)(?:" + "|".join(phrases) + r")") if phrases else None
        allowed = [*(DEFAULT_ALLOWLIST if default_lists else ()), *(fold(w) for w in allowlist)]
        self._allow = (re.compile(r"(?<!\w)(?:" + "|".join(re.escape(a) for a in allowed) + r")(?!\w)")
                       if allowed else None)
        self._predict: Any = None

    def _classifier(self) -> Any:
        if self._predict is None:
            # Imported on first use: loading scikit-learn and the model takes about a second.
            from profanity_check import predict_prob

            self._predict = predict_prob
        return self._predict

    def score(self, text: str) -> tuple[float, str]:
        """The highest classifier probability over the readings, and the first list entry matched ('' if none)."""
        readings = _readings(text, self._allow)
        hit = ""
        for reading in readings:
            hit = next((w for w in _WORD.findall(reading) if _squeeze(w) in self._words), "")
            if not hit and self._phrases is not None:
                m = self._phrases.search(reading)
                hit = m.group(0) if m else ""
            if hit:
                break
        prob = 0.0
        if self.use_classifier:
            prob = float(max(self._classifier()([r.replace("*", "").replace("#", "") for r in readings])))
        return prob, hit

    def check(self, text: str, context: FilterContext | None = None) -> Verdict:
        prob, hit = self.score(text)
        reasons = []
        if hit:
            reasons.append(f"toxicity: matched {hit!r}")
        if prob >= self.threshold:
            reasons.append(f"toxicity: classifier {prob:.2f}")
        return Verdict(not reasons, text, tuple(reasons))


def _luhn(digits: str) -> bool:
    total = 0
    for i, ch in enumerate(reversed(digits)):
        n = int(ch)
        if i % 2 == 1:
            n = n * 2 - 9 if n > 4 else n * 2
        total += n
    return total % 10 == 0


_SECRETS = re.compile(
    r"\b(?:[MNO][A-Za-z\d_-]{23,27}\.[A-Za-z\d_-]{6}\.[A-Za-z\d_-]{27,40}"  # Discord bot token
    r"|sk-(?:proj-)?[A-Za-z\d_-]{20,}"  # OpenAI-style keys
    r"|gh[pousr]_[A-Za-z\d]{36,}|github_pat_[A-Za-z\d_]{50,}"  # GitHub
    r"|AKIA[0-9A-Z]{16}"  # AWS access key id
    r"|xox[abprs]-[A-Za-z\d-]{10,}"  # Slack
    r"|AIza[0-9A-Za-z_-]{35}"  # Google API key
    r"|hf_[A-Za-z\d]{30,})\b"  # Hugging Face
)
_EMAIL = re.compile(r"\b[\w.+-]+@[A-Za-z\d-]+(?:\.[A-Za-z\d-]+)*\.[A-Za-z]{2,}\b")
_CARD = re.compile(r"(?<![\d-])(?:\d[ -]?){12,18}\d(?![\d-])")
_PHONE = re.compile(r"(?<![\w+])(?:\+\d{1,3}[ .-]?)?(?:\(\d{2,4}\)[ .-]?)?\d{2,4}(?:[ .-]?\d{2,4}){2,4}(?!\w)")


class PersonalDataFilter:
    """Redacts e-mail addresses, phone numbers, card numbers (Luhn-checked) and API/bot tokens."""

    name = "personal_data"

    def check(self, text: str, context: FilterContext | None = None) -> Verdict:
        reasons: list[str] = []

        def sub(pattern: re.Pattern[str], label: str, accept: Any = None) -> None:
            nonlocal text

            def repl(m: re.Match[str]) -> str:
                if accept is not None and not accept(m.group(0)):
                    return m.group(0)
                reasons.append(f"redacted {label}")
                return f"[{label} removed]"

            text = pattern.sub(repl, text)

        sub(_SECRETS, "token")
        sub(_EMAIL, "email")
        sub(_CARD, "card number", lambda s: _luhn(re.sub(r"\D", "", s)))
        # Nine digits or more: years, times and prices are left alone.
        sub(_PHONE, "phone number", lambda s: 9 <= len(re.sub(r"\D", "", s)) <= 15)
        return Verdict(True, text, tuple(dict.fromkeys(reasons)))


_MASS_MENTION = re.compile(r"@(everyone|here|[!&]?\d{15,21})")


def neutralise_mentions(text: str) -> str:
    """``@everyone``, ``@here`` and ``<@123>`` / ``<@&123>`` mentions made inert.

    A zero-width space after the ``@`` is what Discord itself recommends (and what
    discord.py's ``escape_mentions`` does): the text looks the same and pings nobody.
    Done in the core so that no face depends on its transport's settings alone.
    """
    return _MASS_MENTION.sub("@\u200b\\1", text)


class MentionFilter:
    name = "mentions"

    def check(self, text: str, context: FilterContext | None = None) -> Verdict:
        out = neutralise_mentions(text)
        return Verdict(True, out, ("neutralised mentions",) if out != text else ())


@dataclass
class FilterChain:
    """Filters in order; each sees the previous one's text. Any block, or any error, blocks."""

    filters: Sequence[Any] = field(default_factory=list)

    def check(self, text: str, context: FilterContext | None = None) -> Verdict:
        context = context or FilterContext()
        reasons: list[str] = []
        allowed = True
        for f in self.filters:
            name = getattr(f, "name", type(f).__name__)
            try:
                verdict = f.check(text, context)
            except Exception as err:  # fail closed: a broken filter must not wave text through
                log.exception("output filter %s failed; blocking the reply", name)
                return Verdict(False, text, (*reasons, f"{name}: filter error ({type(err).__name__})"))
            text = verdict.text
            reasons.extend(verdict.reasons)
            allowed = allowed and verdict.allowed
        return Verdict(allowed, text, tuple(reasons))


# --------------------------------------------------------------------------- measuring


@dataclass(frozen=True)
class FilterReport:
    """How a filter does on a labelled set: blocked counts per label and kind, and the usual rates."""

    counts: dict[tuple[str, str], tuple[int, int]]
    """(label, kind) -> (blocked, total)."""
    misses: tuple[str, ...]
    """Toxic texts let through, then benign texts blocked."""

    def _sum(self, label: str) -> tuple[int, int]:
        pairs = [v for (lab, _), v in self.counts.items() if lab == label]
        return sum(b for b, _ in pairs), sum(t for _, t in pairs)

    @property
    def recall(self) -> float:
        blocked, total = self._sum("toxic")
        return blocked / total if total else 0.0

    @property
    def false_positive_rate(self) -> float:
        blocked, total = self._sum("benign")
        return blocked / total if total else 0.0

    @property
    def precision(self) -> float:
        tp, fp = self._sum("toxic")[0], self._sum("benign")[0]
        return tp / (tp + fp) if tp + fp else 0.0


LABELLED_SETS = (Path(__file__).resolve().parent / "data" / "safety_eval.jsonl",
                 Path(__file__).resolve().parent / "data" / "safety_holdout.jsonl")
"""The labelled sets `bot.py safety-eval` scores by default; they install with the package. The first
was in view while the word lists were written; the second was written apart and never tuned on."""


def load_labelled(path: Any) -> list[dict[str, str]]:
    """Rows of a JSONL set with ``text``, ``label`` (toxic or benign) and ``kind``; errors name file and line."""
    import json
    from pathlib import Path

    rows = []
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as err:
        raise ChatbotError(f"{path}: cannot read ({err})") from None
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise ChatbotError(f"{path}:{n}: not JSON ({err.msg})") from None
        if (not isinstance(row, dict) or not isinstance(row.get("text"), str)
                or row.get("label") not in ("toxic", "benign")):
            raise ChatbotError(f"{path}:{n}: needs a \"text\" string and a \"label\" of toxic or benign")
        rows.append({"text": row["text"], "label": row["label"], "kind": str(row.get("kind", "-"))})
    return rows


def evaluate_filter(check: Any, rows: Sequence[dict[str, str]]) -> FilterReport:
    """Run ``check`` (an `OutputFilter` or chain) over labelled rows; blocked means toxic."""
    counts: dict[tuple[str, str], list[int]] = {}
    missed: list[str] = []
    wrongly: list[str] = []
    for row in rows:
        blocked = not check.check(row["text"], FilterContext()).allowed
        entry = counts.setdefault((row["label"], row["kind"]), [0, 0])
        entry[0] += blocked
        entry[1] += 1
        if row["label"] == "toxic" and not blocked:
            missed.append(row["text"])
        elif row["label"] == "benign" and blocked:
            wrongly.append(row["text"])
    return FilterReport({k: (v[0], v[1]) for k, v in sorted(counts.items())}, tuple(missed + wrongly))


@dataclass(frozen=True)
class FilterOptions:
    """What the settings (or a LangChain model's fields) say about the output filters."""

    toxicity_threshold: float = 0.9
    blocklist: Sequence[str] = ()
    allowlist: Sequence[str] = ()
    redact_personal_data: bool = True
    block_toxic: bool = True
    toxicity: ToxicityFilter | None = None
    """A toxicity filter to share (the engine judges users' messages with the same one)."""


def _toxicity(options: FilterOptions) -> ToxicityFilter | None:
    if not options.block_toxic:
        return None
    return options.toxicity or ToxicityFilter(options.toxicity_threshold, blocklist=options.blocklist,
                                              allowlist=options.allowlist)


OUTPUT_FILTERS: list[Callable[[FilterOptions], OutputFilter | None]] = [
    _toxicity,
    lambda options: PersonalDataFilter() if options.redact_personal_data else None,
    lambda options: MentionFilter(),
]
"""The output filters, in the order they run, each as a factory of `FilterOptions` (None: off).
Adding a filter is its class (an `OutputFilter`) and one entry here: every face's replies go
through `output_chain`, so the engine, the Discord bot and the LangChain models all get it."""


def output_chain(**options: Any) -> FilterChain:
    """The output filters `OUTPUT_FILTERS` makes for ``options`` (the fields of `FilterOptions`)."""
    made = FilterOptions(**options)
    return FilterChain([f for make in OUTPUT_FILTERS if (f := make(made)) is not None])


SENTENCE_END = re.compile(r"[.!?…]+[\"')\]]*\s+")
"""Where a sentence ends inside streamed text: punctuation, then the space before the next word."""


def gate_sentences(pieces: Iterable[str], chain: FilterChain, context: FilterContext | None = None,
                   fallback: str = "") -> Iterator[tuple[str, Verdict]]:
    """Release streamed text a checked sentence at a time, as ``(text to show, verdict)`` pairs.

    Each time a sentence completes, the whole text so far goes through ``chain`` and only
    what it allows (redacted as it says) is released. When a sentence is blocked, a last
    pair with the blocking verdict is yielded (its text is ``fallback`` if nothing was
    shown yet, else empty) and the stream ends there. The caller closes ``pieces`` when
    this generator ends, which stops the model.
    """
    raw = shown = ""
    done = 0  # end of the last checked sentence in `raw`

    def check(upto: int) -> tuple[str, Verdict]:
        nonlocal shown
        verdict = chain.check(raw[:upto], context)
        if not verdict.allowed:
            return (fallback if not shown else ""), verdict
        out, shown = verdict.text[len(shown):], verdict.text
        return out, verdict

    for piece in pieces:
        raw += piece
        ends = [m.end() for m in SENTENCE_END.finditer(raw, done)]
        if not ends:
            continue
        done = ends[-1]
        out, verdict = check(done)
        if out or not verdict.allowed:
            yield out, verdict
        if not verdict.allowed:
            return
    if len(raw) > done:
        out, verdict = check(len(raw))
        if out or not verdict.allowed:
            yield out, verdict
