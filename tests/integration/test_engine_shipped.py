"""The engine with the shipped model and the shipped personas."""

import pytest

from chatbot.config import Settings
from chatbot.engine import ChatEngine
from chatbot.generation import LocalGenerator
from chatbot.memory import InMemoryStore
from chatbot.prompting import list_personas


@pytest.fixture(scope="module")
def shipped():
    return LocalGenerator.from_pretrained(None, device="cpu")


@pytest.fixture()
async def engine(shipped, monkeypatch):
    prompts = []
    real = shipped.generate

    def spy(requests):
        prompts.extend(r.prompt for r in requests)
        return real(requests)

    monkeypatch.setattr(shipped, "generate", spy)
    eng = ChatEngine(shipped, InMemoryStore(), Settings(decoding={"seed": 0}))
    eng.prompts = prompts
    yield eng
    await eng.close()


@pytest.mark.parametrize("name", sorted(list_personas()))
async def test_every_shipped_persona_answers_in_its_own_name(engine, name):
    persona = engine.persona(name)
    reply = await engine.respond(f"cli:{name}", "ada", "hi! how are you today?", persona=name)
    assert reply.speaker == persona.speaker and reply.text.strip()
    assert "\n" not in reply.text and "ada:" not in reply.text
    prompt = engine.prompts[-1]
    assert prompt.startswith(persona.description) and prompt.endswith(f"ada: hi! how are you today?\n{persona.speaker}:")
    assert reply.settings.temperature == engine.settings.decoding_settings(persona.preset).temperature


async def test_a_long_conversation_fits_the_context_and_keeps_the_persona(engine, shipped):
    for i in range(60):
        await engine.store.append("cli:long", "ada", "user", f"here is message number {i} about my day")
        await engine.store.append("cli:long", "Sam", "bot", f"thanks for telling me about part {i}")
    reply = await engine.respond("cli:long", "ada", "what were we talking about?")
    assert reply.prompt_tokens <= shipped.context_size - reply.settings.max_new_tokens
    assert len(reply.dropped_turn_ids) % 8 == 0 and len(reply.dropped_turn_ids) > 90
    assert engine.prompts[-1].startswith(engine.persona("friendly").description)


async def test_the_default_engine_answers_from_the_bundled_bank_and_an_operators_file(tmp_path):
    """The shipped default: the model chooses among bank replies and its own (`response_bank`)."""
    import json

    faq = tmp_path / "faq.jsonl"
    faq.write_text(json.dumps({"context": "who made you?",
                               "reply": "the mods of this server set me up, ask them anything"}) + "\n",
                   encoding="utf-8")
    engine = ChatEngine.from_settings(Settings(memory_path=":memory:", device="cpu",
                                               response_bank=("chitchat", str(faq)), decoding={"seed": 0}))
    try:
        assert len(engine.generator.bank) > 100_000
        made = await engine.respond("cli:faq", "ada", "who made you?")
        assert made.text == "the mods of this server set me up, ask them anything"
        other = await engine.respond("cli:food", "ada", "what do you like to eat?")
        assert other.text != made.text and other.finish_reason == "stop"
        streamed = await engine.stream("cli:faq2", "ada", "who made you?").text()
        assert streamed == made.text
    finally:
        await engine.close()
