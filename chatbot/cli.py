"""`python bot.py ...`: the command line. The terminal front end is the only place that prints.

Every user mistake (bad option value, missing file, model not available offline) ends
as one line on stderr and exit status 2, never a traceback.
"""

from __future__ import annotations

import argparse
import logging
import sys
from typing import Any, Sequence

from .errors import ChatbotError

log = logging.getLogger(__name__)


def _add_decoding_options(p: argparse.ArgumentParser, *, temperature: float = 0.8) -> None:
    g = p.add_argument_group("decoding")
    g.add_argument("--temperature", type=float, default=temperature,
                   help="sampling temperature, 0 for greedy decoding (default %(default)s)")
    g.add_argument("--top-k", type=int, default=50, help="sample among the k most likely tokens, 0 = off (default %(default)s)")
    g.add_argument("--top-p", type=float, default=0.9, help="nucleus sampling mass in (0, 1], 1 = off (default %(default)s)")
    g.add_argument("--max-new-tokens", type=int, default=40, help="longest reply in tokens (default %(default)s)")
    g.add_argument("--repetition-penalty", type=float, default=1.1,
                   help="divide logits of tokens already seen by this, 1 = off (default %(default)s)")
    g.add_argument("--no-repeat-ngram-size", type=int, default=3,
                   help="never repeat an n-gram of this size, 0 = off (default %(default)s)")
    g.add_argument("--max-time", type=float, default=20.0, help="seconds allowed per reply (default %(default)s)")
    g.add_argument("--seed", type=int, default=None, help="seed for reproducible sampling (default: random; 0 for evaluate)")


def _decoding(args: argparse.Namespace) -> Any:
    from .generation import make_decoding_settings

    return make_decoding_settings(
        temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, max_new_tokens=args.max_new_tokens,
        repetition_penalty=args.repetition_penalty, no_repeat_ngram_size=args.no_repeat_ngram_size,
        max_time=args.max_time, seed=args.seed,
    )


def _model_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None,
                   help="model directory, or a hub name already in the local cache (default: the shipped model)")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:1, mps, or auto (default)")
    p.add_argument("--allow-download", action="store_true",
                   help="fetch a hub model that is not in the local cache (needs network; off by default)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="bot.py", description="GPT-2 chatbot: train, evaluate, generate, chat.")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("-v", "--verbose", action="store_true", help="log what happens (to stderr)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    t = sub.add_parser("train", parents=[common], help="train a GPT-2 from scratch or fine-tune one on dialogue data",
                       description="Read dialogue data, clean it, hold out a validation split, train a tokenizer "
                                   "(from scratch) and a GPT-2, and write a Hugging Face model directory with a "
                                   "model card. Interrupt with Ctrl-C and continue with --resume.")
    t.add_argument("--data", default="chitchat",
                   help="'chitchat' (the bundled BYU chit-chat corpus), a .jsonl file with one conversation per "
                        "line as a list of {\"speaker\", \"text\"} turns, or a plain-text file with one "
                        "'Name: text' turn per line and blank lines between conversations (default %(default)s)")
    t.add_argument("--output", default="runs/chitchat-gpt2", help="model directory to write (default %(default)s)")
    t.add_argument("--base-model", default=None,
                   help="fine-tune this model (directory or cached hub name, e.g. distilgpt2) and reuse its "
                        "tokenizer instead of training from scratch")
    t.add_argument("--vocab-size", type=int, default=8000, help="tokenizer vocabulary when training from scratch (default %(default)s)")
    t.add_argument("--n-layer", type=int, default=6, help="transformer layers (default %(default)s)")
    t.add_argument("--n-embd", type=int, default=256, help="hidden width (default %(default)s)")
    t.add_argument("--n-head", type=int, default=8, help="attention heads; must divide --n-embd (default %(default)s)")
    t.add_argument("--block-size", type=int, default=256, help="training sequence length = model context in tokens (default %(default)s)")
    t.add_argument("--batch-size", type=int, default=16, help="sequences per optimiser step (default %(default)s)")
    t.add_argument("--learning-rate", type=float, default=2e-3, help="peak learning rate (default %(default)s)")
    t.add_argument("--weight-decay", type=float, default=0.1, help="AdamW weight decay (default %(default)s)")
    t.add_argument("--warmup-steps", type=int, default=200, help="linear warm-up steps before cosine decay (default %(default)s)")
    t.add_argument("--epochs", type=float, default=1.0, help="passes over the training data (default %(default)s)")
    t.add_argument("--max-steps", type=int, default=None, help="total optimiser steps; overrides --epochs")
    t.add_argument("--dropout", type=float, default=0.0, help="dropout in the transformer (default %(default)s)")
    t.add_argument("--eval-every", type=int, default=500, help="steps between validation losses (default %(default)s)")
    t.add_argument("--checkpoint-every", type=int, default=500, help="steps between checkpoints (default %(default)s)")
    t.add_argument("--val-fraction", type=float, default=0.05, help="share of conversations held out (default %(default)s)")
    t.add_argument("--max-turn-chars", type=int, default=500,
                   help="turns longer than this are dropped, splitting the conversation there (default %(default)s)")
    t.add_argument("--seed", type=int, default=0, help="seed for the split, the tokenizer and training (default %(default)s)")
    t.add_argument("--device", default="auto", help="cpu, cuda, mps, or auto (default)")
    t.add_argument("--allow-download", action="store_true",
                   help="fetch --base-model from the hub if it is not cached (needs network; off by default)")
    t.add_argument("--threads", type=int, default=None, help="CPU threads for torch (default: torch's choice)")
    t.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in --output")
    t.add_argument("--overwrite", action="store_true", help="replace what --output already holds")

    e = sub.add_parser("evaluate", parents=[common], help="validation perplexity and sample replies",
                       description="Score a model on the validation split it was trained with (rebuilt from its "
                                   "training_info.json) and print replies to a few fixed prompts.")
    _model_option(e)
    e.add_argument("--data", default=None, help="score on this corpus instead of the one recorded in the model")
    e.add_argument("--samples", type=int, default=5, help="how many fixed prompts to answer (default %(default)s)")
    _add_decoding_options(e)

    g = sub.add_parser("generate", parents=[common], help="continue a prompt", description="Print the model's continuation of PROMPT.")
    _model_option(g)
    g.add_argument("prompt", help="text to continue")
    g.add_argument("--raw", action="store_true",
                   help="continue the text as it is; by default PROMPT is a chat message and the reply is printed")
    _add_decoding_options(g)

    c = sub.add_parser("chat", parents=[common], help="talk to the model in the terminal (reads lines from stdin when piped)")
    _model_option(c)
    c.add_argument("--name", default="User", help="your speaker name (default %(default)s)")
    c.add_argument("--bot-name", default="Bot", help="the bot's speaker name (default %(default)s)")
    _add_decoding_options(c)
    return parser


def cmd_train(args: argparse.Namespace) -> int:
    from .training import make_train_options, train

    opts = make_train_options(
        data=args.data, output=args.output, base_model=args.base_model, vocab_size=args.vocab_size,
        n_layer=args.n_layer, n_embd=args.n_embd, n_head=args.n_head, block_size=args.block_size,
        batch_size=args.batch_size, learning_rate=args.learning_rate, weight_decay=args.weight_decay,
        warmup_steps=args.warmup_steps, epochs=args.epochs, max_steps=args.max_steps, dropout=args.dropout,
        eval_every=args.eval_every, checkpoint_every=args.checkpoint_every, val_fraction=args.val_fraction,
        max_turn_chars=args.max_turn_chars, seed=args.seed, device=args.device, threads=args.threads,
    )
    progress = sys.stderr.isatty() or args.verbose
    if not progress:
        # Without a progress bar (output to a file or pipe), the periodic validation
        # lines are how a long run shows it is alive.
        logging.getLogger("chatbot.training").setLevel(logging.INFO)
    report = train(opts, resume=args.resume, overwrite=args.overwrite, allow_download=args.allow_download,
                   progress=progress)
    print(f"wrote {report.output}")
    print(f"steps {report.steps}, {report.seconds / 60:.1f} min, {report.parameters / 1e6:.2f}M parameters")
    print(f"validation perplexity {report.val_perplexity:.2f} "
          f"(unigram {report.unigram_perplexity:.2f}; unigram/model {report.unigram_perplexity / report.val_perplexity:.1f}x)")
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from .training import evaluate

    settings = _decoding(args)
    if settings.seed is None:
        # Fixed prompts with a fixed seed, so two models (or two runs) compare like for like.
        settings = settings.model_copy(update={"seed": 0})
    report = evaluate(args.model, data=args.data, samples=args.samples, settings=settings, device=args.device,
                      allow_download=args.allow_download)
    print(f"model: {report.model}")
    print(f"validation perplexity {report.val_perplexity:.2f} on {report.tokens:,} tokens "
          f"(unigram {report.unigram_perplexity:.2f}; unigram/model {report.unigram_perplexity / report.val_perplexity:.1f}x)")
    for prompt, reply in report.samples:
        print(f"> {prompt}\n{reply}")
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    from .generation import GenerationRequest, LocalGenerator
    from .prompting import Utterance

    settings = _decoding(args)
    gen = LocalGenerator.from_pretrained(args.model, device=args.device, allow_download=args.allow_download)
    if args.raw:
        request = GenerationRequest(args.prompt, settings)
    else:
        fmt = gen.format
        prompt = fmt.build_prompt([Utterance("User", args.prompt)], "Bot")
        request = GenerationRequest(prompt, settings, tuple(fmt.stop_strings(["User", "Bot"])))
    print(gen.generate([request])[0].text)
    return 0


def cmd_chat(args: argparse.Namespace) -> int:
    """A minimal prompt loop: history lives in this process only."""
    import time

    from .conversation import Turn, build_window
    from .generation import GenerationRequest, LocalGenerator
    from .prompting import Utterance

    settings = _decoding(args)
    gen = LocalGenerator.from_pretrained(args.model, device=args.device, allow_download=args.allow_download)
    fmt = gen.format
    stops = tuple(fmt.stop_strings([args.name, args.bot_name]))
    interactive = sys.stdin.isatty()
    # History lives in this process only; the window keeps the newest turns that fit the
    # model's context, measured in its own tokens.
    history: list[Turn] = []
    dropped = 0
    budget = gen.context_size - settings.max_new_tokens

    def render(preamble: str, pinned: Sequence[Utterance], turns: Sequence[Turn]) -> str:
        return fmt.build_prompt(list(pinned) + [Utterance(t.author, t.text) for t in turns], args.bot_name, preamble)

    if interactive:
        print(f"Chatting with {gen.name}. Type a message; Ctrl-D or /quit to leave.")
    while True:
        try:
            line = input(f"{args.name}> " if interactive else "")
        except EOFError:
            break
        except KeyboardInterrupt:
            print()
            break
        text = line.strip()
        if not text:
            continue
        if text in ("/quit", "/exit"):
            break
        history.append(Turn("cli:local", args.name, "user", text, time.time(), dropped + len(history)))
        window = build_window(history, render=render, count_tokens=gen.count_tokens, budget=budget,
                              first_position=dropped)
        dropped += len(window.dropped)
        history = list(window.turns)
        request = GenerationRequest(render("", (), history), settings, stops)
        if interactive:
            print(f"{args.bot_name}> ", end="", flush=True)
            reply = ""
            for piece in gen.stream(request):
                reply += piece
                print(piece, end="", flush=True)
            print()
        else:
            reply = gen.generate([request])[0].text
            print(reply, flush=True)
        history.append(Turn("cli:local", args.bot_name, "bot", reply, time.time(), dropped + len(history)))
    return 0


COMMANDS = {"train": cmd_train, "evaluate": cmd_evaluate, "generate": cmd_generate, "chat": cmd_chat}


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    if not args.verbose:
        # transformers' advisory warnings and its load/save progress bars are noise in a
        # terminal chat and would break "one reply per line" on a pipe.
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
    try:
        return COMMANDS[args.command](args)
    except ChatbotError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
