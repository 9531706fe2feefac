"""Keys and values kept between model calls: `PrefixCache` (what earlier prompts and replies
read, for a later prompt that starts the same way) and `KVBlock` (a batch's keys and values,
allocated once, with a window on it that transformers' models write into)."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from typing import Any

__all__ = ["PrefixCache", "KVBlock", "window_layer", "common_prefix"]


class PrefixCache:
    """Keys/values of token sequences already read, for reuse by a later prompt that starts the same way.

    Bounded by bytes; the least recently used entries go first.
    """

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self._entries: OrderedDict[tuple[int, ...], list[tuple[Any, Any]]] = OrderedDict()
        self._bytes = 0
        self.hits = 0
        self.reused_tokens = 0

    @staticmethod
    def _size(kv: list[tuple[Any, Any]]) -> int:
        return sum(k.numel() * k.element_size() + v.numel() * v.element_size() for k, v in kv)

    def put(self, ids: Sequence[int], kv: list[tuple[Any, Any]]) -> None:
        key = tuple(ids)
        size = self._size(kv)
        if not key or size > self.max_bytes:
            return
        if key in self._entries:
            self._bytes -= self._size(self._entries.pop(key))
        # A shorter entry that this one extends is redundant: drop it.
        for old in [k for k in self._entries if len(k) < len(key) and key[: len(k)] == k]:
            self._bytes -= self._size(self._entries.pop(old))
        self._entries[key] = kv
        self._bytes += size
        while self._bytes > self.max_bytes and self._entries:
            _, evicted = self._entries.popitem(last=False)
            self._bytes -= self._size(evicted)

    def longest(self, ids: Sequence[int]) -> tuple[int, list[tuple[Any, Any]] | None]:
        """The longest cached common prefix of ``ids``: its length and the keys/values cut to it."""
        best, best_key = 0, None
        for key in self._entries:
            n = common_prefix(key, ids)
            if n > best:
                best, best_key = n, key
        if best_key is None:
            return 0, None
        self._entries.move_to_end(best_key)
        self.hits += 1
        self.reused_tokens += best
        return best, [(k[:, :, :best], v[:, :, :best]) for k, v in self._entries[best_key]]

    def clear(self) -> None:
        self._entries.clear()
        self._bytes = 0

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def bytes(self) -> int:
        return self._bytes


_WINDOW_LAYER: Any = None


def window_layer(keys: Any, values: Any, rows: slice, lo: int, at: int) -> Any:
    """A cache layer that is a window on a preallocated block: rows ``rows``, columns from ``lo``,
    writing the new tokens' keys/values at column ``at``.

    Why not `DynamicCache`: it grows by `torch.cat`, copying every row at every step, and a
    batch of rows of different lengths would have to be re-padded (copied) whenever a row
    joins or leaves. Measured on this project's CPU, at batch 14 with 800-token contexts the
    copying took most of a decode step (617 ms against 190 ms with spare room), and a join
    re-padding 16 rows took 3.8 s. transformers' `StaticCache` writes in place but has one
    write position per batch and no way to move a row in or out.
    """
    global _WINDOW_LAYER
    if _WINDOW_LAYER is None:
        from transformers.cache_utils import DynamicLayer

        class WindowLayer(DynamicLayer):
            def __init__(self, k: Any, v: Any, rows: slice, lo: int, at: int) -> None:
                super().__init__()
                self.dtype, self.device = k.dtype, k.device
                self.is_initialized = True
                self._k, self._v, self._rows, self._lo, self._at = k, v, rows, lo, at
                self.keys, self.values = k[rows, :, lo:at], v[rows, :, lo:at]

            def update(self, key_states: Any, value_states: Any, *args: Any, **kwargs: Any) -> tuple[Any, Any]:
                end = self._at + key_states.shape[2]
                self._k[self._rows, :, self._at:end] = key_states
                self._v[self._rows, :, self._at:end] = value_states
                self.keys = self._k[self._rows, :, self._lo:end]
                self.values = self._v[self._rows, :, self._lo:end]
                return self.keys, self.values

        _WINDOW_LAYER = WindowLayer
    return _WINDOW_LAYER(keys, values, rows, lo, at)


class KVBlock:
    """Keys and values for up to ``rows`` sequences, allocated once: per layer a
    ``[rows, heads, columns, head_dim]`` tensor of keys and one of values."""

    def __init__(self, model: Any, rows: int, columns: int) -> None:
        import torch

        cfg = model.config
        heads = cfg.num_attention_heads
        shape = (rows, heads, columns, cfg.hidden_size // heads)
        self.columns = columns
        # Zeros, not `empty`: a padding column is masked out of attention, but its value still
        # meets a zero weight, and 0 * NaN from uninitialised memory would be NaN.
        self.k = [torch.zeros(shape, dtype=model.dtype, device=model.device) for _ in range(cfg.num_hidden_layers)]
        self.v = [torch.zeros(shape, dtype=model.dtype, device=model.device) for _ in range(cfg.num_hidden_layers)]

    def cache(self, rows: slice, lo: int, at: int) -> Any:
        from transformers import DynamicCache

        cache = DynamicCache()
        cache.layers = [window_layer(k, v, rows, lo, at) for k, v in zip(self.k, self.v)]
        return cache

    def shift(self, rows: int, lo: int, end: int, by: int) -> None:
        """Move columns ``lo:end`` of the first ``rows`` rows by ``by`` columns (either way)."""
        for t in (*self.k, *self.v):
            t[:rows, :, lo + by:end + by] = t[:rows, :, lo:end].clone()  # the ranges may overlap

    def row(self, layer: int, row: int, lo: int, end: int) -> tuple[Any, Any]:
        return self.k[layer][row:row + 1, :, lo:end], self.v[layer][row:row + 1, :, lo:end]


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


class RowBatch:
    """The decoding rows' keys and values in one `KVBlock`: row ``i`` holds sequence ``i``'s in
    columns ``starts[i]`` to ``end``, so every row writes its next token at column ``end``
    (rows are left-padded to it) and a row joins or leaves by copying only its own columns."""

    def __init__(self, block: KVBlock) -> None:
        self.block = block
        self.seqs: list[Any] = []
        self.starts: list[int] = []
        self.end = 0
        self.moves = 0
        """Times every row's keys/values were moved (a long prompt joining, or compaction)."""

    def __len__(self) -> int:
        return len(self.seqs)

    def place(self, seq: Any, stage: KVBlock, stage_row: int, length: int) -> None:
        """Append ``seq``, whose ``length`` keys/values are in row ``stage_row`` of ``stage``; they
        end at the shared write column (every row moves right when they do not fit on its left)."""
        block = self.block
        if not self.seqs:
            self.end = length
        elif length > self.end:
            block.shift(len(self.seqs), min(self.starts), self.end, length - self.end)
            self.starts = [s + length - self.end for s in self.starts]
            self.end = length
            self.moves += 1
        i, start = len(self.seqs), self.end - length
        for layer in range(len(block.k)):
            block.k[layer][i, :, start:self.end] = stage.k[layer][stage_row, :, :length]
            block.v[layer][i, :, start:self.end] = stage.v[layer][stage_row, :, :length]
        self.seqs.append(seq)
        self.starts.append(start)

    def make_room(self) -> None:
        """Free a column for this step's tokens when the block has none: drop the padding on the left."""
        if self.end >= self.block.columns:
            lo = min(self.starts)
            self.block.shift(len(self.seqs), lo, self.end, -lo)
            self.starts = [s - lo for s in self.starts]
            self.end -= lo
            self.moves += 1

    def kept(self, i: int) -> list[tuple[Any, Any]]:
        """Copies of row ``i``'s keys/values, layer by layer (for the prefix cache)."""
        return [tuple(t.clone() for t in self.block.row(layer, i, self.starts[i], self.end))  # type: ignore[misc]
                for layer in range(len(self.block.k))]

    def remove(self, i: int) -> None:
        """Row ``i`` leaves; the last row takes its place."""
        last = len(self.seqs) - 1
        if i != last:
            lo = self.starts[last]
            for t in (*self.block.k, *self.block.v):
                t[i, :, lo:self.end] = t[last, :, lo:self.end]
            self.seqs[i], self.starts[i] = self.seqs[last], self.starts[last]
        self.seqs.pop()
        self.starts.pop()

    def cache(self, a: int, b: int) -> Any:
        """A transformers cache over rows ``a:b``, from their earliest column; new tokens go at ``end``."""
        return self.block.cache(slice(a, b), min(self.starts[a:b]), self.end)

    def clear(self) -> None:
        self.seqs, self.starts = [], []
