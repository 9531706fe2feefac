import pytest

from chatbot.decoding import (
    PRESETS,
    REPETITION_OFF,
    DecodingOverrides,
    DecodingSettings,
    apply_overrides,
    make_decoding_settings,
    make_overrides,
)
from chatbot.errors import ChatbotError, ModelNotFoundError
from chatbot.generation import GenerationRequest, LocalGenerator, load_model

# Greedy with every repetition control off: the tiny model's bare, deterministic output.
GREEDY = DecodingSettings(temperature=0, max_new_tokens=12, **REPETITION_OFF)


@pytest.mark.parametrize(
    "values, message",
    [
        ({"temperature": -0.5}, "`temperature` must be greater than or equal to 0, got -0.5"),
        ({"top_p": 1.5}, "`top_p` must be less than or equal to 1, got 1.5"),
        ({"top_p": 0}, "`top_p` must be greater than 0"),
        ({"max_new_tokens": 0}, "`max_new_tokens`"),
        ({"top_kk": 3}, "`top_kk` is not a known setting"),
        ({"bot_repetition_penalty": 0.5}, "`bot_repetition_penalty` must be greater than or equal to 1, got 0.5"),
        ({"bot_repetition_penalty": 11}, "`bot_repetition_penalty`"),
        ({"bot_repetition_penalty": float("nan")}, "`bot_repetition_penalty`"),
        ({"bot_no_repeat_ngram_size": -1}, "`bot_no_repeat_ngram_size`"),
        ({"bot_no_repeat_ngram_size": 17}, "`bot_no_repeat_ngram_size`"),
        ({"no_repeat_ngram_size": -1}, "`no_repeat_ngram_size`"),
        ({"avoid_repeats": "sometimes"}, "`avoid_repeats`"),
        ({"repeat_threshold": 0}, "`repeat_threshold` must be greater than 0, got 0"),
        ({"repeat_threshold": 1.5}, "`repeat_threshold`"),
        ({"repeat_lookback": 0}, "`repeat_lookback`"),
        ({"repeat_lookback": 51}, "`repeat_lookback`"),
        ({"repeat_retries": 6}, "`repeat_retries`"),
    ],
)
def test_bad_settings_name_the_setting(values, message):
    with pytest.raises(ChatbotError) as err:
        make_decoding_settings(**values)
    assert message in str(err.value)


def test_missing_directory(tmp_path):
    with pytest.raises(ModelNotFoundError, match="no such directory"):
        load_model(tmp_path / "nope")


def test_directory_without_config(tmp_path):
    with pytest.raises(ModelNotFoundError, match="no config.json"):
        load_model(tmp_path)


def test_hub_name_not_cached_is_one_clear_error():
    with pytest.raises(ModelNotFoundError) as err:
        load_model("some-org/not-a-cached-model")
    message = str(err.value)
    assert "not available offline" in message and "--model" in message and "\n" not in message


@pytest.fixture()
def gen(tiny_dir):
    return LocalGenerator.from_pretrained(tiny_dir, device="cpu")


def test_loads_on_cpu_with_left_padding(gen):
    assert gen.device.type == "cpu"
    assert gen.tokenizer.padding_side == "left"
    assert gen.tokenizer.pad_token is not None
    assert gen.format.name == "transcript"


def test_reply_never_contains_the_prompt_or_a_newline(gen):
    prompt = gen.format.build_prompt([], "Bot", preamble="") + ""
    request = GenerationRequest("ada: hello there\nBot:", GREEDY, tuple(gen.format.stop_strings(["ada", "Bot"])))
    result = gen.generate([request])[0]
    assert "hello there" not in result.text
    assert "\n" not in result.text
    assert result.prompt_tokens == gen.count_tokens("ada: hello there\nBot:")
    assert 0 < result.completion_tokens <= 12
    assert prompt == "Bot:"


def sampled_reply_and_stop(gen):
    """Seeded sampling settings, the free reply, and a stop string inside it spanning several tokens.

    The random tiny model also samples byte-fallback pieces that decode to U+FFFD, so
    seeds are tried in order until the reply has a clean multi-token stretch.
    """
    tok = gen.tokenizer
    for seed in range(100):
        settings = DecodingSettings(temperature=1.0, top_k=0, top_p=1.0, seed=seed, max_new_tokens=12,
                                    **REPETITION_OFF)
        free = gen.generate([GenerationRequest("ada: hi\nBot:", settings)])[0].text
        ids = tok(free, add_special_tokens=False)["input_ids"]
        for i in range(2, len(ids) - 2):
            stop = tok.decode(ids[i:i + 3])
            if ("\ufffd" not in free and stop.strip() and free.index(stop) > 0
                    and len(tok(stop, add_special_tokens=False)["input_ids"]) > 1):
                return settings, free, stop
    raise AssertionError("no seed gave a usable reply")



def test_multi_token_stop_string_cuts_the_reply(gen):
    # The stop-string check does not change the random draws, so both runs sample the same tokens.
    settings, free, stop = sampled_reply_and_stop(gen)
    cut = gen.generate([GenerationRequest("ada: hi\nBot:", settings, (stop,))])[0]
    assert stop not in cut.text
    assert cut.finish_reason == "stop"
    assert cut.text == free[: free.index(stop)].strip()


def test_batch_equals_one_by_one_under_greedy(gen):
    prompts = ["ada: hi\nBot:", "bob: what did you eat today? i had pasta\nBot:", "cy: yo\nBot:"]
    one_by_one = [gen.generate([GenerationRequest(p, GREEDY)])[0].text for p in prompts]
    batched = [r.text for r in gen.generate([GenerationRequest(p, GREEDY) for p in prompts])]
    assert batched == one_by_one


def test_seeded_sampling_is_reproducible(gen):
    settings = DecodingSettings(temperature=1.0, seed=7, max_new_tokens=10)
    a = gen.generate([GenerationRequest("ada: hi\nBot:", settings)])[0].text
    b = gen.generate([GenerationRequest("ada: hi\nBot:", settings)])[0].text
    assert a == b


def test_overlong_prompt_is_cut_from_the_left(gen):
    long_prompt = "ada: " + "word " * 500 + "\nBot:"
    result = gen.generate([GenerationRequest(long_prompt, GREEDY)])[0]
    assert result.prompt_tokens <= gen.context_size - GREEDY.max_new_tokens


def test_reply_budget_larger_than_context_is_an_error(gen):
    with pytest.raises(ChatbotError, match="max_new_tokens"):
        gen.generate([GenerationRequest("hi", DecodingSettings(max_new_tokens=gen.context_size))])


def test_bad_device_is_a_clear_error(tiny_dir):
    with pytest.raises(ChatbotError, match="`device` must be"):
        load_model(tiny_dir, device="gpu0")
    import torch

    if not torch.cuda.is_available():
        with pytest.raises(ChatbotError, match="no CUDA GPU"):
            load_model(tiny_dir, device="cuda")


def test_mistyped_relative_path_says_no_such_directory(tmp_path, monkeypatch):
    (tmp_path / "runs").mkdir()
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ModelNotFoundError, match="no such directory"):
        load_model("runs/mine")


def test_empty_sampled_reply_is_sampled_again(gen, monkeypatch):
    from chatbot import generation

    calls = []
    real = gen._generate_batch

    def first_empty(requests, settings, stops):
        out = real(requests, settings, stops)
        calls.append(settings.seed)
        if len(calls) == 1:
            out = [generation.GenerationResult("", r.prompt_tokens, 0, "stop", r.seconds) for r in out]
        return out

    monkeypatch.setattr(gen, "_generate_batch", first_empty)
    result = gen.generate([GenerationRequest("ada: hi\nBot:", DecodingSettings(seed=5, max_new_tokens=6))])[0]
    assert result.text and calls == [5, 6]


def test_stream_pieces_join_to_the_reply_and_never_show_a_stop_string(gen):
    settings, free, stop = sampled_reply_and_stop(gen)
    request = GenerationRequest("ada: hi\nBot:", settings, (stop,))
    pieces = list(gen.stream(request))
    assert len(pieces) >= 1
    assert "".join(pieces) == gen.generate([request])[0].text == free[: free.index(stop)].strip()
    assert all(stop not in p for p in pieces)


def test_stop_prefix_is_held_back():
    from chatbot.generation import _stop_prefix_len

    assert _stop_prefix_len("well ok\nUs", ["\nUser:"]) == 3
    assert _stop_prefix_len("well ok", ["\nUser:"]) == 0
    assert _stop_prefix_len("a B", [" Bot:", "\n"]) == 2


# --- repetition controls -----------------------------------------------------------------


def test_new_settings_have_the_documented_defaults():
    s = DecodingSettings()
    assert (s.repetition_penalty, s.bot_repetition_penalty, s.no_repeat_ngram_size, s.bot_no_repeat_ngram_size) == (
        1.0, 1.3, 3, 4)
    assert (s.avoid_repeats, s.repeat_threshold, s.repeat_lookback, s.repeat_retries) == (True, 0.8, 5, 2)


def test_overrides_take_the_new_settings():
    overrides = make_overrides({"bot_repetition_penalty": 2.0, "bot_no_repeat_ngram_size": 2, "avoid_repeats": False,
                                "repeat_threshold": 0.9, "repeat_lookback": 3, "repeat_retries": 0})
    assert isinstance(overrides, DecodingOverrides)
    s = apply_overrides(PRESETS["balanced"], overrides)
    assert (s.bot_repetition_penalty, s.bot_no_repeat_ngram_size, s.avoid_repeats) == (2.0, 2, False)
    assert (s.repeat_threshold, s.repeat_lookback, s.repeat_retries) == (0.9, 3, 0)
    assert s.temperature == PRESETS["balanced"].temperature
    with pytest.raises(ChatbotError, match="`bot_repetition_penalty`"):
        make_overrides({"bot_repetition_penalty": 0.5})


def test_presets():
    assert set(PRESETS) == {"greedy", "precise", "balanced", "creative", "plain"}
    assert PRESETS["creative"].bot_repetition_penalty == 1.5
    assert PRESETS["creative"].repetition_penalty == 1.0
    # plain is balanced sampling with the controls off, so the two measure the controls.
    assert PRESETS["plain"] == apply_overrides(PRESETS["balanced"], make_overrides(REPETITION_OFF))
    assert PRESETS["plain"].temperature == PRESETS["balanced"].temperature
    assert not PRESETS["plain"].avoid_repeats


def test_plain_and_repetition_off_switch_every_control_off(gen):
    request = GenerationRequest("ada: hi\nBot: hello there\nada: hey\nBot:", PRESETS["plain"],
                                bot_texts=("hello there",))
    for settings in (PRESETS["plain"], apply_overrides(PRESETS["creative"], make_overrides(REPETITION_OFF))):
        processors, _ = gen.pipeline([request], settings, 20, suppress_blank_start=False)
        assert len(processors) == 0
        _, kwargs = gen._prepare([request], settings, ())
        assert [type(p).__name__ for p in kwargs["logits_processor"]][:1] == ["SuppressTokensAtBeginLogitsProcessor"]
        assert not any("Repetition" in type(p).__name__ or "NGram" in type(p).__name__
                       for p in kwargs["logits_processor"])
        assert kwargs["repetition_penalty"] == 1.0
        assert not kwargs["no_repeat_ngram_size"]  # the stock n-gram ban reads the prompt; never on


def test_processors_follow_the_settings_and_each_rows_bot_texts(gen):
    from chatbot.repetition import BotRepetitionPenalty, ReplyNoRepeatNGram

    said = ("hello there", "i like tea")
    rows = [GenerationRequest("p", bot_texts=said), GenerationRequest("q")]
    procs, _ = gen.pipeline(rows, DecodingSettings(), 9, suppress_blank_start=False)
    assert [type(p) for p in procs] == [BotRepetitionPenalty, ReplyNoRepeatNGram, ReplyNoRepeatNGram]
    penalty, in_reply, against_bot = procs
    # Each turn tokenised as it sits in a transcript, after "Bot:" with its leading space.
    turns = [gen.tokenizer(" " + t, add_special_tokens=False)["input_ids"] for t in said]
    assert penalty.bot_token_ids == (tuple(turns[0] + turns[1]), ())
    assert penalty.penalty == 1.3 and penalty.prompt_length == 9
    assert (in_reply.ngram_size, in_reply.bot_turns_given) == (3, False)
    assert (against_bot.ngram_size, against_bot.bot_turns_given, len(against_bot._turn_bans)) == (4, True, 2)
    assert against_bot._turn_bans[1] == {}

    # Without any bot turn there is nothing to check the reply against.
    assert [type(p) for p in gen.pipeline([GenerationRequest("p")], DecodingSettings(), 9,
                                          suppress_blank_start=False)[0]] == [BotRepetitionPenalty, ReplyNoRepeatNGram]
    only_ngrams = DecodingSettings(bot_repetition_penalty=1.0, no_repeat_ngram_size=0, bot_no_repeat_ngram_size=2)
    assert [type(p) for p in gen.pipeline(rows, only_ngrams, 9, suppress_blank_start=False)[0]] == [ReplyNoRepeatNGram]


def test_user_words_are_not_penalised(gen):
    """A phrase from the user's turn stays free to be said: only the bot's own words count."""
    import torch
    from transformers import NoRepeatNGramLogitsProcessor

    phrase = gen.tokenizer(" i like pasta", add_special_tokens=False)["input_ids"]
    assert len(phrase) >= 3
    prompt = gen.tokenizer("ada: i like pasta\nBot:", add_special_tokens=False)["input_ids"]
    settings = DecodingSettings(no_repeat_ngram_size=3, bot_repetition_penalty=2.0)
    procs, _ = gen.pipeline([GenerationRequest("ada: i like pasta\nBot:", settings)], settings, len(prompt),
                            suppress_blank_start=False)
    # The reply has begun the user's phrase; its next token must keep its score.
    input_ids = torch.tensor([prompt + phrase[:-1]])
    scores = torch.ones((1, len(gen.tokenizer)))
    out = procs(input_ids, scores)
    assert out[0, phrase[-1]] == 1.0
    # The stock processor that used to run here would have banned it (the prompt holds the phrase).
    assert NoRepeatNGramLogitsProcessor(len(phrase))(input_ids, scores.clone())[0, phrase[-1]] == -float("inf")


def _clean_greedy_reply(gen):
    """A prompt and the tiny model's bare greedy reply to it, for a reply that decodes cleanly.

    The random tiny model also produces byte-fallback pieces that decode to U+FFFD and do not
    tokenise back to what was generated; such a reply is no use as a bot turn.
    """
    stops = tuple(gen.format.stop_strings(["ada", "Bot"]))
    for user in ["hi", "do you have any pets?", "what did you eat today?", "yo"]:
        prompt = f"ada: {user}\nBot:"
        text = gen.generate([GenerationRequest(prompt, GREEDY, stops)])[0].text
        if "\ufffd" not in text and len(gen.bot_turn_ids([text])[0]) >= 3:
            return prompt, stops, text
    raise AssertionError("no prompt gave a clean greedy reply")


def _reply_ids(gen, request):
    """The token ids `generate` produces for ``request``, before any decoding or cutting."""
    import torch

    enc, kwargs = gen._prepare([request], request.settings, request.stop_strings)
    with torch.inference_mode():
        out = gen.model.generate(**enc, **kwargs)
    return out[0, enc["input_ids"].shape[1]:].tolist()


def test_bot_texts_keep_the_reply_off_the_bots_earlier_turn(gen):
    prompt, stops, earlier = _clean_greedy_reply(gen)
    # Same prompt: only the bot_texts and the controls differ.
    controls = GREEDY.model_copy(update={"bot_no_repeat_ngram_size": 2, "bot_repetition_penalty": 5.0})
    request = GenerationRequest(prompt, controls, stops, (earlier,))
    reply = gen.generate([request])[0].text
    assert reply != earlier

    said = gen.bot_turn_ids([earlier])[0]
    said_pairs = set(zip(said, said[1:]))
    new = _reply_ids(gen, GenerationRequest(prompt, controls, (), (earlier,)))
    assert len(new) >= 2
    assert not said_pairs & set(zip(new, new[1:]))


def test_stream_applies_the_controls_too(gen):
    prompt, stops, earlier = _clean_greedy_reply(gen)
    controls = GREEDY.model_copy(update={"bot_no_repeat_ngram_size": 2, "bot_repetition_penalty": 5.0})
    request = GenerationRequest(prompt, controls, stops, (earlier,))
    streamed = "".join(gen.stream(request))
    assert streamed != earlier
    assert streamed == gen.generate([request])[0].text


def test_batch_rows_with_different_bot_texts_equal_one_by_one(gen):
    settings = DecodingSettings(temperature=0, max_new_tokens=12)  # every control on, defaults
    requests = [
        GenerationRequest("ada: hi\nBot: hello there\nada: hi\nBot:", settings, bot_texts=("hello there",)),
        GenerationRequest("bob: what did you eat today? i had pasta\nBot:", settings),
        GenerationRequest("cy: yo\nBot: yo yo\ncy: yo\nBot: what is up\ncy: yo\nBot:", settings,
                          bot_texts=("yo yo", "what is up")),
    ]
    one_by_one = [gen.generate([r])[0].text for r in requests]
    assert [r.text for r in gen.generate(requests)] == one_by_one


def test_request_keeps_its_positional_fields():
    request = GenerationRequest("p", GREEDY, ("\n",))
    assert (request.prompt, request.settings, request.stop_strings, request.bot_texts) == ("p", GREEDY, ("\n",), ())


def test_a_cancelled_request_ends_at_its_next_token_and_the_batch_goes_on(roomy_gen):
    import threading

    from chatbot.decoding import DecodingSettings
    from chatbot.generation import GenerationRequest

    settings = DecodingSettings(temperature=0, max_new_tokens=30, no_repeat_ngram_size=0, bot_repetition_penalty=1.0)
    cancel = threading.Event()
    cancel.set()
    gone = GenerationRequest("ada: hi there\nBot:", settings, cancel=cancel)
    kept = GenerationRequest("ada: hi there\nBot:", settings, cancel=threading.Event())
    results = roomy_gen.generate([gone, kept])
    assert results[0].completion_tokens <= 2  # the token in flight, then the end
    assert results[1].completion_tokens == 30 and results[1].finish_reason == "length"
    # Streaming too: the stream ends once its request is cancelled.
    cancel2 = threading.Event()
    pieces = []
    for piece in roomy_gen.stream(GenerationRequest("ada: hi there\nBot:", settings, cancel=cancel2)):
        pieces.append(piece)
        cancel2.set()
    assert len(pieces) <= 2


@pytest.mark.parametrize("native", [False, True])
def test_the_cpu_gets_bfloat16_only_where_it_multiplies_it_natively(monkeypatch, tiny_dir, native):
    import torch

    from chatbot.decoding import DecodingSettings
    from chatbot.generation import GenerationRequest, LocalGenerator, _dtype_for

    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: native)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)
    expected = torch.bfloat16 if native else torch.float32
    assert _dtype_for("cpu") == expected
    gen = LocalGenerator.from_pretrained(tiny_dir, device="cpu")
    assert gen.model.dtype == expected
    reply = gen.generate([GenerationRequest("ada: hi\nBot:", DecodingSettings(temperature=0, max_new_tokens=4))])[0]
    assert reply.completion_tokens > 0


def test_loading_a_model_prints_no_progress_bars_and_leaves_the_setting_as_it_was(tiny_dir, capfd):
    from transformers.utils import logging as hf_logging

    hf_logging.enable_progress_bar()
    capfd.readouterr()
    LocalGenerator.from_pretrained(tiny_dir, device="cpu")
    out, err = capfd.readouterr()
    assert "Loading weights" not in err + out and "%|" not in err
    assert hf_logging.is_progress_bar_enabled()
