"""The style lab's metrics on hand-made transcripts, against values worked out by hand."""

import math

import pytest

from chatbot.tools.lab_metrics import (
    LabTurn,
    cell_metrics,
    distinct,
    latency_summary,
    perplexity,
    reference_scores,
    repeated_turn_rate,
    reply_nll,
    safety_counts,
    self_bleu,
)

# "the cat sat on the mat" against "the cat sat on a mat": 5 of 6 words, 3 of 5 word pairs, 2 of 4
# triples and 1 of 3 four-grams match; equal lengths, so no brevity penalty:
# BLEU = 100 * (5/6 * 3/5 * 2/4 * 1/3) ** (1/4) = 100 * (1/12) ** 0.25
CAT_BLEU = 100 * (1 / 12) ** 0.25


def test_distinct_counts_normalised_words_and_pairs_within_replies():
    # words: i like tea i like coffee -> 4 distinct of 6; pairs: (i like) (like tea) (i like) (like coffee) -> 3 of 4
    assert distinct(["I like tea!", "i like coffee"], 1) == pytest.approx(4 / 6)
    assert distinct(["I like tea!", "i like coffee"], 2) == pytest.approx(3 / 4)
    # "tea i" would span two replies and is not a pair
    assert distinct(["tea", "i"], 2) is None
    assert distinct([], 1) is None


def test_repeated_turn_rate_counts_near_duplicates_of_any_earlier_reply_in_the_same_transcript():
    transcripts = [
        ["i like tea", "I like tea!", "what about you"],   # 2nd repeats 1st (similarity 1.0); 3rd is new
        ["i like green tea a lot", "i like green tea a lot today"],  # 2*6/13 = 0.92 >= 0.8: a repeat
        ["i like tea", "i like coffee"],                     # 2*2/6 = 0.67 < 0.8: not a repeat
    ]
    # pairs: 2 + 1 + 1 = 4 replies that have an earlier one; repeats: 2
    assert repeated_turn_rate(transcripts) == pytest.approx(2 / 4)
    # any earlier reply counts, however far back (the engine's lookback of 5 does not apply here)
    far = ["hello there", "one", "two", "three", "four", "five", "six", "hello there"]
    assert repeated_turn_rate([far]) == pytest.approx(1 / 7)
    assert repeated_turn_rate([["only one"], ["another"]]) is None


def test_self_bleu_of_two_samples_is_the_bleu_of_each_against_the_other():
    assert self_bleu([["the cat sat on the mat", "the cat sat on a mat"]]) == pytest.approx(CAT_BLEU, abs=1e-6)
    assert self_bleu([["a b c d e", "a b c d e"]]) == pytest.approx(100)
    assert self_bleu([["a b c d e", "v w x y z"]]) == pytest.approx(0)
    assert self_bleu([["one sample only"]]) is None


def test_self_bleu_with_three_samples_uses_the_other_two_as_references():
    # "a b c d" matches one of its references fully (twice); "w x y z" matches nothing.
    # Every order then matches 2/3 of its n-grams (8/12, 6/9, 4/6, 2/3); lengths match: BLEU = 100 * 2/3.
    assert self_bleu([["a b c d", "a b c d", "w x y z"]]) == pytest.approx(200 / 3, abs=1e-6)
    with pytest.raises(ValueError, match="same number of samples"):
        self_bleu([["a", "b"], ["a", "b", "c"]])


def test_reference_scores_bleu_and_chrf():
    bleu, _ = reference_scores([("the cat sat on the mat", ["the cat sat on a mat"])])
    assert bleu == pytest.approx(CAT_BLEU, abs=1e-6)
    # chrF of "abc" against "abd": character 1-grams 2/3 match, 2-grams 1/2, 3-grams 0/1 (longer orders have
    # none and are left out); precision = recall = (2/3 + 1/2 + 0) / 3 = 7/18, and so is F-beta.
    _, chrf = reference_scores([("abc", ["abd"])])
    assert chrf == pytest.approx(100 * 7 / 18, abs=1e-6)
    # turns may carry different numbers of references; a reply matching any of them scores fully
    bleu, chrf = reference_scores([("the cat sat on the mat", ["the cat sat on the mat"]),
                                   ("a dog ran in the park", ["no", "a dog ran in the park"]),
                                   ("not scored", [])])
    assert bleu == pytest.approx(100) and chrf == pytest.approx(100)
    assert reference_scores([("no references", [])]) == (None, None)


def test_safety_counts_sort_every_reply_by_what_the_filters_did():
    turns = [
        LabTurn("hi", "hello"),
        LabTurn("hi", "hello", safety=("repeat: kept the least repetitive of 3 replies",), attempts=3),
        LabTurn("hi", "mail me at [email removed]", safety=("redacted email",)),
        LabTurn("hi", "nice", safety=("toxicity: matched 'x'",), attempts=2),
        LabTurn("hi", "Let's talk about something else.", finish_reason="unsafe",
                safety=("toxicity: matched 'x'", "toxicity: classifier 0.97"), attempts=3),
        LabTurn("you x", "Let's keep it friendly.", finish_reason="refused", safety=("input toxicity: matched 'x'",),
                refused=True),
        LabTurn("hi", "@\u200beveryone [phone removed]", safety=("neutralised mentions", "redacted phone")),
        LabTurn("hi", "", finish_reason="unsafe", safety=("toxicity: filter error (RuntimeError)",)),
    ]
    assert safety_counts(turns) == {"clean": 2, "toxic_regenerated": 1, "unsafe_fallback": 2, "redacted": 2,
                                    "mentions": 1, "filter_error": 1, "refused_input": 1}
    assert safety_counts([LabTurn("hi", "x", safety=("a new filter did something",))])["other"] == 1


def test_latency_summary_is_median_and_mean():
    assert latency_summary([0.1, 0.3, 0.2, 1.0]) == (pytest.approx(0.25), pytest.approx(0.4))
    assert latency_summary([]) == (None, None)


class _Model:
    """A stand-in causal LM whose logits at position i are fixed by a rule, so losses are known exactly."""

    def __init__(self, vocab, rule):
        import torch

        self.device = torch.device("cpu")
        self.vocab, self.rule = vocab, rule

    def __call__(self, input_ids):
        import torch

        n = input_ids.shape[1]
        logits = torch.stack([self.rule(i) for i in range(n)]).unsqueeze(0)

        class Out:
            pass

        out = Out()
        out.logits = logits
        return out


def test_reply_nll_under_known_probabilities():
    import torch

    # probabilities 1/2, 1/4, 1/8, 1/8 at every position: tokens 0, 1, 2 cost ln 2 + ln 4 + ln 8 = 6 ln 2
    probs = torch.tensor([0.5, 0.25, 0.125, 0.125])
    model = _Model(4, lambda i: probs.log())
    nll, tokens = reply_nll(model, [3, 3], [0, 1, 2], context=16)
    assert nll == pytest.approx(6 * math.log(2), rel=1e-5) and tokens == 3
    assert perplexity(nll, 3) == pytest.approx(4.0, rel=1e-5)  # exp(6 ln 2 / 3) = 2**2
    assert perplexity(0.0, 0) is None


def test_reply_nll_reads_each_reply_token_from_the_position_before_it_and_keeps_the_newest_prompt():
    import torch

    def rule(i):  # position i is sure the next token is i + 1
        row = torch.full((16,), -50.0)
        row[(i + 1) % 16] = 50.0
        return row

    model = _Model(16, rule)
    assert reply_nll(model, [9, 9], [2, 3], context=16)[0] == pytest.approx(0, abs=1e-6)  # positions 1, 2 predict 2, 3
    assert reply_nll(model, [9, 9], [3, 4], context=16)[0] > 100                         # off by one: badly wrong
    # 10 prompt tokens + 3 reply tokens in a context of 8: the prompt keeps its last 5, so the reply sits at 5..7
    assert reply_nll(model, list(range(10)), [5, 6, 7], context=8) == (pytest.approx(0, abs=1e-6), 3)
    # a reply as long as the context keeps one prompt token before it and is scored on its first 7 tokens
    assert reply_nll(model, [0], list(range(1, 12)), context=8) == (pytest.approx(0, abs=1e-6), 7)
    assert reply_nll(model, [1], [], context=8) == (0.0, 0)


def test_cell_metrics_lines_up_replies_to_the_same_turn_across_samples():
    def t(reply, tokens, latency, refs=()):
        return LabTurn("line", reply, reply_tokens=tokens, latency=latency, references=refs)

    # sample 1 and sample 2 of one two-turn conversation
    sample1 = [t("a b c d", 4, 0.2, ("a b c d",)), t("w x y z", 4, 0.4)]
    sample2 = [t("a b c d", 4, 0.6, ("a b c d",)), t("e f g h", 4, 0.8)]
    metrics = cell_metrics([sample1, sample2], samples=2, nll=(4 * math.log(2), 4))
    # self-BLEU: turn 1 agrees fully, turn 2 not at all: every order matches 1/2 of its n-grams -> 50
    assert metrics["self_bleu"] == pytest.approx(50.0, abs=1e-6)
    assert metrics["bleu"] == pytest.approx(100) and metrics["chrf"] == pytest.approx(100)
    assert metrics["perplexity"] == pytest.approx(2.0)
    assert metrics["replies"] == 4 and metrics["reply_tokens"] == 4
    assert metrics["distinct_1"] == pytest.approx(12 / 16)  # a b c d w x y z e f g h
    assert metrics["repeated_turn_rate"] == 0.0
    assert metrics["latency_p50"] == pytest.approx(0.5) and metrics["latency_mean"] == pytest.approx(0.5)
    assert metrics["safety"]["clean"] == 4 and metrics["finish"] == {"stop": 4}
    assert cell_metrics([sample1], samples=1)["self_bleu"] is None


def test_a_refused_line_counts_neither_as_a_zero_token_reply_nor_as_a_zero_second_one():
    # The engine answers a refused line with its canned text, 0 reply tokens and no timing.
    turns = [LabTurn("hi", "hello there friend", reply_tokens=4, latency=0.4),
             LabTurn("you idiot", "Let's keep it friendly.", reply_tokens=0, finish_reason="refused", refused=True),
             LabTurn("bye", "bye now", reply_tokens=2, latency=0.2),
             LabTurn("x", "Let's talk about something else.", reply_tokens=0, finish_reason="unsafe", latency=1.2)]
    metrics = cell_metrics([turns], samples=1)
    assert metrics["replies"] == 4
    assert metrics["reply_tokens"] == pytest.approx(3.0)  # (4 + 2) / 2: the model-written replies
    # the unsafe fallback did go through the model (three tries): its time counts
    assert metrics["latency_p50"] == pytest.approx(0.4) and metrics["latency_mean"] == pytest.approx(0.6)
    only_refused = cell_metrics([[turns[1]]], samples=1)
    assert only_refused["reply_tokens"] is None and only_refused["latency_p50"] is None
