"""Reply quality judged blind: the Meena paper's sensibleness and specificity average (SSA).

`write_replies` runs one or more *arms* (an engine from a settings file) over a set of everyday
contexts and writes, in one folder, what a judge needs and nothing more: ``items.jsonl`` (each
context and reply, shuffled over the arms, speakers A and B), ``JUDGING.md`` (the definitions),
and apart from them ``key.json`` (which arm wrote which item) and ``replies-<arm>.jsonl``.
Whoever judges, a person or a helper given only ``items.jsonl`` and ``JUDGING.md``, writes
``verdicts.jsonl``; `score` then gives each arm's figures.

A context set is JSON lines: ``{"id": ..., "turns": [{"role": "user" | "bot", "text": ...}, ...]}``
ending with a user turn (``reference``, a person's reply, is allowed and ignored here). The two
that ship, `prompts/eval/ssa-dev.jsonl` and `ssa-test.jsonl`, were written before any tuning;
tune on dev, report test.
"""

from __future__ import annotations

import asyncio
import json
import random
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from ..config import Settings
from ..errors import ChatbotError, CorpusError

__all__ = ["Arm", "load_contexts", "write_replies", "score", "JUDGING"]

USER, BOT = "User", "Sam"
"""Speaker names the contexts are replayed under (the bot's is the persona's in the prompt)."""

JUDGING = """# Judging replies

Each line of items.jsonl has a context (a chat between A, a person, and B; the last line is A's)
and B's reply. Judge each reply on its own, without trying to find out where it came from, and
write verdicts.jsonl: one line per item, in order,
{"item": "item-001", "sensible": 0 or 1, "specific": 0 or 1}.

- sensible: the reply makes sense in context: fluent and logical, consistent with the context
  (what B said earlier, facts A stated), a reasonable response to A's last message. Nonsense,
  contradictions, ignoring a direct question or answering the wrong thing: 0. When in doubt, 0.
- specific: only if sensible; 1 when the reply is specific to this context, so that it could not
  be given unchanged to most other messages. "ok", "lol", "that's cool", "what about you?": 0.

The same reply to the same context always gets the same verdict.
"""


@dataclass(frozen=True)
class Arm:
    name: str
    settings: Settings


def load_contexts(path: str | Path) -> list[dict[str, Any]]:
    """A context set; a malformed line is an error naming it."""
    path = Path(path)
    if not path.is_file():
        raise ChatbotError(f"{path}: no such context set")
    contexts = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
            turns = item["turns"]
            ok = (isinstance(item["id"], str) and turns and turns[-1]["role"] == "user"
                  and all(t["role"] in ("user", "bot") and isinstance(t["text"], str) and t["text"].strip()
                          for t in turns))
        except (ValueError, KeyError, TypeError, IndexError):
            ok = False
        if not ok:
            raise CorpusError(f"{path}:{n}: expected {{\"id\": ..., \"turns\": [{{\"role\": \"user\" or \"bot\", "
                              "\"text\": ...}, ...]}} ending with a user turn")
        contexts.append(item)
    if not contexts:
        raise ChatbotError(f"{path}: no contexts")
    return contexts


async def _arm_replies(arm: Arm, contexts: Sequence[dict[str, Any]], seed: int) -> list[dict[str, Any]]:
    from ..engine import ChatEngine

    engine = await asyncio.to_thread(ChatEngine.from_settings, arm.settings.model_copy(update={"memory_path": ":memory:"}))
    rows = []
    try:
        for n, item in enumerate(contexts):
            conversation = f"eval:{item['id']}"
            for turn in item["turns"][:-1]:
                await engine.remember(conversation, USER if turn["role"] == "user" else BOT, turn["text"],
                                      role=turn["role"])
            reply = await engine.respond(conversation, USER, item["turns"][-1]["text"],
                                         decoding={"seed": seed + n})
            rows.append({"id": item["id"], "reply": reply.text, "seconds": round(reply.timings["total"], 4)})
    finally:
        await engine.close()
    return rows


def write_replies(contexts: Sequence[dict[str, Any]], arms: Sequence[Arm], out: Path, *, seed: int = 1000) -> int:
    """Every arm's replies to every context, and the blind items for a judge, in ``out`` (which
    must not hold an earlier run's verdicts). Returns how many items there are to judge."""
    names = [arm.name for arm in arms]
    if not arms or len(set(names)) != len(names):
        raise ChatbotError(f"give each arm once, by a name of its own (got {', '.join(names) or 'none'})")
    if (out / "verdicts.jsonl").exists():
        raise ChatbotError(f"{out} already holds verdicts.jsonl; give a new folder")
    if not out.parent.is_dir():
        raise ChatbotError(f"{out.parent}: no such folder")
    replies = {arm.name: asyncio.run(_arm_replies(arm, contexts, seed)) for arm in arms}
    out.mkdir(exist_ok=True)
    items = [(name, item, row) for name in names for item, row in zip(contexts, replies[name])]
    random.Random(seed).shuffle(items)
    key = {}
    with (out / "items.jsonl").open("w", encoding="utf-8") as f:
        for n, (name, item, row) in enumerate(items, 1):
            label = f"item-{n:03d}"
            key[label] = {"arm": name, "id": item["id"]}
            context = [("A: " if t["role"] == "user" else "B: ") + t["text"] for t in item["turns"]]
            f.write(json.dumps({"item": label, "context": context, "reply": "B: " + row["reply"]}) + "\n")
    (out / "key.json").write_text(json.dumps(key, indent=1), encoding="utf-8")
    (out / "JUDGING.md").write_text(JUDGING, encoding="utf-8")
    for name in names:
        with (out / f"replies-{name}.jsonl").open("w", encoding="utf-8") as f:
            for row in replies[name]:
                f.write(json.dumps(row) + "\n")
    return len(items)


def score(out: Path) -> dict[str, dict[str, float]]:
    """Each arm's sensible and specific rates, SSA, replies judged and median seconds per reply,
    from ``out``'s key, replies and verdicts (every item must have one)."""
    try:
        key = json.loads((out / "key.json").read_text(encoding="utf-8"))
        lines = (out / "verdicts.jsonl").read_text(encoding="utf-8").splitlines()
    except FileNotFoundError as err:
        raise ChatbotError(f"{out}: no {Path(err.filename).name} (write the replies first, then the verdicts)") from None
    verdicts = {}
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            v = json.loads(line)
            verdicts[v["item"]] = (int(v["sensible"]), int(v["specific"]))
        except (ValueError, KeyError, TypeError):
            raise CorpusError(f"{out / 'verdicts.jsonl'}:{n}: expected {{\"item\", \"sensible\", \"specific\"}}") from None
    missing = sorted(set(key) - set(verdicts))
    if missing:
        raise ChatbotError(f"{out / 'verdicts.jsonl'}: no verdict for {len(missing)} items ({', '.join(missing[:3])}, ...)")
    results: dict[str, dict[str, float]] = {}
    for arm in sorted({k["arm"] for k in key.values()}):
        judged = [verdicts[item] for item, k in key.items() if k["arm"] == arm]
        sensible = sum(s for s, _ in judged) / len(judged)
        specific = sum(s and p for s, p in judged) / len(judged)
        seconds = [json.loads(line)["seconds"] for line in
                   (out / f"replies-{arm}.jsonl").read_text(encoding="utf-8").splitlines() if line.strip()]
        results[arm] = {"judged": len(judged), "sensible": round(sensible, 3), "specific": round(specific, 3),
                        "ssa": round((sensible + specific) / 2, 3), "median_seconds": round(statistics.median(seconds), 3)}
    (out / "results.json").write_text(json.dumps(results, indent=1), encoding="utf-8")
    return results


def hits_at_1(contexts: Sequence[dict[str, Any]], settings: Settings, *, distractors: int = 9,
              seed: int = 0) -> dict[str, float]:
    """How often the model ranks a context's reference reply above ``distractors`` references of
    other contexts (hits@1 of 10, as ConvAI2 reports it): by its likelihood alone, by the response
    bank's score (`candidate_scores`, no context similarity), and by that score with the sentence
    encoder's (`meaning_scores`, when `Settings.sentence_encoder` names one). A measure that needs
    no judge and runs in seconds; it follows how well a model can choose, not how well it writes."""
    from ..conversation import Turn
    from ..exchange import Exchanges
    from ..generation import LocalGenerator
    from ..memory import InMemoryStore
    from ..personas import PersonaBook
    from ..response_bank import candidate_scores, meaning_scores
    from ..sentence_encoder import load_encoder

    scored = [c for c in contexts if isinstance(c.get("reference"), str) and c["reference"].strip()]
    if len(scored) <= distractors:
        raise ChatbotError(f"hits@1 needs more than {distractors} contexts with a \"reference\" reply, "
                           f"got {len(scored)}")
    generator = LocalGenerator.from_pretrained(settings.model, device=settings.device,
                                               allow_download=settings.allow_download)
    book = PersonaBook(settings.prompts_dir, settings.persona, settings.preset, settings.decoding)
    persona = book.default
    decoding = book.decoding(persona, settings.preset or persona.preset, None)
    # The prompt the engine would build for these turns: its own planner.
    plan = Exchanges(generator, InMemoryStore(), book, settings, None).planner(persona, decoding)
    encoder = load_encoder(settings.sentence_encoder) if settings.sentence_encoder else None
    rng = random.Random(seed)
    likelihood = mutual = meaning = 0
    for n, item in enumerate(scored):
        others = [c["reference"] for m, c in enumerate(scored) if m != n]
        texts = [item["reference"], *rng.sample(others, distractors)]
        turns = [Turn("eval:hits", USER if t["role"] == "user" else persona.speaker, t["role"], t["text"], 0.0, i)
                 for i, t in enumerate(item["turns"])]
        prompt = plan(turns).prompt
        fit = generator.score(prompt, texts)
        likelihood += max(range(len(texts)), key=fit.__getitem__) == 0
        ranked = candidate_scores(generator, generator.format, prompt, texts, [0.0] * len(texts),
                                  item["turns"][-1]["text"])
        mutual += max(range(len(texts)), key=ranked.__getitem__) == 0
        if encoder is not None:
            said = [(t["role"], t["text"]) for t in item["turns"]]
            ranked = [r + m for r, m in zip(ranked, meaning_scores(encoder, said, texts))]
            meaning += max(range(len(texts)), key=ranked.__getitem__) == 0
    result = {"contexts": len(scored), "candidates": distractors + 1,
              "hits_at_1_likelihood": round(likelihood / len(scored), 3),
              "hits_at_1_bank_score": round(mutual / len(scored), 3)}
    if encoder is not None:
        result["hits_at_1_with_meaning"] = round(meaning / len(scored), 3)
    return result
