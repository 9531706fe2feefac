"""Sentence embeddings in the response bank's choice: the bundled all-MiniLM-L6-v2, for real."""

import json
import pickle

import numpy as np
import pytest

from chatbot.config import Settings
from chatbot.errors import ChatbotError
from chatbot.response_bank import BankedGenerator, ResponseBank, meaning_scores
from chatbot.sentence_encoder import BUNDLED_ENCODER, MeaningIndex, check_encoder, fingerprint, load_encoder
from tests.unit.test_response_bank import PAIRS, request


@pytest.fixture(scope="module")
def encoder():
    return load_encoder(BUNDLED_ENCODER)


def test_a_reply_about_the_message_is_closer_than_one_about_something_else(encoder):
    near, far = encoder.similarities("i just got a new puppy", ["aww what breed is it?", "the bus was late again"])
    assert -1 <= far < near <= 1 and near - far > 0.2
    rows = encoder.cosines(["coffee or tea?", "i ran my first 5k"], ["i prefer tea", "well done, how did it feel?", "x"])
    assert len(rows) == 2 and all(len(row) == 3 for row in rows)
    assert rows[0][0] > rows[0][1] and rows[1][1] > rows[1][0]
    assert encoder.cosines(["hi"], []) == [[]] and encoder.similarities("hi", []) == []
    assert load_encoder(BUNDLED_ENCODER) is encoder  # one per process, shared by every bank


def test_meaning_rewards_an_answer_and_not_a_turn_said_back(encoder):
    context = [("user", "good morning!!")]
    echo, answer, elsewhere = meaning_scores(encoder, context, ["good morning!!", "morning! did you sleep well?",
                                                                 "my car needs new tyres"])
    assert answer > echo and answer > elsewhere
    # The person's question from two turns ago, asked back, loses to a reply to what they said last.
    context = [("user", "weekend plans?"), ("bot", "just chatting here. you?"), ("user", "maybe a bbq")]
    asked_back, answered = meaning_scores(encoder, context, ["any fun plans this weekend?",
                                                             "ooh a bbq sounds great, burgers or ribs?"])
    assert answered > asked_back
    assert meaning_scores(encoder, [], ["a", "b"]) == [0.0, 0.0]
    assert meaning_scores(encoder, context, []) == []


def test_the_bank_weighs_meaning_when_given_an_encoder(roomy_gen, encoder):
    # The tiny model's own judgement is close to even between these; meaning decides.
    pairs = [("do you like music?", "i love music, mostly jazz and old soul records"),
             ("do you like music?", "the bus was late again this morning")]
    banked = BankedGenerator(roomy_gen, ResponseBank(PAIRS + pairs), candidates=5, encoder=encoder)
    assert banked.encoder is encoder
    assert banked.generate([request(["do you like music?"])])[0].text == pairs[0][1]
    assert BankedGenerator(roomy_gen, ResponseBank(PAIRS)).encoder is None


def test_a_mistyped_encoder_is_a_clear_error_and_creates_nothing(tmp_path):
    assert Settings().sentence_encoder == BUNDLED_ENCODER
    assert Settings(sentence_encoder="").sentence_encoder == ""
    check_encoder(BUNDLED_ENCODER)
    missing = tmp_path / "no-such-model"
    with pytest.raises(ChatbotError, match="not a sentence-transformers model folder"):
        check_encoder(str(missing))
    with pytest.raises(ChatbotError, match="not a sentence-transformers model folder"):
        load_encoder(str(missing))
    assert not missing.exists()


def test_the_engine_checks_the_encoder_before_loading_the_model(tmp_path):
    from chatbot.engine import load_generator

    with pytest.raises(ChatbotError, match="sentence encoder .*nope"):
        load_generator(Settings(model=str(tmp_path / "no-model"), sentence_encoder=str(tmp_path / "nope")))


def test_an_operators_bank_is_searched_by_meaning_and_kept_with_its_index(tmp_path, encoder):
    faq = tmp_path / "faq.jsonl"
    faq.write_text("".join(json.dumps({"context": c, "reply": r}) + "\n" for c, r in [
        ("who made you?", "the mods did"), ("server rules?", "be kind and no spam"),
        ("when is movie night?", "fridays at 8pm")]), encoding="utf-8")
    cache = tmp_path / "cache"
    bank = ResponseBank.load(faq, cache=cache, encoder=encoder)
    assert bank.meaning is not None and len(bank.meaning) == len(bank) == 3
    # No word in common with "who made you?", so the words find nothing; the meaning does.
    assert bank.search(["tell me your creator"], k=3) == []
    hits = bank.search(["tell me your creator"], k=3, encoder=encoder)
    assert hits[0].reply == "the mods did" and hits[0].similarity > 0
    assert bank.search(["any film evenings planned?"], k=1, encoder=encoder)[0].reply == "fridays at 8pm"
    kept = ResponseBank.load(faq, cache=cache, encoder=encoder)  # from the cache: the same index
    assert np.array_equal(kept.meaning.codes, bank.meaning.codes)
    assert ResponseBank.load(faq, cache=cache).meaning is None  # without an encoder: another bank
    assert len(list(cache.glob("bank-*.pickle"))) == 2


def test_a_meaning_index_keeps_the_nearest_rows_in_a_fraction_of_the_bytes():
    rng = np.random.default_rng(0)
    # Vectors that vary mostly along a few directions, as sentence embeddings do.
    vectors = rng.normal(size=(3000, 8)) @ rng.normal(size=(8, 64)) + 0.05 * rng.normal(size=(3000, 64))
    vectors = (vectors / np.linalg.norm(vectors, axis=1, keepdims=True)).astype(np.float32)
    index = MeaningIndex.fit("test", vectors, dimensions=16)
    assert index.codes.shape == (3000, 16) and index.codes.dtype == np.int8
    queries = vectors[:20]
    for n, query in enumerate(queries):
        assert int(np.argmax(index.search(query[None], [1.0]))) == n
    more = index.extended(vectors[:5])
    assert len(more) == 3005 and np.array_equal(more.codes[3000:], index.codes[:5])
    restored = pickle.loads(pickle.dumps(index))
    assert restored._rows is None and np.allclose(restored.search(queries[:1], [1.0]), index.search(queries[:1], [1.0]))
    small = MeaningIndex.fit("test", vectors[:10], dimensions=16)  # too few rows for main axes: all kept
    assert small.codes.shape == (10, 64)


def test_the_shipped_index_is_of_the_installed_corpus():
    from chatbot.response_bank import SHIPPED_INDEX, _chitchat_pairs, _cleaned

    index, made_from = MeaningIndex.read(SHIPPED_INDEX)
    contexts = [c for c, _ in _cleaned(_chitchat_pairs())]
    assert index.encoder == BUNDLED_ENCODER and len(index) == len(contexts) > 100_000
    assert made_from == fingerprint(contexts)
