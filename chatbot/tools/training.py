"""Corpus building, tokenizer training, GPT-2 training / fine-tuning, and perplexity.

The pipeline: read dialogue data -> clean -> split by conversation -> render every
conversation with the chat engine's own prompt format (`chatbot.prompting`) -> train a
sentencepiece tokenizer (from scratch) or reuse the base model's -> pack the token
stream into fixed-size blocks -> train -> write a Hugging Face model directory with a
model card.

The loop is written here rather than with `transformers.Trainer`: the data is one packed
tensor, so the loop is short, and owning it keeps resume exact (the block order of every
epoch is a function of the seed and the step) without pulling `accelerate` into the
project's dependencies.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import random
import re
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from ..corpus import chitchat_conversations
from ..decoding import DecodingSettings
from ..errors import ChatbotError, CorpusError, settings_error_message
from ..generation import GenerationRequest, LocalGenerator, load_model, pick_device, resolve_model
from ..prompting import PromptFormat, Utterance, clean_speaker, clean_text, format_name_for_model, make_format

log = logging.getLogger(__name__)

EOS_TOKEN = "<|endoftext|>"
CHITCHAT = "chitchat"

# Chit-chat transcripts name speakers by opaque ids. Training on a mix of names teaches
# the model that the label before the colon is arbitrary, so personas and Discord
# authors can be named at inference time. "User"/"Bot" are over-represented because
# they are the defaults.
SPEAKER_NAMES = (
    "Alex Ana Ben Cara Dan Eli Emma Finn Gina Hana Ian Ivy Jack Jade Kai Kim Leo Lily Max Mia "
    "Nate Nora Omar Olga Paul Pia Quinn Rosa Sam Sara Tom Tara Uma Vic Wes Zoe Ada Bob Kate Ravi"
).split()
DEFAULT_NAME_PAIR_SHARE = 0.3

_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f\u200b-\u200f\u202a-\u202e\u2060-\u2064\ufeff]")
_LABELLED_LINE = re.compile(r"^([^:\n]{1,32}):\s+(.*)$")


# --------------------------------------------------------------------------- corpus


@dataclass
class Conversation:
    turns: list[Utterance]
    source: str = ""


@dataclass
class CleanStats:
    conversations_read: int = 0
    conversations_kept: int = 0
    turns_kept: int = 0
    empty_turns: int = 0
    overlong_turns: int = 0
    duplicate_conversations: int = 0
    too_short_conversations: int = 0


def _name_pair(key: str, seed: int) -> tuple[str, str]:
    rng = random.Random(f"{seed}:{key}")
    if rng.random() < DEFAULT_NAME_PAIR_SHARE:
        return ("User", "Bot") if rng.random() < 0.5 else ("Bot", "User")
    a, b = rng.sample(SPEAKER_NAMES, 2)
    return a, b


def load_chitchat(seed: int = 0) -> list[Conversation]:
    """The BYU chit-chat corpus shipped in the `chitchat-dataset` package."""
    conversations = []
    for key, messages in chitchat_conversations():
        names: dict[str, str] = {}
        pair = _name_pair(key, seed)
        turns = []
        for sender, text in messages:
            if sender not in names:
                names[sender] = pair[len(names) % 2]
            turns.append(Utterance(names[sender], text))
        conversations.append(Conversation(turns, f"chitchat:{key}"))
    return conversations


def _turns_from_json(obj: Any, where: str) -> list[Utterance]:
    if isinstance(obj, dict) and "turns" in obj:
        obj = obj["turns"]
    if not isinstance(obj, list):
        raise CorpusError(f"{where}: expected a list of turns like "
                          '[{"speaker": "ada", "text": "hi"}], got ' + type(obj).__name__)
    turns = []
    for j, turn in enumerate(obj, 1):
        if not isinstance(turn, dict):
            raise CorpusError(f"{where}: turn {j} is not an object with \"speaker\" and \"text\"")
        for key in ("speaker", "text"):
            if not isinstance(turn.get(key), str):
                raise CorpusError(f"{where}: turn {j} has no \"{key}\" string")
        turns.append(Utterance(turn["speaker"], turn["text"]))
    return turns


def _lines(path: Path) -> Iterator[tuple[int, str]]:
    """Numbered lines of a UTF-8 file; anything else is a `CorpusError` naming the line."""
    if not path.is_file():
        raise CorpusError(f"{path}: no such file")
    try:
        with path.open("rb") as fh:
            for lineno, raw in enumerate(fh, 1):
                try:
                    yield lineno, raw.decode("utf-8")
                except UnicodeDecodeError as err:
                    raise CorpusError(f"{path}:{lineno}: not UTF-8 text ({err.reason})") from None
    except OSError as err:
        raise CorpusError(f"{path}: cannot read ({err.strerror})") from None


def load_jsonl(path: Path) -> list[Conversation]:
    """One conversation per line: a JSON list of ``{"speaker": ..., "text": ...}``."""
    conversations = []
    for lineno, line in _lines(path):
        if not line.strip():
            continue
        where = f"{path}:{lineno}"
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as err:
            raise CorpusError(f"{where}: not valid JSON ({err.msg} at column {err.colno})") from None
        conversations.append(Conversation(_turns_from_json(obj, where), where))
    return conversations


def load_text(path: Path) -> list[Conversation]:
    """Plain text: conversations separated by blank lines, one turn per line.

    A line ``Name: text`` names its speaker; unlabelled lines alternate between
    ``User`` and ``Bot``.
    """
    conversations: list[Conversation] = []
    turns: list[Utterance] = []
    start = 1
    for lineno, line in _lines(path):
        line = line.rstrip("\r\n")
        if not line.strip():
            if turns:
                conversations.append(Conversation(turns, f"{path}:{start}"))
            turns = []
            continue
        if not turns:
            start = lineno
        m = _LABELLED_LINE.match(line.strip())
        if m:
            turns.append(Utterance(m.group(1), m.group(2)))
        else:
            turns.append(Utterance("User" if len(turns) % 2 == 0 else "Bot", line))
    if turns:
        conversations.append(Conversation(turns, f"{path}:{start}"))
    return conversations


def load_corpus(source: str, seed: int = 0) -> list[Conversation]:
    """``chitchat`` for the bundled corpus, else a ``.jsonl`` or plain-text file."""
    if source == CHITCHAT:
        return load_chitchat(seed)
    path = Path(source).expanduser()
    if path.suffix.lower() in (".jsonl", ".json"):
        conversations = load_jsonl(path)
    else:
        conversations = load_text(path)
    if not conversations:
        raise CorpusError(f"{path}: holds no conversations")
    return conversations


def clean_turn_text(text: str) -> str:
    """Whitespace collapsed, control/invisible characters and literal special tokens removed."""
    return clean_text(_CONTROL.sub(" ", text.replace(EOS_TOKEN, " ")))


def clean_conversations(
    conversations: Iterable[Conversation], *, max_turn_chars: int = 500, min_turns: int = 2
) -> tuple[list[Conversation], CleanStats]:
    """Normalise text, drop empty turns, merge a speaker's consecutive turns, split a
    conversation at an over-long turn (it is dropped; what comes before and after stays
    coherent), drop too-short and duplicate conversations."""
    stats = CleanStats()
    seen: set[str] = set()
    kept: list[Conversation] = []
    for conv in conversations:
        stats.conversations_read += 1
        pieces: list[list[Utterance]] = [[]]
        for turn in conv.turns:
            text = clean_turn_text(turn.text)
            speaker = clean_speaker(turn.speaker)
            if not text:
                stats.empty_turns += 1
                continue
            if len(text) > max_turn_chars:
                stats.overlong_turns += 1
                pieces.append([])
                continue
            current = pieces[-1]
            if current and current[-1].speaker == speaker:
                current[-1] = Utterance(speaker, current[-1].text + " " + text)
            else:
                current.append(Utterance(speaker, text))
        for turns in pieces:
            if len(turns) < min_turns:
                if turns:
                    stats.too_short_conversations += 1
                continue
            key = hashlib.sha1("\n".join(t.text.lower() for t in turns).encode()).hexdigest()
            if key in seen:
                stats.duplicate_conversations += 1
                continue
            seen.add(key)
            kept.append(Conversation(turns, conv.source))
            stats.turns_kept += len(turns)
    stats.conversations_kept = len(kept)
    return kept, stats


def split_conversations(
    conversations: Sequence[Conversation], val_fraction: float, seed: int
) -> tuple[list[Conversation], list[Conversation]]:
    """Hold out whole conversations, chosen by a seeded shuffle."""
    order = list(range(len(conversations)))
    random.Random(seed).shuffle(order)
    n_val = max(1, round(len(order) * val_fraction)) if val_fraction > 0 else 0
    if n_val >= len(order):
        raise CorpusError(f"only {len(order)} conversations: too few to hold out {val_fraction:.0%} for validation")
    val_idx = set(order[:n_val])
    train = [c for i, c in enumerate(conversations) if i not in val_idx]
    val = [c for i, c in enumerate(conversations) if i in val_idx]
    return train, val


def render(conversations: Iterable[Conversation], fmt: PromptFormat, eos_token: str) -> list[str]:
    """Each conversation in the engine's prompt format, followed by end-of-text."""
    texts = (fmt.render_conversation(c.turns) for c in conversations)
    return [t if t.endswith(eos_token) else t + eos_token for t in texts]


# --------------------------------------------------------------------------- tokenizer


def train_tokenizer(texts: Sequence[str], out_dir: Path, vocab_size: int, seed: int = 0) -> Any:
    """Train a sentencepiece BPE tokenizer and save it in Hugging Face form.

    Byte fallback means no input is ever unknown; the newline is a piece of its own
    because it ends every transcript turn. The result is saved as ``tokenizer.json``,
    which `AutoTokenizer.from_pretrained` loads without sentencepiece.
    """
    import sentencepiece as spm
    from transformers import LlamaTokenizer

    out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        corpus = Path(tmp) / "corpus.txt"
        with corpus.open("w", encoding="utf-8") as fh:
            for text in texts:
                for line in text.replace(EOS_TOKEN, "").split("\n"):
                    if line:
                        fh.write(line + "\n")
        spm.set_random_generator_seed(seed)
        try:
            spm.SentencePieceTrainer.train(
                input=str(corpus), model_prefix=str(Path(tmp) / "tokenizer"), vocab_size=vocab_size,
                model_type="bpe", byte_fallback=True, split_digits=True, character_coverage=0.9995,
                normalization_rule_name="identity", remove_extra_whitespaces=False,
                user_defined_symbols=["\n"], unk_id=0, eos_id=1, bos_id=-1, pad_id=-1,
                eos_piece=EOS_TOKEN, input_sentence_size=2_000_000, shuffle_input_sentence=True,
                num_threads=os.cpu_count() or 1, minloglevel=2,
            )
        except RuntimeError as err:
            raise ChatbotError(f"tokenizer training failed: {err}") from None
        tokenizer = LlamaTokenizer.from_pretrained(
            tmp, add_bos_token=False, add_eos_token=False, legacy=False, add_prefix_space=False,
            eos_token=EOS_TOKEN, unk_token="<unk>", bos_token=None, pad_token=None,
        )
    tokenizer.save_pretrained(out_dir)
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(out_dir)


def tokenize_stream(texts: Sequence[str], tokenizer: Any) -> "Any":
    """All texts as one 1-D token tensor (the packing that training and evaluation share)."""
    import torch

    ids: list[int] = []
    for start in range(0, len(texts), 1000):
        for row in tokenizer(list(texts[start:start + 1000]), add_special_tokens=False)["input_ids"]:
            ids.extend(row)
    return torch.tensor(ids, dtype=torch.long)


# --------------------------------------------------------------------------- options


class TrainOptions(BaseModel):
    """Everything `python bot.py train` can be told. Recorded in the model card."""

    model_config = ConfigDict(extra="forbid")

    data: str = CHITCHAT
    """`chitchat` (the bundled corpus), a .jsonl file or a plain-text file."""
    output: str = "runs/chitchat-gpt2"
    """Directory the model (and, while training, its checkpoints) is written to."""
    base_model: str | None = None
    """Fine-tune this model (hub name in the local cache, or a directory); None trains from scratch."""
    vocab_size: int = Field(8000, ge=300, le=65536)
    """Tokenizer vocabulary when training from scratch (ignored when fine-tuning)."""
    n_layer: int = Field(6, ge=1, le=48)
    """Transformer layers of a model trained from scratch."""
    n_embd: int = Field(256, ge=16, le=4096)
    """Hidden width of a model trained from scratch."""
    n_head: int = Field(8, ge=1, le=64)
    """Attention heads; must divide `n_embd`."""
    block_size: int = Field(256, ge=16, le=4096)
    """Training sequence length in tokens; the context of a model trained from scratch."""
    batch_size: int = Field(16, ge=1, le=4096)
    """Sequences per optimiser step."""
    learning_rate: float = Field(2e-3, gt=0, le=1.0)
    """Peak learning rate, reached after warm-up, then cosine decay to a tenth of it."""
    weight_decay: float = Field(0.1, ge=0, le=1.0)
    """AdamW weight decay on weight matrices."""
    warmup_steps: int = Field(200, ge=0)
    """Steps of linear learning-rate warm-up."""
    max_steps: int | None = Field(None, ge=1)
    """Total optimiser steps; None means `epochs` passes over the data."""
    epochs: float = Field(1.0, gt=0, le=1000)
    """Passes over the training data when `max_steps` is not set."""
    dropout: float = Field(0.0, ge=0, lt=1)
    """Dropout in the transformer; off by default: at a few epochs it costs more CPU time than it saves."""
    eval_every: int = Field(500, ge=1)
    """Steps between validation losses."""
    checkpoint_every: int = Field(500, ge=1)
    """Steps between checkpoints (the last step is always checkpointed)."""
    val_fraction: float = Field(0.05, ge=0.001, lt=0.5)
    """Share of conversations held out for validation."""
    max_turn_chars: int = Field(500, ge=10)
    """Turns longer than this are dropped and split their conversation."""
    seed: int = Field(0, ge=0)
    """Seed for speaker names, the split, the tokenizer, initialisation and data order."""
    device: str = "auto"
    """Where to train: auto (CUDA, then MPS, then CPU), cpu, cuda, cuda:N or mps."""
    threads: int | None = Field(None, ge=1, le=512)
    """CPU threads for torch; None keeps torch's default."""

    @model_validator(mode="after")
    def _shape(self) -> "TrainOptions":
        if self.n_embd % self.n_head:
            raise ValueError(f"`n_embd` ({self.n_embd}) must be divisible by `n_head` ({self.n_head})")
        return self


def make_train_options(**values: Any) -> TrainOptions:
    try:
        return TrainOptions(**values)
    except ValidationError as err:
        raise ChatbotError(settings_error_message(err)) from None


# --------------------------------------------------------------------------- prepared data


@dataclass
class PreparedData:
    train_ids: Any
    val_ids: Any
    stats: CleanStats
    n_train_conversations: int
    n_val_conversations: int
    format_name: str


def prepare_data(opts: TrainOptions, tokenizer_dir: Path | None, base_tokenizer: Any = None,
                 base_config: Any = None) -> tuple[PreparedData, Any]:
    """Load, clean, split, render, and tokenize; trains a tokenizer when there is no base."""
    raw = load_corpus(opts.data, opts.seed)
    conversations, stats = clean_conversations(raw, max_turn_chars=opts.max_turn_chars)
    if len(conversations) < 2:
        raise CorpusError(f"{opts.data}: fewer than 2 usable conversations after cleaning ({asdict(stats)})")
    train, val = split_conversations(conversations, opts.val_fraction, opts.seed)
    format_name = format_name_for_model(opts.base_model or "", base_config) if base_tokenizer else "transcript"
    eos = base_tokenizer.eos_token if base_tokenizer is not None else EOS_TOKEN
    fmt = make_format(format_name, eos)
    train_texts, val_texts = render(train, fmt, eos), render(val, fmt, eos)
    if base_tokenizer is None:
        assert tokenizer_dir is not None
        tokenizer = train_tokenizer(train_texts, tokenizer_dir, opts.vocab_size, opts.seed)
    else:
        tokenizer = base_tokenizer
    data = PreparedData(tokenize_stream(train_texts, tokenizer), tokenize_stream(val_texts, tokenizer), stats,
                        len(train), len(val), format_name)
    return data, tokenizer


def n_blocks(ids: Any, block_size: int) -> int:
    return (len(ids) - 1) // block_size


def get_block(ids: Any, i: int, block_size: int) -> tuple[Any, Any]:
    start = i * block_size
    chunk = ids[start:start + block_size + 1]
    return chunk[:-1], chunk[1:]


def block_order(n: int, seed: int, epoch: int) -> list[int]:
    order = list(range(n))
    random.Random(seed * 1_000_003 + epoch).shuffle(order)
    return order


def evaluate_loss(model: Any, ids: Any, block_size: int, batch_size: int = 32, max_blocks: int | None = None) -> float:
    """Mean next-token cross-entropy over non-overlapping blocks."""
    import torch
    import torch.nn.functional as F

    total = n_blocks(ids, block_size)
    if max_blocks is not None:
        total = min(total, max_blocks)
    if total < 1:
        raise ChatbotError(f"validation data has fewer than {block_size + 1} tokens; lower --block-size")
    was_training = model.training
    model.eval()
    loss_sum, count = 0.0, 0
    with torch.inference_mode():
        for start in range(0, total, batch_size):
            xs, ys = zip(*(get_block(ids, i, block_size) for i in range(start, min(start + batch_size, total))))
            x = torch.stack(xs).to(model.device)
            y = torch.stack(ys).to(model.device)
            logits = model(input_ids=x).logits.float()
            loss_sum += F.cross_entropy(logits.view(-1, logits.size(-1)), y.reshape(-1), reduction="sum").item()
            count += y.numel()
    if was_training:
        model.train()
    return loss_sum / count


def unigram_perplexity(train_ids: Any, val_ids: Any, vocab_size: int, block_size: int) -> float:
    """Perplexity of add-one-smoothed unigram frequencies on exactly the tokens the model is scored on."""
    import torch

    counts = torch.bincount(train_ids, minlength=vocab_size).double() + 1.0
    logp = torch.log(counts / counts.sum())
    total = n_blocks(val_ids, block_size)
    targets = torch.cat([get_block(val_ids, i, block_size)[1] for i in range(total)])
    return math.exp(-logp[targets].mean().item())


# --------------------------------------------------------------------------- training


@dataclass
class TrainReport:
    output: str
    steps: int
    seconds: float
    train_loss: float
    val_loss: float
    val_perplexity: float
    unigram_perplexity: float
    parameters: int
    history: list[dict[str, float]] = field(default_factory=list)


CHECKPOINTS = "checkpoints"
STATE_FILE = "trainer_state.json"


def _latest_checkpoint(out: Path) -> Path | None:
    found = sorted((out / CHECKPOINTS).glob("step-*"), key=lambda p: int(p.name.split("-")[1]))
    found = [p for p in found if (p / STATE_FILE).is_file()]
    return found[-1] if found else None


def _lr_at(step: int, total: int, opts: TrainOptions) -> float:
    """Linear warm-up, then cosine decay to a tenth of the peak."""
    if step < opts.warmup_steps:
        return opts.learning_rate * (step + 1) / opts.warmup_steps
    progress = (step - opts.warmup_steps) / max(1, total - opts.warmup_steps)
    return opts.learning_rate * (0.1 + 0.45 * (1 + math.cos(math.pi * min(1.0, progress))))


def _save_checkpoint(out: Path, model: Any, tokenizer: Any, optimizer: Any, state: dict[str, Any], keep: int = 2) -> Path:
    import torch

    ckpt_root = out / CHECKPOINTS
    final = ckpt_root / f"step-{state['step']}"
    tmp = ckpt_root / f".tmp-step-{state['step']}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
    state = dict(state, torch_rng=torch.get_rng_state().tolist())
    (tmp / STATE_FILE).write_text(json.dumps(state))
    shutil.rmtree(final, ignore_errors=True)
    # A checkpoint appears under its real name only when complete, so an interruption
    # while saving leaves the previous one as the latest.
    tmp.rename(final)
    for old in sorted(ckpt_root.glob("step-*"), key=lambda p: int(p.name.split("-")[1]))[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def _check_output(out: Path, resume: bool, overwrite: bool) -> Path | None:
    """Decide what may happen to ``out``; returns the checkpoint to resume from."""
    if out.exists() and not out.is_dir():
        raise ChatbotError(f"--output {out} is a file, not a directory")
    latest = _latest_checkpoint(out) if out.is_dir() else None
    if resume:
        if latest is None:
            raise ChatbotError(f"nothing to resume: {out} has no checkpoint; drop --resume to start a new run")
        return latest
    if out.is_dir() and any(out.iterdir()):
        if not overwrite:
            what = "a checkpoint (pass --resume to continue it" if latest else "files (pass --overwrite to replace them"
            raise ChatbotError(f"{out} already holds {what}, or choose another --output)")
        if not ((out / "config.json").exists() or (out / CHECKPOINTS).exists()):
            # --overwrite replaces what the directory holds, so it must be one this command wrote.
            raise ChatbotError(f"{out} does not look like a model directory; refusing to overwrite it")
    return None


def _model_context(config: Any) -> int:
    for key in ("n_positions", "max_position_embeddings"):
        value = getattr(config, key, None)
        if isinstance(value, int):
            return value
    raise ChatbotError(f"the base model ({type(config).__name__}) does not declare its context size; "
                       "use a GPT-2-family model")


def train(opts: TrainOptions, *, resume: bool = False, overwrite: bool = False, allow_download: bool = False,
          progress: bool = True) -> TrainReport:
    """Train (or fine-tune) a GPT-2 and write a Hugging Face model directory to ``opts.output``."""
    import torch
    import torch.nn.functional as F
    from tqdm.auto import tqdm
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GPT2Config, GPT2LMHeadModel

    out = Path(opts.output).expanduser()
    latest = _check_output(out, resume, overwrite)
    saved: dict[str, Any] = {}
    if latest is not None:
        saved = json.loads((latest / STATE_FILE).read_text())
        mismatched = {k: (saved["options"].get(k), v) for k, v in opts.model_dump().items()
                      if k not in ("device", "threads", "output") and saved["options"].get(k) != v}
        if mismatched:
            desc = ", ".join(f"`{k}` was {a!r}, now {b!r}" for k, (a, b) in mismatched.items())
            raise ChatbotError(f"cannot resume with different options: {desc}")

    if opts.threads:
        torch.set_num_threads(opts.threads)
    torch.manual_seed(opts.seed)
    device = pick_device(opts.device)
    started = time.time()

    # Everything that can fail on bad input runs before the output directory is touched.
    base_model = None
    with tempfile.TemporaryDirectory() as tmp:
        if latest is not None:
            # The checkpoint's own tokenizer: token ids must mean what they meant before.
            data, tokenizer = prepare_data(opts, None, AutoTokenizer.from_pretrained(latest),
                                           AutoConfig.from_pretrained(latest))
        elif opts.base_model:
            base_model, base_tok = load_model(opts.base_model, device="cpu", allow_download=allow_download,
                                              option="--base-model")
            data, tokenizer = prepare_data(opts, None, base_tok, base_model.config)
        else:
            data, tokenizer = prepare_data(opts, Path(tmp) / "tokenizer")
    block = opts.block_size
    if base_model is not None and block > _model_context(base_model.config):
        raise ChatbotError(f"`block_size` must be at most the base model's context "
                           f"({_model_context(base_model.config)}), got {block}")
    if n_blocks(data.train_ids, block) < 1 or n_blocks(data.val_ids, block) < 1:
        raise ChatbotError(f"the corpus is too small for --block-size {block} "
                           f"({len(data.train_ids)} training / {len(data.val_ids)} validation tokens)")

    replaces: list[str] = []
    try:
        if latest is None:
            # --overwrite: the old run's checkpoints go now, but a model already there stays
            # usable (a bot may be running on it) until the new one replaces it (`_write_final`).
            shutil.rmtree(out / CHECKPOINTS, ignore_errors=True)
            replaces = sorted(p.name for p in out.iterdir()) if out.is_dir() else []
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise ChatbotError(f"cannot write --output {out}: {err.strerror}") from None
    if latest is not None:
        model = AutoModelForCausalLM.from_pretrained(latest)
    elif base_model is not None:
        model = base_model
        model.config.chatbot_prompt_format = data.format_name
    else:
        config = GPT2Config(
            vocab_size=len(tokenizer), n_positions=block, n_embd=opts.n_embd, n_layer=opts.n_layer,
            n_head=opts.n_head, resid_pdrop=opts.dropout, embd_pdrop=opts.dropout, attn_pdrop=opts.dropout,
            # The fused tanh-GELU computes the same function as GPT-2's "gelu_new" and,
            # measured on a 2-core CPU, trains 1.4x faster.
            activation_function="gelu_pytorch_tanh",
            bos_token_id=tokenizer.eos_token_id, eos_token_id=tokenizer.eos_token_id,
            chatbot_prompt_format=data.format_name,
        )
        model = GPT2LMHeadModel(config)
    model.to(device)
    model.train()

    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": opts.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=opts.learning_rate, betas=(0.9, 0.95),
    )
    per_epoch = n_blocks(data.train_ids, block)
    steps_per_epoch = max(1, per_epoch // opts.batch_size)
    total_steps = opts.max_steps or max(1, math.ceil(opts.epochs * steps_per_epoch))
    state: dict[str, Any] = {"step": 0, "history": [], "seconds": 0.0, "smooth_loss": None,
                             "options": opts.model_dump(), "replaces": replaces}
    if latest is not None:
        optimizer.load_state_dict(torch.load(latest / "optimizer.pt", map_location=device))
        state.update(saved)
        torch.set_rng_state(torch.tensor(saved["torch_rng"], dtype=torch.uint8))
        log.info("resuming from %s", latest)

    n_params = sum(p.numel() for p in model.parameters())
    bar = tqdm(total=total_steps, initial=state["step"], disable=not progress, unit="step",
               desc=f"training {n_params / 1e6:.1f}M params")
    say = bar.write if progress else log.info
    seg_start = time.time()
    try:
        while state["step"] < total_steps:
            step = state["step"]
            epoch, pos = divmod(step, steps_per_epoch)
            order = block_order(per_epoch, opts.seed, epoch)
            idx = order[pos * opts.batch_size:(pos + 1) * opts.batch_size]
            xs, ys = zip(*(get_block(data.train_ids, i, block) for i in idx))
            x, y = torch.stack(xs).to(device), torch.stack(ys).to(device)
            lr = _lr_at(step, total_steps, opts)
            for group in optimizer.param_groups:
                group["lr"] = lr
            logits = model(input_ids=x).logits
            loss = F.cross_entropy(logits.view(-1, logits.size(-1)).float(), y.reshape(-1))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            state["step"] = done = step + 1
            smooth = state["smooth_loss"]
            state["smooth_loss"] = smooth = loss.item() if smooth is None else 0.98 * smooth + 0.02 * loss.item()
            bar.update(1)
            bar.set_postfix(loss=f"{smooth:.3f}", lr=f"{lr:.2e}")
            if done % opts.eval_every == 0 or done == total_steps:
                val = evaluate_loss(model, data.val_ids, block, max_blocks=None if done == total_steps else 200)
                state["history"].append({"step": done, "train_loss": round(smooth, 4), "val_loss": round(val, 4)})
                say(f"step {done}: train loss {smooth:.3f}, validation loss {val:.3f} (perplexity {math.exp(val):.1f})")
            if done % opts.checkpoint_every == 0 or done == total_steps:
                state["seconds"] += time.time() - seg_start
                seg_start = time.time()
                # The last step is checkpointed too, so an interruption while the final
                # model is scored and written loses nothing: --resume finishes it.
                _save_checkpoint(out, model, tokenizer, optimizer, state)
        bar.close()

        # The last history entry is the full validation loss at the final step.
        val_loss = state["history"][-1]["val_loss"]
        uni = unigram_perplexity(data.train_ids, data.val_ids, len(tokenizer), block)
        smooth = state["smooth_loss"]
        report = TrainReport(
            output=str(out), steps=state["step"], seconds=round(state["seconds"], 1),
            train_loss=round(smooth, 4), val_loss=round(val_loss, 4),
            val_perplexity=round(math.exp(val_loss), 2), unigram_perplexity=round(uni, 2),
            parameters=n_params, history=state["history"],
        )
        cfg = model.config
        info = {
            "report": asdict(report),
            "options": opts.model_dump(),
            "model": {"n_layer": cfg.n_layer, "n_embd": cfg.n_embd, "n_head": cfg.n_head,
                      "context": _model_context(cfg), "vocab_size": cfg.vocab_size},
            "data": {"source": opts.data, "cleaning": asdict(data.stats),
                     "train_conversations": data.n_train_conversations,
                     "validation_conversations": data.n_val_conversations,
                     "train_tokens": int(len(data.train_ids)), "validation_tokens": int(len(data.val_ids)),
                     "prompt_format": data.format_name},
            "device": device, "torch_threads": torch.get_num_threads(),
            "wall_seconds_including_data": round(time.time() - started, 1),
        }
        _write_final(out, model, tokenizer, info, state.get("replaces", []))
    except KeyboardInterrupt:
        bar.close()
        if state["step"] == 0:
            raise ChatbotError("interrupted before the first step; nothing saved") from None
        path = _latest_checkpoint(out)
        if path is None or json.loads((path / STATE_FILE).read_text())["step"] != state["step"]:
            state["seconds"] += time.time() - seg_start
            path = _save_checkpoint(out, model, tokenizer, optimizer, state)
        raise ChatbotError(f"interrupted at step {state['step']}; saved {path}; "
                           f"run the same command with --resume to continue") from None
    return report


def _write_final(out: Path, model: Any, tokenizer: Any, info: dict[str, Any], replaces: Sequence[str] = ()) -> None:
    """Write the model directory; checkpoints are removed only once it is complete, and so is
    whatever of ``replaces`` (what ``--output`` held when an --overwrite run began) this model
    did not write again (another tokenizer file, say)."""
    staging = out / ".final"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    model.to("cpu")
    model.save_pretrained(staging, safe_serialization=True)
    tokenizer.save_pretrained(staging)
    (staging / "training_info.json").write_text(json.dumps(info, indent=2) + "\n")
    (staging / "README.md").write_text(model_card(info))
    written = {item.name for item in staging.iterdir()}
    for item in staging.iterdir():
        os.replace(item, out / item.name)
    staging.rmdir()
    shutil.rmtree(out / CHECKPOINTS, ignore_errors=True)
    for item in (out / name for name in set(replaces) - written):
        try:
            shutil.rmtree(item) if item.is_dir() and not item.is_symlink() else item.unlink(missing_ok=True)
        except OSError as err:  # the model is written: a leftover is worth a warning, not a failure
            log.warning("could not remove %s: %s", item, err.strerror)


def model_card(info: dict[str, Any]) -> str:
    r, o, d, m = info["report"], info["options"], info["data"], info["model"]
    ratio = r["unigram_perplexity"] / r["val_perplexity"]
    base = o["base_model"] or "none (trained from scratch)"
    scored = n_blocks(range(d["validation_tokens"]), o["block_size"]) * o["block_size"]  # what evaluate_loss reads
    lines = [
        "---",
        "library_name: transformers",
        "pipeline_tag: text-generation",
        "tags: [gpt2, conversational, chit-chat]",
        "---",
        "",
        f"# {Path(r['output']).name}",
        "",
        "A GPT-2 for casual chat, trained by `python bot.py train`. Prompts use the "
        f"`{d['prompt_format']}` format of `chatbot/prompting.py`.",
        "",
        "## Evaluation",
        "",
        "| measure | value |",
        "| --- | --- |",
        f"| validation perplexity | {r['val_perplexity']:.2f} |",
        f"| unigram perplexity on the same tokens | {r['unigram_perplexity']:.2f} |",
        f"| unigram / model | {ratio:.1f}x |",
        f"| validation loss | {r['val_loss']:.4f} |",
        f"| final training loss (smoothed) | {r['train_loss']:.4f} |",
        "",
        "## Data",
        "",
        f"- source: `{d['source']}`",
        f"- conversations: {d['train_conversations']} training, {d['validation_conversations']} validation "
        f"(split by conversation, seed {o['seed']}, {o['val_fraction']:.1%} held out)",
        f"- tokens: {d['train_tokens']:,} training, {d['validation_tokens']:,} validation; the perplexities "
        f"score the {scored:,} validation tokens that fill whole {o['block_size']}-token blocks",
        "- cleaning: " + ", ".join(f"{k.replace('_', ' ')} {v:,}" for k, v in d["cleaning"].items()),
        "",
        "## Model and training",
        "",
        f"- parameters: {r['parameters']:,}; base model: {base}",
        f"- shape: {m['n_layer']} layers, {m['n_embd']} wide, {m['n_head']} heads, "
        f"context {m['context']} tokens, vocabulary {m['vocab_size']}",
        f"- steps: {r['steps']}, batch {o['batch_size']} x {o['block_size']} tokens, peak learning rate "
        f"{o['learning_rate']}, warm-up {o['warmup_steps']}, cosine decay, weight decay {o['weight_decay']}, "
        f"dropout {o['dropout']}",
        f"- seed: {o['seed']}; device: {info['device']} ({info['torch_threads']} threads); "
        f"training time {r['seconds'] / 60:.1f} min",
        "",
        "## History",
        "",
        "| step | training loss | validation loss |",
        "| --- | --- | --- |",
    ]
    lines += [f"| {h['step']} | {h['train_loss']} | {h['val_loss']} |" for h in r["history"]]
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------- evaluation

FIXED_PROMPTS = (
    "hi!",
    "how are you doing today?",
    "what do you like to do for fun?",
    "do you have any pets?",
    "what is your favorite movie?",
)


@dataclass
class EvalReport:
    model: str
    val_perplexity: float
    unigram_perplexity: float
    tokens: int
    samples: list[tuple[str, str]]


def evaluate(model_name: str | None = None, *, data: str | None = None, seed: int | None = None,
             val_fraction: float | None = None, block_size: int | None = None, samples: int = 5,
             settings: DecodingSettings | None = None, device: str = "auto",
             allow_download: bool = False) -> EvalReport:
    """Perplexity on the validation split the model was trained with, plus sampled replies.

    The split is rebuilt from the options in ``training_info.json`` when the model has
    one, so ``evaluate`` scores exactly the conversations training held out.
    """
    name = resolve_model(model_name)
    gen = LocalGenerator.from_pretrained(name, device=device, allow_download=allow_download)
    recorded: dict[str, Any] = {}
    info_file = Path(name) / "training_info.json"
    if info_file.is_file():
        recorded = json.loads(info_file.read_text()).get("options", {})
    opts = make_train_options(
        data=data or recorded.get("data", CHITCHAT),
        seed=recorded.get("seed", 0) if seed is None else seed,
        val_fraction=val_fraction or recorded.get("val_fraction", 0.05),
        max_turn_chars=recorded.get("max_turn_chars", 500),
        block_size=block_size or min(gen.context_size, recorded.get("block_size", gen.context_size)),
    )
    raw = load_corpus(opts.data, opts.seed)
    conversations, _ = clean_conversations(raw, max_turn_chars=opts.max_turn_chars)
    train_convs, val_convs = split_conversations(conversations, opts.val_fraction, opts.seed)
    eos = gen.tokenizer.eos_token
    fmt = gen.format
    val_ids = tokenize_stream(render(val_convs, fmt, eos), gen.tokenizer)
    train_ids = tokenize_stream(render(train_convs, fmt, eos), gen.tokenizer)
    loss = evaluate_loss(gen.model, val_ids, opts.block_size)
    uni = unigram_perplexity(train_ids, val_ids, len(gen.tokenizer), opts.block_size)
    settings = settings or DecodingSettings(seed=opts.seed)
    if not 0 <= samples <= len(FIXED_PROMPTS):
        raise ChatbotError(f"`samples` must be between 0 and {len(FIXED_PROMPTS)}, got {samples}")
    prompts = FIXED_PROMPTS[:samples]
    requests = [
        GenerationRequest(fmt.build_prompt([Utterance("User", p)], "Bot"), settings, tuple(fmt.stop_strings(["User", "Bot"])))
        for p in prompts
    ]
    replies = [r.text for r in gen.generate(requests)]
    return EvalReport(name, math.exp(loss), uni, n_blocks(val_ids, opts.block_size) * opts.block_size,
                      list(zip(prompts, replies)))
