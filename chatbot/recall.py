"""What a person told the bot about themselves, said back when they ask ("what's my name?").

A small model cannot copy a name from six lines up on purpose, and no reply in a bank knows
it, so this module answers those questions from the conversation itself. It is written by hand,
deliberately plain: a question about the person (a question with "my", "i" or "me" in it) is
matched against what they said earlier in the window, by the words the two share (and, for a
name or an age, by the usual ways of saying one), and the best match is turned round to the
second person ("i have two dogs" -> "you told me you have two dogs"), the way ELIZA turned
statements round. `recall` gives that reply, or None; the response bank (`BankedGenerator`)
puts it first among its candidates.
"""

from __future__ import annotations

import re
from typing import Sequence

__all__ = ["recall", "second_person"]

_WORD = re.compile(r"[a-z0-9']+")
_CLAUSE = re.compile(r"[.!?;,]+\s*|\s+(?:but|so|because)\s+")
_ON = re.compile(r"(?:in|at|near|on|from|with|by)\b")
"""A clause that starts like this goes on with the one before ("i live in canada, in vancouver")."""
_SELF = {"i", "i'm", "im", "me", "my", "mine", "myself", "i've", "ive", "i'll", "i'd", "am"}
# Words that carry no fact (question words, fillers, the verbs of asking); "from" and "with"
# stay out of this list because they ask for a place or a person ("where am i from?").
_FILLER = set("""a an the and or of to in on at for is are was were be been do does did doing have has had
i i'm im me my mine myself you your yours what whats what's who whom where when which how why again
remember said say tell told know think wait ok okay so lol haha anyway btw um uh hey hi hello just
really can could would will please yeah yes no not it its it's that this there here am ill i'll
ive i've id i'd many much""".split())
_SAME = {"went": "go", "going": "go", "goes": "go", "had": "have", "has": "have", "got": "get",
         "working": "work", "works": "work", "worked": "work", "lives": "live", "living": "live", "lived": "live",
         "favorite": "favourite", "called": "call", "named": "name"}
_NAME = re.compile(r"\b(?:i'?m|i am|my name is|my name's|call me|it'?s|its)\s+([a-z][a-z'-]{1,20})\b")
_AGE = re.compile(r"\b(?:i'?m|i am|i turned|turned)\s+(\d{1,3})\b")
_NOT_NAMES = {"a", "an", "the", "so", "just", "not", "good", "fine", "ok", "okay", "from", "going", "doing",
              "tired", "here", "back", "home", "at", "in", "on", "really", "very", "pretty", "also", "still"}

_TRAILING = {"btw", "lol", "haha", "lmao", "tho", "though", "anyway"}
_PAST = {"went", "got", "had", "made", "saw", "ran", "took", "came", "bought", "met", "moved", "started"}
_TURN = {"i": "you", "i'm": "you're", "im": "you're", "me": "you", "my": "your", "mine": "yours",
         "myself": "yourself", "i've": "you've", "ive": "you've", "i'll": "you'll", "i'd": "you'd",
         "am": "are", "was": "were"}


def _clauses(text: str) -> list[str]:
    """``text`` cut at its sentence and clause breaks, a place or a detail kept with its clause."""
    clauses: list[str] = []
    for part in _CLAUSE.split(text):
        if clauses and _ON.match(part.strip().lower()) and not set(_words(part)) & _SELF:
            clauses[-1] = f"{clauses[-1]}, {part.strip()}"
        else:
            clauses.append(part)
    return clauses


def second_person(text: str) -> str:
    """``text`` about the speaker, said to them: "i'm from porto" -> "you're from porto"."""
    words = text.strip().split()
    out = []
    for n, word in enumerate(words):
        core = word.rstrip(".,!?;:").lower()
        tail = word[len(word.rstrip(".,!?;:")):]
        if core == "was" and not (n and words[n - 1].lower() in ("i", "i'm")):
            out.append(word)  # "it was fun" stays; "i was there" -> "you were there"
            continue
        out.append(_TURN[core] + tail if core in _TURN else word)
    return " ".join(out)


def _words(text: str) -> list[str]:
    return [_SAME.get(w, w[:-1] if len(w) > 3 and w.endswith("s") and not w.endswith("ss") else w)
            for w in _WORD.findall(text.lower())]


def _asks_about_self(text: str) -> bool:
    lowered = text.lower()
    words = set(_WORD.findall(lowered))
    question = "?" in text or bool(words & {"what", "whats", "what's", "where", "who", "how", "remember"})
    return question and bool(words & {"my", "i", "me", "am"})


def recall(turns: Sequence[tuple[str, str]]) -> str | None:
    """The answer to the last turn, when it asks what the person said about themselves earlier
    in ``turns`` ((role, text) pairs, oldest first), else None."""
    if not turns or turns[-1][0] != "user" or not _asks_about_self(turns[-1][1]):
        return None
    question = turns[-1][1].lower()
    wanted = {w for w in _words(question) if w not in _FILLER}
    if "name" in question:
        for n in range(len(turns) - 2, -1, -1):
            role, text = turns[n]
            if role != "user":
                continue
            asked = n > 0 and turns[n - 1][0] == "bot" and "name" in turns[n - 1][1].lower()
            match = _NAME.search(text.lower())
            if match and match.group(1) not in _NOT_NAMES and (asked or not match.group(0).startswith("it")):
                return f"your name is {match.group(1).capitalize()}!"
            if asked and len(text.split()) <= 3:  # "leo", "it's leo"
                return f"your name is {text.split()[-1].strip('.!').capitalize()}!"
    if "old" in wanted or "age" in wanted:
        for role, text in reversed(turns[:-1]):
            match = _AGE.search(text.lower()) if role == "user" else None
            if match:
                return f"you told me you're {match.group(1)}."
    best, best_score = None, 0
    for role, text in turns[:-1]:
        if role != "user":
            continue
        for clause in _clauses(text):
            words = _words(clause)
            if not set(words) & _SELF:
                continue
            score = len(wanted & set(words))
            if score > best_score:  # the earliest of equal matches: what was said first about it
                best, best_score = clause, score
    if best is None:
        return None
    words = best.strip().split()
    while words and words[-1].lower().strip(".,!?") in _TRAILING:
        words.pop()
    if words and words[0].lower() not in _TURN and (words[0].lower() in _SAME or words[0].lower().endswith("ed")
                                                    or words[0].lower() in _PAST):
        words.insert(0, "I")  # "went hiking with my sister" was said of themselves
    return f"you told me {second_person(' '.join(words))}." if words else None
