"""Self-chat: measure how repetitive the bot is, with the repetition controls on and off.

Each arm replays the same conversations with the same seeds through the real engine (a
throwaway in-memory store, safety filters as configured), against a scripted partner or
against the engine itself under another persona. Only the decoding's repetition controls
differ between the arms, so the difference in the numbers is theirs.
"""

from __future__ import annotations

import random
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from ..decoding import REPETITION_OFF
from ..repetition import distinct_n, normalize_for_comparison, repeated_turn_rate

PARTNER_LINES = (
    "hi! how are you doing today?", "what do you like to do for fun?", "do you have any pets?",
    "what kind of music do you listen to?", "i just got back from a run", "what did you have for dinner?",
    "do you like to travel?", "what is your favorite movie?", "i am so tired today", "tell me about your weekend",
    "do you play any sports?", "what are you reading these days?", "i love cooking pasta", "do you like the beach?",
    "what do you do for work?", "i started learning the guitar", "it is raining again here",
    "do you have any siblings?", "what is your favorite food?", "i want to go hiking this summer",
    "are you a morning person?", "what games do you play?", "i watched a great show last night",
    "do you like coffee or tea?", "what is the best place you have visited?", "i have an exam tomorrow",
    "do you like animals?", "what are your plans for tonight?", "i think i need a vacation", "ok, tell me more",
)


@dataclass
class ArmResult:
    name: str
    replies: list[list[str]] = field(default_factory=list)
    reply_tokens: list[int] = field(default_factory=list)
    seconds: float = 0.0
    regenerated: int = 0

    @property
    def all_replies(self) -> list[str]:
        return [r for conv in self.replies for r in conv]

    def metrics(self, threshold: float = 0.8) -> dict[str, float]:
        replies = self.all_replies
        rates = [repeated_turn_rate(conv, threshold) * (len(conv) - 1) for conv in self.replies]
        pairs = sum(max(len(conv) - 1, 0) for conv in self.replies)
        return {
            "repeated-turn rate": sum(rates) / pairs if pairs else 0.0,
            "looping replies": sum(_loops(r) for r in replies) / len(replies) if replies else 0.0,
            "distinct-1": distinct_n(replies, 1),
            "distinct-2": distinct_n(replies, 2),
            "mean reply tokens": sum(self.reply_tokens) / len(self.reply_tokens) if self.reply_tokens else 0.0,
            "replies regenerated": self.regenerated / len(replies) if replies else 0.0,
        }


def _loops(text: str) -> bool:
    """A reply that repeats a word 3-gram of itself ("i know i know i know")."""
    words = normalize_for_comparison(text).split()
    grams = [tuple(words[i:i + 3]) for i in range(len(words) - 2)]
    return len(grams) != len(set(grams))


async def run_arm(engine: Any, name: str, *, conversations: int, turns: int, seed: int, partner: str,
                  partner_persona: str, decoding: dict[str, Any], progress: Callable[[], None] | None = None,
                  ) -> ArmResult:
    result = ArmResult(name)
    started = time.perf_counter()
    for c in range(conversations):
        rng = random.Random(seed * 7919 + c)
        lines = list(PARTNER_LINES)
        rng.shuffle(lines)
        conversation = f"selfchat:{name}-{c}"
        other = f"selfchat:{name}-{c}-partner"
        replies: list[str] = []
        message = lines[0]
        for t in range(turns):
            turn_seed = seed * 1_000_003 + c * 1000 + t
            reply = await engine.respond(conversation, "User", message, decoding={**decoding, "seed": turn_seed})
            replies.append(reply.text)
            result.reply_tokens.append(reply.reply_tokens)
            result.regenerated += reply.attempts > 1
            if progress:
                progress()
            if partner == "scripted":
                message = lines[(t + 1) % len(lines)]
            else:
                answer = await engine.respond(other, reply.speaker, reply.text, persona=partner_persona,
                                              decoding={**decoding, "seed": turn_seed + 500})
                message = answer.text
        result.replies.append(replies)
    result.seconds = time.perf_counter() - started
    return result


def arms() -> list[tuple[str, dict[str, Any]]]:
    """Controls on (the persona's preset as it is) and off (every repetition control disabled)."""
    return [("on", {}), ("off", dict(REPETITION_OFF))]


def format_table(results: Sequence[ArmResult]) -> str:
    metrics = [r.metrics() for r in results]
    width = max(len(k) for k in metrics[0])
    lines = [" " * width + "".join(f"{'controls ' + r.name:>16}" for r in results)]
    for key in metrics[0]:
        cells = "".join(f"{m[key]:>16.3f}" if key != "mean reply tokens" else f"{m[key]:>16.1f}" for m in metrics)
        lines.append(f"{key:<{width}}{cells}")
    lines.append(f"{'seconds':<{width}}" + "".join(f"{r.seconds:>16.1f}" for r in results))
    return "\n".join(lines)


def sample_lines(result: ArmResult, n: int = 6) -> list[str]:
    return [re.sub(r"\s+", " ", r) for r in result.replies[0][:n]] if result.replies else []
