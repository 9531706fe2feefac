"""The token-budgeted rolling window, measured with a real (tiny) tokenizer."""

import pytest

from chatbot.conversation import Turn, build_window
from chatbot.errors import ChatbotError
from chatbot.prompting import TranscriptFormat, Utterance, get_persona

FMT = TranscriptFormat()
PERSONA = get_persona("friendly")


def render(preamble, pinned, turns):
    return FMT.build_prompt(list(pinned) + [Utterance(t.author, t.text) for t in turns], PERSONA.speaker, preamble)


def make_turns(n, start_id=1):
    return [Turn("cli:local", "ada" if i % 2 == 0 else "Sam", "user" if i % 2 == 0 else "bot",
                 f"message number {i} about pasta and the ocean", 0.0, start_id + i) for i in range(n)]


@pytest.fixture()
def count(tiny_tokenizer):
    return lambda text: len(tiny_tokenizer(text, add_special_tokens=False)["input_ids"])


def window(turns, count, budget, **kw):
    kw.setdefault("preamble", PERSONA.description)
    kw.setdefault("pinned", PERSONA.example_turns("ada"))
    return build_window(turns, render=render, count_tokens=count, budget=budget, **kw)


def test_everything_fits(count):
    turns = make_turns(4)
    w = window(turns, count, 10_000)
    assert w.turns == tuple(turns) and w.dropped == () and w.cut == ()
    assert w.tokens == count(render(w.preamble, w.pinned, turns))


def test_exactly_full_and_one_token_over(count):
    turns = make_turns(6)
    full = count(render(PERSONA.description, PERSONA.example_turns("ada"), turns))
    assert window(turns, count, full, chunk=1).dropped == ()
    over = window(turns, count, full - 1, chunk=1)
    assert over.dropped == (turns[0].id,)
    assert over.tokens <= full - 1


def test_persona_stays_pinned_after_200_turns(count):
    turns = make_turns(200)
    w = window(turns, count, 300)
    text = render(w.preamble, w.pinned, w.turns)
    assert text.startswith(PERSONA.description + "\nada: hi!\nSam: hey!")
    assert w.tokens <= 300
    assert len(w.turns) < 200 and w.turns[-1] == turns[-1]
    assert w.dropped == tuple(t.id for t in turns[: 200 - len(w.turns)])


def test_turns_are_dropped_in_chunks_so_the_prefix_stays_stable(count):
    chunk, budget = 4, 500
    conversation = make_turns(60)
    starts, prefix_breaks = [], 0
    previous = None
    for n in range(1, 61):
        w = window(conversation[:n], count, budget, chunk=chunk)
        assert w.tokens <= budget
        first = w.turns[0].id
        starts.append(first)
        if w.dropped and len(w.turns) > chunk:
            # The first kept turn sits on a chunk boundary of conversation positions.
            assert (first - conversation[0].id) % chunk == 0
        if previous is not None and previous.turns[0].id == first:
            # Same start: the previous prompt (minus its reply cue) is a prefix of this one.
            before = render(previous.preamble, previous.pinned, previous.turns)[: -len("Sam:")]
            assert render(w.preamble, w.pinned, w.turns).startswith(before)
        elif previous is not None:
            prefix_breaks += 1
        previous = w
    # Dropping one turn at a time would change the start on nearly every turn once full.
    assert prefix_breaks <= len(set(starts))
    assert len(set(starts)) < 60 // 3


def test_window_uses_the_absolute_position_of_the_fetched_turns(count):
    # The same conversation fetched as its newest 40 turns chooses the same start.
    conversation = make_turns(100)
    whole = window(conversation, count, 500, chunk=4)
    newest = window(conversation[60:], count, 500, chunk=4, first_position=60)
    assert whole.turns == newest.turns


def test_single_giant_turn_is_cut_not_the_persona(count):
    giant = Turn("cli:local", "ada", "user", "word " * 5000 + "the end", 0.0, 99)
    w = window(make_turns(3) + [giant], count, 200)
    assert w.cut == (99,) and len(w.turns) == 1
    assert w.turns[0].text.endswith("the end")
    assert w.tokens <= 200
    assert render(w.preamble, w.pinned, w.turns).startswith(PERSONA.description)


def test_persona_larger_than_the_budget_is_a_clear_error(count):
    with pytest.raises(ChatbotError, match="the persona text takes"):
        window(make_turns(2), count, 10)


def test_budget_smaller_than_a_chunk_keeps_what_fits_without_cutting(count):
    conversation = make_turns(16)
    w = window(conversation, count, 250, chunk=4)
    assert w.cut == () and w.turns and w.turns[-1] == conversation[-1]
    assert w.tokens <= 250
