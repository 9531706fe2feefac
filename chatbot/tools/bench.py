"""`python bot.py bench`: the batching generator against one `model.generate` call per message.

Both arms decode the same number of new tokens greedily (end-of-text ignored), and each
conversation's prompt grows by the reply the arm itself generated and the next message, as
a chat's does; so both arms read prompts of the same lengths and do the same work, and a
subset of replies is compared token for token. The workload is N conversations, each a
persona prefix and a history, in one of two arrival modes:

- ``burst``: every conversation sends its next message as soon as its previous reply is
  done (all N start at once); a message's latency runs from then;
- ``poisson``: messages arrive at a fixed average rate, each conversation's in turn; a
  message's latency runs from its arrival, waiting for the previous reply included.

Each arm runs in its own process, so peak memory is its own. Reported per arm: output
tokens/s, time to first token, time per output token, end-to-end latency p50/p90/p99,
peak memory; then (b)/(a) ratios, and batch-1 decode time per token against the
memory-bandwidth bound (weight bytes / measured copy bandwidth)."""

from __future__ import annotations

import json
import multiprocessing
import random
import resource
import statistics
import threading
import time
from dataclasses import asdict, dataclass, replace
from typing import Any

from ..errors import ChatbotError

__all__ = ["BenchOptions", "Workload", "make_workload", "run_bench", "format_report"]

GPT2_124M = {"n_layer": 12, "n_head": 12, "n_embd": 768, "n_positions": 1024, "vocab_size": 50257}
TOPICS = ["hiking", "cooking", "music", "old films", "the weather", "board games", "cats", "travel", "books",
          "gardening", "coffee", "football", "painting", "the sea", "trains", "space"]


@dataclass(frozen=True)
class BenchOptions:
    model: str | None = None
    """A model directory or cached hub name; empty builds the GPT-2 124M shape from its config (random weights)."""
    conversations: int = 16
    turns: int = 4
    min_history: int = 200
    max_history: int = 900
    min_reply: int = 30
    max_reply: int = 60
    mode: str = "burst"
    rate: float = 2.0
    """Messages per second in ``poisson`` mode."""
    max_batch: int = 16
    seed: int = 0
    check: int = 4
    """Replies compared token for token between the arms."""
    device: str = "cpu"

    def __post_init__(self) -> None:
        if self.mode not in ("burst", "poisson"):
            raise ChatbotError(f"`mode` must be burst or poisson, got {self.mode!r}")
        for name in ("conversations", "turns", "min_history", "min_reply", "max_batch"):
            if getattr(self, name) < 1:
                raise ChatbotError(f"`{name}` must be at least 1, got {getattr(self, name)}")
        if self.max_history < self.min_history or self.max_reply < self.min_reply:
            raise ChatbotError("the maximum history and reply lengths must not be below the minimums")
        if self.rate <= 0:
            raise ChatbotError(f"`rate` must be greater than 0, got {self.rate}")


@dataclass(frozen=True)
class Message:
    conversation: int
    turn: int
    added_ids: tuple[int, ...]
    """What the user adds: the whole history and first message on turn 0; afterwards the next
    message, read after the previous prompt and the reply the arm itself generated."""
    prompt_len: int
    """Tokens in the prompt (the same in both arms: every reply has exactly ``new_tokens``)."""
    new_tokens: int
    arrival: float
    """Seconds after the start (poisson mode); 0 in burst mode, where a message is sent when its
    conversation's previous reply is done."""


@dataclass(frozen=True)
class Workload:
    messages: tuple[Message, ...]
    mode: str

    def conversations(self) -> dict[int, list[Message]]:
        out: dict[int, list[Message]] = {}
        for m in sorted(self.messages, key=lambda m: (m.conversation, m.turn)):
            out.setdefault(m.conversation, []).append(m)
        return out


def _load(options: BenchOptions) -> Any:
    """The model and tokenizer the benchmark runs on, as a `LocalGenerator`."""
    import torch

    from ..generation import LocalGenerator, load_model

    if options.model:
        return LocalGenerator.from_pretrained(options.model, device=options.device)
    from transformers import GPT2Config, GPT2LMHeadModel

    _, tokenizer = load_model(None, device=options.device)  # the shipped tokenizer; unknown ids decode to ""
    torch.manual_seed(options.seed)
    config = GPT2Config(**GPT2_124M, bos_token_id=tokenizer.eos_token_id, eos_token_id=tokenizer.eos_token_id,
                        chatbot_prompt_format="transcript")
    model = GPT2LMHeadModel(config).eval().to(options.device)
    return LocalGenerator(model, tokenizer, name="gpt2-124m-shape")


def make_workload(tokenizer: Any, options: BenchOptions, context: int) -> Workload:
    """N conversations, each a persona and a history of ``min_history`` to ``max_history`` tokens
    that grows by every reply and the next message, as a chat's prompt does."""
    rng = random.Random(options.seed)
    persona = ("Sam is a friendly person who likes to chat about everyday things, asks questions back, "
               "and keeps answers short and warm.\nUser: hi!\nSam: hello! how are you today?\n")

    def encode(text: str) -> tuple[int, ...]:
        return tuple(tokenizer(text, add_special_tokens=False)["input_ids"])

    messages = []
    for c in range(options.conversations):
        topic = TOPICS[c % len(TOPICS)]
        asks = [encode(f"\nUser: so what do you think about {topic} now? tell me more, part {t}.\nSam:")
                for t in range(options.turns)]
        replies = [rng.randint(options.min_reply, options.max_reply) for _ in range(options.turns)]
        growth = sum(len(a) for a in asks[1:]) + sum(replies)
        # The history starts where its last prompt (and reply) still fits under max_history and the context.
        top = max(options.min_history, min(options.max_history, context - 1) - growth - len(asks[0]))
        target = rng.randint(options.min_history, top)
        lines = [persona]
        while len(encode("".join(lines))) < target:
            n = len(lines)
            lines.append(f"User: tell me about {topic}, part {n}? i really like {topic}.\n"
                         f"Sam: {topic} is lovely, number {n} is my favourite bit of it.\n")
        history = encode("".join(lines).rstrip("\n"))
        length = 0
        for t in range(options.turns):
            added = history + asks[0] if t == 0 else asks[t]
            length = (length + replies[t - 1] if t else 0) + len(added)
            if length + replies[t] > context:
                raise ChatbotError(f"the model's context ({context} tokens) is too short for this workload; "
                                   "lower the history or reply lengths")
            messages.append(Message(c, t, added, length, replies[t], 0.0))
    if options.mode == "poisson":
        clock, timed = 0.0, []
        for m in sorted(messages, key=lambda m: (m.turn, m.conversation)):
            clock += rng.expovariate(options.rate)
            timed.append(replace(m, arrival=clock))
        messages = timed
    return Workload(tuple(messages), options.mode)


# --------------------------------------------------------------------------- the arms (each in its own process)


def _percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    k = (len(ordered) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (k - lo)


def _summary(records: list[dict[str, Any]], wall: float) -> dict[str, Any]:
    tokens = sum(r["tokens"] for r in records)
    ttft = [r["first"] - r["arrival"] for r in records]
    tpot = [(r["end"] - r["first"]) / max(1, r["tokens"] - 1) for r in records]
    e2e = [r["end"] - r["arrival"] for r in records]
    return {
        "output_tokens": tokens, "wall_s": wall, "tokens_per_s": tokens / wall,
        "ttft_p50_s": _percentile(ttft, 0.5), "tpot_ms": 1000 * statistics.mean(tpot),
        "latency_p50_s": _percentile(e2e, 0.5), "latency_p90_s": _percentile(e2e, 0.9),
        "latency_p95_s": _percentile(e2e, 0.95), "latency_p99_s": _percentile(e2e, 0.99),
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        **_gpu_peak(),
    }


def _gpu_peak() -> dict[str, float]:
    """Peak GPU memory of this process, where it used a GPU (the resident set does not count it)."""
    import torch

    if not (torch.cuda.is_available() and torch.cuda.is_initialized()):
        return {}
    return {"peak_gpu_mb": torch.cuda.max_memory_allocated() / 2**20}


def _naive_arm(options: BenchOptions, workload: Workload) -> dict[str, Any]:
    """One `model.generate` per message, one after another, in arrival order (the usual first version)."""
    import torch
    from transformers import GenerationConfig
    from transformers.generation.streamers import BaseStreamer

    gen = _load(options)
    model = gen.model
    dev = model.device

    class FirstToken(BaseStreamer):
        def __init__(self) -> None:
            self.calls = 0
            self.first = 0.0

        def put(self, value: Any) -> None:
            self.calls += 1
            if self.calls == 2:  # the first call is the prompt
                self.first = time.perf_counter()

        def end(self) -> None:
            pass

    # Arrival order; in burst mode every conversation's turn t before any turn t+1, and a message
    # counts as sent when its conversation's previous reply was done.
    order = sorted(workload.messages, key=lambda m: (m.arrival, m.turn, m.conversation))
    records, outputs = [], {}
    history: dict[int, list[int]] = {}
    done_at: dict[int, float] = {}
    start = time.perf_counter()
    for m in order:
        arrival = start + m.arrival if workload.mode == "poisson" else done_at.get(m.conversation, start)
        wait = arrival - time.perf_counter()
        if wait > 0:
            time.sleep(wait)
        prompt = history.get(m.conversation, []) + list(m.added_ids)
        ids = torch.tensor([prompt], device=dev)
        streamer = FirstToken()
        # A config of its own, so a checkpoint's generation settings (a repetition penalty, say) stay out.
        config = GenerationConfig(max_new_tokens=m.new_tokens, min_new_tokens=m.new_tokens, do_sample=False,
                                  pad_token_id=gen.tokenizer.pad_token_id, eos_token_id=None)
        with torch.inference_mode():
            out = model.generate(ids, attention_mask=torch.ones_like(ids), generation_config=config, streamer=streamer)
        end = time.perf_counter()
        new = out[0, ids.shape[1]:].tolist()
        history[m.conversation] = prompt + new
        done_at[m.conversation] = end
        outputs[(m.conversation, m.turn)] = new
        records.append({"arrival": arrival, "first": streamer.first or end, "end": end, "tokens": len(new)})
    summary = _summary(records, time.perf_counter() - start)
    summary["outputs"] = {f"{c}:{t}": v for (c, t), v in outputs.items()}
    return summary


def _batched_arm(options: BenchOptions, workload: Workload) -> dict[str, Any]:
    """The engine's generator: requests from all conversations batched, prefixes reused."""
    from ..decoding import DecodingSettings
    from ..generation import GenerationRequest
    from ..scheduler import BatchingGenerator

    gen = _load(options)
    sched = BatchingGenerator(gen, max_batch=options.max_batch, max_queue=max(64, len(workload.messages)),
                              ignore_eos=True)
    records: list[dict[str, Any]] = []
    outputs: dict[str, list[int]] = {}
    lock = threading.Lock()

    def conversation(ms: list[Message]) -> None:
        """One conversation's messages in turn, each sent at its arrival time and not before the previous reply."""
        history: list[int] = []
        for m in ms:
            if workload.mode == "poisson":
                arrival = start + m.arrival
                wait = arrival - time.perf_counter()
                if wait > 0:
                    time.sleep(wait)
            else:
                arrival = time.perf_counter()
            settings = DecodingSettings(temperature=0, max_new_tokens=m.new_tokens, no_repeat_ngram_size=0,
                                        bot_repetition_penalty=1.0, bot_no_repeat_ngram_size=0, max_time=600)
            prompt = history + list(m.added_ids)
            handle = sched.submit(GenerationRequest("", settings, trim_to_sentence=False), prompt_ids=prompt)
            reply = list(handle.future.result().token_ids)
            end = time.perf_counter()
            history = prompt + reply
            with lock:
                outputs[f"{m.conversation}:{m.turn}"] = reply
                records.append({"conversation": m.conversation, "turn": m.turn, "arrival": arrival,
                                "first": handle.first_token_at or end, "end": end,
                                "tokens": len(reply)})

    errors: list[BaseException] = []

    def run(ms: list[Message]) -> None:
        try:
            conversation(ms)
        except BaseException as err:  # a thread's exception would otherwise only be printed
            errors.append(err)

    start = time.perf_counter()
    threads = [threading.Thread(target=run, args=(ms,)) for ms in workload.conversations().values()]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        sched.close()
        raise errors[0]
    summary = _summary(records, time.perf_counter() - start)
    summary["outputs"] = outputs
    summary["prefix_cache"] = {"hits": sched.cache.hits, "reused_tokens": sched.cache.reused_tokens,
                               "mean_batch": sched.rows_stepped / max(1, sched.steps), "moves": sched.moves}
    sched.close()
    return summary


def _bandwidth(options: BenchOptions) -> dict[str, Any]:
    """Batch-1 decode time per token against weight bytes / memory copy bandwidth."""
    import torch

    gen = _load(options)
    model = gen.model
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    dev = model.device
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    # On the model's device: a GPU's decode is bound by its own memory, not the host's.
    big = torch.empty(64 * 2**20 // 4, dtype=torch.float32, device=dev)
    dst = torch.empty_like(big)
    dst.copy_(big)
    sync()
    t = time.perf_counter()
    for _ in range(10):
        dst.copy_(big)
    sync()
    copy_s = (time.perf_counter() - t) / 10
    bandwidth = 2 * big.numel() * 4 / copy_s  # read + write
    ids = torch.tensor([[5] * 64], device=model.device)
    with torch.inference_mode():
        model.generate(ids, max_new_tokens=4, min_new_tokens=4, do_sample=False, pad_token_id=0)
        sync()
        t = time.perf_counter()
        model.generate(ids, max_new_tokens=33, min_new_tokens=33, do_sample=False, pad_token_id=0)
        sync()
        long = time.perf_counter() - t
        t = time.perf_counter()
        model.generate(ids, max_new_tokens=1, min_new_tokens=1, do_sample=False, pad_token_id=0)
        sync()
        short = time.perf_counter() - t
    per_token = (long - short) / 32
    bound = weight_bytes / bandwidth
    return {"weight_mb": weight_bytes / 2**20, "copy_gb_per_s": bandwidth / 1e9, "decode_ms_per_token": per_token * 1000,
            "bound_ms_per_token": bound * 1000, "fraction_of_bound": bound / per_token}


def _in_process(target: str, options: BenchOptions, workload: Workload | None) -> dict[str, Any]:
    """Run one arm in a fresh process (its own peak memory, no warm caches from the other arm)."""
    from transformers.utils import logging as hf_logging

    ctx = multiprocessing.get_context("spawn")
    # A spawned process starts with transformers' defaults: give it the caller's (no loading bars from the CLI).
    quiet = (not hf_logging.is_progress_bar_enabled(), hf_logging.get_verbosity())
    with ctx.Pool(1, initializer=_quiet_like_caller, initargs=quiet) as pool:
        result = pool.apply(_call, (target, asdict(options), workload))
        # Let the worker exit on its own: killed (the pool's exit), it leaves the locks its
        # progress bars made for the resource tracker to warn about.
        pool.close()
        pool.join()
    return result


def _quiet_like_caller(no_progress_bars: bool, verbosity: int) -> None:
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity(verbosity)
    if no_progress_bars:
        hf_logging.disable_progress_bar()


def _call(target: str, options: dict[str, Any], workload: Workload | None) -> dict[str, Any]:
    opts = BenchOptions(**options)
    fn = {"naive": _naive_arm, "batched": _batched_arm, "bandwidth": _bandwidth}[target]
    return fn(opts) if workload is None else fn(opts, workload)


def run_bench(options: BenchOptions, *, separate_processes: bool = True) -> dict[str, Any]:
    from ..generation import load_model

    if options.model:
        from ..generation import LocalGenerator

        gen = LocalGenerator.from_pretrained(options.model, device="cpu")
        tokenizer, context = gen.tokenizer, gen.context_size
    else:
        _, tokenizer = load_model(None, device="cpu")
        context = GPT2_124M["n_positions"]
    workload = make_workload(tokenizer, options, context)
    run = (lambda target, w: _in_process(target, options, w)) if separate_processes else \
        (lambda target, w: _call(target, asdict(options), w))
    naive = run("naive", workload)
    batched = run("batched", workload)
    bound = run("bandwidth", None)
    # Spread over conversations and turns: a later turn reads a prefix the batch left in the cache.
    every = sorted(naive["outputs"], key=lambda k: tuple(int(x) for x in k.split(":")))
    picks = min(options.check, len(every))
    keys = [every[round(i * (len(every) - 1) / max(1, picks - 1))] for i in range(picks)]
    same = sum(naive["outputs"][k] == batched["outputs"][k] for k in keys)
    prompt_tokens = [m.prompt_len for m in workload.messages]
    return {
        "options": asdict(options), "messages": len(workload.messages),
        "prompt_tokens": {"min": min(prompt_tokens), "max": max(prompt_tokens)},
        "naive": {k: v for k, v in naive.items() if k != "outputs"},
        "batched": {k: v for k, v in batched.items() if k != "outputs"},
        "ratios": {
            "throughput": batched["tokens_per_s"] / naive["tokens_per_s"],
            "latency_p50": batched["latency_p50_s"] / naive["latency_p50_s"],
            "latency_p95": batched["latency_p95_s"] / naive["latency_p95_s"],
            "ttft_p50": batched["ttft_p50_s"] / naive["ttft_p50_s"],
        },
        "identical_replies": f"{same} of {len(keys)}",
        "bandwidth": bound,
    }


def format_report(report: dict[str, Any]) -> str:
    n, b, r = report["naive"], report["batched"], report["ratios"]
    o = report["options"]
    lines = [
        f"{report['messages']} messages from {o['conversations']} conversations ({o['mode']}), prompts "
        f"{report['prompt_tokens']['min']}-{report['prompt_tokens']['max']} tokens, replies {o['min_reply']}-"
        f"{o['max_reply']} tokens, model {o['model'] or 'GPT-2 124M shape (random weights)'}",
        f"{'':24}{'(a) naive':>12}{'(b) batched':>14}{'(b)/(a)':>10}",
    ]

    def row(label: str, key: str, fmt: str, ratio: float | None = None) -> None:
        rr = f"{ratio:>10.2f}" if ratio is not None else f"{b[key] / n[key]:>10.2f}"
        lines.append(f"{label:24}{format(n[key], fmt):>12}{format(b[key], fmt):>14}{rr}")

    row("output tokens/s", "tokens_per_s", ".1f", r["throughput"])
    row("time to first token p50", "ttft_p50_s", ".2f")
    row("time per token (ms)", "tpot_ms", ".1f")
    row("latency p50 (s)", "latency_p50_s", ".2f")
    row("latency p90 (s)", "latency_p90_s", ".2f")
    row("latency p95 (s)", "latency_p95_s", ".2f")
    row("latency p99 (s)", "latency_p99_s", ".2f")
    row("peak memory (MB)", "peak_rss_mb", ".0f")
    if "peak_gpu_mb" in n and "peak_gpu_mb" in b:
        row("peak GPU memory (MB)", "peak_gpu_mb", ".0f")
    pc = b.get("prefix_cache", {})
    bw = report["bandwidth"]
    lines += [
        f"identical replies (greedy, checked): {report['identical_replies']}; prefix cache: {pc.get('hits', 0)} hits, "
        f"{pc.get('reused_tokens', 0)} prompt tokens not read again; mean batch {pc.get('mean_batch', 0):.1f} rows",
        f"batch-1 decode {bw['decode_ms_per_token']:.1f} ms/token; memory-bandwidth bound {bw['bound_ms_per_token']:.1f} "
        f"ms/token ({bw['weight_mb']:.0f} MB of weights at {bw['copy_gb_per_s']:.1f} GB/s): "
        f"{bw['fraction_of_bound']:.2f} of the bound",
    ]
    return "\n".join(lines)


def report_json(report: dict[str, Any]) -> str:
    return json.dumps(report, indent=2)
