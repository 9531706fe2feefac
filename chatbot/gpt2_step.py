"""`PackedStep`: one GPT-2 forward pass over the batch's next tokens and pieces of prompts together.

Why by hand: the batching generator has two kinds of work between two decode steps, one
new token for each of up to `max_batch` rows and pieces of new prompts, and on a CPU the
decode step alone multiplies each weight matrix by only a handful of rows, which runs at
about half the speed per row of a prompt's matrix products (measured on this project's
2-core CPU: a 768x3072 product takes 1.1 ms for 16 rows and 8.7 ms for 272). transformers' GPT-2
forward takes one rectangular batch, so putting a 256-token prompt piece in the same call
as 16 one-token rows would pad every row to 256 tokens. Here the rows' tokens and the
prompt pieces go through every layer's matrix products as one ``[rows + pieces, hidden]``
matrix, and only attention is done apart: each decoding row over its own columns of the
batch's block (no padding read on a CPU), each piece over its staging row. The layers are
the model's own modules (`ln_1`, `attn.c_attn`, `attn.c_proj`, `ln_2`, `mlp`, `ln_f`), so
the arithmetic is the model's up to the order of the sums; only the batching differs.

On a CPU, a product with few rows is done the other way round, ``(W.T @ x.T).T`` with a
copy of each weight matrix stored ``[out, in]``: the same sums, but the BLAS on this
project's CPU runs it much faster when the weights come from memory rather than cache
(GPT-2 124M's twelve layers, 16 rows: 52 ms against 77-105 ms; 4 rows: 29 ms against 66 ms;
at 256 rows the usual way is faster). The copies cost the size of the layers' weights
again (340 MB for GPT-2 124M), and are taken when the generator starts: a model whose weights
change afterwards (training) needs a new generator. The vocabulary projection is done as ``W @ h.T`` for the
same reason, with no copy needed (26 ms against 40 ms for 16 rows).

Used only for `GPT2LMHeadModel` (the models this project ships and trains); any other
model goes through its own forward.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

__all__ = ["PackedStep", "Piece"]

SMALL = range(2, 129)
"""Rows for which a CPU matrix product runs on the transposed weights (measured above; one row
runs as fast the usual way)."""


@dataclass
class Piece:
    """Prompt tokens to read into row ``row`` of the staging block: ``ids`` at positions ``at``, ``at + 1``, ..."""

    ids: list[int]
    at: int
    row: int = 0


class PackedStep:
    """Runs decode rows and prompt pieces through a GPT-2 model in one pass."""

    def __init__(self, model: Any) -> None:
        cfg = model.config
        self.model = model
        self.heads = cfg.n_head
        self.head_dim = cfg.n_embd // cfg.n_head
        self.hidden = cfg.n_embd
        self.scales = [block.attn.scaling for block in model.transformer.h]
        # On a GPU one masked attention call for the whole batch beats a call per row (each
        # call is a kernel launch); on a CPU, a call per row reads only that row's columns.
        self.per_row = model.device.type == "cpu"
        self.convs = [(b.attn.c_attn, b.attn.c_proj, b.mlp.c_fc, b.mlp.c_proj) for b in model.transformer.h]
        """Per layer, its four products: attention in and out, MLP in and out."""
        self.transposed: list[list[Any]] | None = None
        if model.device.type == "cpu":
            import torch

            with torch.no_grad():
                self.transposed = [[conv.weight.T.contiguous() for conv in convs] for convs in self.convs]

    def _linear(self, x: Any, layer: int, which: int) -> Any:
        """GPT-2's `Conv1D` (``x @ weight + bias``, weight ``[in, out]``), the faster way round for ``x``'s rows."""
        import torch

        conv = self.convs[layer][which]
        if self.transposed is not None and x.shape[0] in SMALL:
            return torch.addmm(conv.bias[:, None], self.transposed[layer][which], x.T).T.contiguous()
        return torch.addmm(conv.bias, x, conv.weight)

    @staticmethod
    def supports(model: Any) -> bool:
        from transformers import GPT2LMHeadModel

        cfg = model.config
        # `reorder_and_upcast_attn` computes attention in float32 in half-precision models; this pass does not.
        return type(model) is GPT2LMHeadModel and not cfg.add_cross_attention and not cfg.reorder_and_upcast_attn \
            and all(hasattr(block.attn, "scaling") for block in model.transformer.h)

    def __call__(self, keys: list[Any], values: list[Any], tokens: list[int], positions: list[int],
                 starts: list[int], end: int, stage_keys: list[Any] | None = None,
                 stage_values: list[Any] | None = None, pieces: Sequence[Piece] = ()) -> Any:
        """Logits ``[rows, vocab]`` (float32) of the next token of each decoding row; None when there are none.

        Row ``i`` of the block ``keys``/``values`` (per layer ``[rows, heads, columns, head_dim]``)
        holds its keys/values in columns ``starts[i]:end``; its token ``tokens[i]`` at
        ``positions[i]`` is written at column ``end``. Each piece's keys/values are written to its
        row of the staging block at columns ``piece.at`` on; pieces get no logits.
        """
        import torch
        import torch.nn.functional as F

        model = self.model
        tr = model.transformer
        dev = model.device
        n = len(tokens)
        ids = torch.tensor(tokens + [i for p in pieces for i in p.ids], device=dev)
        pos = torch.tensor(positions + [i for p in pieces for i in range(p.at, p.at + len(p.ids))], device=dev)
        x = tr.wte(ids) + tr.wpe(pos)
        heads, hd, width = self.heads, self.head_dim, self.hidden
        lo = min(starts) if n else 0
        mask = None
        if n and not self.per_row:
            columns = torch.arange(lo, end + 1, device=dev)
            mask = (columns[None, :] >= torch.tensor(starts, device=dev)[:, None])[:, None, None, :]
        # Query j of a piece (position at + j) sees every earlier column and itself.
        piece_masks = [torch.ones(len(p.ids), p.at + len(p.ids), dtype=torch.bool, device=dev).tril(p.at) if p.at
                       else None for p in pieces]
        for layer, block in enumerate(tr.h):
            scale = self.scales[layer]
            h = block.ln_1(x)
            q, k, v = self._linear(h, layer, 0).split(width, dim=1)
            parts = []
            if n:
                kb, vb = keys[layer], values[layer]
                kb[:n, :, end] = k[:n].view(n, heads, hd)
                vb[:n, :, end] = v[:n].view(n, heads, hd)
                qd = q[:n].view(n, heads, 1, hd)
                if self.per_row:
                    out = torch.cat([
                        F.scaled_dot_product_attention(qd[i:i + 1], kb[i:i + 1, :, s:end + 1], vb[i:i + 1, :, s:end + 1],
                                                       scale=scale)
                        for i, s in enumerate(starts)])
                else:
                    out = F.scaled_dot_product_attention(qd, kb[:n, :, lo:end + 1], vb[:n, :, lo:end + 1],
                                                         attn_mask=mask, scale=scale)
                parts.append(out.reshape(n, width))
            a = n
            for p, p_mask in zip(pieces, piece_masks):
                m, r, b = len(p.ids), p.row, a + len(p.ids)
                ks, vs = stage_keys[layer], stage_values[layer]  # type: ignore[index]
                ks[r, :, p.at:p.at + m] = k[a:b].view(m, heads, hd).transpose(0, 1)
                vs[r, :, p.at:p.at + m] = v[a:b].view(m, heads, hd).transpose(0, 1)
                qp = q[a:b].view(m, heads, hd).transpose(0, 1)[None]
                out = F.scaled_dot_product_attention(qp, ks[r:r + 1, :, :p.at + m], vs[r:r + 1, :, :p.at + m],
                                                     attn_mask=p_mask, is_causal=p_mask is None, scale=scale)
                parts.append(out[0].transpose(0, 1).reshape(m, width))
                a = b
            x = x + self._linear(parts[0] if len(parts) == 1 else torch.cat(parts), layer, 1)
            x = x + self._linear(block.mlp.act(self._linear(block.ln_2(x), layer, 2)), layer, 3)
        if not n:
            return None
        h = tr.ln_f(x[:n])
        return (model.lm_head.weight @ h.T).T.float().contiguous()
