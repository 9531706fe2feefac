"""`python bot.py ...`: the command line, a face of the library like the others. It holds the
commands of the tools (train, evaluate, generate, bench, selfchat, lab, safety-eval) and takes
each face's own command (`FaceCommand`: the terminal chat, the Discord bot) from ``bot.py``.

Every user mistake (bad option value, missing file, model not available offline) ends
as one line on stderr and exit status 2, never a traceback.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import sys
from dataclasses import dataclass
from typing import Any, Callable, Sequence

from chatbot.errors import ChatbotError

log = logging.getLogger(__name__)





def decoding_options(p: argparse.ArgumentParser, *, preset_help: str) -> None:
    from chatbot.decoding import PRESETS

    g = p.add_argument_group("decoding", "Each option overrides the one in the preset; unset ones come from it.")
    g.add_argument("--preset", default=None, choices=list(PRESETS), help=preset_help)
    g.add_argument("--temperature", type=float, help="sampling temperature, 0 for greedy decoding")
    g.add_argument("--top-k", type=int, help="sample among the k most likely tokens, 0 = off")
    g.add_argument("--top-p", type=float, help="nucleus sampling mass in (0, 1], 1 = off")
    g.add_argument("--max-new-tokens", type=int, help="longest reply in tokens")
    g.add_argument("--bot-repetition-penalty", type=float,
                   help="divide the scores of tokens the bot itself said (earlier turns, this reply) by this, 1 = off")
    g.add_argument("--no-repeat-ngram-size", type=int, help="never repeat an n-gram of this size within the reply, 0 = off")
    g.add_argument("--bot-no-repeat-ngram-size", type=int,
                   help="never reuse an n-gram of this size from the bot's earlier turns, 0 = off")
    g.add_argument("--repetition-penalty", type=float,
                   help="transformers' penalty on every prompt and reply token, the user's words too; 1 = off")
    g.add_argument("--max-time", type=float, help="seconds allowed per reply")
    g.add_argument("--seed", type=int, help="seed for reproducible sampling (default: random)")


def _overrides(args: argparse.Namespace) -> dict[str, Any]:
    """The decoding options given on the command line (the others stay as the preset has them)."""
    from chatbot.decoding import GENERATION_FIELDS

    return {name: getattr(args, name) for name in GENERATION_FIELDS if getattr(args, name, None) is not None}


def settings_from_args(args: argparse.Namespace, **extra: Any) -> Any:
    """The settings file (``--config``, else ``chatbot.toml`` here), the environment, then the
    command line's options on top: every command that runs a model reads them the same way."""
    from chatbot.config import Settings
    from chatbot.decoding import make_overrides

    make_overrides(_overrides(args))  # a bad option is named as the option says it (`top_p`), not as a file key
    values = dict(model=args.model, device=args.device, allow_download=args.allow_download or None,
                  memory_path=getattr(args, "memory", None), decoding=_overrides(args) or None)
    return Settings.load(args.config, **{**values, **extra})


def _decoding(args: argparse.Namespace, settings: Any, default_preset: str = "balanced") -> Any:
    """``--preset`` (else the settings' preset, else ``default_preset``) with the settings' decoding
    table, which holds the command line's decoding options too, on top."""
    from chatbot.decoding import compose

    return compose(args.preset or settings.preset or default_preset, settings.decoding)


def config_option(p: argparse.ArgumentParser, what: str = "settings file (TOML)") -> None:
    p.add_argument("--config", default=None, help=f"{what}; default: chatbot.toml in this folder if there is one")


def memory_option(p: argparse.ArgumentParser) -> None:
    """``--memory``, which `settings_from_args` reads as the settings' ``memory_path``."""
    p.add_argument("--memory", default=None, help="SQLite file for conversations, ':memory:' to forget on exit "
                                                  "(default: the settings' memory_path, chatbot.sqlite3)")


def model_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None,
                   help="model directory, or a hub name already in the local cache (default: the shipped model)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1, mps, or auto (default)")
    p.add_argument("--allow-download", action="store_true",
                   help="fetch a hub model that is not in the local cache (needs network; off by default)")


@dataclass(frozen=True)
class FaceCommand:
    """A command that a face adds to ``bot.py`` (the Discord bot's ``discord``), registered by
    ``bot.py``: the core's command line knows no face. ``add(subparsers, common)`` adds the
    command's parser (``common`` is the parent parser with ``-v``); ``run(args)`` runs it and
    returns the exit status. `config_option`, `model_option` and `settings_from_args` give it the
    options and the settings every command reads the same way."""

    name: str
    add: Callable[[Any, argparse.ArgumentParser], argparse.ArgumentParser]
    run: Callable[[argparse.Namespace], int]


class _Parser(argparse.ArgumentParser):
    """Reports an unknown option with the usage of the command it was given to (``chat --presset``
    shows chat's usage), where argparse would show the top-level one."""

    commands: dict[str, argparse.ArgumentParser] = {}

    def parse_args(self, args: Sequence[str] | None = None, namespace: Any = None) -> Any:  # type: ignore[override]
        parsed, extra = self.parse_known_args(args, namespace)
        if extra:
            parser = self.commands.get(getattr(parsed, "command", None) or "", self)
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        return parsed


def build_parser(faces: Sequence[FaceCommand] = ()) -> argparse.ArgumentParser:
    parser = _Parser(prog="bot.py", description="GPT-2 chatbot: chat in the terminal, train and evaluate models, measure repetition and safety.")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("-v", "--verbose", action="store_true", help="log what happens (to stderr)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    parser.commands = sub.choices

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
    config_option(e, "settings file (TOML) for the model, device and decoding")
    model_option(e)
    e.add_argument("--data", default=None, help="score on this corpus instead of the one recorded in the model")
    e.add_argument("--samples", type=int, default=5, help="how many fixed prompts to answer (default %(default)s)")
    decoding_options(e, preset_help="decoding preset (default balanced, with seed 0)")

    g = sub.add_parser("generate", parents=[common], help="answer one message, or continue a text",
                       description="Print the bot's reply to PROMPT, a one-off message through the same engine as "
                                   "the chat (persona, repetition controls, safety filters; nothing is stored), or "
                                   "with --raw the model's plain continuation of PROMPT.")
    config_option(g, "settings file (TOML) for the model, persona, decoding and safety")
    model_option(g)
    g.add_argument("prompt", help="the message to answer (or, with --raw, the text to continue)")
    g.add_argument("--raw", action="store_true",
                   help="continue the text as it is; by default PROMPT is a chat message and the reply is printed")
    g.add_argument("--persona", default=None, help="persona that answers (default: the settings'); not with --raw")
    decoding_options(g, preset_help="decoding preset (default: the persona's; balanced with --raw)")

    b = sub.add_parser("bench", parents=[common], help="measure batched serving against one generate call per message",
                       description="Run the same conversations through (a) one model.generate call per message, one "
                                   "after another, and (b) the batching generator, with greedy decoding and a fixed "
                                   "number of new tokens, and print throughput, time to first token, time per token, "
                                   "latency percentiles, peak memory and the ratios (b)/(a).")
    b.add_argument("--model", default=None,
                   help="model directory or cached hub name (default: the GPT-2 124M shape with random weights)")
    b.add_argument("--device", default="cpu", help="cpu (default), cuda, cuda:1 or mps")
    b.add_argument("--conversations", type=int, default=16, help="conversations (default %(default)s)")
    b.add_argument("--turns", type=int, default=4, help="messages per conversation (default %(default)s)")
    b.add_argument("--min-history", type=int, default=200, help="shortest starting history in tokens (default %(default)s)")
    b.add_argument("--max-history", type=int, default=900, help="longest prompt, history and replies included, in tokens (default %(default)s)")
    b.add_argument("--min-reply", type=int, default=30, help="shortest reply in tokens (default %(default)s)")
    b.add_argument("--max-reply", type=int, default=60, help="longest reply in tokens (default %(default)s)")
    b.add_argument("--mode", choices=["burst", "poisson"], default="burst",
                   help="burst: every conversation sends its next message when answered; poisson: messages arrive "
                        "at --rate per second (default %(default)s)")
    b.add_argument("--rate", type=float, default=2.0, help="messages per second in poisson mode (default %(default)s)")
    b.add_argument("--max-batch", type=int, default=16, help="rows decoded together (default %(default)s)")
    b.add_argument("--seed", type=int, default=0, help="workload and weights seed (default %(default)s)")
    b.add_argument("--json", default=None, metavar="PATH", help="also write the figures as JSON here")

    sc = sub.add_parser("selfchat", parents=[common], help="measure repetition with the controls on and off",
                        description="Replay N-turn conversations through the engine against a scripted partner (or "
                                    "the engine under another persona), with the same seeds for both arms, and print "
                                    "repeated-turn rate, looping replies, distinct-1/2 and mean reply length with the "
                                    "repetition controls on and off.")
    sc.add_argument("--config", default=None, help="settings file (TOML)")
    model_option(sc)
    sc.add_argument("--persona", default=None, help="persona under test (default: the settings')")
    sc.add_argument("--preset", default=None, help="decoding preset of the 'on' arm (default: the persona's)")
    sc.add_argument("--conversations", type=int, default=8, help="conversations per arm (default %(default)s)")
    sc.add_argument("--turns", type=int, default=10, help="bot replies per conversation (default %(default)s)")
    sc.add_argument("--seed", type=int, default=0, help="base seed; both arms use the same seeds (default %(default)s)")
    sc.add_argument("--partner", choices=["scripted", "bot"], default="scripted",
                    help="who talks to the bot: fixed chit-chat lines, or the engine itself (default %(default)s)")
    sc.add_argument("--partner-persona", default="playful", help="persona of the bot partner (default %(default)s)")

    lab = sub.add_parser("lab", parents=[common], help="compare personas and decoding presets side by side",
                         description="Replay a scenario's scripted conversations through every cell of its grid "
                                     "(personas x presets x models) with the same seeds, and write per cell the "
                                     "transcripts, distinct-1/2, repeated-turn rate, self-BLEU, perplexity, safety "
                                     "counts, latency and, where the scenario has reference replies, BLEU and chrF: "
                                     "a table here, and report.html, results.json and results.csv in --out.")
    lab.add_argument("scenario", help="scenario file (.toml, .yaml or .yml), e.g. prompts/lab/personas.toml")
    lab.add_argument("--out", default=None, metavar="DIR",
                     help="folder for the results (default lab-results/<scenario name>); an earlier run's "
                          "results.json there is kept as previous.json")
    lab.add_argument("--baseline", default=None, metavar="JSON",
                     help="an earlier run's results.json (or its folder): show what changed, cell by cell")
    lab.add_argument("--seed", type=int, default=None, help="replace the scenario's seed")
    lab.add_argument("--samples", type=int, default=None, help="replace the scenario's samples per cell")
    config_option(lab, "settings file (TOML) for safety, repetition and decoding")
    model_option(lab)

    ssa = sub.add_parser("ssa", parents=[common], help="judge reply quality blind (sensibleness and specificity)",
                         description="`ssa replies`: run each arm (an engine from a settings file) over a set of "
                                     "everyday contexts and write the shuffled, blind items a judge needs. `ssa "
                                     "score`: each arm's sensible and specific rates and SSA from the judge's "
                                     "verdicts.jsonl.")
    ssa_sub = ssa.add_subparsers(dest="ssa_command", required=True, metavar="STEP")
    sr = ssa_sub.add_parser("replies", parents=[common], help="write every arm's replies and the blind items")
    sr.add_argument("contexts", help="context set (JSON lines), e.g. prompts/eval/ssa-dev.jsonl")
    sr.add_argument("--arm", action="append", required=True, metavar="NAME[=SETTINGS]",
                    help="an engine to judge: a name, and the settings file it runs with (default: the defaults); "
                         "repeatable, e.g. --arm bank --arm model-only=prompts/eval/model-only.toml")
    sr.add_argument("--out", required=True, metavar="DIR", help="new folder for the items, key and replies")
    sr.add_argument("--seed", type=int, default=1000, help="first reply's seed; the shuffle's too (default %(default)s)")
    sr.add_argument("--device", default="cpu", help="device of every arm (default %(default)s)")
    ss = ssa_sub.add_parser("score", parents=[common], help="each arm's figures from the verdicts")
    ss.add_argument("out", metavar="DIR", help="the folder `ssa replies` wrote, with the judge's verdicts.jsonl")
    sh = ssa_sub.add_parser("hits", parents=[common], help="hits@1 of 10: how often the model ranks the "
                                                           "reference reply first (no judge needed)")
    sh.add_argument("contexts", help="context set whose lines have a \"reference\" reply")
    sh.add_argument("--seed", type=int, default=0, help="which distractors (default %(default)s)")
    config_option(sh)
    model_option(sh)

    bi = sub.add_parser("bank-index", parents=[common], help="index the bundled corpus's contexts by meaning "
                                                             "(the file that ships; minutes)",
                        description="Embed the bundled chit-chat corpus's contexts with the sentence encoder and "
                                    "write the response bank's meaning index. The project ships it; run this after "
                                    "a new chitchat-dataset or encoder.")
    bi.add_argument("--out", default=None, help="where to write it (default: chatbot/data/chitchat-meaning.npz)")

    se = sub.add_parser("safety-eval", parents=[common], help="precision, recall and false positives of the output filter",
                        description="Run the output toxicity filter over labelled sentences (JSONL lines with "
                                    "\"text\", \"label\": toxic|benign, \"kind\") and print how much it blocks.")
    se.add_argument("data", nargs="*", help="labelled sets (default: the two that ship in chatbot/data)")
    se.add_argument("--config", default=None, help="settings file whose toxicity settings to use")
    se.add_argument("--threshold", type=float, default=None, help="classifier threshold (default: the settings')")
    se.add_argument("--show-misses", action="store_true", help="list the sentences it got wrong")
    for face in faces:
        face.add(sub, common)
    return parser


def cmd_train(args: argparse.Namespace) -> int:
    from chatbot.tools.training import make_train_options, train

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
        logging.getLogger("chatbot.tools.training").setLevel(logging.INFO)
    report = train(opts, resume=args.resume, overwrite=args.overwrite, allow_download=args.allow_download,
                   progress=progress)
    print(f"wrote {report.output}")
    print(f"steps {report.steps}, {report.seconds / 60:.1f} min, {report.parameters / 1e6:.2f}M parameters")
    print(f"validation perplexity {report.val_perplexity:.2f} "
          f"(unigram {report.unigram_perplexity:.2f}; unigram/model {report.unigram_perplexity / report.val_perplexity:.1f}x)")
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from chatbot.tools.training import evaluate

    config = settings_from_args(args)
    settings = _decoding(args, config)
    if settings.seed is None:
        # Fixed prompts with a fixed seed, so two models (or two runs) compare like for like.
        settings = settings.model_copy(update={"seed": 0})
    report = evaluate(config.model, data=args.data, samples=args.samples, settings=settings, device=config.device,
                      allow_download=config.allow_download)
    print(f"model: {report.model}")
    print(f"validation perplexity {report.val_perplexity:.2f} on {report.tokens:,} tokens "
          f"(unigram {report.unigram_perplexity:.2f}; unigram/model {report.unigram_perplexity / report.val_perplexity:.1f}x)")
    for prompt, reply in report.samples:
        print(f"> {prompt}\n{reply}")
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    import asyncio

    from chatbot.generation import GenerationRequest, LocalGenerator

    if not args.prompt.strip():
        raise ChatbotError("the prompt is empty; give some text to " + ("continue" if args.raw else "answer"))
    if args.raw:
        if args.persona is not None:
            raise ChatbotError("--persona answers a message; --raw continues a text without one")
        config = settings_from_args(args)
        gen = LocalGenerator.from_pretrained(config.model, device=config.device, allow_download=config.allow_download)
        request = GenerationRequest(args.prompt, _decoding(args, config))
        print(gen.generate([request])[0].text)
        return 0
    from chatbot.engine import ChatEngine

    # One message to the engine, on a memory of its own that ends with this command.
    config = settings_from_args(args, memory_path=":memory:", persona=args.persona, preset=args.preset)

    async def answer() -> str:
        engine = ChatEngine.from_settings(config)
        try:
            return (await engine.respond("cli:generate", "User", args.prompt)).text
        finally:
            await engine.close()

    print(asyncio.run(answer()))
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from pathlib import Path

    from chatbot.tools.bench import BenchOptions, format_report, report_json, run_bench

    options = BenchOptions(model=args.model, conversations=args.conversations, turns=args.turns,
                           min_history=args.min_history, max_history=args.max_history, min_reply=args.min_reply,
                           max_reply=args.max_reply, mode=args.mode, rate=args.rate, max_batch=args.max_batch,
                           seed=args.seed, device=args.device)
    print("running (a) the naive arm, then (b) the batched arm, each in its own process ...", file=sys.stderr)
    report = run_bench(options)
    print(format_report(report))
    if args.json:
        Path(args.json).write_text(report_json(report), encoding="utf-8")
    return 0


def cmd_selfchat(args: argparse.Namespace) -> int:
    import asyncio
    from pathlib import Path

    from chatbot.config import Settings
    from chatbot.engine import ChatEngine
    from chatbot.tools.selfchat import arms, format_table, run_arm, sample_lines

    if args.conversations < 1 or args.turns < 1:
        raise ChatbotError("`--conversations` and `--turns` must be at least 1")
    settings = Settings.load(args.config, model=args.model, device=args.device,
                             allow_download=args.allow_download or None, memory_path=":memory:",
                             persona=args.persona, preset=args.preset)
    engine = ChatEngine.from_settings(settings)
    if args.partner == "bot":
        engine.persona(args.partner_persona)
    total = args.conversations * args.turns * 2
    bar = None
    if sys.stderr.isatty():
        from tqdm.auto import tqdm

        bar = tqdm(total=total, desc="selfchat", unit="reply", leave=False)

    async def run_all() -> list[Any]:
        try:
            return [await run_arm(engine, name, conversations=args.conversations, turns=args.turns, seed=args.seed,
                                  partner=args.partner, partner_persona=args.partner_persona, decoding=decoding,
                                  progress=bar.update if bar else None) for name, decoding in arms()]
        finally:
            await engine.close()

    results = asyncio.run(run_all())
    if bar:
        bar.close()
    persona, preset = engine.default_persona, settings.preset or engine.default_persona.preset
    print(f"selfchat: {args.conversations} conversations x {args.turns} replies per arm, persona {persona.name} "
          f"(preset {preset}), {args.partner} partner, seed {args.seed}, model {Path(engine.generator.name).name}")
    print(format_table(results))
    for result in results:
        print(f"\nfirst conversation, controls {result.name}:")
        for line in sample_lines(result):
            print(f"  {persona.speaker}: {line}")
    return 0


def cmd_lab(args: argparse.Namespace) -> int:
    from pathlib import Path

    from chatbot.config import Settings
    from chatbot.tools.lab import load_generators, prepare, run_lab
    from chatbot.tools.lab_html import render_html
    from chatbot.tools.lab_report import (
        check_baseline,
        check_out_dir,
        compare,
        load_baseline,
        results_document,
        terminal_table,
        write_outputs,
    )

    settings = Settings.load(args.config, device=args.device, allow_download=args.allow_download or None)
    # Everything the scenario names is checked, and the baseline read, before any model runs.
    plan = prepare(args.scenario, settings, models=[args.model] if args.model else (), seed=args.seed,
                   samples=args.samples)
    baseline = load_baseline(args.baseline) if args.baseline else None
    out_dir = Path(args.out) if args.out else Path("lab-results") / plan.scenario.name
    if baseline is not None:
        check_baseline(baseline, [cell.key for cell in plan.cells])
        if Path(baseline["_path"]).resolve() == (out_dir / "results.json").resolve():
            # Writing this run moves that file to previous.json; the report names where the baseline will be.
            baseline["_path"] = str(out_dir / "previous.json")
    check_out_dir(out_dir)
    generators = load_generators(plan, device=settings.device, allow_download=settings.allow_download)
    total = len(plan.cells) * plan.replies_per_cell
    print(f"lab {plan.scenario.name}: {len(plan.cells)} cells x {plan.replies_per_cell} replies = {total} replies",
          file=sys.stderr)
    bar = None
    if sys.stderr.isatty():
        from tqdm.auto import tqdm

        bar = tqdm(total=total, desc="lab", unit="reply", leave=False)
    replies = 0

    def progress(cell: str) -> None:
        nonlocal replies
        replies += 1
        if bar is not None:
            bar.set_postfix_str(cell, refresh=False)
            bar.update()
        elif replies % plan.replies_per_cell == 0:
            # A bar's carriage returns would garble a log file or CI output: one line per finished cell.
            print(f"lab: cell {replies // plan.replies_per_cell}/{len(plan.cells)} done: {cell}", file=sys.stderr,
                  flush=True)

    try:
        run = run_lab(plan, generators, progress=progress)
    finally:
        if bar is not None:
            bar.close()
    doc = results_document(run)
    comparison = compare(doc, baseline) if baseline is not None else None
    paths = write_outputs(doc, out_dir, render_html(doc, comparison))
    sc = plan.scenario
    print(f"{sc.name}: {len(plan.cells)} cells, {sc.samples} samples, seed {sc.seed}, {run.seconds:.1f} s")
    print(terminal_table(doc, comparison))
    print(f"\nwrote {paths['html']}, {paths['json'].name}, {paths['csv'].name}")
    return 0


def cmd_safety_eval(args: argparse.Namespace) -> int:
    from pathlib import Path

    from chatbot.config import Settings
    from chatbot.safety import LABELLED_SETS, ToxicityFilter, evaluate_filter, load_labelled

    settings = Settings.load(args.config, toxicity_threshold=args.threshold)
    check = ToxicityFilter(settings.toxicity_threshold, blocklist=settings.blocklist, allowlist=settings.allowlist)
    paths = [Path(p) for p in args.data] or list(LABELLED_SETS)
    print(f"toxicity filter: classifier threshold {settings.toxicity_threshold}, word and phrase lists")
    for path in paths:
        if not path.is_file():
            raise ChatbotError(f"{path}: no such file")
        report = evaluate_filter(check, load_labelled(path))
        print(f"\n{path.name}")
        for (label, kind), (blocked, total) in report.counts.items():
            print(f"  {label:<7} {kind:<11} blocked {blocked:>4} of {total:<4} ({blocked / total:.1%})")
        benign = sum(t for (lab, _), (_, t) in report.counts.items() if lab == "benign")
        print(f"  precision {report.precision:.3f}   recall {report.recall:.3f}   "
              f"false-positive rate {report.false_positive_rate:.3f} (of {benign} benign)")
        if args.show_misses:
            for text in report.misses:
                print(f"    wrong: {text!r}")
    return 0


def cmd_ssa(args: argparse.Namespace) -> int:
    from pathlib import Path

    from chatbot.config import Settings
    from chatbot.tools.ssa import Arm, load_contexts, score, write_replies

    if args.ssa_command == "hits":
        from chatbot.tools.ssa import hits_at_1

        settings = Settings.load(args.config, model=args.model, device=args.device,
                                 allow_download=args.allow_download or None)
        r = hits_at_1(load_contexts(args.contexts), settings, seed=args.seed)
        with_meaning = (f", {r['hits_at_1_with_meaning']:.2f} with the sentence encoder's"
                        if "hits_at_1_with_meaning" in r else "")
        print(f"hits@1 of {r['candidates']} over {r['contexts']} contexts: {r['hits_at_1_likelihood']:.2f} by "
              f"likelihood, {r['hits_at_1_bank_score']:.2f} by the model's score for the response bank"
              f"{with_meaning} (chance: {1 / r['candidates']:.2f})")
        return 0
    if args.ssa_command == "score":
        results = score(Path(args.out))
        print(f"{'arm':<16} {'judged':>6} {'sensible':>8} {'specific':>8} {'SSA':>6} {'s/reply':>8}")
        for name, r in results.items():
            print(f"{name:<16} {r['judged']:>6} {r['sensible']:>8.2f} {r['specific']:>8.2f} {r['ssa']:>6.2f} "
                  f"{r['median_seconds']:>8.2f}")
        return 0
    contexts = load_contexts(args.contexts)
    arms = []
    for given in args.arm:
        name, _, path = given.partition("=")
        if not name.strip():
            raise ChatbotError(f"--arm {given!r}: give a name, e.g. --arm bank or --arm mine=chatbot.toml")
        if path and not Path(path).is_file():
            raise ChatbotError(f"--arm {name}: {path}: no such settings file")
        # An arm is its file alone: neither the environment nor a chatbot.toml here changes what is judged.
        arms.append(Arm(name, Settings.load(path, env={}, device=args.device) if path else Settings(device=args.device)))
    out = Path(args.out)
    count = write_replies(contexts, arms, out, seed=args.seed)
    print(f"{count} replies to judge in {out / 'items.jsonl'} (instructions: {out / 'JUDGING.md'}); "
          f"then: bot.py ssa score {out}")
    return 0


def cmd_bank_index(args: argparse.Namespace) -> int:
    import time
    from pathlib import Path

    from chatbot.response_bank import SHIPPED_INDEX, build_shipped_index

    out = Path(args.out) if args.out else SHIPPED_INDEX
    started = time.perf_counter()
    count = build_shipped_index(out)
    print(f"{count} contexts indexed by meaning in {time.perf_counter() - started:.0f} s: {out}")
    return 0


COMMANDS = {"train": cmd_train, "bank-index": cmd_bank_index, "evaluate": cmd_evaluate, "generate": cmd_generate, "bench": cmd_bench, "safety-eval": cmd_safety_eval,
            "selfchat": cmd_selfchat, "lab": cmd_lab, "ssa": cmd_ssa}


def main(argv: Sequence[str] | None = None, faces: Sequence[FaceCommand] = ()) -> int:
    """``bot.py``'s commands, and those of ``faces``."""
    parser = build_parser(faces)
    args = parser.parse_args(argv)
    commands = {**COMMANDS, **{face.name: face.run for face in faces}}
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    if not args.verbose:
        # transformers' advisory warnings and its load/save progress bars are noise in a
        # terminal chat and would break "one reply per line" on a pipe.
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
    try:
        return commands[args.command](args)
    except ChatbotError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        if not _stdout_gone():
            raise
        # The reader went away (`bot.py safety-eval --show-misses | head`): stop quietly, and
        # point stdout at nothing so Python's flush at exit does not fail again.
        with contextlib.suppress(OSError, ValueError):
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141


def _stdout_gone() -> bool:
    """Whether standard output is a pipe whose reader has gone (not some other pipe of the command's)."""
    import select

    try:
        fd = sys.stdout.fileno()
    except (OSError, ValueError):  # replaced by something without a file
        return False
    if not hasattr(select, "poll"):  # Windows: stdout is the likeliest pipe to break
        return True
    poll = select.poll()
    poll.register(fd, select.POLLOUT)
    return any(events & select.POLLERR for _, events in poll.poll(0))
