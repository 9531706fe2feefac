"""The packed GPT-2 pass computes what the model's own forward computes: the decoding rows'
logits and keys/values, and a prompt piece's keys/values, in every way it can run."""

from __future__ import annotations

import pytest
import torch

import chatbot.gpt2_step as gpt2_step
from chatbot.gpt2_step import PackedStep, Piece
from chatbot.kv_cache import KVBlock


def tiny_gpt2(**extra):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(vocab_size=97, n_positions=64, n_embd=48, n_layer=3, n_head=4, **extra)
    return GPT2LMHeadModel(config).eval()


def reference(model, ids, starts, end, block):
    """The model's own forward for one decode step of rows whose keys/values fill ``starts[i]:end``."""
    lo = min(starts)
    columns = torch.arange(lo, end + 1)
    mask = (columns[None, :] >= torch.tensor(starts)[:, None]).long()
    positions = torch.tensor([[end - s] for s in starts])
    out = model(input_ids=torch.tensor(ids)[:, None], attention_mask=mask, position_ids=positions, use_cache=True,
                past_key_values=block.cache(slice(0, len(ids)), lo, end))
    return out.logits[:, -1, :].float()


@pytest.mark.parametrize("per_row", [True, False], ids=["row-by-row attention", "masked attention"])
@pytest.mark.parametrize("small", [range(2, 129), range(0)], ids=["transposed weights", "model's weights"])
@pytest.mark.parametrize("extra", [{}, {"scale_attn_by_inverse_layer_idx": True}], ids=["gpt2", "layer-scaled"])
def test_decoding_rows_and_a_prompt_piece_match_the_models_forward(per_row, small, extra, monkeypatch):
    monkeypatch.setattr(gpt2_step, "SMALL", small)
    model = tiny_gpt2(**extra)
    step = PackedStep(model)
    step.per_row = per_row
    with torch.inference_mode():
        # Three rows of different lengths, left-padded to the shared end column 20.
        ours, theirs = KVBlock(model, 3, 40), KVBlock(model, 3, 40)
        starts, end = [2, 11, 17], 20
        history = torch.randint(0, 97, (3, 20))
        for i, s in enumerate(starts):  # each row's history read by the model, at its own columns
            model(input_ids=history[i:i + 1, s:end], position_ids=torch.arange(end - s)[None], use_cache=True,
                  past_key_values=ours.cache(slice(i, i + 1), s, s))
        for a, b in zip(ours.k + ours.v, theirs.k + theirs.v):
            b.copy_(a)
        # A prompt piece read after 5 tokens already in the staging row.
        prompt = torch.randint(0, 97, (12,)).tolist()
        stage, expected_stage = KVBlock(model, 1, 40), KVBlock(model, 1, 40)
        model(input_ids=torch.tensor([prompt[:5]]), use_cache=True, past_key_values=stage.cache(slice(0, 1), 0, 0))
        for a, b in zip(stage.k + stage.v, expected_stage.k + expected_stage.v):
            b.copy_(a)
        model(input_ids=torch.tensor([prompt[5:]]), position_ids=torch.arange(5, 12)[None], use_cache=True,
              past_key_values=expected_stage.cache(slice(0, 1), 0, 5))

        tokens = [5, 6, 7]
        expected = reference(model, tokens, starts, end, theirs)
        got = step(ours.k, ours.v, tokens, [end - s for s in starts], starts, end,
                   stage_keys=stage.k, stage_values=stage.v, pieces=[Piece(prompt[5:], 5)])
    assert got.shape == expected.shape and got.dtype == torch.float32
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)
    for a, b in zip(ours.k + ours.v, theirs.k + theirs.v):  # this step's keys/values written at column `end`
        torch.testing.assert_close(a[:, :, :end + 1], b[:, :, :end + 1], rtol=1e-4, atol=1e-5)
    for a, b in zip(stage.k + stage.v, expected_stage.k + expected_stage.v):
        torch.testing.assert_close(a[:, :, :12], b[:, :, :12], rtol=1e-4, atol=1e-5)


def test_a_piece_alone_from_the_start_gives_no_logits_and_the_prompts_keys():
    model = tiny_gpt2()
    step = PackedStep(model)
    with torch.inference_mode():
        rows, stage, expected = KVBlock(model, 2, 40), KVBlock(model, 1, 40), KVBlock(model, 1, 40)
        prompt = torch.randint(0, 97, (9,)).tolist()
        assert step(rows.k, rows.v, [], [], [], 0, stage_keys=stage.k, stage_values=stage.v,
                    pieces=[Piece(prompt, 0)]) is None
        model(input_ids=torch.tensor([prompt]), use_cache=True, past_key_values=expected.cache(slice(0, 1), 0, 0))
    for a, b in zip(stage.k + stage.v, expected.k + expected.v):
        torch.testing.assert_close(a[:, :, :9], b[:, :, :9], rtol=1e-4, atol=1e-5)


def test_only_gpt2_language_models_take_the_packed_pass():
    from transformers import GPTNeoConfig, GPTNeoForCausalLM

    assert PackedStep.supports(tiny_gpt2())
    assert not PackedStep.supports(tiny_gpt2(reorder_and_upcast_attn=True))  # attention upcast to float32
    neo = GPTNeoForCausalLM(GPTNeoConfig(vocab_size=97, max_position_embeddings=64, hidden_size=32, num_layers=2,
                                         num_heads=2, attention_types=[[["global"], 2]])).eval()
    assert not PackedStep.supports(neo)
