"""Turns and conversation ids.

A conversation id is a scope: ``discord:channel:42``, ``discord:dm:7``,
``langchain:session:abc``, ``cli:local``. It names whose history a turn belongs to, so
one history is never shared by everyone.
"""

from __future__ import annotations

import functools
import re
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any, Callable, Literal, Sequence

from .errors import ChatbotError, InvalidConversationId
from .generation import prompt_budget
from .prompting import Utterance

if TYPE_CHECKING:
    from .decoding import DecodingSettings
    from .generation import Generator

Role = Literal["user", "bot"]
ROLES = ("user", "bot")
MAX_CONVERSATION_ID_CHARS = 200
MAX_AUTHOR_CHARS = 100

# scope ":" rest, where rest is printable ASCII without spaces; anything else (control
# characters, spaces, quotes, slashes) is refused rather than silently rewritten, so two
# different inputs can never end up in the same conversation.
_CONVERSATION_ID = re.compile(r"[a-z][a-z0-9_-]*:[A-Za-z0-9_.:@#+=-]+")


def check_conversation_id(conversation_id: object) -> str:
    """Return the id unchanged if it is valid, else raise `InvalidConversationId` saying why."""
    if not isinstance(conversation_id, str):
        raise InvalidConversationId(f"conversation id must be a string, got {type(conversation_id).__name__}")
    if len(conversation_id) > MAX_CONVERSATION_ID_CHARS:
        raise InvalidConversationId(
            f"conversation id must be at most {MAX_CONVERSATION_ID_CHARS} characters, got {len(conversation_id)}"
        )
    if not _CONVERSATION_ID.fullmatch(conversation_id):
        raise InvalidConversationId(
            f"conversation id must look like 'scope:key' (e.g. 'discord:channel:42', 'cli:local') using letters, "
            f"digits and _.:@#+=-, got {conversation_id!r}"
        )
    return conversation_id


def check_author(author: object) -> str:
    if not isinstance(author, str) or not author.strip():
        raise ChatbotError(f"author must be a non-empty string, got {author!r}")
    if len(author) > MAX_AUTHOR_CHARS:
        raise ChatbotError(f"author must be at most {MAX_AUTHOR_CHARS} characters, got {len(author)}")
    return author



@dataclass(frozen=True)
class Turn:
    """One stored message of a conversation."""

    conversation_id: str
    author: str
    role: Role
    text: str
    created_at: float
    id: int
    author_key: str | None = None
    """Who wrote it, stably (``discord:user:42``): display names change and repeat, so forgetting
    and exporting a person go by this. Stored turns always carry one (the author name when the
    face had no better key); turns built only for a prompt may leave it None. Last, so positional
    construction keeps working."""

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


# --------------------------------------------------------------------------- rolling window


@dataclass(frozen=True)
class Window:
    """What goes into one prompt: pinned persona text, then the newest turns that fit."""

    preamble: str
    pinned: tuple  # example exchanges (prompting.Utterance), always kept
    turns: tuple[Turn, ...]
    dropped: tuple[int, ...]
    """Ids of conversation turns left out, oldest first."""
    cut: tuple[int, ...]
    """Ids of turns whose text was shortened to fit (only ever the newest one)."""
    tokens: int
    """Tokens the rendered window takes, measured with the model's tokenizer."""


def build_window(
    turns: Sequence[Turn],
    *,
    render: Callable[[str, Sequence[Any], Sequence[Turn]], str],
    count_tokens: Callable[[str], int],
    budget: int,
    preamble: str = "",
    pinned: Sequence[Any] = (),
    first_position: int = 0,
    chunk: int = 8,
) -> Window:
    """Choose the turns of one prompt.

    ``turns`` are the newest turns of a conversation, oldest first, and ``first_position``
    is the position of ``turns[0]`` in the whole conversation. ``render(preamble, pinned,
    turns)`` gives the prompt text, and ``count_tokens`` measures it, so the budget is in
    the model's own tokens.

    When turns must go, the oldest are dropped in whole chunks of ``chunk`` conversation
    positions: the first kept turn stays the same from one reply to the next until the
    window overflows again, so the prompt's prefix (and a cache of it) stays valid. A
    newest turn that cannot fit even alone is shortened, keeping its end; the pinned
    persona text is never pushed out.
    """
    if budget < 1:
        raise ChatbotError(f"the window budget must be at least 1 token, got {budget}")
    if chunk < 1:
        raise ChatbotError(f"`chunk` must be at least 1, got {chunk}")
    pinned = tuple(pinned)
    base = count_tokens(render(preamble, pinned, ()))
    if base > budget:
        raise ChatbotError(f"the persona text takes {base} tokens, more than the window's {budget}; "
                           "shorten its description or examples, or lower the reply budget")
    turns = list(turns)

    def fits(start: int, items: Sequence[Turn]) -> bool:
        return count_tokens(render(preamble, pinned, items[start:])) <= budget

    # Smallest start that fits, found by binary search (the rendered length only grows
    # as the start moves back).
    lo, hi = 0, len(turns)
    while lo < hi:
        mid = (lo + hi) // 2
        if fits(mid, turns):
            hi = mid
        else:
            lo = mid + 1
    start = lo
    if 0 < start < len(turns):
        # Round up to the next chunk boundary in conversation positions, unless that
        # would leave no turn at all (the budget holds less than a chunk).
        rounded = start + (-(first_position + start)) % chunk
        if rounded < len(turns):
            start = rounded
    cut: list[int] = []
    if turns and start >= len(turns):
        # Even the newest turn alone does not fit: keep it, shortened to its end.
        start = len(turns) - 1
        last = turns[-1]
        lo_c, hi_c = 0, len(last.text)
        while lo_c < hi_c:
            mid = (lo_c + hi_c) // 2
            candidate = [Turn(last.conversation_id, last.author, last.role, last.text[mid:], last.created_at, last.id)]
            if fits(0, candidate):
                hi_c = mid
            else:
                lo_c = mid + 1
        turns[-1] = Turn(last.conversation_id, last.author, last.role, last.text[lo_c:], last.created_at, last.id)
        cut.append(last.id)
    kept = tuple(turns[start:])
    return Window(preamble, pinned, kept, tuple(t.id for t in turns[:start]), tuple(cut),
                  count_tokens(render(preamble, pinned, kept)))


@dataclass(frozen=True)
class PromptPlan:
    """A window turned into model input: the prompt, where the reply must stop, what the bot said."""

    window: Window
    prompt: str
    stop_strings: tuple[str, ...]
    """The format's stops for every speaker in the window (and the ``speakers`` given)."""
    bot_texts: tuple[str, ...]
    """The bot's turns in the window, oldest first, for the repetition controls."""
    said: tuple[tuple[str, str], ...] = ()
    """The window's turns as (role, text), oldest first: `GenerationRequest.context`."""


def plan_prompt(turns: Sequence[Turn], *, fmt: Any, speaker: str, count_tokens: Callable[[str], int], budget: int,
                preamble: str = "", pinned: Sequence[Any] = (), speakers: Sequence[str] = (),
                first_position: int = 0, chunk: int = 8) -> PromptPlan:
    """The rolling window of ``turns`` rendered by ``fmt`` (a `PromptFormat`) for ``speaker`` to answer."""

    def render(pre: str, pin: Sequence[Any], kept: Sequence[Turn]) -> str:
        return fmt.build_prompt(list(pin) + [Utterance(t.author, t.text) for t in kept], speaker, pre)

    window = build_window(turns, render=render, count_tokens=count_tokens, budget=budget, preamble=preamble,
                          pinned=pinned, first_position=first_position, chunk=chunk)
    in_window = sorted({t.author for t in window.turns} | {speaker, *speakers})
    return PromptPlan(window, render(window.preamble, window.pinned, window.turns),
                      tuple(fmt.stop_strings(in_window)), tuple(t.text for t in window.turns if t.role == "bot"),
                      tuple((t.role, t.text) for t in window.turns))


def prompt_planner(generator: Generator, settings: DecodingSettings, *, speaker: str, preamble: str = "",
                   pinned: Sequence[Any] = (), speakers: Sequence[str] = (),
                   chunk: int = 8) -> Callable[..., PromptPlan]:
    """`plan_prompt` bound to ``generator`` (its prompt format, tokenizer and context) for a reply under
    ``settings``: the window gets the model's context less the reply's ``max_new_tokens``.

    The one place a reply's prompt is planned: the engine and the LangChain chat model both call
    it, so they build the same prompt from the same turns. The result takes the turns (and
    ``first_position``, the first one's place in the whole conversation).
    """
    return functools.partial(plan_prompt, fmt=generator.format, speaker=speaker, count_tokens=generator.count_tokens,
                             budget=prompt_budget(generator.context_size, settings), preamble=preamble,
                             pinned=pinned, speakers=speakers, chunk=chunk)
