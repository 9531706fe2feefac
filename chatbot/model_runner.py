"""`ModelRunner`: the model's work for the batching generator, kept apart from the scheduling.

It reads prompt pieces into staging rows and computes the decoding rows' next-token logits, on
GPT-2 both in one packed pass (`gpt2_step`). Out of memory it shrinks its work instead of
failing everyone: a prompt is read in smaller pieces, the rows are decoded in halves (down to
one row, which alone fails), and the packed pass is given up until the batch empties.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any

from .kv_cache import KVBlock, PrefixCache, RowBatch

__all__ = ["ModelRunner"]

log = logging.getLogger(__name__)


class ModelRunner:
    """Runs ``model`` over the decoding ``rows`` and the prompts staged in ``stage``.

    A request here needs ``ids`` (prompt then reply tokens; the keys/values hold all but the
    last), ``read`` and ``stage_row`` while its prompt is read.
    """

    def __init__(self, model: Any, rows: RowBatch, stage: KVBlock, cache: PrefixCache, packed: Any | None) -> None:
        self.model = model
        self.rows = rows
        self.stage = stage
        self.cache = cache
        self.packed = packed
        """GPT-2: a `gpt2_step.PackedStep` that runs the rows and the prompt pieces in one pass; else None."""
        self.fit: int | None = None
        """Rows a decode step runs with after running out of memory (None: all of them)."""
        self.unpacked = False
        """Out of memory in a packed pass: prompts and rows go separately until the batch empties."""
        self.splits = 0
        """Decode steps split in two because memory ran out."""
        self.oom_retries = 0

    @property
    def packing(self) -> bool:
        """Whether the next step is one packed pass."""
        return self.packed is not None and not self.unpacked

    def batch_emptied(self) -> None:
        """The batch has no row left: the next one starts with all the room there is."""
        self.fit = None
        self.unpacked = False

    def after_oom(self) -> None:
        import torch

        self.oom_retries += 1
        log.warning("out of memory: dropping the prefix cache and retrying with a smaller piece of work")
        self.cache.clear()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    # ------------------------------------------------------------------ prompts

    def start_reading(self, seq: Any) -> None:
        """Copy the longest cached prefix of the prompt into its staging row; ``seq.read`` says how much."""
        n, kv = self.cache.longest(seq.ids[:-1])
        r = seq.stage_row
        for layer, (k, v) in enumerate(kv or []):
            self.stage.k[layer][r, :, :n] = k[0]
            self.stage.v[layer][r, :, :n] = v[0]
        seq.read = n

    def read_chunk(self, seq: Any, m: int) -> int:
        """Read up to ``m`` more prompt tokens into the staging row (fewer if memory runs out); how many were read."""
        import torch

        dev = self.model.device
        while True:
            try:
                ids = torch.tensor([seq.ids[seq.read: seq.read + m]], device=dev)
                positions = torch.arange(seq.read, seq.read + m, device=dev)[None]
                # Only the last position's logits could matter, and none are used here: skipping the
                # vocabulary projection saves about a quarter of a GPT-2 124M prompt read.
                r = seq.stage_row
                self.model(input_ids=ids, position_ids=positions, use_cache=True, logits_to_keep=1,
                           past_key_values=self.stage.cache(slice(r, r + 1), 0, seq.read))
                return m
            except torch.OutOfMemoryError:
                if m == 1:
                    raise
                self.after_oom()
                m //= 2

    # ------------------------------------------------------------------ decoding

    def decode(self, fail: Callable[[Any, BaseException], None]) -> Any:
        """The next-token logits of every row (one row per line); a row that alone does not fit in
        memory is handed to ``fail`` and gets zeros."""
        import torch

        self.rows.make_room()
        n = len(self.rows)
        size = self.fit or n
        logits = torch.cat([self._forward_rows(a, min(a + size, n), fail) for a in range(0, n, size)])
        self.rows.end += 1
        return logits

    def _forward_rows(self, a: int, b: int, fail: Callable[[Any, BaseException], None]) -> Any:
        """Logits of the next token for rows ``a:b``; out of memory, the rows go in two halves."""
        import torch

        dev = self.model.device
        seqs, starts = self.rows.seqs[a:b], self.rows.starts[a:b]
        try:
            lo, end = min(starts), self.rows.end
            ids = torch.tensor([[s.ids[-1]] for s in seqs], device=dev)
            positions = torch.tensor([[len(s.ids) - 1] for s in seqs], device=dev)
            columns = torch.arange(lo, end + 1, device=dev)
            mask = (columns[None, :] >= torch.tensor(starts, device=dev)[:, None]).long()
            out = self.model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True,
                             past_key_values=self.rows.cache(a, b))
            return out.logits[:, -1, :].float()
        except torch.OutOfMemoryError as err:
            if b - a == 1:  # one row alone does not fit: it fails, the others go on
                fail(seqs[0], err)
                return torch.zeros((1, self.model.get_output_embeddings().out_features), device=dev)
            self.after_oom()
            self.splits += 1
            mid = (a + b) // 2
            self.fit = mid - a  # later steps go in pieces that fit, until the batch empties
            return torch.cat([self._forward_rows(a, mid, fail), self._forward_rows(mid, b, fail)])

    def packed_pass(self, plan: Sequence[tuple[Any, int]]) -> tuple[bool, Any]:
        """GPT-2: one token for every row and the planned prompt pieces, in one pass. Returns
        ``(done, logits)``: ``done`` is False when memory ran out (nothing is taken as read; the
        next steps go the separate way), and ``logits`` None when no row is decoding."""
        import torch

        from .gpt2_step import Piece

        rows, stage = self.rows, self.stage
        n = len(rows)
        if n:
            rows.make_room()
        pieces = [Piece(seq.ids[seq.read: seq.read + m], seq.read, seq.stage_row) for seq, m in plan]
        try:
            logits = self.packed(rows.block.k, rows.block.v, [s.ids[-1] for s in rows.seqs],
                                 [len(s.ids) - 1 for s in rows.seqs], rows.starts, rows.end,
                                 stage_keys=stage.k, stage_values=stage.v, pieces=pieces)
        except torch.OutOfMemoryError:
            # Everything this pass wrote is written again by the retry: go the separate way (prompt
            # pieces halved, rows split) until the batch empties.
            self.after_oom()
            self.unpacked = True
            return False, None
        if n:
            rows.end += 1
        return True, logits
