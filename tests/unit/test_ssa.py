"""`bot.py ssa`: every arm's replies, blind items for a judge, and the figures from the verdicts."""

import json
from pathlib import Path

import pytest

from bot import main
from chatbot.config import Settings
from chatbot.errors import ChatbotError, CorpusError
from chatbot.tools.ssa import Arm, load_contexts, score, write_replies

CONTEXTS = [
    {"id": "c1", "turns": [{"role": "user", "text": "hi there"}]},
    {"id": "c2", "turns": [{"role": "user", "text": "i'm maya"}, {"role": "bot", "text": "hi maya"},
                           {"role": "user", "text": "what's my name?"}], "reference": "maya!"},
]


def write_set(path, items):
    path.write_text("".join(json.dumps(i) + "\n" for i in items), encoding="utf-8")
    return path


def arm(name, tiny_dir, tiny_prompts, **values):
    return Arm(name, Settings(model=str(tiny_dir), prompts_dir=tiny_prompts, persona="tester", device="cpu",
                              decoding={"max_new_tokens": 6}, **values))


def test_replies_are_written_blind_and_scored_per_arm(tmp_path, tiny_dir, tiny_prompts):
    out = tmp_path / "run"
    arms = [arm("model", tiny_dir, tiny_prompts, response_bank=()), arm("greedy", tiny_dir, tiny_prompts,
                                                                         response_bank=(), preset="greedy")]
    assert write_replies(CONTEXTS, arms, out) == 4
    items = [json.loads(line) for line in (out / "items.jsonl").read_text().splitlines()]
    assert {i["item"] for i in items} == {"item-001", "item-002", "item-003", "item-004"}
    assert all(i["context"][-1].startswith("A: ") and i["reply"].startswith("B: ") for i in items)
    assert not any("model" in json.dumps(i) or "greedy" in json.dumps(i) for i in items)  # nothing names the arm
    key = json.loads((out / "key.json").read_text())
    assert sorted(k["arm"] for k in key.values()) == ["greedy", "greedy", "model", "model"]
    assert "sensible" in (out / "JUDGING.md").read_text()
    with pytest.raises(ChatbotError, match="no verdicts.jsonl"):
        score(out)
    verdicts = [{"item": i, "sensible": int(k["arm"] == "model"), "specific": int(k["id"] == "c2")}
                for i, k in key.items()]
    (out / "verdicts.jsonl").write_text("".join(json.dumps(v) + "\n" for v in verdicts[:-1]))
    with pytest.raises(ChatbotError, match="no verdict for 1 items"):
        score(out)
    (out / "verdicts.jsonl").write_text("".join(json.dumps(v) + "\n" for v in verdicts))
    results = score(out)
    assert results["model"]["judged"] == 2 and results["model"]["sensible"] == 1.0
    assert results["model"]["specific"] == 0.5 and results["model"]["ssa"] == 0.75
    assert results["greedy"]["ssa"] == 0.0  # specific counts only where sensible
    assert json.loads((out / "results.json").read_text()) == results
    with pytest.raises(ChatbotError, match="already holds verdicts"):
        write_replies(CONTEXTS, arms, out)
    with pytest.raises(ChatbotError, match="each arm once"):
        write_replies(CONTEXTS, [arms[0], arms[0]], tmp_path / "twice")


def test_a_malformed_context_line_is_named(tmp_path):
    good = write_set(tmp_path / "good.jsonl", CONTEXTS)
    assert [c["id"] for c in load_contexts(good)] == ["c1", "c2"]
    bad = write_set(tmp_path / "bad.jsonl", [CONTEXTS[0], {"id": "x", "turns": [{"role": "bot", "text": "hi"}]}])
    with pytest.raises(CorpusError, match="bad.jsonl:2: .*ending with a user turn"):
        load_contexts(bad)
    with pytest.raises(ChatbotError, match="no such context set"):
        load_contexts(tmp_path / "nope.jsonl")


def test_the_command_checks_its_arms_before_running_any(capsys, tmp_path):
    contexts = write_set(tmp_path / "set.jsonl", CONTEXTS)
    capsys.readouterr()
    code = main(["ssa", "replies", str(contexts), "--arm", "x=nope.toml", "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert code == 2 and err.strip() == "error: --arm x: nope.toml: no such settings file"
    assert not (tmp_path / "o").exists()
    code = main(["ssa", "score", str(tmp_path / "o")])
    assert code == 2 and "no key.json" in capsys.readouterr().err


def test_the_shipped_sets_are_well_formed_and_apart():
    folder = Path(__file__).resolve().parents[2] / "prompts" / "eval"
    dev, test = load_contexts(folder / "ssa-dev.jsonl"), load_contexts(folder / "ssa-test.jsonl")
    assert len(dev) == len(test) == 60
    assert not {c["turns"][-1]["text"] for c in dev} & {c["turns"][-1]["text"] for c in test}


def test_hits_at_1_ranks_each_reference_among_others(capsys, monkeypatch, tmp_path, tiny_dir, tiny_prompts):
    from chatbot.tools.ssa import hits_at_1

    contexts = [{"id": f"c{n}", "turns": [{"role": "user", "text": f"line {n}"}], "reference": f"reply {n}"}
                for n in range(12)]
    settings = Settings(model=str(tiny_dir), prompts_dir=tiny_prompts, persona="tester", device="cpu")
    result = hits_at_1(contexts, settings, distractors=9)
    assert result["contexts"] == 12 and result["candidates"] == 10
    assert 0 <= result["hits_at_1_likelihood"] <= 1 and 0 <= result["hits_at_1_bank_score"] <= 1
    assert 0 <= result["hits_at_1_with_meaning"] <= 1  # the bundled sentence encoder, on by default
    assert "hits_at_1_with_meaning" not in hits_at_1(contexts, settings.model_copy(update={"sentence_encoder": ""}))
    assert hits_at_1(contexts, settings, distractors=9) == result  # the same distractors for the same seed
    with pytest.raises(ChatbotError, match="more than 9 contexts"):
        hits_at_1(contexts[:5], settings)
    path = write_set(tmp_path / "set.jsonl", contexts)
    capsys.readouterr()
    monkeypatch.setenv("CHATBOT_PROMPTS_DIR", str(tiny_prompts))
    monkeypatch.setenv("CHATBOT_PERSONA", "tester")
    assert main(["ssa", "hits", str(path), "--model", str(tiny_dir), "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("hits@1 of 10 over 12 contexts: ") and "with the sentence encoder's" in out
