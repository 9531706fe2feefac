from transformers import AutoTokenizer

from chatbot.tools.training import EOS_TOKEN


def test_round_trip(tiny_tokenizer):
    text = "Ada: hi there!  2 spaces, digits 12345, émoji 🙂, tab\tend\nBob: ok\n"
    ids = tiny_tokenizer(text, add_special_tokens=False)["input_ids"]
    assert tiny_tokenizer.decode(ids) == text


def test_newline_and_eos_are_single_tokens(tiny_tokenizer):
    assert len(tiny_tokenizer("\n", add_special_tokens=False)["input_ids"]) == 1
    assert tiny_tokenizer.eos_token == EOS_TOKEN
    assert tiny_tokenizer.convert_tokens_to_ids(EOS_TOKEN) == tiny_tokenizer.eos_token_id


def test_no_special_tokens_added(tiny_tokenizer):
    ids = tiny_tokenizer("hi")["input_ids"]
    assert tiny_tokenizer.eos_token_id not in ids


def test_saved_tokenizer_loads_with_autotokenizer(tiny_tokenizer, tmp_path):
    tiny_tokenizer.save_pretrained(tmp_path)
    again = AutoTokenizer.from_pretrained(tmp_path)
    text = "Sam: what's up?\n"
    assert again(text)["input_ids"] == tiny_tokenizer(text)["input_ids"]
