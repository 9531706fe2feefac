"""GPT2LLM and ChatGPT2 on the shipped model."""

from langchain_core.messages import HumanMessage

from adapters.langchain_gpt2 import GPT2LLM, ChatGPT2

PROMPTS = ["User: hi!\nBot:", "User: what is your favorite movie?\nBot:", "User: do you like music?\nBot:"]


def test_llm_batch_equals_one_by_one_and_stops_at_newlines():
    llm = GPT2LLM(preset="greedy", max_new_tokens=30)
    batched = llm.batch(PROMPTS, stop=["\n"])
    assert batched == [llm.invoke(p, stop=["\n"]) for p in PROMPTS]
    assert all(text.strip() and "\n" not in text and "User:" not in text for text in batched)
    assert "".join(llm.stream(PROMPTS[1], stop=["\n"])) == batched[1]


def test_chat_model_replies_in_persona():
    chat = ChatGPT2(persona="playful", seed=0)
    reply = chat.invoke([HumanMessage("hi! what should we do today?")])
    assert reply.content.strip() and "Pip:" not in reply.content and "User:" not in reply.content
    assert reply.usage_metadata["output_tokens"] > 0


def test_chat_model_chooses_from_the_response_bank_like_the_engine():
    from langchain_core.messages import AIMessage

    from chatbot.response_bank import BankedGenerator

    chat = ChatGPT2(seed=0)
    assert isinstance(chat.generator, BankedGenerator) and len(chat.generator.bank) > 100_000
    name = chat.invoke([HumanMessage("hi i'm maya"), AIMessage("hi maya!"), HumanMessage("what's my name?")])
    assert name.content == "your name is Maya!"
    music = chat.invoke([HumanMessage("do you like music?")]).content
    assert music and "".join(c.content for c in chat.stream([HumanMessage("do you like music?")])) == music
    assert not isinstance(ChatGPT2(seed=0, response_bank=()).generator, BankedGenerator)
