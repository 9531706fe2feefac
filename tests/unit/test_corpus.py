import json

import pytest

from chatbot.errors import CorpusError
from chatbot.prompting import Utterance
from chatbot.tools.training import (
    EOS_TOKEN,
    Conversation,
    clean_conversations,
    load_corpus,
    load_jsonl,
    load_text,
    split_conversations,
)


def test_jsonl_loads_turns(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps([{"speaker": "a", "text": "hi"}, {"speaker": "b", "text": "yo"}]) + "\n\n"
                    + json.dumps({"turns": [{"speaker": "a", "text": "x"}]}) + "\n")
    convs = load_jsonl(path)
    assert [c.turns for c in convs] == [[Utterance("a", "hi"), Utterance("b", "yo")], [Utterance("a", "x")]]


@pytest.mark.parametrize(
    "line, message",
    [
        ("{not json", "d.jsonl:2: not valid JSON"),
        ('"just a string"', "d.jsonl:2: expected a list of turns"),
        ('[{"speaker": "a"}]', 'd.jsonl:2: turn 1 has no "text" string'),
        ('[{"speaker": "a", "text": "hi"}, 5]', "d.jsonl:2: turn 2 is not an object"),
    ],
)
def test_malformed_jsonl_names_the_line(tmp_path, line, message):
    path = tmp_path / "d.jsonl"
    path.write_text('[{"speaker": "a", "text": "fine"}]\n' + line + "\n")
    with pytest.raises(CorpusError, match=message.replace("[", r"\[")):
        load_jsonl(path)


def test_missing_file_is_a_clear_error(tmp_path):
    with pytest.raises(CorpusError, match="no such file"):
        load_corpus(str(tmp_path / "missing.jsonl"))


def test_plain_text_labels_and_alternation(tmp_path):
    path = tmp_path / "d.txt"
    path.write_text("Ada: hi\nBob: hello there\n\nfirst line\nsecond line\n")
    convs = load_text(path)
    assert convs[0].turns == [Utterance("Ada", "hi"), Utterance("Bob", "hello there")]
    assert [t.speaker for t in convs[1].turns] == ["User", "Bot"]


def test_cleaning():
    long_turn = "word " * 200
    convs = [
        Conversation([Utterance("a", "  hi \n\n there "), Utterance("b", ""), Utterance("a", "again"),
                      Utterance("b", f"ok {EOS_TOKEN} fine\x07")]),
        Conversation([Utterance("a", "HI there again"), Utterance("b", "ok fine")]),  # duplicate: case is ignored
        Conversation([Utterance("a", "hi there again"), Utterance("b", "ok  fine")]),  # duplicate of the first
        Conversation([Utterance("a", "one"), Utterance("b", "two"), Utterance("a", long_turn),
                      Utterance("b", "three"), Utterance("a", "four")]),
        Conversation([Utterance("a", "alone")]),
    ]
    kept, stats = clean_conversations(convs, max_turn_chars=100)
    assert kept[0].turns == [Utterance("a", "hi there again"), Utterance("b", "ok fine")]
    assert stats.empty_turns == 1
    assert stats.duplicate_conversations == 2
    assert stats.overlong_turns == 1
    # The over-long turn splits its conversation; both halves survive.
    assert [t.text for t in kept[1].turns] == ["one", "two"]
    assert [t.text for t in kept[2].turns] == ["three", "four"]
    assert stats.too_short_conversations == 1
    assert stats.conversations_kept == len(kept) == 3


def test_split_is_by_conversation_and_seeded():
    convs = [Conversation([Utterance("a", str(i)), Utterance("b", "x")]) for i in range(100)]
    train, val = split_conversations(convs, 0.1, seed=3)
    assert len(val) == 10 and len(train) == 90
    assert not {id(c) for c in train} & {id(c) for c in val}
    again = split_conversations(convs, 0.1, seed=3)[1]
    assert [c.turns for c in again] == [c.turns for c in val]
    assert [c.turns for c in split_conversations(convs, 0.1, seed=4)[1]] != [c.turns for c in val]


def test_chitchat_corpus_loads():
    convs = load_corpus("chitchat")
    assert len(convs) == 7168
    speakers = {t.speaker for c in convs[:200] for t in c.turns}
    assert "User" in speakers and len(speakers) > 10


def test_non_utf8_file_names_the_line(tmp_path):
    path = tmp_path / "d.txt"
    path.write_bytes(b"Ada: hi\nBob: caf\xe9\n")
    with pytest.raises(CorpusError, match="d.txt:2: not UTF-8"):
        load_text(path)
