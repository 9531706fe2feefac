"""The model that ships under chatbot/models/: loads offline, chats plausibly, meets its quality bar."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from chatbot.generation import DEFAULT_MODEL, DecodingSettings, GenerationRequest, LocalGenerator
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


def test_piped_chat_prints_one_reply_per_line():
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    proc = subprocess.run([sys.executable, "bot.py", "chat", "--seed", "0"], input="hi\nwhat is your name?\n",
                          capture_output=True, text=True, cwd=ROOT, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert len(lines) == 2 and all(line.strip() for line in lines)
    assert proc.stderr == ""


def test_unavailable_hub_model_is_one_line_error():
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    proc = subprocess.run([sys.executable, "bot.py", "generate", "--model", "example-org/not-a-real-model", "hi"],
                          capture_output=True, text=True, cwd=ROOT, env=env, timeout=300)
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1 and "not available offline" in proc.stderr and "Traceback" not in proc.stderr
