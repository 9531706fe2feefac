"""Repetition controls: the two logits processors on hand-made tensors and inside a real
`generate` call with a tiny GPT-2, and the plain-text duplicate helpers."""

from __future__ import annotations

import pickle
import subprocess
import sys

import pytest
import torch
from transformers import (
    GPT2Config,
    GPT2LMHeadModel,
    LogitsProcessor,
    LogitsProcessorList,
    NoRepeatNGramLogitsProcessor,
)

from chatbot.repetition import (
    BotRepetitionPenalty,
    ReplyNoRepeatNGram,
    distinct_n,
    is_repeat,
    max_similarity,
    normalize_for_comparison,
    repeated_turn_rate,
    similarity,
)

INF = float("inf")


def banned(scores: torch.Tensor) -> list[list[int]]:
    """Per row, the token ids whose score is -inf."""
    return [torch.nonzero(row == -INF).flatten().tolist() for row in scores]


def trigrams(tokens: list[int]) -> list[tuple[int, ...]]:
    return [tuple(tokens[k:k + 3]) for k in range(len(tokens) - 2)]


# --- BotRepetitionPenalty ----------------------------------------------------------------

# Prompt of 4 tokens, then one generated token per row.
PEN_INPUT = torch.tensor([
    [1, 2, 3, 4, 5],  # bot said 3; 1, 2, 4 are the user's (or separators); generated 5
    [6, 2, 7, 0, 7],  # bot said 0 and 6; 2 and 7 are the user's; generated 7
])
PEN_BOT = [[3], [0, 6]]
PEN_SCORES = torch.tensor([
    [1.0, -1.0, 2.0, 4.0, -2.0, -3.0, 0.5, -INF],
    [2.0, 3.0, -4.0, 1.0, 1.0, 1.0, -INF, 6.0],
])


def test_bot_penalty_exact_values():
    out = BotRepetitionPenalty(2.0, PEN_BOT, prompt_length=4)(PEN_INPUT, PEN_SCORES)
    expected = torch.tensor([
        # 3 (bot's, positive) halved; 5 (generated, negative) doubled; 1, 2, 4 untouched.
        [1.0, -1.0, 2.0, 2.0, -2.0, -6.0, 0.5, -INF],
        # 0 (bot's) halved; 6 (bot's, -inf) stays -inf; 7 generated halved although the user
        # said it too; 2 occurs only in the user's words and keeps its -4.
        [1.0, 3.0, -4.0, 1.0, 1.0, 1.0, -INF, 3.0],
    ])
    assert torch.equal(out, expected)


def test_bot_penalty_leaves_user_only_tokens_alone():
    out = BotRepetitionPenalty(3.0, PEN_BOT, prompt_length=4)(PEN_INPUT, PEN_SCORES)
    # Every one of these is in input_ids, but only in the prompt and never in the bot's turns.
    assert torch.equal(out[0, [1, 2, 4]], PEN_SCORES[0, [1, 2, 4]])
    assert out[1, 2] == PEN_SCORES[1, 2]


def test_bot_penalty_picks_up_each_new_generated_token():
    proc = BotRepetitionPenalty(2.0, [[], []], prompt_length=2)
    scores = torch.full((2, 4), 4.0)
    first = proc(torch.tensor([[0, 1], [0, 1]]), scores)
    assert torch.equal(first, scores)  # nothing generated, nothing said by the bot
    later = proc(torch.tensor([[0, 1, 2, 3], [0, 1, 3, 3]]), scores)
    assert torch.equal(later, torch.tensor([[4.0, 4.0, 2.0, 2.0], [4.0, 4.0, 4.0, 2.0]]))


def test_bot_penalty_does_not_edit_scores_in_place():
    scores = PEN_SCORES.clone()
    out = BotRepetitionPenalty(2.0, PEN_BOT, prompt_length=4)(PEN_INPUT, scores)
    assert torch.equal(scores, PEN_SCORES)
    assert out.data_ptr() != scores.data_ptr()


def test_bot_penalty_of_one_is_a_no_op():
    scores = PEN_SCORES.clone()
    out = BotRepetitionPenalty(1.0, PEN_BOT, prompt_length=4)(PEN_INPUT, scores)
    assert torch.equal(out, PEN_SCORES)
    assert out.data_ptr() != scores.data_ptr()


def test_bot_penalty_ignores_ids_beyond_the_vocabulary():
    # The stock processor does the same: such ids cannot be generated, so there is nothing to penalise.
    out = BotRepetitionPenalty(2.0, [[3, 99], [0, 6]], prompt_length=4)(PEN_INPUT, PEN_SCORES)
    assert out[0, 3] == 2.0


@pytest.mark.parametrize(("penalty", "message"), [
    (0.5, "`bot_repetition_penalty` must be at least 1, got 0.5"),
    (0.0, "`bot_repetition_penalty` must be at least 1, got 0.0"),
    (float("nan"), "`bot_repetition_penalty` must be a finite number, got nan"),
    ("2", "`bot_repetition_penalty` must be a number, got '2'"),
])
def test_bot_penalty_refuses_bad_penalty(penalty, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        BotRepetitionPenalty(penalty, [[1]], prompt_length=0)


def test_bot_penalty_refuses_bad_token_ids_and_prompt_length():
    with pytest.raises(ValueError, match=r"`bot_token_ids\[0\]` must hold non-negative integer token ids, got -1"):
        BotRepetitionPenalty(1.2, [[-1]], prompt_length=0)
    with pytest.raises(ValueError, match="`prompt_length` must be at least 0, got -3"):
        BotRepetitionPenalty(1.2, [[1]], prompt_length=-3)


def test_bot_penalty_refuses_a_batch_of_another_size():
    proc = BotRepetitionPenalty(2.0, [[3]], prompt_length=4)
    with pytest.raises(ValueError, match=r"`bot_token_ids` has 1 row\(s\) but the batch has 2"):
        proc(PEN_INPUT, PEN_SCORES)


def test_processors_refuse_a_prompt_longer_than_the_input():
    with pytest.raises(ValueError, match="`prompt_length` is 9 but input_ids has only 5 positions"):
        BotRepetitionPenalty(2.0, PEN_BOT, prompt_length=9)(PEN_INPUT, PEN_SCORES)
    with pytest.raises(ValueError, match="`prompt_length` is 9 but input_ids has only 5 positions"):
        ReplyNoRepeatNGram(2, prompt_length=9)(PEN_INPUT, PEN_SCORES)


# --- ReplyNoRepeatNGram ------------------------------------------------------------------

def test_ngram_bans_repeats_within_the_reply():
    # n=2, prompt [9, 1, 2], reply [1, 2, 3, 1]: the reply's bigrams starting with its last
    # token 1 are (1, 2), so 2 is banned and nothing else.
    ids = torch.tensor([[9, 1, 2, 1, 2, 3, 1]])
    scores = torch.zeros(1, 10)
    assert banned(ReplyNoRepeatNGram(2, prompt_length=3)(ids, scores)) == [[2]]


def test_ngram_leaves_ngrams_of_the_users_words_alone():
    # The user wrote "1 2"; the reply so far is [4, 1]. Echoing "1 2" is allowed here,
    # while the stock processor, reading the whole sequence, forbids it.
    ids = torch.tensor([[1, 2, 5, 4, 1]])
    scores = torch.zeros(1, 10)
    assert banned(ReplyNoRepeatNGram(2, prompt_length=3)(ids, scores)) == [[]]
    assert banned(NoRepeatNGramLogitsProcessor(2)(ids, scores.clone())) == [[2]]


def test_ngram_bans_ngrams_of_earlier_bot_turns_but_not_across_turns():
    ids = torch.tensor([
        [7, 1, 4, 5, 5, 6, 7, 1],  # prompt [7, 1, 4], reply [5, 5, 6, 7, 1]
        [1, 2, 9, 1, 2, 6, 1, 2],  # prompt [1, 2, 9], reply [1, 2, 6, 1, 2]
    ])
    bot_turns = [
        [[7, 1, 2], [3, 4]],
        # Read as one stream these would hold (3, 1, 2) and (1, 2, 3); as turns they do not.
        [[1, 2, 8], [3, 1], [2, 3]],
    ]
    scores = torch.arange(20, dtype=torch.float).reshape(2, 10)
    out = ReplyNoRepeatNGram(3, prompt_length=3, bot_turns=bot_turns)(ids, scores)
    # Row 0: (7, 1, 2) from a bot turn bans 2; the prompt's (7, 1, 4) bans nothing.
    # Row 1: the reply's own (1, 2, 6) bans 6, the bot turn (1, 2, 8) bans 8; not 3 (it would
    # need a trigram across turns), not 9 (only the user's prompt has (1, 2, 9)).
    assert banned(out) == [[2], [6, 8]]
    keep = out != -INF
    assert torch.equal(out[keep], scores[keep])
    # The stock processor would ban 9 (from the prompt) instead of 8 (from the bot's turn).
    assert banned(NoRepeatNGramLogitsProcessor(3)(ids, scores.clone()))[1] == [6, 9]


def test_ngram_prefix_never_reaches_into_the_prompt():
    # The prompt ends in (7, 1) and a bot turn holds (7, 1, 2), but the reply is still empty.
    ids = torch.tensor([[7, 1]])
    out = ReplyNoRepeatNGram(3, prompt_length=2, bot_turns=[[[7, 1, 2]]])(ids, torch.zeros(1, 5))
    assert banned(out) == [[]]


def test_ngram_size_one_bans_every_token_the_bot_used():
    ids = torch.tensor([[5, 5, 1]])
    out = ReplyNoRepeatNGram(1, prompt_length=2, bot_turns=[[[3], [4, 3]]])(ids, torch.zeros(1, 6))
    assert banned(out) == [[1, 3, 4]]


def test_ngram_does_not_edit_scores_in_place():
    ids = torch.tensor([[9, 1, 2, 1, 2, 3, 1]])
    scores = torch.zeros(1, 10)
    out = ReplyNoRepeatNGram(2, prompt_length=3, bot_turns=[[[1, 4]]])(ids, scores)
    assert torch.equal(scores, torch.zeros(1, 10))
    assert banned(out) == [[2, 4]]


def test_ngram_refuses_bad_settings():
    with pytest.raises(ValueError, match="`ngram_size` must be at least 1, got 0"):
        ReplyNoRepeatNGram(0, prompt_length=0)
    with pytest.raises(ValueError, match="`ngram_size` must be an integer, got 2.5"):
        ReplyNoRepeatNGram(2.5, prompt_length=0)
    with pytest.raises(ValueError, match=r"`bot_turns\[0\]\[1\]` must hold non-negative integer token ids"):
        ReplyNoRepeatNGram(2, prompt_length=0, bot_turns=[[[1, 2], [-4]]])
    proc = ReplyNoRepeatNGram(2, prompt_length=1, bot_turns=[[[1, 2]]])
    with pytest.raises(ValueError, match=r"`bot_turns` has 1 row\(s\) but the batch has 2"):
        proc(torch.tensor([[0, 1], [0, 1]]), torch.zeros(2, 4))


def test_processors_are_logits_processors_that_pickle():
    for proc in (BotRepetitionPenalty(1.5, [[1]], 0), ReplyNoRepeatNGram(3, 0, [[[1, 2, 3]]])):
        assert isinstance(proc, LogitsProcessor)
        assert type(pickle.loads(pickle.dumps(proc))) is type(proc)


def test_importing_the_module_does_not_load_torch():
    code = "import sys, chatbot.repetition as r; r.similarity('a', 'b'); assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


# --- inside a real generate call ---------------------------------------------------------

PROMPT = torch.tensor([[1, 2, 3, 4, 10, 11, 12, 5, 6, 7]])
BOT_TURNS = [[[10, 11, 12, 13], [20, 21, 22]]]


@pytest.fixture(scope="module")
def tiny_lm():
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=50, n_positions=64, n_embd=16, n_layer=1, n_head=2, bos_token_id=49, eos_token_id=49)
    return GPT2LMHeadModel(config).eval()


class LoopForcer(LogitsProcessor):
    """Pushes the model round the bot's first turn forever: 10 11 12 13 10 11 ..."""

    def __call__(self, input_ids, scores):
        boost = torch.zeros_like(scores)
        boost[:, 10 + (input_ids.shape[1] - PROMPT.shape[1]) % 4] = 1000.0
        return scores + boost


def generate(model, *processors) -> list[int]:
    out = model.generate(PROMPT, attention_mask=torch.ones_like(PROMPT), max_new_tokens=20, do_sample=False,
                         logits_processor=LogitsProcessorList(list(processors)), pad_token_id=0)
    return out[0, PROMPT.shape[1]:].tolist()


def both_controls():
    bot_ids = [[t for turn in BOT_TURNS[0] for t in turn]]
    return (BotRepetitionPenalty(1.3, bot_ids, prompt_length=PROMPT.shape[1]),
            ReplyNoRepeatNGram(3, prompt_length=PROMPT.shape[1], bot_turns=BOT_TURNS))


def assert_no_repeated_or_old_trigram(reply: list[int]) -> None:
    grams = trigrams(reply)
    assert len(grams) == len(set(grams)), reply
    old = {g for turn in BOT_TURNS[0] for g in trigrams(turn)}
    assert not old & set(grams), reply


def test_both_processors_compose_in_generate(tiny_lm):
    reply = generate(tiny_lm, *both_controls())
    assert len(reply) == 20
    assert_no_repeated_or_old_trigram(reply)


def test_processors_break_a_forced_loop_in_generate(tiny_lm):
    # Without the controls the forcer wins outright, so the test below has something to stop.
    assert generate(tiny_lm, LoopForcer())[:8] == [10, 11, 12, 13, 10, 11, 12, 13]
    reply = generate(tiny_lm, LoopForcer(), *both_controls())
    assert_no_repeated_or_old_trigram(reply)
    # Bigrams of the bot's turn are still allowed once each: only trigrams are banned.
    assert reply[:2] == [10, 11]


# --- plain-text helpers ------------------------------------------------------------------

def test_normalize_for_comparison():
    assert normalize_for_comparison("  Don\u2019t  STOP\u2014me\u2026now! ") == "dont stop me now"
    # NFKC folds full-width letters and ligatures; symbols and emoji stay.
    assert normalize_for_comparison("\uff28\uff49 \ufb01ne \u263a") == "hi fine \u263a"
    assert normalize_for_comparison("?!...") == ""


def test_similarity():
    assert similarity("I like tea.", "I like tea.") == 1.0
    assert similarity("Hello there, FRIEND!", "hello there friend") == 1.0
    assert similarity("the cat sat", "quantum physics rules") == 0.0
    # 3 shared words out of 4 + 4: 2 * 3 / 8.
    assert similarity("i like green tea", "I like black tea") == 0.75
    assert similarity("", "...") == 1.0
    assert similarity("", "hi") == 0.0


def test_max_similarity_and_is_repeat():
    previous = ["i like green tea", "what?"]
    assert max_similarity("I like black tea", previous) == 0.75
    assert max_similarity("anything", []) == 0.0
    assert is_repeat("I like black tea", previous, threshold=0.75)
    assert not is_repeat("I like black tea", previous, threshold=0.8)
    assert is_repeat("What!", previous, threshold=1.0)
    assert not is_repeat("What!", [], threshold=0.5)
    for bad in (0, 0.0, 1.5, -1):
        with pytest.raises(ValueError, match=rf"`threshold` must be in \(0, 1\], got {bad}"):
            is_repeat("a", ["a"], threshold=bad)


def test_distinct_n():
    texts = ["a b a b", "A, b c!"]
    # Unigrams: a b a b | a b c -> 7 in all, 3 distinct (a, b, c).
    assert distinct_n(texts, 1) == 3 / 7
    # Bigrams: ab ba ab | ab bc -> 5 in all (none across the two texts), 3 distinct.
    assert distinct_n(texts, 2) == 3 / 5
    assert distinct_n(["a b"], 3) == 0.0
    assert distinct_n([], 1) == 0.0
    with pytest.raises(ValueError, match="`n` must be an integer of at least 1, got 0"):
        distinct_n(texts, 0)


def test_repeated_turn_rate():
    replies = ["hi there", "Hi there!", "how are you", "hi there", "what is up"]
    # After the first: #1 repeats #0, #2 is new, #3 repeats #0 (within 5), #4 is new -> 2 / 4.
    assert repeated_turn_rate(replies) == 0.5
    # Looking back one reply only, #3 no longer sees #0 -> 1 / 4.
    assert repeated_turn_rate(replies, window=1) == 0.25
    assert repeated_turn_rate(["hi"]) == 0.0
    assert repeated_turn_rate([]) == 0.0
    with pytest.raises(ValueError, match="`window` must be an integer of at least 1, got 0"):
        repeated_turn_rate(replies, window=0)
    with pytest.raises(ValueError, match=r"`threshold` must be in \(0, 1\], got 2"):
        repeated_turn_rate(replies, threshold=2)
