"""The batching generator on a tiny GPT-2: batched equals one by one, prefix reuse changes nothing,
padding, cancellation, deadlines, a full queue, failures, streaming, and the engine on top."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from chatbot.decoding import DecodingSettings
from chatbot.errors import GeneratorBusy
from chatbot.generation import GenerationRequest
from chatbot.kv_cache import PrefixCache
from chatbot.scheduler import BatchingGenerator

GREEDY = DecodingSettings(temperature=0, max_new_tokens=12, max_time=60)
STOPS = ("\nada:", "\nBot:")
PROMPTS = [
    "Bot is kind.\nada: hi there, how are you?\nBot:",
    "ada: what do you like to eat?\nBot:",
    "ada: tell me about your weekend, i went hiking with my dog and it rained a lot all day long\nBot:",
    "ada:",
]


@pytest.fixture(params=[True, False], ids=["packed", "separate"])
def sched(roomy_gen, request):
    """Both ways of stepping: GPT-2's packed pass (`gpt2_step`), and the model's own forward for prompts and rows apart."""
    s = BatchingGenerator(roomy_gen, max_batch=8, packed=request.param)
    assert (s.runner.packed is not None) == request.param
    yield s
    s.close()


def requests(settings=GREEDY):
    return [GenerationRequest(p, settings, STOPS) for p in PROMPTS]


def test_batched_replies_equal_one_by_one_replies(roomy_gen, sched):
    alone = [roomy_gen.generate([r])[0] for r in requests()]
    with ThreadPoolExecutor(len(PROMPTS)) as pool:  # all in flight at once: one batch, padded to the longest
        batched = list(pool.map(lambda r: sched.generate([r])[0], requests()))
    assert [r.text for r in batched] == [r.text for r in alone]
    assert [r.completion_tokens for r in batched] == [r.completion_tokens for r in alone]
    assert sched.rows_stepped > sched.steps, "the requests were never decoded together"


def test_several_prompts_are_read_in_one_packed_pass_and_give_the_same_tokens(roomy_gen, monkeypatch):
    alone = [roomy_gen.generate([r])[0] for r in requests()]
    sched = BatchingGenerator(roomy_gen, max_batch=8)
    passes = []
    real_pass, real_admit = sched.runner.packed, sched.loop.admit
    go = threading.Event()

    def packed(*args, pieces=(), **kwargs):
        passes.append(len(pieces))
        return real_pass(*args, pieces=pieces, **kwargs)

    def admit():
        go.wait(30)  # every request is queued before the scheduler takes any
        real_admit()

    monkeypatch.setattr(sched.runner, "packed", packed)
    monkeypatch.setattr(sched.loop, "admit", admit)
    try:
        handles = [sched.submit(r) for r in requests()]
        go.set()
        batched = [h.future.result(timeout=60) for h in handles]
    finally:
        sched.close()
    assert passes[0] == 4, "the four short prompts were not read together"
    assert [r.text for r in batched] == [r.text for r in alone]


def test_reusing_a_prefix_gives_the_same_tokens_as_reading_it_again(roomy_gen, sched):
    first = sched.generate([GenerationRequest(PROMPTS[0], GREEDY, STOPS)])[0]
    follow_up = f"{PROMPTS[0]} {first.text}\nada: and what else?\nBot:"
    reused = sched.generate([GenerationRequest(follow_up, GREEDY, STOPS)])[0]
    assert sched.cache.hits >= 1 and sched.cache.reused_tokens > 10
    fresh = BatchingGenerator(roomy_gen, cache_bytes=0)
    try:
        again = fresh.generate([GenerationRequest(follow_up, GREEDY, STOPS)])[0]
    finally:
        fresh.close()
    assert fresh.cache.hits == 0
    assert reused.text == again.text == roomy_gen.generate([GenerationRequest(follow_up, GREEDY, STOPS)])[0].text


def test_the_prefix_cache_stays_within_its_bytes():
    cache = PrefixCache(max_bytes=3 * 2 * 4 * 10)  # room for three 10-float key/value pairs

    def kv(n):
        return [(torch.zeros(1, 1, n, 1), torch.zeros(1, 1, n, 1))]

    for i in range(5):
        cache.put([i, 1, 2, 3, 4, 5, 6, 7, 8, 9], kv(10))
    assert len(cache) == 3 and cache.bytes <= cache.max_bytes
    n, found = cache.longest([4, 1, 2, 3, 99])
    assert n == 4 and found[0][0].shape[2] == 4
    assert cache.longest([0, 1, 2])[0] == 0  # evicted, least recently used first


def test_streamed_pieces_join_to_the_generated_reply_and_hide_stop_strings(roomy_gen):
    # No prefix cache: a prompt read in two passes can differ in the last bits, which flips
    # near-ties of this random tiny model (the reuse test above checks a realistic case).
    sched = BatchingGenerator(roomy_gen, cache_bytes=0)
    for request in requests():
        whole = sched.generate([request])[0].text
        pieces = list(sched.stream(request))
        assert "".join(pieces) == whole
        assert not any("ada:" in p for p in pieces)
    sched.close()


def test_a_cancelled_request_ends_and_the_others_go_on(sched):
    long = DecodingSettings(temperature=0, max_new_tokens=40, max_time=60)
    cancel = threading.Event()
    gone = sched.submit(GenerationRequest(PROMPTS[1], long, (), cancel=cancel))
    kept = sched.submit(GenerationRequest(PROMPTS[2], long, ()))
    cancel.set()
    assert gone.future.result(timeout=60).completion_tokens < 40
    assert kept.future.result(timeout=60).completion_tokens == 40 or kept.future.result().finish_reason == "stop"


def test_a_request_past_its_deadline_ends_with_time(sched):
    slow = DecodingSettings(temperature=0, max_new_tokens=200, max_time=0.001)
    result = sched.generate([GenerationRequest(PROMPTS[1], slow, ())])[0]
    assert result.finish_reason == "time" and result.completion_tokens < 200


def test_a_full_queue_says_busy_at_once(roomy_gen):
    sched = BatchingGenerator(roomy_gen, max_batch=1, max_queue=1)
    long = DecodingSettings(temperature=0, max_new_tokens=40, max_time=60)
    try:
        handles, busy = [], 0
        for _ in range(4):
            try:
                handles.append(sched.submit(GenerationRequest(PROMPTS[1], long, ())))
            except GeneratorBusy as err:
                busy += 1
                assert "try again" in str(err)
        assert busy >= 2
        assert all(h.future.result(timeout=60).completion_tokens > 0 for h in handles)
    finally:
        sched.close()


def test_a_model_failure_fails_the_requests_in_flight_and_the_next_one_succeeds(roomy_gen, sched, monkeypatch):
    calls = []

    def failing_once(real):
        def run(*args, **kwargs):
            calls.append(1)
            if len(calls) == 1:
                raise RuntimeError("CUDA out of memory (simulated)")
            return real(*args, **kwargs)
        return run

    monkeypatch.setattr(roomy_gen.model, "forward", failing_once(roomy_gen.model.forward))
    if sched.runner.packed is not None:
        monkeypatch.setattr(sched.runner, "packed", failing_once(sched.runner.packed))
    with pytest.raises(RuntimeError, match="out of memory"):
        sched.generate([GenerationRequest(PROMPTS[0], GREEDY, STOPS)])
    assert sched.generate([GenerationRequest(PROMPTS[0], GREEDY, STOPS)])[0].completion_tokens > 0


def test_seeded_sampling_repeats(sched):
    sampled = DecodingSettings(temperature=0.9, top_p=0.9, top_k=50, max_new_tokens=12, seed=7, max_time=60)
    a = sched.generate([GenerationRequest(PROMPTS[0], sampled, STOPS)])[0]
    b = sched.generate([GenerationRequest(PROMPTS[0], sampled, STOPS)])[0]
    assert a.text == b.text


def test_bad_limits_are_refused(roomy_gen):
    with pytest.raises(Exception, match="max_batch"):
        BatchingGenerator(roomy_gen, max_batch=0)


async def test_the_engine_answers_several_conversations_through_one_batch(roomy_gen, tiny_prompts):
    import asyncio

    from chatbot.config import Settings
    from chatbot.engine import ChatEngine
    from chatbot.memory import InMemoryStore

    sched = BatchingGenerator(roomy_gen, max_batch=8)
    engine = ChatEngine(sched, InMemoryStore(), Settings(persona="tester", prompts_dir=tiny_prompts,
                                                         decoding={"max_new_tokens": 8}))
    try:
        replies = await asyncio.gather(*(engine.respond(f"cli:c{i}", "ada", f"hello number {i}") for i in range(6)))
        assert all(r.bot_turn_id is not None for r in replies)
        assert sched.rows_stepped > sched.steps  # they shared decode steps
        for i in range(6):
            assert [t.role for t in await engine.history(f"cli:c{i}")] == ["user", "bot"]
    finally:
        await engine.close()
        sched.close()


def test_the_benchmark_gives_both_arms_the_same_work(tmp_path, tiny_tokenizer, capsys):
    from chatbot.tools.bench import BenchOptions, format_report, run_bench

    from ..conftest import save_tiny_gpt2

    save_tiny_gpt2(tiny_tokenizer, tmp_path / "m", context=256)
    options = BenchOptions(model=str(tmp_path / "m"), conversations=3, turns=2, min_history=30, max_history=60,
                           min_reply=3, max_reply=6, check=6)
    report = run_bench(options, separate_processes=False)
    assert report["messages"] == 6 and report["identical_replies"] == "6 of 6"
    assert report["naive"]["output_tokens"] == report["batched"]["output_tokens"]
    assert report["batched"]["prefix_cache"]["hits"] >= 3  # each second turn reused its first
    text = format_report(report)
    assert "(b)/(a)" in text and "of the bound" in text


def test_bench_options_are_checked():
    from chatbot.tools.bench import BenchOptions
    from chatbot.errors import ChatbotError

    with pytest.raises(ChatbotError, match="mode"):
        BenchOptions(mode="steady")
    with pytest.raises(ChatbotError, match="conversations"):
        BenchOptions(conversations=0)


@pytest.mark.parametrize("streaming", [False, True])
async def test_a_full_generator_queue_reaches_the_caller_as_engine_busy(roomy_gen, tiny_prompts, monkeypatch,
                                                                        streaming):
    from chatbot.config import Settings
    from chatbot.engine import ChatEngine
    from chatbot.errors import EngineBusy
    from chatbot.memory import InMemoryStore

    sched = BatchingGenerator(roomy_gen, max_batch=1, max_queue=1)

    def full(*args, **kwargs):
        raise GeneratorBusy("the model has 1 replies waiting; try again in a moment")

    monkeypatch.setattr(sched, "stream" if streaming else "generate", full)
    engine = ChatEngine(sched, InMemoryStore(), Settings(persona="tester", prompts_dir=tiny_prompts))
    try:
        with pytest.raises(EngineBusy, match="try again"):
            if streaming:
                async with engine.stream("cli:x", "ada", "hi") as stream:
                    await stream.text()
            else:
                await engine.respond("cli:x", "ada", "hi")
    finally:
        await engine.close()
        sched.close()


LONG = ("Bot is kind and patient.\nada: i went hiking with my dog last weekend and it rained all day, "
        "so we sat under a tree and ate sandwiches while the thunder rolled\nBot:")


def finishing_times(handles):
    """perf_counter time at which each handle's result was set."""
    import time

    times = [0.0] * len(handles)
    for i, h in enumerate(handles):
        h.future.add_done_callback(lambda _f, i=i: times.__setitem__(i, time.perf_counter()))
    return times


@pytest.mark.parametrize("packed", [True, False], ids=["packed", "separate"])
def test_a_long_prompt_is_read_between_decode_steps_and_gives_the_same_tokens(roomy_gen, packed):
    alone = roomy_gen.generate([GenerationRequest(LONG, GREEDY, STOPS)])[0]
    sched = BatchingGenerator(roomy_gen, max_batch=4, prefill_chunk=2, packed=packed)
    try:
        short = sched.submit(GenerationRequest(PROMPTS[3], GREEDY.model_copy(update={"max_new_tokens": 4})))
        long = sched.submit(GenerationRequest(LONG, GREEDY, STOPS))
        done = finishing_times([short, long])
        assert long.future.result(timeout=60).text == alone.text
        assert short.future.result(timeout=60).completion_tokens == 4
    finally:
        sched.close()
    # The short reply was decoded (and finished) while the long prompt was still being read, two tokens a step.
    assert done[0] < long.first_token_at


@pytest.mark.parametrize("packed", [True, False], ids=["packed", "separate"])
def test_rows_leaving_and_joining_at_every_length_keep_their_tokens(tiny_dir, monkeypatch, packed):
    import chatbot.scheduler as scheduler
    from chatbot.generation import LocalGenerator

    # A 64-token context and one spare column: the block runs out of room often and is compacted.
    monkeypatch.setattr(scheduler, "SPARE_COLUMNS", 1)
    gen = LocalGenerator.from_pretrained(tiny_dir, device="cpu")
    prompts = ["ada: hi\nBot:", "Bot is kind.\nada: what do you like to eat on a sunny day?\nBot:", "ada:",
               "ada: tell me a story\nBot:"] * 5
    prompts[6] = "Bot is kind and patient and good.\nada: i went hiking with my dog and it rained\nBot:"
    budgets = [3 + (7 * i) % 11 for i in range(len(prompts))]  # rows finish at different steps
    reqs = [GenerationRequest(p, GREEDY.model_copy(update={"max_new_tokens": n}), STOPS)
            for p, n in zip(prompts, budgets)]
    alone = [gen.generate([r])[0] for r in reqs]
    sched = BatchingGenerator(gen, max_batch=4, cache_bytes=0, packed=packed)
    try:
        with ThreadPoolExecutor(len(reqs)) as pool:
            batched = list(pool.map(lambda r: sched.generate([r])[0], reqs))
        assert sched.moves >= 2, "the rows were never moved"
    finally:
        sched.close()
    assert [r.text for r in batched] == [r.text for r in alone]


def out_of_memory_when(gen, monkeypatch, too_big, packed_too_big, what):
    """The model's forward raises out-of-memory for input ids that are ``too_big``, and the packed
    GPT-2 pass for decoding rows' positions and prompt pieces that are ``packed_too_big``."""
    from chatbot.gpt2_step import PackedStep

    real = gen.model.forward

    def forward(*args, **kwargs):
        if too_big(kwargs["input_ids"], kwargs.get("position_ids")):
            raise torch.OutOfMemoryError(f"out of memory (simulated: {what})")
        return real(*args, **kwargs)

    real_packed = PackedStep.__call__

    def packed(self, keys, values, tokens, positions, *args, pieces=(), **kwargs):
        if packed_too_big(positions, pieces):
            raise torch.OutOfMemoryError(f"out of memory (simulated: {what})")
        return real_packed(self, keys, values, tokens, positions, *args, pieces=pieces, **kwargs)

    monkeypatch.setattr(gen.model, "forward", forward)
    monkeypatch.setattr(PackedStep, "__call__", packed)


def test_out_of_memory_in_a_decode_step_splits_the_batch_and_every_request_succeeds(roomy_gen, monkeypatch):
    alone = [roomy_gen.generate([r])[0] for r in requests()]
    out_of_memory_when(roomy_gen, monkeypatch, lambda ids, _: ids.shape[0] > 1,
                       lambda positions, _: len(positions) > 1, "more than one row")
    sched = BatchingGenerator(roomy_gen, max_batch=8)
    try:
        with ThreadPoolExecutor(len(PROMPTS)) as pool:
            batched = list(pool.map(lambda r: sched.generate([r])[0], requests()))
        assert sched.splits > 0
    finally:
        sched.close()
    assert [r.text for r in batched] == [r.text for r in alone]


def test_out_of_memory_reading_a_prompt_reads_it_in_smaller_pieces(roomy_gen, monkeypatch):
    alone = roomy_gen.generate([GenerationRequest(LONG, GREEDY, STOPS)])[0]
    out_of_memory_when(roomy_gen, monkeypatch, lambda ids, _: ids.shape[1] > 5,
                       lambda _, pieces: any(len(p.ids) > 5 for p in pieces), "more than 5 tokens")
    sched = BatchingGenerator(roomy_gen)
    try:
        assert sched.generate([GenerationRequest(LONG, GREEDY, STOPS)])[0].text == alone.text
        assert sched.oom_retries > 0
    finally:
        sched.close()


def test_a_row_that_does_not_fit_alone_fails_and_the_others_finish(roomy_gen, monkeypatch):
    long_len = len(roomy_gen.encode(LONG))
    # A decode step with the long row in it does not fit, alone or not.
    out_of_memory_when(roomy_gen, monkeypatch, lambda ids, pos: ids.shape[1] == 1 and int(pos.max()) >= long_len - 1,
                       lambda positions, _: any(p >= long_len - 1 for p in positions), "the long row")
    sched = BatchingGenerator(roomy_gen, max_batch=4)
    try:
        short = sched.submit(GenerationRequest(PROMPTS[1], GREEDY, STOPS))
        long = sched.submit(GenerationRequest(LONG, GREEDY, STOPS))
        with pytest.raises(torch.OutOfMemoryError):
            long.future.result(timeout=60)
        assert short.future.result(timeout=60).completion_tokens > 0
        assert sched.generate([GenerationRequest(PROMPTS[0], GREEDY, STOPS)])[0].completion_tokens > 0
    finally:
        sched.close()


def wait_for(condition, timeout=30.0):
    import time

    end = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < end, "timed out"
        time.sleep(0.01)


def test_a_request_cancelled_while_decoding_ends_at_its_next_token(sched):
    cancel = threading.Event()
    long = DecodingSettings(temperature=0, max_new_tokens=200, max_time=60)
    handle = sched.submit(GenerationRequest(PROMPTS[1], long, (), cancel=cancel))
    wait_for(lambda: handle.first_token_at > 0)
    cancel.set()
    assert handle.future.result(timeout=60).completion_tokens < 200


def test_leaving_a_stream_early_ends_its_row_without_a_cancel_event(roomy_gen):
    sched = BatchingGenerator(roomy_gen)
    try:
        long = DecodingSettings(temperature=0, max_new_tokens=200, max_time=60)
        pieces = sched.stream(GenerationRequest("ada: tell me everything\nBot:", long, ()))
        next(pieces)
        pieces.close()
        wait_for(lambda: sched.in_flight() == 0)
        assert sched.rows_stepped < 150, "the row ran on after its reader left"
    finally:
        sched.close()


def test_a_cancelled_request_still_queued_frees_its_place_at_once(roomy_gen):
    sched = BatchingGenerator(roomy_gen, max_batch=1, max_queue=1)
    try:
        long = DecodingSettings(temperature=0, max_new_tokens=150, max_time=60)
        running = sched.submit(GenerationRequest(PROMPTS[2], long, ()))
        wait_for(lambda: running.first_token_at > 0)
        cancel = threading.Event()
        queued = sched.submit(GenerationRequest(PROMPTS[1], GREEDY, (), cancel=cancel))
        with pytest.raises(GeneratorBusy):
            sched.submit(GenerationRequest(PROMPTS[0], GREEDY, STOPS))
        cancel.set()
        assert queued.future.result(timeout=60).completion_tokens == 0
        assert not running.future.done(), "the cancelled request waited for the running one"
        later = sched.submit(GenerationRequest(PROMPTS[0], GREEDY, STOPS))  # its place is free again
        assert later.future.result(timeout=60).completion_tokens > 0
    finally:
        sched.close()


def test_closing_ends_every_request_queued_running_or_streaming(roomy_gen):
    sched = BatchingGenerator(roomy_gen, max_batch=2)
    long = DecodingSettings(temperature=0, max_new_tokens=200, max_time=60)
    handles = [sched.submit(GenerationRequest(p, long, ())) for p in PROMPTS]
    pieces = sched.stream(GenerationRequest(PROMPTS[0], long, ()))
    wait_for(lambda: handles[0].first_token_at > 0)
    sched.close()
    for h in handles:
        wait_for(h.future.done)
    with pytest.raises(Exception, match="closed"):
        list(pieces)
    with pytest.raises(Exception, match="closed"):
        sched.generate([GenerationRequest(PROMPTS[0], GREEDY, STOPS)])


def test_a_failure_while_a_read_prompt_joins_the_batch_fails_it_and_the_next_request_succeeds(roomy_gen, sched, monkeypatch):
    real = sched.loop.place
    calls = []

    def failing(seq):
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("no room (simulated)")
        return real(seq)

    monkeypatch.setattr(sched.loop, "place", failing)
    first = sched.submit(GenerationRequest(PROMPTS[0], GREEDY, STOPS))
    with pytest.raises(RuntimeError, match="no room"):
        first.future.result(timeout=60)
    assert sched.generate([GenerationRequest(PROMPTS[1], GREEDY, STOPS)])[0].completion_tokens > 0


def test_running_out_of_memory_keeping_a_finished_row_costs_only_the_saving(roomy_gen, sched, monkeypatch):
    import chatbot.kv_cache as kv_cache

    def no_memory(*args, **kwargs):
        raise torch.OutOfMemoryError("out of memory (simulated: copying a finished row)")

    monkeypatch.setattr(kv_cache.KVBlock, "row", no_memory)
    short = sched.submit(GenerationRequest(PROMPTS[1], GREEDY.model_copy(update={"max_new_tokens": 2}), ()))
    other = sched.submit(GenerationRequest(PROMPTS[2], GREEDY, ()))
    assert short.future.result(timeout=60).completion_tokens == 2
    assert other.future.result(timeout=60).completion_tokens > 0
    assert len(sched.cache) == 0 and sched.oom_retries > 0


def test_a_blank_start_id_past_the_models_vocabulary_is_ignored(roomy_gen, sched, monkeypatch):
    monkeypatch.setattr(roomy_gen, "blank_start_ids", [*roomy_gen.blank_start_ids, 10**6])
    alone = roomy_gen.generate([GenerationRequest(PROMPTS[0], GREEDY, STOPS)])[0]
    assert sched.generate([GenerationRequest(PROMPTS[0], GREEDY, STOPS)])[0].text == alone.text


def test_a_max_batch_too_large_for_memory_is_refused_at_start(roomy_gen, monkeypatch):
    from chatbot.errors import ChatbotError

    def no_memory(*args, **kwargs):
        raise torch.OutOfMemoryError("out of memory (simulated)")

    monkeypatch.setattr(torch, "zeros", no_memory)
    with pytest.raises(ChatbotError, match="lower `max_batch`"):
        BatchingGenerator(roomy_gen, max_batch=256)


def test_a_sampled_reply_that_comes_out_empty_is_sampled_again(sched, monkeypatch):
    real = sched.loop.advance
    tries = []

    def first_try_empty(seq, token):
        tries.append(seq.attempt)
        if seq.attempt == 0:  # the model closed its turn at once
            seq.done, seq.text = "stop", ""
            sched.loop.finish(seq)
            return
        real(seq, token)

    monkeypatch.setattr(sched.loop, "advance", first_try_empty)
    sampled = DecodingSettings(temperature=0.9, max_new_tokens=6, seed=3, max_time=60)
    result = sched.generate([GenerationRequest(PROMPTS[0], sampled, ())])[0]
    assert 0 in tries and 1 in tries
    assert result.text and result.completion_tokens > 0
    before = len(tries)
    greedy = sched.generate([GenerationRequest(PROMPTS[0], GREEDY.model_copy(update={"max_new_tokens": 6}), ())])[0]
    assert greedy.text == "" and tries[before:] == [0]  # greedy would only say the same again: one try


def test_a_request_whose_processor_fails_ends_alone(roomy_gen, sched, monkeypatch):
    real = roomy_gen.pipeline

    def pipeline(requests, settings, prompt_len, **kwargs):
        processors, warpers = real(requests, settings, prompt_len, **kwargs)
        if requests[0].prompt == PROMPTS[1]:
            def broken(ids, scores):
                raise ValueError("a broken logits processor (simulated)")
            processors.append(broken)
        return processors, warpers

    monkeypatch.setattr(roomy_gen, "pipeline", pipeline)
    alone = roomy_gen.generate([GenerationRequest(PROMPTS[2], GREEDY, STOPS)])[0]
    broken = sched.submit(GenerationRequest(PROMPTS[1], GREEDY, STOPS))
    kept = sched.submit(GenerationRequest(PROMPTS[2], GREEDY, STOPS))
    with pytest.raises(ValueError, match="broken"):
        broken.future.result(timeout=60)
    assert kept.future.result(timeout=60).text == alone.text
