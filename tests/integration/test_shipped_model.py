"""The model that ships under chatbot/models/: loads offline, chats plausibly, meets its quality bar."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from chatbot.decoding import DecodingSettings
from chatbot.generation import DEFAULT_MODEL, GenerationRequest, LocalGenerator
from chatbot.prompting import Utterance

ROOT = Path(__file__).resolve().parents[2]
GREETINGS = ["hi!", "hello, how are you?", "what do you do for fun?", "good morning", "do you like music?",
             "what is your favorite food?"]


@pytest.fixture(scope="module")
def shipped():
    return LocalGenerator.from_pretrained(None, device="cpu")


def test_default_model_is_the_shipped_one(shipped):
    assert Path(shipped.name) == DEFAULT_MODEL
    size = sum(f.stat().st_size for f in DEFAULT_MODEL.iterdir())
    assert size <= 40 * 1024 * 1024


def test_model_card_records_the_quality_bar():
    info = json.loads((DEFAULT_MODEL / "training_info.json").read_text())
    report = info["report"]
    assert report["unigram_perplexity"] / report["val_perplexity"] >= 10
    card = (DEFAULT_MODEL / "README.md").read_text()
    assert f"{report['val_perplexity']:.2f}" in card


@pytest.mark.parametrize("seed", [0, 1])
def test_replies_to_small_talk_are_plausible_turns(shipped, seed):
    fmt = shipped.format
    stops = tuple(fmt.stop_strings(["User", "Bot"]))
    settings = DecodingSettings(seed=seed)
    requests = [GenerationRequest(fmt.build_prompt([Utterance("User", g)], "Bot"), settings, stops) for g in GREETINGS]
    for greeting, result in zip(GREETINGS, shipped.generate(requests)):
        assert result.text.strip(), f"empty reply to {greeting!r}"
        assert "\n" not in result.text and "User:" not in result.text and "Bot:" not in result.text
        assert greeting not in result.text
        assert result.finish_reason in ("stop", "length")


def chat(tmp_path, lines, *argv):
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    env.pop("CHATBOT_PERSONA", None)
    return subprocess.run([sys.executable, str(ROOT / "bot.py"), "chat", "--seed", "0", *argv], input=lines,
                          capture_output=True, text=True, cwd=tmp_path, env=env, timeout=300)


def test_piped_chat_prints_one_reply_per_line_and_remembers_across_runs(tmp_path):
    proc = chat(tmp_path, "hi\nmy name is ada and i love hiking\n")
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert len(lines) == 2 and all(line.strip() for line in lines)
    assert proc.stderr == ""

    # A second run of the program continues the same conversation from chatbot.sqlite3.
    proc = chat(tmp_path, "/persona playful\nwhat do i love?\n")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines()[0] == "(now talking to Pip, persona playful)"
    import sqlite3

    with sqlite3.connect(tmp_path / "chatbot.sqlite3") as db:
        rows = db.execute("SELECT author, role, text FROM turns WHERE conversation_id = 'cli:local' ORDER BY id").fetchall()
    assert [r[1] for r in rows] == ["user", "bot"] * 3
    assert rows[2][2] == "my name is ada and i love hiking" and rows[4][2] == "what do i love?"
    assert [r[0] for r in rows[1::2]] == ["Sam", "Sam", "Pip"]


def test_unavailable_hub_model_is_one_line_error():
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    proc = subprocess.run([sys.executable, "bot.py", "generate", "--model", "example-org/not-a-real-model", "hi"],
                          capture_output=True, text=True, cwd=ROOT, env=env, timeout=300)
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1 and "not available offline" in proc.stderr and "Traceback" not in proc.stderr
