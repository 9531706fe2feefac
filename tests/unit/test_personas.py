import pytest

from chatbot.decoding import PRESETS, get_preset
from chatbot.errors import ChatbotError
from chatbot.prompting import TranscriptFormat, get_persona, list_personas, load_persona


def test_shipped_personas_load_and_differ():
    personas = list_personas()
    assert {"friendly", "concise", "formal", "playful"} <= set(personas)
    assert len({p.speaker for p in personas.values()}) >= 3
    assert len({p.preset for p in personas.values()}) >= 3
    assert len({p.description for p in personas.values()}) == len(personas)
    for p in personas.values():
        assert p.examples, f"{p.name} has no example exchanges"


def test_persona_is_pinned_at_the_top_of_the_prompt():
    p = get_persona("friendly")
    prompt = TranscriptFormat().build_prompt(p.example_turns("ada"), p.speaker, p.description)
    assert prompt.startswith(p.description + "\nada: hi!\nSam: ")
    assert prompt.endswith("\nSam:")


def write(tmp_path, name, text):
    path = tmp_path / f"{name}.toml"
    path.write_text(text)
    return path


@pytest.mark.parametrize(
    "text, message",
    [
        ('name = "x"\ndescription = "d"\n', "x.toml: `speaker` Field required"),
        ('name = "x"\nspeaker = "S"\nmood = "happy"\n', "x.toml: `mood` is not a known setting"),
        ('name = "x"\nspeaker = "S"\npreset = "wild"\n', "x.toml: `preset` must be one of greedy, precise"),
        ('name = "x"\nspeaker = "S: evil"\n', "x.toml: `speaker` must be a single line without ':'"),
        ('name = "x"\nspeaker = "S"\n[[examples]]\nuser = "hi"\n', "x.toml: `examples.0.bot` Field required"),
        ('name = "x"\nspeaker = \n', "x.toml: not valid TOML"),
        ('name = "y"\nspeaker = "S"\n', "x.toml: `name` must match the file name"),
    ],
)
def test_malformed_persona_names_file_and_field(tmp_path, text, message):
    path = write(tmp_path, "x", text)
    with pytest.raises(ChatbotError) as err:
        load_persona(path)
    assert message in str(err.value)


def test_unknown_persona_lists_the_known_ones(tmp_path):
    write(tmp_path, "alpha", 'name = "alpha"\nspeaker = "A"\n')
    with pytest.raises(ChatbotError, match="unknown persona 'beta'; available: alpha"):
        get_persona("beta", tmp_path)
    with pytest.raises(ChatbotError, match="unknown persona"):
        get_persona("../etc/passwd", tmp_path)


def test_presets():
    assert PRESETS["greedy"].greedy
    assert PRESETS["creative"].temperature > PRESETS["balanced"].temperature > PRESETS["precise"].temperature
    with pytest.raises(ChatbotError, match="unknown decoding preset 'hot'; available: greedy"):
        get_preset("hot")


def test_a_persona_style_counts_words_and_writes_sentences():
    from chatbot.prompting import PersonaStyle

    style = PersonaStyle(max_words=4, avoid=("lol", "u"), prefer=("!",), sentence_case=True)
    assert style.fit("great!! lol") == 1.0 and style.fit("you lol u") == -2.0 and style.fit("plural") == 0.0
    assert style.allows("one two three four") and not style.allows("one two three four five")
    assert style.write("i think so. i'm sure") == "I think so. I'm sure."
    assert style.write("is it?") == "Is it?" and PersonaStyle().write("i think so") == "i think so"


def test_the_shipped_personas_styles_load_and_a_bad_key_is_named(tmp_path):
    from chatbot.errors import ChatbotError
    from chatbot.prompting import get_persona

    assert get_persona("concise").style.max_words == 10 and get_persona("formal").style.sentence_case
    assert get_persona("friendly").style.fit("anything at all!") == 0.0
    (tmp_path / "odd.toml").write_text('name = "odd"\nspeaker = "Odd"\n[style]\nmax_word = 3\n', encoding="utf-8")
    with pytest.raises(ChatbotError, match="style.max_word"):
        get_persona("odd", tmp_path)
