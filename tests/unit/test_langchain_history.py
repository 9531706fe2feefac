"""The LangChain chat history adapter against real memory stores (a SQLite file and the in-memory one)."""

import asyncio
import types

import pytest
from langchain_core.messages import AIMessage, ChatMessage, HumanMessage, SystemMessage, ToolMessage
from langchain_core.prompts import ChatPromptTemplate, MessagesPlaceholder
from langchain_core.runnables import RunnableLambda
from langchain_core.runnables.history import RunnableWithMessageHistory

from adapters.langchain_history import ChatbotMessageHistory
from chatbot.config import Settings
from chatbot.engine import ChatEngine
from chatbot.memory import InMemoryStore, SQLiteMemoryStore

CID = "langchain:session:s1"


@pytest.fixture(params=["sqlite", "memory"])
def store(request, tmp_path):
    s = SQLiteMemoryStore(tmp_path / "m.sqlite3") if request.param == "sqlite" else InMemoryStore()
    yield s
    asyncio.run(s.close())


@pytest.fixture()
def sqlite_store(tmp_path):
    s = SQLiteMemoryStore(tmp_path / "m.sqlite3")
    yield s
    asyncio.run(s.close())


def exchange():
    return [
        HumanMessage(content="hi there"),
        AIMessage(content="hello!"),
        HumanMessage(content="i am ada", name="ada"),
        AIMessage(content="nice to meet you", name="Pip"),
    ]


def as_tuples(messages):
    return [(type(m).__name__, m.content, m.name) for m in messages]


EXPECTED = [("HumanMessage", "hi there", None), ("AIMessage", "hello!", None),
            ("HumanMessage", "i am ada", "ada"), ("AIMessage", "nice to meet you", "Pip")]


def test_round_trip_sync(store):
    history = ChatbotMessageHistory("s1", store)
    assert history.conversation_id == CID
    assert history.messages == []
    history.add_messages(exchange())
    history.add_user_message("one more")
    history.add_ai_message(AIMessage(content="sure"))
    assert as_tuples(history.messages) == EXPECTED + [("HumanMessage", "one more", None), ("AIMessage", "sure", None)]
    turns = asyncio.run(store.newest(CID, 10))
    assert [(t.role, t.author) for t in turns] == [("user", "User"), ("bot", "Bot"), ("user", "ada"),
                                                   ("bot", "Pip"), ("user", "User"), ("bot", "Bot")]


async def test_round_trip_async(store):
    history = ChatbotMessageHistory("s1", store, user_name="ada", bot_name="Pip")
    await history.aadd_messages([HumanMessage(content="hi"), AIMessage(content="hello"),
                                 HumanMessage(content="me too", name="User"), AIMessage(content="ok", name="Bot")])
    # Messages without a name are written as this history's own user and bot; anyone
    # else keeps their name on the way back.
    assert as_tuples(await history.aget_messages()) == [
        ("HumanMessage", "hi", None), ("AIMessage", "hello", None),
        ("HumanMessage", "me too", "User"), ("AIMessage", "ok", "Bot")]
    assert [(t.role, t.author) for t in await store.newest(CID, 10)] == [
        ("user", "ada"), ("bot", "Pip"), ("user", "User"), ("bot", "Bot")]


async def test_list_content_is_joined_text(store):
    history = ChatbotMessageHistory("s1", store)
    await history.aadd_messages([HumanMessage(content=["what is ", {"type": "text", "text": "2+2?"}])])
    assert [m.content for m in await history.aget_messages()] == ["what is 2+2?"]


def test_persists_across_store_objects_and_sessions_are_separate(tmp_path):
    path = tmp_path / "m.sqlite3"
    first = SQLiteMemoryStore(path)
    ChatbotMessageHistory("s1", first).add_messages(exchange())
    asyncio.run(first.close())

    second = SQLiteMemoryStore(path)
    try:
        assert as_tuples(ChatbotMessageHistory("s1", second).messages) == EXPECTED
        assert ChatbotMessageHistory("s2", second).messages == []
    finally:
        asyncio.run(second.close())


async def test_clear_removes_only_that_session(store):
    one, two = ChatbotMessageHistory("s1", store), ChatbotMessageHistory("s2", store)
    await one.aadd_messages(exchange())
    await two.aadd_messages(exchange()[:2])
    await store.append("cli:local", "ada", "user", "not langchain")
    await one.aclear()
    assert await one.aget_messages() == []
    assert len(await two.aget_messages()) == 2
    assert await store.count("cli:local") == 1
    # The sync spelling does the same.
    two.clear()
    assert await store.count("langchain:session:s2") == 0


@pytest.mark.parametrize("bad, named", [
    (ToolMessage(content="42", tool_call_id="call-1"), "ToolMessage"),
    (ChatMessage(content="hm", role="critic"), "ChatMessage with role 'critic'"),
    (AIMessage(content="", tool_calls=[{"name": "add", "args": {}, "id": "call-1"}]), "tool calls"),
    (HumanMessage(content=[{"type": "image_url", "image_url": {"url": "x"}}]), "image_url"),
    ("just a string", "str"),
])
async def test_bad_message_in_a_batch_writes_nothing(store, bad, named):
    history = ChatbotMessageHistory("s1", store)
    batch = [HumanMessage(content="hi"), bad, AIMessage(content="hello")]
    with pytest.raises(ValueError, match=named) as err:
        await history.aadd_messages(batch)
    assert "message 1" in str(err.value)
    assert await store.count(CID) == 0
    with pytest.raises(ValueError, match=named):
        history.add_messages(batch)  # the sync path, called inside this running loop
    assert await store.count(CID) == 0


async def test_system_messages_are_left_out_with_a_warning_and_the_turns_kept(store, caplog):
    history = ChatbotMessageHistory("s1", store)
    with caplog.at_level("WARNING", logger="adapters.langchain_history"):
        await history.aadd_messages([SystemMessage(content="be nice"), HumanMessage(content="hi"),
                                     AIMessage(content="hello")])
    assert [type(m).__name__ for m in await history.aget_messages()] == ["HumanMessage", "AIMessage"]
    assert "left out 1 system message" in caplog.text and "prompt" in caplog.text


async def test_chat_messages_are_stored_by_their_role(store):
    history = ChatbotMessageHistory("s1", store)
    await history.aadd_messages([ChatMessage(content="hi", role="user"), ChatMessage(content="hey", role="assistant"),
                                 ChatMessage(content="be brief", role="system")])
    assert [(type(m).__name__, m.content) for m in await history.aget_messages()] == [
        ("HumanMessage", "hi"), ("AIMessage", "hey")]


@pytest.mark.parametrize("session_id", ["has space", "", "a/b", "x" * 300, 42])
def test_bad_session_id_is_a_clear_error(store, session_id):
    with pytest.raises(ValueError, match="session_id"):
        ChatbotMessageHistory(session_id, store)


def test_needs_exactly_one_of_store_or_engine(store, tmp_path):
    with pytest.raises(ValueError, match=r'SQLiteMemoryStore\("chatbot.sqlite3"\)'):
        ChatbotMessageHistory("s1")
    with pytest.raises(ValueError, match="not both"):
        ChatbotMessageHistory("s1", store, engine=types.SimpleNamespace(store=store))
    with pytest.raises(ValueError, match="SQLiteMemoryStore"):
        ChatbotMessageHistory("s1", str(tmp_path / "m.sqlite3"))  # type: ignore[arg-type]


@pytest.mark.parametrize("kwargs, named", [
    ({"max_messages": 0}, "max_messages"),
    ({"max_messages": True}, "max_messages"),
    ({"user_name": " "}, "user_name"),
    ({"bot_name": None}, "bot_name"),
])
def test_bad_settings_name_the_setting(store, kwargs, named):
    with pytest.raises(ValueError, match=named):
        ChatbotMessageHistory("s1", store, **kwargs)


async def test_engine_store_is_used(tiny_prompts, roomy_gen):
    engine = ChatEngine(roomy_gen, InMemoryStore(), Settings(persona="tester", prompts_dir=tiny_prompts))
    try:
        history = ChatbotMessageHistory("s1", engine=engine)
        assert history.store is engine.store
        await history.aadd_messages(exchange()[:2])
        assert [t.text for t in await engine.history(CID)] == ["hi there", "hello!"]
    finally:
        await engine.close()


async def test_max_messages_reads_only_the_newest(store):
    history = ChatbotMessageHistory("s1", store, max_messages=3)
    await history.aadd_messages(exchange())
    assert [m.content for m in await history.aget_messages()] == ["hello!", "i am ada", "nice to meet you"]
    assert [m.content for m in history.messages] == ["hello!", "i am ada", "nice to meet you"]
    assert len(await ChatbotMessageHistory("s1", store).aget_messages()) == 4


async def test_sync_api_inside_a_running_loop(store):
    history = ChatbotMessageHistory("s1", store)
    history.add_messages(exchange())
    assert as_tuples(history.messages) == EXPECTED
    assert "hi there" in str(history)
    assert history.export()["conversation_id"] == CID
    history.clear()
    assert history.messages == []
    # The loop is still usable afterwards.
    await history.aadd_messages(exchange()[:1])
    assert await store.count(CID) == 1


def echo_chain(seen):
    def answer(prompt_value):
        messages = prompt_value.to_messages()
        seen.append(messages)
        return AIMessage(content=f"echo: {messages[-1].content}")

    prompt = ChatPromptTemplate.from_messages(
        [("system", "be nice"), MessagesPlaceholder("history"), ("human", "{question}")])
    return prompt | RunnableLambda(answer)


def with_history(seen, store):
    return RunnableWithMessageHistory(
        echo_chain(seen), lambda sid: ChatbotMessageHistory(sid, store),
        input_messages_key="question", history_messages_key="history")


def test_runnable_with_message_history(sqlite_store):
    seen = []
    chain = with_history(seen, sqlite_store)
    config = {"configurable": {"session_id": "abc"}}
    assert chain.invoke({"question": "first?"}, config=config).content == "echo: first?"
    assert chain.invoke({"question": "second?"}, config=config).content == "echo: second?"

    turns = asyncio.run(sqlite_store.newest("langchain:session:abc", 10))
    assert [(t.role, t.text) for t in turns] == [("user", "first?"), ("bot", "echo: first?"),
                                                 ("user", "second?"), ("bot", "echo: second?")]
    assert [len(m) for m in seen] == [2, 4]  # system + question, then system + first exchange + question
    assert [m.content for m in seen[1][1:3]] == ["first?", "echo: first?"]


def test_a_message_list_input_with_a_system_message_keeps_the_exchange(sqlite_store):
    # The wrapper stores the input messages and the reply after the call, and only logs a
    # history's error: a refused system message would lose the whole exchange unseen.
    chain = RunnableWithMessageHistory(RunnableLambda(lambda messages: AIMessage(content="hello ada")),
                                       lambda sid: ChatbotMessageHistory(sid, sqlite_store))
    chain.invoke([SystemMessage(content="be kind"), HumanMessage(content="hi")],
                 config={"configurable": {"session_id": "abc"}})
    turns = asyncio.run(sqlite_store.newest("langchain:session:abc", 10))
    assert [(t.role, t.text) for t in turns] == [("user", "hi"), ("bot", "hello ada")]


async def test_runnable_with_message_history_async(sqlite_store):
    seen = []
    chain = with_history(seen, sqlite_store)
    config = {"configurable": {"session_id": "xyz"}}
    await chain.ainvoke({"question": "first?"}, config=config)
    await chain.ainvoke({"question": "second?"}, config=config)
    assert await sqlite_store.count("langchain:session:xyz") == 4
    assert [len(m) for m in seen] == [2, 4]


async def test_forget_author_and_export(store):
    history = ChatbotMessageHistory("s1", store)
    await history.aadd_messages(exchange())
    assert history.forget_author("ada") == 1
    assert "i am ada" not in [m.content for m in history.messages]
    assert await history.aforget_author("nobody") == 0
    with pytest.raises(ValueError, match="author"):
        await history.aforget_author("")

    exported = await history.aexport()
    assert exported["conversation_id"] == CID
    assert [t["text"] for t in exported["turns"]] == ["hi there", "hello!", "nice to meet you"]
    assert history.export()["turns"] == exported["turns"]
