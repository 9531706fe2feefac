"""Streamed text equals stored text: `ReplyText` on every kind of tokenizer the project supports
(the shipped sentencepiece one with byte fallback, one trained in the test, GPT-2's byte-level BPE),
with characters split over several tokens, and the generators' streams on top of it."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from chatbot.decoding import DecodingSettings
from chatbot.generation import DEFAULT_MODEL, GenerationRequest, LocalGenerator, ReplyText
from chatbot.prompting import cut_at_stop

STOPS = ["\n", " ada:", "<|endoftext|>"]
TRICKY = [
    "hi 😀 café 日本 👍🏽",
    "naïve — “quoted” ümlaut ok",
    "ends with an emoji 🎉",
    "🎉🎉 starts with two",
    "Ωmega and ∑um, 12°C",
    "family 👨‍👩‍👧 and a flag 🇫🇷 done",
]


@pytest.fixture(scope="module")
def shipped_tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(DEFAULT_MODEL)


@pytest.fixture(params=["shipped", "trained", "byte-level"])
def tokenizer(request, shipped_tokenizer, tiny_tokenizer, byte_level_tokenizer):
    return {"shipped": shipped_tokenizer, "trained": tiny_tokenizer, "byte-level": byte_level_tokenizer}[request.param]


def byte_pieces(tokenizer) -> frozenset[int]:
    from chatbot.generation import _BYTE_PIECE

    return frozenset(i for piece, i in tokenizer.get_vocab().items() if _BYTE_PIECE.fullmatch(piece))


def stream_of(tokenizer, ids, stops=STOPS):
    """What a stream shows for ``ids`` arriving one token at a time, and the text it ends on."""
    reply = ReplyText(tokenizer, stops, byte_pieces(tokenizer))
    pieces = []
    for token in ids:
        reply.add([token])
        pieces.append(reply.release())
        if reply.stopped:
            break
    pieces.append(reply.release(final=True))
    return pieces, reply.text.strip()


@pytest.mark.parametrize("text", TRICKY)
def test_pieces_join_to_the_whole_reply_decoded(tokenizer, text):
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    pieces, final = stream_of(tokenizer, ids)
    whole = tokenizer.decode(ids, skip_special_tokens=False).strip()
    assert "".join(pieces) == final == whole
    assert not any("\ufffd" in p for p in pieces), "a half-decoded character was shown"


def test_a_character_is_shown_only_once_all_its_bytes_have_come(shipped_tokenizer):
    ids = shipped_tokenizer("ok 日本", add_special_tokens=False)["input_ids"]
    pieces, _ = stream_of(shipped_tokenizer, ids)
    shown = [p for p in pieces if p]
    # "日" decodes alone after its third byte, but the next byte turns the run into four U+FFFD
    # until "本" is complete: nothing of it is released before the end.
    assert shown == ["ok", " 日本"]


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_any_token_sequence_streams_to_its_decoded_text(tokenizer, data):
    """Random ids, byte pieces among them (lone, truncated and invalid UTF-8 included)."""
    vocab = len(tokenizer)
    ids = data.draw(st.lists(st.integers(0, vocab - 1), max_size=30))
    pieces, final = stream_of(tokenizer, ids)
    raw = tokenizer.decode(ids, skip_special_tokens=False)
    assert "".join(pieces) == final == cut_at_stop(raw, STOPS)[0].strip()


def test_a_stop_string_split_over_tokens_is_never_shown(tokenizer):
    ids = tokenizer("fine thanks ada: and you", add_special_tokens=False)["input_ids"]
    pieces, final = stream_of(tokenizer, ids)
    assert "".join(pieces) == final == "fine thanks"


def byte_level_generator(byte_level_tokenizer, tmp_path):
    from tests.conftest import save_tiny_gpt2

    out = save_tiny_gpt2(byte_level_tokenizer, tmp_path / "byte-level-gpt2", context=128)
    return LocalGenerator.from_pretrained(out, device="cpu")


def requests_with_odd_bytes(gen):
    """Sampled replies of a random tiny model: they are full of byte pieces that do not form characters."""
    stops = tuple(gen.format.stop_strings(["ada", "Bot"]))
    return [GenerationRequest(f"ada: {user}\nBot:", DecodingSettings(temperature=1.5, top_k=0, top_p=1.0,
                                                                       max_new_tokens=24, seed=seed), stops,
                              trim_to_sentence=False)
            for seed, user in enumerate(["hi 😀", "café?", "日本 is far", "what now 🎉", "ok"])]


@pytest.mark.parametrize("kind", ["trained", "byte-level"])
def test_the_generators_stream_exactly_what_they_return(kind, tiny_dir, byte_level_tokenizer, tmp_path):
    from chatbot.scheduler import BatchingGenerator

    gen = (LocalGenerator.from_pretrained(tiny_dir, device="cpu") if kind == "trained"
           else byte_level_generator(byte_level_tokenizer, tmp_path))
    batching = BatchingGenerator(gen, max_batch=4)
    try:
        odd = 0
        for request in requests_with_odd_bytes(gen):
            returned = gen.generate([request])[0].text
            odd += "\ufffd" in returned or any(ord(ch) > 127 for ch in returned)
            assert "".join(gen.stream(request)) == returned
            assert "".join(batching.stream(request)) == batching.generate([request])[0].text
        assert odd, "no reply had a character outside ASCII: the test shows nothing"
    finally:
        batching.close()
