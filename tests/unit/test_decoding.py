"""The one precedence rule and the one settings -> logits pipeline that every generator and face use."""

from __future__ import annotations

import pytest

from chatbot.decoding import (
    ENGINE_ONLY,
    GENERATION_FIELDS,
    PRESETS,
    DecodingSettings,
    compose,
    logits_pipeline,
    make_overrides,
)
from chatbot.errors import ChatbotError


def test_each_layer_overrides_only_the_keys_it_gives_in_order():
    persona = {"temperature": 0.6, "top_k": 20}
    settings = make_overrides({"top_k": 30, "max_new_tokens": 12})
    call = {"max_new_tokens": 5}
    got = compose("creative", persona, settings, call)
    assert (got.temperature, got.top_k, got.max_new_tokens) == (0.6, 30, 5)
    assert got.top_p == PRESETS["creative"].top_p  # given by no layer: the preset's
    assert compose("creative", None, {}, None) == PRESETS["creative"]
    assert compose(PRESETS["greedy"], {"seed": 3}).seed == 3


def test_a_bad_layer_or_preset_names_what_is_wrong():
    with pytest.raises(ChatbotError, match="unknown decoding preset 'creativ'"):
        compose("creativ")
    with pytest.raises(ChatbotError, match="`top_p` must be less than or equal to 1"):
        compose("balanced", {"top_p": 2})


def test_the_field_names_faces_expose_are_the_generators_settings():
    assert set(GENERATION_FIELDS) | set(ENGINE_ONLY) == set(DecodingSettings.model_fields)
    assert not set(GENERATION_FIELDS) & set(ENGINE_ONLY)


def test_the_pipeline_has_transformers_order_and_no_warpers_when_greedy():
    settings = DecodingSettings(repetition_penalty=1.2, temperature=0.7, top_k=10, top_p=0.9)
    processors, warpers = logits_pipeline(settings, prompt_length=4, bot_turns=[[[5, 6, 7, 8]]],
                                          blank_start_ids=[0])
    assert [type(p).__name__ for p in processors] == [
        "RepetitionPenaltyLogitsProcessor", "SuppressTokensAtBeginLogitsProcessor", "BotRepetitionPenalty",
        "ReplyNoRepeatNGram", "ReplyNoRepeatNGram"]
    assert [type(w).__name__ for w in warpers] == ["TemperatureLogitsWarper", "TopKLogitsWarper", "TopPLogitsWarper"]
    assert logits_pipeline(PRESETS["greedy"], prompt_length=4, bot_turns=[[]])[1] is None


def test_both_generators_decode_with_the_same_pipeline(roomy_gen, monkeypatch):
    """The local generator (through model.generate) and the batching one (step by step) build
    their processors in one place, and give the same replies for the same seed."""
    from chatbot import generation
    from chatbot.generation import GenerationRequest
    from chatbot.scheduler import BatchingGenerator

    calls = []
    real = generation.logits_pipeline
    monkeypatch.setattr(generation, "logits_pipeline", lambda *a, **k: calls.append(a[0]) or real(*a, **k))
    settings = DecodingSettings(temperature=0.9, max_new_tokens=10, seed=4, max_time=60)
    request = GenerationRequest("ada: hi there\nBot: hello\nada: how are you?\nBot:", settings, ("\nada:",),
                                ("hello",))
    alone = roomy_gen.generate([request])[0].text
    sched = BatchingGenerator(roomy_gen, max_batch=2)
    try:
        assert sched.generate([request])[0].text == alone
    finally:
        sched.close()
    assert calls == [settings, settings]
