"""The response bank: replies people wrote, searched by words, chosen by the model's judgement."""

import json
import threading

import pytest

from chatbot.decoding import DecodingSettings
from chatbot.errors import ChatbotError, CorpusError
from chatbot.generation import GenerationRequest
from chatbot.response_bank import BankedGenerator, ResponseBank

PAIRS = [
    ("do you like music?", "i love music, mostly jazz and old soul records"),
    ("do you like music?", "i love music, mostly jazz and old soul records"),
    ("what is your favourite colour?", "blue, like the sea in the morning"),
    ("i just got a new puppy", "a puppy! what breed is it?"),
    ("how was your weekend?", "quiet, i read a book and baked bread"),
]
GREEDY = DecodingSettings(temperature=0, max_new_tokens=40, max_time=60)


def test_search_finds_the_reply_to_the_closest_context_once():
    bank = ResponseBank(PAIRS)
    hits = bank.search(["hey", "do you like music at all?"], k=3)
    assert hits[0].reply == "i love music, mostly jazz and old soul records"
    assert [h.reply for h in hits].count(hits[0].reply) == 1
    assert 0 < hits[-1].similarity <= hits[0].similarity <= 1.0 + 1e-9
    assert bank.search([], k=3) == [] and bank.search(["zzz qqq"], k=3) == []


def test_the_turn_before_counts_less_than_the_message():
    bank = ResponseBank(PAIRS)
    hits = bank.search(["i just got a new puppy", "how was your weekend?"], k=2)
    assert hits[0].reply == "quiet, i read a book and baked bread"


def test_an_operators_bank_is_a_json_lines_file(tmp_path):
    path = tmp_path / "faq.jsonl"
    path.write_text("\n".join(json.dumps({"context": c, "reply": r}) for c, r in PAIRS) + "\n", encoding="utf-8")
    assert len(ResponseBank.load(path)) == len(PAIRS)
    with pytest.raises(ChatbotError, match="no such file"):
        ResponseBank.load(tmp_path / "nope.jsonl")
    path.write_text('{"context": "hi", "reply": "hello"}\n{"context": "hi"}\n', encoding="utf-8")
    with pytest.raises(CorpusError, match=r"faq.jsonl:2: expected a JSON object"):
        ResponseBank.load(path)
    path.write_text('{"context": "hi", "reply": 3}\n', encoding="utf-8")
    with pytest.raises(CorpusError, match=r":1: .* must be strings"):
        ResponseBank.load(path)
    with pytest.raises(ChatbotError, match="no \\(context, reply\\) pairs"):
        ResponseBank([(" ", "x")])


def request(context, *, settings=GREEDY, bot_texts=()):
    prompt = "".join(f"ada: {t}\n" for t in context) + "Bot:"
    said = tuple(("user", t) for t in context)
    return GenerationRequest(prompt, settings, ("\n", " ada:", " Bot:"), bot_texts, context=said)


def test_the_chosen_reply_is_a_candidate_and_never_a_recent_or_too_long_one(roomy_gen):
    banked = BankedGenerator(roomy_gen, ResponseBank(PAIRS), candidates=5)
    music = "i love music, mostly jazz and old soul records"
    own = roomy_gen.generate([request(["do you like music?"])])[0].text
    result = banked.generate([request(["do you like music?"])])[0]
    assert result.text in {own, *(r for _, r in PAIRS)}
    assert result.completion_tokens == roomy_gen.count_tokens(result.text)
    again = banked.generate([request(["do you like music?"], bot_texts=(music,))])[0]
    assert again.text != music
    short = GREEDY.model_copy(update={"max_new_tokens": 3})
    assert banked.generate([request(["do you like music?"], settings=short)])[0].text != music
    # Greedy settings choose the same every time; a stream gives the same reply in one piece.
    assert banked.generate([request(["do you like music?"])])[0].text == result.text
    assert "".join(banked.stream(request(["do you like music?"]))) == result.text


def test_with_nothing_in_the_bank_the_models_own_reply_stands(roomy_gen):
    banked = BankedGenerator(roomy_gen, ResponseBank(PAIRS))
    own = roomy_gen.generate([request(["zzz qqq"])])[0]
    assert banked.generate([request(["zzz qqq"])])[0].text == own.text


def test_a_cancelled_request_is_not_rescored(roomy_gen):
    banked = BankedGenerator(roomy_gen, ResponseBank(PAIRS))
    cancel = threading.Event()
    cancel.set()
    req = GenerationRequest("ada: do you like music?\nBot:", GREEDY, ("\n",), context=(("user", "do you like music?"),),
                            cancel=cancel)
    assert banked.generate([req])[0].text not in {r for _, r in PAIRS}


def test_sampling_picks_among_the_best_by_seed(roomy_gen):
    banked = BankedGenerator(roomy_gen, ResponseBank(PAIRS * 3 + [(f"do you like music {i}?", f"reply {i}")
                                                                  for i in range(5)]), candidates=8)
    sampled = DecodingSettings(temperature=0.8, max_new_tokens=40, max_time=60)
    picks = {banked.generate([request(["do you like music?"], settings=sampled.model_copy(
        update={"seed": seed}))])[0].text for seed in range(12)}
    same = {banked.generate([request(["do you like music?"], settings=sampled.model_copy(
        update={"seed": 3}))])[0].text for _ in range(3)}
    assert len(same) == 1 and 1 <= len(picks) <= 3


def test_score_prefers_the_continuation_the_model_was_shown(roomy_gen):
    scores = roomy_gen.score("ada: hi\nBot:", ["hello there", "zebra quantum"])
    assert len(scores) == 2 and all(s < 0 for s in scores)
    assert roomy_gen.score("x", []) == []
    with pytest.raises(ChatbotError, match="bank_candidates"):
        BankedGenerator(roomy_gen, ResponseBank(PAIRS), candidates=0)


def test_a_built_bank_is_kept_and_built_again_when_its_file_changes(tmp_path):
    path = tmp_path / "faq.jsonl"
    path.write_text(json.dumps({"context": "who made you?", "reply": "the mods did"}) + "\n", encoding="utf-8")
    cache = tmp_path / "cache"
    first = ResponseBank.load(path, cache=cache)
    kept = list(cache.glob("bank-*.pickle"))
    assert len(kept) == 1 and ResponseBank.load(path, cache=cache).replies == first.replies
    kept[0].write_bytes(b"not a bank")  # damaged: built again, not an error
    assert ResponseBank.load(path, cache=cache).replies == ["the mods did"]
    path.write_text(json.dumps({"context": "who made you?", "reply": "a team of volunteers"}) + "\n",
                    encoding="utf-8")
    assert ResponseBank.load(path, cache=cache).replies == ["a team of volunteers"]
    assert not (tmp_path / "nowhere").exists()
    with pytest.raises(ChatbotError, match="no such file"):
        ResponseBank.load([str(path), str(tmp_path / "nowhere" / "x.jsonl")], cache=tmp_path / "nowhere")
    assert not (tmp_path / "nowhere").exists()  # a mistyped path creates no folder


def test_several_sources_make_one_bank(tmp_path):
    a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    a.write_text(json.dumps({"context": "who made you?", "reply": "the mods did"}) + "\n", encoding="utf-8")
    b.write_text(json.dumps({"context": "server rules?", "reply": "be kind"}) + "\n", encoding="utf-8")
    bank = ResponseBank.load([str(a), str(b)], cache=tmp_path / "cache")
    assert sorted(bank.replies) == ["be kind", "the mods did"]
    assert bank.search(["what are the server rules?"], k=1)[0].reply == "be kind"


def test_the_setting_takes_one_source_a_list_or_none():
    from chatbot.config import Settings

    assert Settings().response_bank == ("chitchat",)
    assert Settings(response_bank="faq.jsonl").response_bank == ("faq.jsonl",)
    assert Settings(response_bank="").response_bank == ()
    assert Settings.load(env={"CHATBOT_RESPONSE_BANK": "chitchat, faq.jsonl"}).response_bank == ("chitchat", "faq.jsonl")


def test_a_question_about_what_the_person_said_gets_it_back(roomy_gen):
    banked = BankedGenerator(roomy_gen, ResponseBank(PAIRS))
    said = (("user", "hi i'm maya"), ("bot", "hi maya"), ("user", "what's my name?"))
    req = GenerationRequest("ada: hi i'm maya\nBot: hi maya\nada: what's my name?\nBot:", GREEDY, ("\n",),
                            context=said)
    assert banked.generate([req])[0].text == "your name is Maya!"
    already = GenerationRequest(req.prompt, GREEDY, ("\n",), ("your name is Maya!",), context=said)
    assert banked.generate([already])[0].text != "your name is Maya!"  # not twice in a row


def test_score_takes_one_prompt_or_one_per_continuation(roomy_gen):
    one = [roomy_gen.score("ada: hi\nBot:", [t])[0] for t in ("hello there", "zebra")]
    each = roomy_gen.score(["ada: hi\nBot:", "ada: hi\nBot:"], ["hello there", "zebra"])
    assert each == pytest.approx(one, abs=0.02)  # the model may run in bfloat16: batches round differently
    with pytest.raises(ValueError, match="2 prompts for 1"):
        roomy_gen.score(["a", "b"], ["x"])


def test_the_backward_score_reads_the_message_after_each_candidate(roomy_gen):
    from chatbot.response_bank import BACKWARD_WEIGHT, candidate_scores

    prompt = "ada: do you like music?\nBot:"
    texts = ["i love jazz", "blue"]
    forward = candidate_scores(roomy_gen, roomy_gen.format, prompt, texts, [0.0, 0.0])
    both = candidate_scores(roomy_gen, roomy_gen.format, prompt, texts, [0.0, 0.0], "do you like music?")
    alone = roomy_gen.score("ada:", ["do you like music?"])[0]
    led = roomy_gen.score(["Bot: i love jazz\nada:", "Bot: blue\nada:"], ["do you like music?"] * 2)
    assert both == pytest.approx([f + BACKWARD_WEIGHT * (b - alone) for f, b in zip(forward, led)], abs=0.03)


def test_a_persona_style_steers_the_choice_and_the_writing(roomy_gen):
    from chatbot.prompting import PersonaStyle

    banked = BankedGenerator(roomy_gen, ResponseBank(PAIRS), candidates=5)
    terse = PersonaStyle(max_words=3, sentence_case=True)
    req = GenerationRequest("ada: do you like music?\nBot:", GREEDY, ("\n",), context=(("user", "do you like music?"),),
                            style=terse)
    text = banked.generate([req])[0].text
    assert text != "I love music, mostly jazz and old soul records."  # too long for this persona
    name = GenerationRequest("ada: i'm maya\nBot: hi\nada: what's my name?\nBot:", GREEDY, ("\n",),
                             context=(("user", "i'm maya"), ("bot", "hi"), ("user", "what's my name?")), style=terse)
    assert banked.generate([name])[0].text == "Your name is Maya!"


def test_only_the_most_recently_used_banks_are_kept(tmp_path):
    import os

    from chatbot.response_bank import KEPT_BANKS

    cache = tmp_path / "cache"
    for n in range(KEPT_BANKS + 2):
        path = tmp_path / f"faq{n}.jsonl"
        path.write_text(json.dumps({"context": f"question {n}", "reply": f"answer {n}"}) + "\n", encoding="utf-8")
        ResponseBank.load(path, cache=cache)
        for kept in cache.glob("bank-*.pickle"):  # older by a second each round, whatever the clock's grain
            os.utime(kept, (kept.stat().st_mtime - 1, kept.stat().st_mtime - 1))
    assert len(list(cache.glob("bank-*.pickle"))) == KEPT_BANKS


def test_a_mistyped_bank_file_fails_before_the_model_loads(tmp_path, monkeypatch):
    from chatbot.config import Settings
    from chatbot.engine import load_generator
    from chatbot.generation import LocalGenerator

    def no_model(*args, **kwargs):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(LocalGenerator, "from_pretrained", no_model)
    with pytest.raises(ChatbotError, match="response bank .*nope.jsonl: no such file"):
        load_generator(Settings(response_bank=("chitchat", str(tmp_path / "nope.jsonl"))))
    assert not (tmp_path / "nope.jsonl").exists()
