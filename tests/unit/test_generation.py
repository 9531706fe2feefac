import pytest

from chatbot.errors import ChatbotError, ModelNotFoundError
from chatbot.generation import (
    DecodingSettings,
    GenerationRequest,
    LocalGenerator,
    load_model,
    make_decoding_settings,
)

GREEDY = DecodingSettings(temperature=0, max_new_tokens=12, repetition_penalty=1.0, no_repeat_ngram_size=0)


@pytest.mark.parametrize(
    "values, message",
    [
        ({"temperature": -0.5}, "`temperature` must be greater than or equal to 0, got -0.5"),
        ({"top_p": 1.5}, "`top_p` must be less than or equal to 1, got 1.5"),
        ({"top_p": 0}, "`top_p` must be greater than 0"),
        ({"max_new_tokens": 0}, "`max_new_tokens`"),
        ({"top_kk": 3}, "`top_kk` is not a known setting"),
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
                                    repetition_penalty=1.0, no_repeat_ngram_size=0)
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

    def first_empty(prompts, settings, stops):
        out = real(prompts, settings, stops)
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
