"""The command line as a user meets it: exit status 2 and one line on stderr for mistakes."""

import pytest

from chatbot.cli import build_parser, main


def run(capsys, *argv):
    capsys.readouterr()  # drop what fixtures printed
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--temperature", "-1"], "`temperature` must be greater than or equal to 0, got -1.0"),
        (["--top-p", "1.5"], "`top_p` must be less than or equal to 1, got 1.5"),
        (["--max-new-tokens", "0"], "`max_new_tokens` must be greater than or equal to 1"),
    ],
)
def test_bad_decoding_options(capsys, tiny_dir, argv, message):
    code, out, err = run(capsys, "generate", "--model", str(tiny_dir), *argv, "hi")
    assert code == 2 and out == ""
    assert err.startswith(f"error: {message}") and len(err.strip().splitlines()) == 1


def test_missing_model_directory(capsys, tmp_path):
    code, _, err = run(capsys, "generate", "--model", str(tmp_path / "nope"), "hi")
    assert code == 2 and "no such directory" in err and len(err.strip().splitlines()) == 1


def test_missing_training_data(capsys, tmp_path):
    code, _, err = run(capsys, "train", "--data", str(tmp_path / "none.jsonl"), "--output", str(tmp_path / "m"))
    assert code == 2 and err.strip() == f"error: {tmp_path / 'none.jsonl'}: no such file"
    assert not (tmp_path / "m").exists()


def test_bad_training_option(capsys, tmp_path):
    code, _, err = run(capsys, "train", "--n-embd", "30", "--n-head", "4", "--output", str(tmp_path / "m"))
    assert code == 2 and "`n_embd` (30) must be divisible by `n_head` (4)" in err


def test_generate_prints_a_reply(capsys, tiny_dir):
    code, out, err = run(capsys, "generate", "--model", str(tiny_dir), "--seed", "1", "--max-new-tokens", "8", "hi")
    assert code == 0 and len(out.splitlines()) == 1


def test_chat_reads_piped_lines_and_prints_one_reply_each(capsys, monkeypatch, tiny_dir):
    import io

    monkeypatch.setattr("sys.stdin", io.StringIO("hi\n\nwhat is your name?\n"))
    code, out, _ = run(capsys, "chat", "--model", str(tiny_dir), "--seed", "3", "--max-new-tokens", "6")
    assert code == 0
    assert len(out.splitlines()) == 2


def test_help_explains_every_training_option():
    parser = build_parser()
    train = parser._subparsers._group_actions[0].choices["train"]
    for action in train._actions:
        if action.dest != "help":
            assert action.help, f"--{action.dest} has no help text"


def test_train_without_a_terminal_reports_validation_losses(capsys, caplog, tmp_path):
    from ..conftest import dialogue_jsonl

    data = tmp_path / "d.jsonl"
    dialogue_jsonl(data, copies=30)
    code, out, err = run(capsys, "train", "--data", str(data), "--output", str(tmp_path / "m"), "--vocab-size", "300",
                         "--n-layer", "1", "--n-embd", "32", "--n-head", "2", "--block-size", "32", "--batch-size", "4",
                         "--max-steps", "4", "--eval-every", "2", "--warmup-steps", "1", "--threads", "1")
    assert code == 0, err
    # pytest holds the root logger, so the lines land in caplog rather than on stderr.
    assert "step 2: train loss" in caplog.text and "step 4: train loss" in caplog.text
    assert "validation perplexity" in out and f"wrote {tmp_path / 'm'}" in out
