"""Shared fixtures: a tiny GPT-2 built from a config (no files, no network)."""

from __future__ import annotations

import os
import tempfile

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
# Built response banks are kept for the run in a folder of its own, not in the user's cache.
os.environ.setdefault("CHATBOT_CACHE", tempfile.mkdtemp(prefix="chatbot-test-cache-"))

DIALOGUE = [
    [("ada", "hi there, how are you?"), ("bob", "i am good, thanks. and you?"), ("ada", "great, just got back from a run")],
    [("cy", "what are you reading these days?"), ("di", "a book about the ocean"), ("cy", "sounds fun, is it good?"),
     ("di", "yes, i like it a lot")],
    [("ed", "do you have any pets?"), ("fay", "a cat named pickles"), ("ed", "haha that is a great name")],
    [("gus", "what did you eat today?"), ("hal", "pasta with tomato sauce"), ("gus", "yum, i love pasta")],
]


def dialogue_jsonl(path, copies: int = 1) -> None:
    import json

    with open(path, "w", encoding="utf-8") as fh:
        for n in range(copies):
            for conv in DIALOGUE:
                turns = [{"speaker": s, "text": f"{t} ({n})" if n else t} for s, t in conv]
                fh.write(json.dumps(turns) + "\n")


@pytest.fixture(scope="session")
def tiny_tokenizer(tmp_path_factory):
    """A sentencepiece tokenizer trained by the project's own code on a small corpus."""
    from chatbot.prompting import TranscriptFormat
    from chatbot.tools.training import EOS_TOKEN, load_jsonl, render, train_tokenizer

    path = tmp_path_factory.mktemp("corpus") / "d.jsonl"
    dialogue_jsonl(path, copies=30)
    texts = render(load_jsonl(path), TranscriptFormat(EOS_TOKEN), EOS_TOKEN)
    return train_tokenizer(texts, tmp_path_factory.mktemp("tok"), vocab_size=400)


@pytest.fixture()
def tiny_model(tiny_tokenizer):
    return tiny_gpt2(tiny_tokenizer, context=64)


@pytest.fixture()
def tiny_dir(tmp_path, tiny_model, tiny_tokenizer):
    """The tiny model saved as a Hugging Face directory."""
    out = tmp_path / "tiny-gpt2"
    tiny_model.save_pretrained(out)
    tiny_tokenizer.save_pretrained(out)
    return out


@pytest.fixture()
def tiny_prompts(tmp_path):
    """Two short personas that fit the tiny model's 64-token context."""
    folder = tmp_path / "prompts"
    folder.mkdir()
    (folder / "tester.toml").write_text('name = "tester"\nspeaker = "Bot"\ndescription = "Bot is kind."\n'
                                        'preset = "greedy"\n', encoding="utf-8")
    (folder / "other.toml").write_text('name = "other"\nspeaker = "Pip"\npreset = "balanced"\n'
                                       '[[examples]]\nuser = "hi"\nbot = "yo"\n', encoding="utf-8")
    return folder


@pytest.fixture(scope="session")
def roomy_gen(tiny_tokenizer, tmp_path_factory):
    """A tiny GPT-2 generator with a 256-token context: room for a few turns, small enough to overflow."""
    from chatbot.generation import LocalGenerator

    out = save_tiny_gpt2(tiny_tokenizer, tmp_path_factory.mktemp("roomy-gpt2"), context=256)
    return LocalGenerator.from_pretrained(out, device="cpu")


def tiny_gpt2(tokenizer, *, context: int):
    """A tiny GPT-2 for ``tokenizer`` (seeded, so always the same weights), in eval mode."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(vocab_size=len(tokenizer), n_positions=context, n_embd=32, n_layer=2, n_head=2,
                        bos_token_id=tokenizer.eos_token_id, eos_token_id=tokenizer.eos_token_id,
                        chatbot_prompt_format="transcript")
    return GPT2LMHeadModel(config).eval()


def save_tiny_gpt2(tokenizer, out, *, context: int):
    """`tiny_gpt2` and ``tokenizer`` saved as a model directory."""
    tiny_gpt2(tokenizer, context=context).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def byte_level_tokenizer(tmp_path_factory):
    """A GPT-2-style byte-level BPE tokenizer (as GPT-2, DialoGPT and distilgpt2 use), trained here
    on the dialogue lines: every byte is a symbol, so a character outside the corpus is split into
    byte pieces that only decode to it together."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    texts = [f"{speaker}: {text}" for conv in DIALOGUE for speaker, text in conv]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts * 20, trainer)
    out = tmp_path_factory.mktemp("byte-level-tok")
    PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>").save_pretrained(out)
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(out)
