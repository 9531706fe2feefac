"""Sentence embeddings in the response bank's choice: the bundled all-MiniLM-L6-v2, for real."""

import pytest

from chatbot.config import Settings
from chatbot.errors import ChatbotError
from chatbot.response_bank import BankedGenerator, ResponseBank, meaning_scores
from chatbot.sentence_encoder import BUNDLED_ENCODER, check_encoder, load_encoder
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
