"""Settings: one typed place, from a TOML file and the environment; every typo is an error that names it."""

import pytest

from adapters.discord_settings import DiscordSettings
from chatbot.config import Section, Settings, register_section
from chatbot.errors import ChatbotError


def write(tmp_path, text):
    path = tmp_path / "chatbot.toml"
    path.write_text(text, encoding="utf-8")
    return path


def test_defaults_need_no_file(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    s = Settings.load(env={})
    assert s.persona == "friendly" and s.memory_path == "chatbot.sqlite3" and s.model is None
    assert s.decoding_settings("balanced").temperature == 0.8


def test_file_then_environment(tmp_path):
    path = write(tmp_path, 'persona = "concise"\nmemory_path = "/tmp/x.sqlite3"\nwindow_chunk = 4\n'
                           '[decoding]\ntemperature = 0.6\nmax_new_tokens = 60\n')
    s = Settings.load(path, env={"CHATBOT_PERSONA": "formal", "CHATBOT_DECODING__TOP_P": "0.5"})
    assert s.persona == "formal" and s.memory_path == "/tmp/x.sqlite3" and s.window_chunk == 4
    d = s.decoding_settings("precise")
    assert (d.temperature, d.max_new_tokens, d.top_p, d.top_k) == (0.6, 60, 0.5, 40)


def test_from_file_reads_the_named_file(tmp_path):
    assert Settings.from_file(write(tmp_path, 'device = "cpu"\n')).device == "cpu"


def test_chatbot_toml_in_the_working_directory_and_chatbot_config(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    write(tmp_path, 'persona = "playful"\n')
    assert Settings.load(env={}).persona == "playful"
    other = tmp_path / "other.toml"
    other.write_text('persona = "formal"\n')
    assert Settings.load(env={"CHATBOT_CONFIG": str(other)}).persona == "formal"


@pytest.mark.parametrize(
    "text, message",
    [
        ('persna = "friendly"\n', "`persna` is not a known setting"),
        ("window_chunk = 0\n", "`window_chunk` must be greater than or equal to 1, got 0"),
        ("[decoding]\ntop_p = 1.5\n", "`decoding.top_p` must be less than or equal to 1, got 1.5"),
        ("[decoding]\ntemprature = 1\n", "`decoding.temprature` is not a known setting"),
        ('preset = "wild"\n', "`preset` must be one of greedy, precise, balanced, creative, plain, got 'wild'"),
        ('device = "gpu"\n', "`device` must be auto, cpu, cuda, cuda:N or mps, got 'gpu'"),
        ('persona = "../x"\n', "`persona` must be a persona file name"),
        ("max_input_chars = 1e9\n", "`max_input_chars`"),
        ("persona = \n", "not valid TOML"),
    ],
)
def test_file_mistakes_name_the_file_and_the_key(tmp_path, text, message):
    path = write(tmp_path, text)
    with pytest.raises(ChatbotError) as err:
        Settings.load(path, env={})
    assert str(err.value).startswith(str(path)) and message in str(err.value)


@pytest.mark.parametrize(
    "env, message",
    [
        ({"CHATBOT_PERSONNA": "x"}, "CHATBOT_PERSONNA: `personna` is not a known setting"),
        ({"CHATBOT_DECODING__TOPP": "1"}, "CHATBOT_DECODING__TOPP: `decoding.topp` is not a known setting"),
        ({"CHATBOT_DECODING": "x"}, "set one decoding key at a time"),
        ({"CHATBOT_WINDOW_CHUNK": "lots"}, "`window_chunk` must be a valid integer"),
        ({"CHATBOT_DECODING__SEED": "-3"}, "`decoding.seed` must be greater than or equal to 0"),
    ],
)
def test_environment_mistakes_name_the_variable(tmp_path, monkeypatch, env, message):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ChatbotError) as err:
        Settings.load(env=env)
    assert message in str(err.value)


def test_missing_file_is_a_clear_error(tmp_path):
    with pytest.raises(ChatbotError, match="no such settings file"):
        Settings.load(tmp_path / "nope.toml", env={})


def test_discord_token_is_secret(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    s = Settings.load(env={"DISCORD_TOKEN": "abc.def.ghi"})
    assert s.section(DiscordSettings).token.get_secret_value() == "abc.def.ghi"
    assert "abc.def.ghi" not in repr(s) and "abc.def.ghi" not in str(s.model_dump())
    both = Settings.load(env={"DISCORD_TOKEN": "a", "CHATBOT_DISCORD__TOKEN": "b"})
    assert both.section(DiscordSettings).token.get_secret_value() == "b"


def test_a_face_reads_its_own_table_from_the_file_and_the_environment(tmp_path):
    path = tmp_path / "chatbot.toml"
    path.write_text('persona = "friendly"\n[discord]\nchannels = [1, 2]\nedit_interval = 2.5\n', encoding="utf-8")
    s = Settings.load(path, env={"CHATBOT_DISCORD__EDIT_INTERVAL": "3", "CHATBOT_DISCORD__SHARDED": "true"})
    face = s.section(DiscordSettings)
    assert (face.channels, face.edit_interval, face.sharded, face.stream) == ((1, 2), 3.0, True, True)
    assert Settings.load(env={"CHATBOT_DISCORD__CHANNELS": "5, 6"}).section(DiscordSettings).channels == (5, 6)
    assert Settings().section(DiscordSettings) == DiscordSettings()
    assert not hasattr(Settings(), "discord_token")  # the core knows no face


@pytest.mark.parametrize(("table", "env", "message"), [
    ('discord_token = "x"', {}, r"`discord_token` is now `token` in the \[discord\] table"),
    ("[discord]\nedit_interval = 0.01", {}, r"`discord.edit_interval` must be greater than or equal to 0.2, got 0.01"),
    ("[discord]\ntokn = 1", {}, r"`discord.tokn` is not a known setting"),
    ("[discrod]\ntoken = 1", {}, r"`discrod` is not a known setting"),
    ("", {"CHATBOT_DISCORD_TOKEN": "x"}, r"CHATBOT_DISCORD_TOKEN: `discord_token` is now `token` in the \[discord\]"),
    ("", {"CHATBOT_DISCORD__TOKN": "x"}, r"CHATBOT_DISCORD__TOKN: `discord.tokn` is not a known setting"),
])
def test_a_mistake_in_a_face_table_names_the_key(tmp_path, table, env, message):
    path = tmp_path / "chatbot.toml"
    path.write_text(table + "\n", encoding="utf-8")
    with pytest.raises(ChatbotError, match=message):
        Settings.load(path, env=env)


def test_with_section_checks_its_changes_like_the_file():
    s = Settings(discord={"edit_interval": 2.0}).with_section(DiscordSettings, channels=(7,), sharded=None)
    assert s.section(DiscordSettings).channels == (7,) and s.section(DiscordSettings).edit_interval == 2.0
    with pytest.raises(ChatbotError, match="`discord.edit_interval`"):
        s.with_section(DiscordSettings, edit_interval=0)


def test_a_new_face_section_is_one_class_and_one_registration():
    class Greeter(Section):  # what a face adds: its model ...
        name = "greeter_test"
        greeting: str = "hello"

    register_section(Greeter)  # ... and one registration (an installed face uses the entry point)
    s = Settings.load(env={"CHATBOT_GREETER_TEST__GREETING": "hi"})
    assert s.section(Greeter).greeting == "hi"
    with pytest.raises(ValueError, match="two settings sections"):
        register_section(type("Other", (Section,), {"name": "greeter_test"}))
    with pytest.raises(ValueError, match="not a core setting"):
        register_section(type("Clash", (Section,), {"name": "persona"}))


@pytest.mark.parametrize("model", [Settings, DiscordSettings])
def test_every_setting_has_a_docstring(model):
    import sys

    source = open(sys.modules[model.__module__].__file__, encoding="utf-8").read()
    for name in model.model_fields:
        after = source.split(f"\n    {name}: ", 1)[1].split("\n")
        assert any(line.strip().startswith('"""') for line in after[1:3]), f"`{name}` has no docstring"
