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


def test_multi_token_stop_string_cuts_the_reply(gen):
    # Seeded sampling gives the random tiny model varied output; the stop string check
    # does not change the random draws, so both runs sample the same tokens.
    settings = DecodingSettings(temperature=1.0, top_k=0, top_p=1.0, seed=11, max_new_tokens=12,
                                repetition_penalty=1.0, no_repeat_ngram_size=0)
    free = gen.generate([GenerationRequest("ada: hi\nBot:", settings)])[0].text
    ids = gen.tokenizer(free, add_special_tokens=False)["input_ids"]
    stop = gen.tokenizer.decode(ids[4:7])
    assert len(gen.tokenizer(stop, add_special_tokens=False)["input_ids"]) > 1
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
