import json

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

import chatbot.tools.training as training
from chatbot.errors import ChatbotError, CorpusError
from chatbot.generation import LocalGenerator
from chatbot.tools.training import make_train_options, train

from ..conftest import dialogue_jsonl


def tiny_options(tmp_path, **overrides):
    data = tmp_path / "dialogue.jsonl"
    if not data.exists():
        data.parent.mkdir(parents=True, exist_ok=True)
        dialogue_jsonl(data, copies=30)
    values = dict(data=str(data), output=str(tmp_path / "model"), vocab_size=300, n_layer=2, n_embd=32, n_head=2,
                  block_size=32, batch_size=8, learning_rate=3e-3, warmup_steps=5, max_steps=40, eval_every=20,
                  checkpoint_every=10, val_fraction=0.1, threads=1)
    values.update(overrides)
    return make_train_options(**values)


def test_short_run_lowers_the_loss_and_writes_a_model_directory(tmp_path):
    opts = tiny_options(tmp_path, max_steps=120, eval_every=40)
    report = train(opts, progress=False)
    first, last = report.history[0], report.history[-1]
    assert report.val_loss < 5.0 < float(torch.log(torch.tensor(300.0)))  # well below a uniform guess
    assert last["val_loss"] < first["val_loss"]
    assert report.val_perplexity < report.unigram_perplexity

    out = tmp_path / "model"
    assert (out / "model.safetensors").is_file()
    assert not (out / "checkpoints").exists()
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.config.chatbot_prompt_format == "transcript"
    assert AutoTokenizer.from_pretrained(out).eos_token == training.EOS_TOKEN
    info = json.loads((out / "training_info.json").read_text())
    assert info["options"]["seed"] == 0 and info["data"]["validation_conversations"] > 0
    card = (out / "README.md").read_text()
    assert f"{report.val_perplexity:.2f}" in card and "seed: 0" in card
    scored = training.n_blocks(range(info["data"]["validation_tokens"]), opts.block_size) * opts.block_size
    assert f"score the {scored:,} validation tokens" in card
    # The trained model is usable by the generator straight away.
    gen = LocalGenerator.from_pretrained(out, device="cpu")
    settings = training.DecodingSettings(max_new_tokens=8, seed=0)
    result = gen.generate([training.GenerationRequest("ada: hi\nBot:", settings)])[0]
    assert isinstance(result.text, str) and 0 < result.completion_tokens <= 8


def train_until_interrupted(opts, step, monkeypatch, **kwargs):
    """Run ``train`` as if Ctrl-C came at ``step``; returns the error it ended with."""
    real_lr = training._lr_at

    def interrupt(at, total, o):
        if at == step:
            raise KeyboardInterrupt
        return real_lr(at, total, o)

    monkeypatch.setattr(training, "_lr_at", interrupt)
    try:
        with pytest.raises(ChatbotError, match=f"interrupted at step {step}") as err:
            train(opts, progress=False, **kwargs)
    finally:
        monkeypatch.setattr(training, "_lr_at", real_lr)
    return err.value


def test_interrupted_run_resumes_to_the_same_weights(tmp_path, monkeypatch):
    straight = train(tiny_options(tmp_path / "a", max_steps=30), progress=False)
    assert straight.steps == 30

    opts = tiny_options(tmp_path / "b", max_steps=30)
    assert "--resume" in str(train_until_interrupted(opts, 17, monkeypatch))
    assert (tmp_path / "b" / "model" / "checkpoints" / "step-17").is_dir()

    with pytest.raises(ChatbotError, match="already holds a checkpoint"):
        train(opts, progress=False)
    with pytest.raises(ChatbotError, match="`learning_rate` was"):
        train(tiny_options(tmp_path / "b", max_steps=30, learning_rate=1e-3), resume=True, progress=False)

    resumed = train(opts, resume=True, progress=False)
    assert resumed.steps == 30
    a = load_file(tmp_path / "a" / "model" / "model.safetensors")
    b = load_file(tmp_path / "b" / "model" / "model.safetensors")
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-4, atol=1e-5)


def test_resume_without_checkpoint_is_an_error(tmp_path):
    with pytest.raises(ChatbotError, match="nothing to resume"):
        train(tiny_options(tmp_path), resume=True, progress=False)


def test_malformed_data_fails_before_anything_is_written(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('[{"speaker": "a", "text": "ok"}, {"speaker": "b", "text": "fine"}]\n{oops\n')
    opts = tiny_options(tmp_path, data=str(bad))
    with pytest.raises(CorpusError, match="bad.jsonl:2"):
        train(opts, progress=False)
    assert not (tmp_path / "model").exists()


def test_block_size_too_large_for_tiny_corpus(tmp_path):
    opts = tiny_options(tmp_path, block_size=4096, max_steps=2)
    with pytest.raises(ChatbotError, match="too small for --block-size 4096"):
        train(opts, progress=False)
    assert not (tmp_path / "model").exists()


@pytest.mark.parametrize(
    "override, message",
    [
        ({"n_embd": 30, "n_head": 4}, "`n_embd` (30) must be divisible by `n_head` (4)"),
        ({"learning_rate": -1}, "`learning_rate` must be greater than 0"),
        ({"vocab_size": 10}, "`vocab_size`"),
        ({"val_fraction": 0.9}, "`val_fraction`"),
    ],
)
def test_bad_training_options(tmp_path, override, message):
    with pytest.raises(ChatbotError) as err:
        tiny_options(tmp_path, **override)
    assert message in str(err.value)


def test_fine_tune_reuses_the_base_tokenizer(tmp_path, tiny_dir):
    opts = tiny_options(tmp_path, base_model=str(tiny_dir), max_steps=6, eval_every=3, vocab_size=8000)
    report = train(opts, progress=False)
    out = tmp_path / "model"
    base_tok = AutoTokenizer.from_pretrained(tiny_dir)
    tok = AutoTokenizer.from_pretrained(out)
    assert tok.get_vocab() == base_tok.get_vocab()
    assert report.steps == 6
    info = json.loads((out / "training_info.json").read_text())
    assert info["options"]["base_model"] == str(tiny_dir)


def test_overwrite_replaces_an_old_run_and_its_checkpoints(tmp_path, monkeypatch):
    train_until_interrupted(tiny_options(tmp_path, max_steps=30), 25, monkeypatch)
    new = tiny_options(tmp_path, max_steps=12)
    report = train(new, overwrite=True, progress=False)
    assert report.steps == 12
    assert not (tmp_path / "model" / "checkpoints").exists()


def test_overwriting_a_model_keeps_it_usable_until_the_new_one_is_written(tmp_path, monkeypatch):
    out = tmp_path / "model"
    train(tiny_options(tmp_path, max_steps=10), progress=False)
    (out / "vocab.old").write_text("a file the new model does not have")
    before = load_file(out / "model.safetensors")
    train_until_interrupted(tiny_options(tmp_path, max_steps=30, seed=1), 15, monkeypatch, overwrite=True)
    # Interrupted: the old model is still there, whole, beside the new run's checkpoint.
    assert all(torch.equal(before[k], v) for k, v in load_file(out / "model.safetensors").items())
    assert LocalGenerator.from_pretrained(out, device="cpu").context_size == 32
    assert (out / "checkpoints").is_dir()

    (out / "resume.log").write_text("put here during the run: not the old model's, so it stays")

    report = train(tiny_options(tmp_path, max_steps=30, seed=1), resume=True, progress=False)
    assert report.steps == 30
    after = load_file(out / "model.safetensors")
    assert any(not torch.equal(before[k], v) for k, v in after.items())
    assert not (out / "vocab.old").exists() and not (out / "checkpoints").exists()
    assert (out / "resume.log").exists()
    assert json.loads((out / "training_info.json").read_text())["options"]["seed"] == 1


def test_overwrite_refuses_a_directory_it_did_not_write(tmp_path):
    precious = tmp_path / "model"
    precious.mkdir()
    (precious / "notes.txt").write_text("keep me")
    with pytest.raises(ChatbotError, match="does not look like a model directory"):
        train(tiny_options(tmp_path), overwrite=True, progress=False)
    assert (precious / "notes.txt").read_text() == "keep me"


def test_evaluate_rebuilds_the_validation_split(tmp_path):
    from chatbot.tools.training import evaluate

    report = train(tiny_options(tmp_path, max_steps=20, eval_every=10), progress=False)
    from chatbot.decoding import DecodingSettings

    result = evaluate(str(tmp_path / "model"), samples=2, device="cpu",
                      settings=DecodingSettings(max_new_tokens=8, seed=0))
    assert result.val_perplexity == pytest.approx(report.val_perplexity, rel=1e-3)
    assert result.unigram_perplexity == pytest.approx(report.unigram_perplexity, rel=1e-3)
    assert [p for p, _ in result.samples] == list(training.FIXED_PROMPTS[:2])
    with pytest.raises(ChatbotError, match="`samples` must be between 0 and 5"):
        evaluate(str(tmp_path / "model"), samples=9, device="cpu")
