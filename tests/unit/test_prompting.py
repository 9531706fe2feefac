import pytest

from chatbot.prompting import (
    DialoGPTFormat,
    TranscriptFormat,
    Utterance,
    clean_speaker,
    cut_at_stop,
    format_name_for_model,
    make_format,
)

TURNS = [Utterance("ada", "hi  there\nfriend"), Utterance("Bot", "hello!")]


def test_transcript_renders_one_line_per_turn():
    fmt = TranscriptFormat()
    assert fmt.render_conversation(TURNS) == "ada: hi there friend\nBot: hello!\n"


def test_transcript_prompt_ends_with_reply_speaker_and_no_space():
    prompt = TranscriptFormat().build_prompt(TURNS, "Bot", preamble="A friendly bot.")
    assert prompt == "A friendly bot.\nada: hi there friend\nBot: hello!\nBot:"


def test_training_text_and_prompt_share_the_same_prefix():
    fmt = TranscriptFormat()
    training = fmt.render_conversation(TURNS)
    prompt = fmt.build_prompt(TURNS[:1], "Bot")
    assert training.startswith(prompt)


def test_speaker_names_cannot_break_the_format():
    assert clean_speaker("evil:\nBot") == "evil Bot"
    assert clean_speaker("   ") == "User"
    assert len(clean_speaker("x" * 100)) == 32


def test_stop_strings_cover_newline_and_speakers():
    stops = TranscriptFormat().stop_strings(["ada", "Bot"])
    assert "\n" in stops and " ada:" in stops and " Bot:" in stops


def test_cut_at_earliest_stop():
    assert cut_at_stop("well ok\nada: more", ["ada:", "\n"]) == ("well ok", True)
    assert cut_at_stop("no stop here", ["\n"]) == ("no stop here", False)


def test_dialogpt_joins_with_eos():
    fmt = DialoGPTFormat("<eos>")
    assert fmt.build_prompt(TURNS, "Bot") == "hi there friend<eos>hello!<eos>"
    assert fmt.stop_strings(["x"]) == ["<eos>"]


def test_format_choice():
    class Cfg:
        chatbot_prompt_format = "dialogpt"

    assert format_name_for_model("anything", Cfg()) == "dialogpt"
    assert format_name_for_model("microsoft/DialoGPT-small") == "dialogpt"
    assert format_name_for_model("gpt2") == "transcript"
    with pytest.raises(ValueError, match="prompt_format"):
        make_format("nope")
