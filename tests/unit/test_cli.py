"""The command line as a user meets it: exit status 2 and one line on stderr for mistakes."""

from pathlib import Path

import pytest

from adapters.cli import build_parser
from bot import FACES, main

BOT = Path(__file__).resolve().parents[2] / "bot.py"


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


@pytest.mark.parametrize("damage", ["weights", "config"])
def test_a_damaged_model_directory_is_one_line_saying_what_failed(capsys, tmp_path, tiny_dir, damage):
    import shutil

    broken = shutil.copytree(tiny_dir, tmp_path / "broken")
    if damage == "weights":
        (broken / "model.safetensors").write_bytes((broken / "model.safetensors").read_bytes()[:100])
    else:
        (broken / "config.json").write_text("{not json")
    code, out, err = run(capsys, "generate", "--model", str(broken), "hi")
    assert code == 2 and out == "" and len(err.strip().splitlines()) == 1
    assert err.startswith(f"error: cannot load model '{broken}' (") and "offline" not in err


@pytest.mark.parametrize("command", ["generate", "chat"])
@pytest.mark.parametrize("damage", ["no tokenizer files", "an empty vocabulary", "no tokenizer_config.json"])
def test_a_model_without_its_tokenizer_fails_at_load_in_one_line(capsys, monkeypatch, tmp_path, tiny_dir, command,
                                                                 damage):
    import io
    import shutil

    broken = shutil.copytree(tiny_dir, tmp_path / "broken")
    gone = ["tokenizer_config.json"] if damage == "no tokenizer_config.json" else [
        "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model"]
    for file in gone:
        (broken / file).unlink(missing_ok=True)
    if damage == "an empty vocabulary":
        (broken / "vocab.json").write_text('{"<|endoftext|>": 0}')
        (broken / "merges.txt").write_text("#version: 0.2\n")
    memory = tmp_path / "memory.sqlite3"
    monkeypatch.setattr("sys.stdin", io.StringIO("hi\n"))
    argv = ["generate", "--model", str(broken), "hi"] if command == "generate" else \
        ["chat", "--model", str(broken), "--memory", str(memory)]
    code, out, err = run(capsys, *argv)
    assert code == 2 and out == "" and len(err.strip().splitlines()) == 1
    assert err.startswith(f"error: cannot load model '{broken}' (") and "tokenizer" in err
    assert not memory.exists(), "nothing is stored for a model that cannot answer"


def test_missing_training_data(capsys, tmp_path):
    code, _, err = run(capsys, "train", "--data", str(tmp_path / "none.jsonl"), "--output", str(tmp_path / "m"))
    assert code == 2 and err.strip() == f"error: {tmp_path / 'none.jsonl'}: no such file"
    assert not (tmp_path / "m").exists()


def test_missing_base_model_names_the_training_option(capsys, tmp_path):
    from ..conftest import dialogue_jsonl

    data = tmp_path / "d.jsonl"
    dialogue_jsonl(data, copies=2)
    code, _, err = run(capsys, "train", "--data", str(data), "--base-model", str(tmp_path / "nope"),
                       "--output", str(tmp_path / "m"))
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert "no such directory" in err and "point --base-model at" in err
    assert not (tmp_path / "m").exists()


def test_bad_training_option(capsys, tmp_path):
    code, _, err = run(capsys, "train", "--n-embd", "30", "--n-head", "4", "--output", str(tmp_path / "m"))
    assert code == 2 and "`n_embd` (30) must be divisible by `n_head` (4)" in err


def test_generate_prints_a_reply(capsys, tiny_dir, chat_env):
    code, out, err = run(capsys, "generate", "--model", str(tiny_dir), "--seed", "1", "--max-new-tokens", "8", "hi")
    assert code == 0 and len(out.splitlines()) == 1, err


@pytest.fixture()
def chat_env(monkeypatch, tmp_path, tiny_prompts):
    """Run chat in a clean folder, on short personas that fit the tiny model."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("CHATBOT_PROMPTS_DIR", str(tiny_prompts))
    monkeypatch.setenv("CHATBOT_PERSONA", "tester")
    return tmp_path


def chat(capsys, monkeypatch, tiny_dir, lines, *argv):
    import io

    monkeypatch.setattr("sys.stdin", io.StringIO("".join(f"{line}\n" for line in lines)))
    return run(capsys, "chat", "--model", str(tiny_dir), "--max-new-tokens", "6", *argv)


def test_chat_prints_one_line_per_line_read(capsys, monkeypatch, tiny_dir, chat_env):
    code, out, err = chat(capsys, monkeypatch, tiny_dir, ["hi", "", "what is your name?", "/persona", "/bogus",
                                                          "x" * 5000, "/persona other", "and you?"], "--seed", "3")
    assert code == 0, err
    lines = out.splitlines()
    assert len(lines) == 8 and all(line.strip() for line in lines)
    assert lines[1] == "(empty message ignored)"
    assert lines[3] == "(personas: other (Pip), tester * (Bot))"
    assert lines[4] == "(unknown command /bogus; /help lists them)"
    assert lines[5] == "(that message is 5,000 characters long; the limit is 2,000)"
    assert lines[6] == "(now talking to Pip, persona other)"
    assert (chat_env / "chatbot.sqlite3").is_file()


def test_chat_remembers_across_runs_and_resets(capsys, monkeypatch, tiny_dir, chat_env):
    assert chat(capsys, monkeypatch, tiny_dir, ["hello", "/persona other"])[0] == 0
    code, out, _ = chat(capsys, monkeypatch, tiny_dir, ["/persona", "/reset", "/reset"])
    assert code == 0
    # The persona chosen in the first run is still this conversation's.
    assert out.splitlines() == ["(personas: other * (Pip), tester (Bot))", "(forgot 2 turns of cli:local)",
                                "(forgot 0 turns of cli:local)"]
    # Another conversation id has its own memory; --reset starts it over.
    chat(capsys, monkeypatch, tiny_dir, ["hi"], "--conversation", "cli:work")
    code, out, _ = chat(capsys, monkeypatch, tiny_dir, ["/reset"], "--conversation", "cli:work", "--reset")
    assert out.strip() == "(forgot 0 turns of cli:work)"


def test_a_mistyped_persona_with_reset_forgets_nothing(capsys, monkeypatch, tiny_dir, chat_env):
    assert chat(capsys, monkeypatch, tiny_dir, ["hello"])[0] == 0
    code, _, err = chat(capsys, monkeypatch, tiny_dir, ["hi"], "--reset", "--persona", "nobody")
    assert code == 2 and "unknown persona 'nobody'" in err
    # /reset with an argument is refused (it would forget this conversation, not the one named).
    code, out, _ = chat(capsys, monkeypatch, tiny_dir, ["/reset cli:other", "/help", "/reset"])
    lines = out.splitlines()
    assert lines[0] == "(/reset takes no argument; it forgets this conversation, cli:local)"
    assert lines[1].startswith("(commands: /help") and lines[1].endswith(")")  # one line, piped
    assert lines[2] == "(forgot 2 turns of cli:local)" and len(lines) == 3


@pytest.mark.parametrize("argv", [["generate", ""], ["generate", "--raw", "  "]])
def test_generate_refuses_an_empty_prompt(capsys, tiny_dir, argv):
    code, out, err = run(capsys, *argv, "--model", str(tiny_dir))
    assert code == 2 and out == "" and err.startswith("error: the prompt is empty")


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--conversation", "my chat"], "error: conversation id must look like 'scope:key'"),
        (["--persona", "nobody"], "error: unknown persona 'nobody'; available: other, tester"),
        (["--top-p", "2"], "error: `top_p` must be less than or equal to 1, got 2.0"),
        (["--memory", "/proc/no/such.sqlite3"], "error: cannot open the memory database"),
    ],
)
def test_chat_mistakes_are_one_line(capsys, monkeypatch, tiny_dir, chat_env, argv, message):
    code, out, err = chat(capsys, monkeypatch, tiny_dir, ["hi"], *argv)
    assert code == 2 and out == ""
    assert err.startswith(message) and len(err.strip().splitlines()) == 1


def test_chat_settings_file_typo_names_the_file(capsys, monkeypatch, tiny_dir, chat_env):
    (chat_env / "chatbot.toml").write_text("window_chunks = 4\n")
    code, _, err = chat(capsys, monkeypatch, tiny_dir, ["hi"])
    assert code == 2 and err.strip() == "error: chatbot.toml: `window_chunks` is not a known setting"


def test_help_explains_every_training_option():
    parser = build_parser(FACES)
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


def test_selfchat_prints_both_arms(capsys, monkeypatch, tiny_dir, chat_env):
    code, out, err = run(capsys, "selfchat", "--model", str(tiny_dir), "--conversations", "2", "--turns", "3")
    assert code == 0, err
    assert "controls on" in out and "controls off" in out
    for metric in ("repeated-turn rate", "looping replies", "distinct-1", "distinct-2", "mean reply tokens"):
        assert metric in out
    # Same seeds, same partner: the two runs are reproducible.
    _, again, _ = run(capsys, "selfchat", "--model", str(tiny_dir), "--conversations", "2", "--turns", "3")
    strip = lambda text: [line for line in text.splitlines() if not line.startswith("seconds")]  # noqa: E731
    assert strip(again) == strip(out)


def test_safety_eval_reports_the_rates(capsys, tmp_path):
    data = tmp_path / "set.jsonl"
    data.write_text('{"text": "you are an idiot", "label": "toxic", "kind": "plain"}\n'
                    '{"text": "have a nice day", "label": "benign", "kind": "ordinary"}\n')
    code, out, _ = run(capsys, "safety-eval", str(data))
    assert code == 0
    assert "precision 1.000   recall 1.000   false-positive rate 0.000" in out


def test_safety_eval_bad_file_is_one_line(capsys, tmp_path):
    data = tmp_path / "set.jsonl"
    data.write_text('{"text": "hi"}\n')
    code, _, err = run(capsys, "safety-eval", str(data))
    assert code == 2 and err.strip() == f'error: {data}:1: needs a "text" string and a "label" of toxic or benign'


def test_discord_without_a_token_says_how_to_set_one(capsys, monkeypatch, chat_env):
    monkeypatch.delenv("DISCORD_TOKEN", raising=False)
    code, out, err = run(capsys, "discord")
    assert code == 2 and out == ""
    assert err.startswith("error: no Discord token: set DISCORD_TOKEN") and len(err.strip().splitlines()) == 1


def test_discord_failures_are_one_line_and_never_show_the_token(capsys, monkeypatch, tiny_dir, chat_env):
    import discord

    secret = "MTIz.secret-token-value.xyz"
    monkeypatch.setenv("DISCORD_TOKEN", secret)

    async def refuse(self, token):
        # Logging in is the network edge; Discord answers 401 to a bad token.
        raise discord.LoginFailure("Improper token has been passed.")

    monkeypatch.setattr(discord.http.HTTPClient, "static_login", refuse)
    code, out, err = run(capsys, "discord", "--model", str(tiny_dir), "--channel", "123456789012345678", "-v")
    assert code == 2 and "error: Discord refused the token" in err
    assert secret not in out + err


@pytest.mark.parametrize(("env", "expected"), [(None, 8), ("1", 1), ("3", 3)])
def test_the_discord_bot_batches_replies_unless_the_settings_say_otherwise(capsys, monkeypatch, chat_env, env,
                                                                          expected):
    import adapters.discord_bot

    seen = []

    async def run_discord(settings):  # the bot itself would connect to Discord
        seen.append(settings.max_batch)

    monkeypatch.setenv("DISCORD_TOKEN", "MTIz.token.xyz")
    if env is None:
        monkeypatch.delenv("CHATBOT_MAX_BATCH", raising=False)
    else:
        monkeypatch.setenv("CHATBOT_MAX_BATCH", env)
    monkeypatch.setattr(adapters.discord_bot, "run_discord", run_discord)
    code, out, err = run(capsys, "discord")
    assert code == 0 and seen == [expected]


def test_a_reader_that_goes_away_ends_the_command_quietly(monkeypatch, tiny_dir, chat_env):
    """`bot.py ... | head`: when the pipe closes, no traceback, exit status 141 as a shell gives."""
    import io
    import os
    import sys

    read_end, write_end = os.pipe()
    os.close(read_end)  # the reader has gone
    monkeypatch.setattr(sys, "stdin", io.StringIO("/help\n" * 10))
    monkeypatch.setattr(sys, "stdout", io.TextIOWrapper(io.FileIO(write_end, "w")))
    assert main(["chat", "--model", str(tiny_dir), "--memory", ":memory:"]) == 141


def test_a_broken_pipe_that_is_not_stdout_is_not_hidden(monkeypatch):
    import adapters.terminal as terminal

    def fails(*args, **kwargs):
        raise BrokenPipeError("a worker's pipe")

    monkeypatch.setattr(terminal, "run_chat", fails)
    with pytest.raises(BrokenPipeError, match="a worker's pipe"):
        main(["chat"])


@pytest.mark.parametrize("name", ["Bot", "Pip:", "b.o.t"])
def test_chat_refuses_a_user_name_that_is_the_bots_at_start(capsys, monkeypatch, tiny_dir, chat_env, name):
    from chatbot.memory import SQLiteMemoryStore

    code, out, err = chat(capsys, monkeypatch, tiny_dir, ["hi", "hello"], "--name", name)
    assert code == 2 and out == "" and len(err.strip().splitlines()) == 1
    assert err.startswith(f"error: the name {name!r} is taken by the bot")
    if (chat_env / "chatbot.sqlite3").exists():
        import asyncio

        store = SQLiteMemoryStore(chat_env / "chatbot.sqlite3")
        assert asyncio.run(store.count("cli:local")) == 0


@pytest.mark.parametrize("when", ["generating", "storing"])
def test_ctrl_c_on_a_piped_chat_never_leaves_a_stored_reply_unprinted(capsys, monkeypatch, tiny_dir, chat_env, when):
    """SIGINT arrives during the third reply: while the model runs (no bot turn may be stored)
    or while the bot turn is being written (it must then be printed)."""
    import asyncio
    import os
    import signal
    import time

    from chatbot.generation import LocalGenerator
    from chatbot.memory import SQLiteMemoryStore

    calls = []

    def interrupt_the_third():
        calls.append(1)
        if len(calls) == 3:
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.3)  # still at work when the signal is handled

    if when == "generating":
        real_generate = LocalGenerator.generate
        monkeypatch.setattr(LocalGenerator, "generate",
                            lambda self, requests: interrupt_the_third() or real_generate(self, requests))
    else:
        real_append = SQLiteMemoryStore._append

        def append(self, conversation_id, author, role, text, author_key):
            turn = real_append(self, conversation_id, author, role, text, author_key)
            if role == "bot":
                interrupt_the_third()
            return turn

        monkeypatch.setattr(SQLiteMemoryStore, "_append", append)
    code, out, err = chat(capsys, monkeypatch, tiny_dir, [f"line number {i}" for i in range(10)])
    assert code == 130 and err.strip() == "interrupted"
    store = SQLiteMemoryStore(chat_env / "chatbot.sqlite3")
    bot = [t.text for t in asyncio.run(store.newest("cli:local", 50)) if t.role == "bot"]
    assert out.splitlines() == bot
    assert len(bot) == (2 if when == "generating" else 3)


@pytest.mark.parametrize("how", ["chatbot.toml", "--config"])
def test_generate_reads_the_settings_file_like_every_command(capsys, monkeypatch, tmp_path, tiny_dir, tiny_prompts,
                                                             how):
    monkeypatch.chdir(tmp_path)
    settings = (f'model = "{tiny_dir}"\nprompts_dir = "{tiny_prompts}"\npersona = "tester"\n'
                '[decoding]\nmax_new_tokens = 4\n')
    path = tmp_path / ("chatbot.toml" if how == "chatbot.toml" else "mine.toml")
    path.write_text(settings)
    config = ["--config", str(path)] if how == "--config" else []
    for argv in (["generate", *config, "hi"], ["generate", *config, "--raw", "ada: hi"]):
        code, out, err = run(capsys, *argv)  # no --model: the file's model is used
        assert code == 0 and len(out.splitlines()) == 1, err
    assert not (tmp_path / "chatbot.sqlite3").exists(), "a one-off message is not stored"
    path.write_text(settings.replace("max_new_tokens = 4", "max_new_tokens = 0"))
    code, out, err = run(capsys, "generate", *config, "hi")
    assert code == 2 and err.startswith(f"error: {path.name if how == 'chatbot.toml' else path}: `decoding.max_new_tokens`")
    code, out, err = run(capsys, "generate", *config, "--raw", "--persona", "tester", "hi")
    assert code == 2 and "--raw" in err


def test_chat_with_a_mistyped_memory_folder_creates_nothing(capsys, monkeypatch, tiny_dir, chat_env):
    code, out, err = chat(capsys, monkeypatch, tiny_dir, ["hi"], "--memory", "nonexistent/dir/x.sqlite3")
    assert code == 2 and out == "" and len(err.strip().splitlines()) == 1
    assert "nonexistent/dir does not exist" in err
    assert not (chat_env / "nonexistent").exists()


def _read_until(fd, marker, seen, timeout=60.0):
    """Read the terminal into ``seen`` until ``marker`` has appeared (again) or the program ended."""
    import os
    import select
    import time

    start, count = time.monotonic(), seen[0].count(marker)
    while seen[0].count(marker) <= count and time.monotonic() - start < timeout:
        if select.select([fd], [], [], 0.5)[0]:
            try:
                chunk = os.read(fd, 4096)
            except OSError:  # the program ended and closed the terminal
                return False
            if not chunk:
                return False
            seen[0] += chunk.decode("utf-8", "replace")
    return seen[0].count(marker) > count


def test_interactive_chat_in_a_real_terminal_ends_cleanly_on_ctrl_d(tiny_dir, tiny_prompts, tmp_path):
    """A pseudo-terminal, as a person has: the reply streams after a prompt, and Ctrl-D leaves
    the shell's next prompt on a line of its own."""
    import os
    import pty
    import sys

    env = {**os.environ, "CHATBOT_PROMPTS_DIR": str(tiny_prompts), "CHATBOT_PERSONA": "tester"}
    pid, fd = pty.fork()
    if pid == 0:  # the child: the chat, on the terminal
        os.chdir(tmp_path)
        os.execve(sys.executable, [sys.executable, str(BOT), "chat", "--model", str(tiny_dir), "--name", "ada",
                                   "--max-new-tokens", "4"], env)
    seen = [""]
    try:
        assert _read_until(fd, "ada> ", seen), seen[0]
        os.write(fd, b"hi\r")
        assert _read_until(fd, "ada> ", seen), seen[0]
        assert "Bot> " in seen[0]
        os.write(fd, b"\x04")  # Ctrl-D on an empty line
        _read_until(fd, "never printed", seen, timeout=30)
    finally:
        _, status = os.waitpid(pid, 0)
        os.close(fd)
    assert os.waitstatus_to_exitcode(status) == 0, seen[0]
    assert seen[0].endswith("ada> \r\n"), repr(seen[0][-40:])


def test_a_piped_quit_prints_its_line(capsys, monkeypatch, tiny_dir, chat_env):
    code, out, err = chat(capsys, monkeypatch, tiny_dir, ["hi", "/quit", "never read"])
    assert code == 0 and len(out.splitlines()) == 2 and out.splitlines()[1] == "(bye)"


@pytest.mark.parametrize("argv", [["chat", "--presset", "x"], ["generate", "--presset", "x", "hi"]])
def test_an_unknown_option_shows_the_commands_own_usage(capsys, argv):
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    err = capsys.readouterr().err
    assert exit_.value.code == 2
    assert err.startswith(f"usage: bot.py {argv[0]} ") and f"bot.py {argv[0]}: error: unrecognized arguments: --presset" in err


@pytest.mark.parametrize("name, message", [("", "--name '': author must be a non-empty string"),
                                           ("x" * 101, "--name 'xxx")])
def test_a_bad_chat_name_names_the_option(capsys, monkeypatch, tiny_dir, chat_env, name, message):
    code, out, err = chat(capsys, monkeypatch, tiny_dir, ["hi"], "--name", name)
    assert code == 2 and out == "" and err.startswith(f"error: {message}") and len(err.strip().splitlines()) == 1
