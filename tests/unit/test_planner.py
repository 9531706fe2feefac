"""The batching generator's admission and prompt-reading plan, without a model: plain token counts."""

from __future__ import annotations

from dataclasses import dataclass, field

from chatbot.scheduler import PromptPlanner


@dataclass
class Seq:
    name: str
    prompt: int
    """Prompt tokens; ``ids`` holds them plus the token decoding starts from."""
    cached: int = 0
    gone: bool = False
    read: int = 0
    stage_row: int = -1
    ids: list[int] = field(default_factory=list)

    def __post_init__(self):
        self.ids = list(range(self.prompt + 1))


class Batch:
    """What the generator does around the planner: a prefix-cache lookup at start, a row when placed."""

    def __init__(self):
        self.placed, self.ended = [], []

    def start(self, seq):
        seq.read = seq.cached

    def place(self, seq):
        self.placed.append(seq.name)

    def over(self, seq):
        if seq.gone:
            self.ended.append(seq.name)
        return seq.gone


def plan(planner, batch, budget):
    return [(seq.name, m) for seq, m in planner.plan(budget, over=batch.over, start=batch.start, place=batch.place)]


def read_all(planner, batch, steps):
    for seq, m in steps:
        planner.read(seq, m, batch.place)


def test_prompts_are_read_in_arrival_order_within_the_budget():
    planner, batch = PromptPlanner(max_batch=8, stage_rows=4), Batch()
    a, b, c = Seq("a", 100), Seq("b", 30), Seq("c", 300)
    planner.pending.extend([a, b, c])
    assert plan(planner, batch, 256) == [("a", 100), ("b", 30), ("c", 126)]
    assert [s.stage_row for s in (a, b, c)] == [0, 1, 2]
    read_all(planner, batch, [(a, 100), (b, 30), (c, 126)])
    assert batch.placed == ["a", "b"] and planner.staged == [c]
    # The long prompt goes on at the next step from where it stopped: the decoding rows wait one chunk at most.
    assert plan(planner, batch, 256) == [("c", 174)]
    read_all(planner, batch, [(c, 174)])
    assert batch.placed == ["a", "b", "c"] and not planner.waiting()


def test_at_most_the_staging_rows_are_read_at_once_and_a_freed_row_is_reused():
    planner, batch = PromptPlanner(max_batch=8, stage_rows=2), Batch()
    seqs = [Seq(n, 10) for n in "abc"]
    planner.pending.extend(seqs)
    assert plan(planner, batch, 5) == [("a", 5)]  # the budget ends before b is begun
    assert plan(planner, batch, 100) == [("a", 10), ("b", 10)]  # two rows: c waits for one
    assert [s.stage_row for s in seqs[:2]] == [0, 1]
    planner.read(seqs[0], 10, batch.place)  # a's prompt (read from 0 again: nothing was read) is done
    assert plan(planner, batch, 100) == [("b", 10), ("c", 10)] and seqs[2].stage_row == 0


def test_a_prompt_found_whole_in_the_prefix_cache_joins_at_once_without_using_the_budget():
    planner, batch = PromptPlanner(max_batch=8, stage_rows=4), Batch()
    planner.pending.extend([Seq("again", 50, cached=50), Seq("new", 20)])
    assert plan(planner, batch, 20) == [("new", 20)]
    assert batch.placed == ["again"] and [s.name for s in planner.staged] == ["new"]


def test_cancelled_or_late_requests_end_before_they_cost_anything():
    planner, batch = PromptPlanner(max_batch=8, stage_rows=4), Batch()
    staged, waiting, kept = Seq("staged", 40), Seq("waiting", 40), Seq("kept", 40)
    planner.pending.extend([staged, waiting, kept])
    plan(planner, batch, 10)
    staged.gone = waiting.gone = True
    assert plan(planner, batch, 100) == [("kept", 40)]
    assert batch.ended == ["staged", "waiting"]


def test_room_counts_the_batch_the_staged_and_the_pending():
    planner = PromptPlanner(max_batch=4, stage_rows=2)
    assert planner.room(decoding=1) == 3
    planner.pending.extend([Seq("a", 5), Seq("b", 5)])
    plan(planner, Batch(), 3)
    assert len(planner.staged) == 1 and len(planner.pending) == 1 and planner.room(decoding=1) == 1
