"""The benchmark's analytic FLOP count against torch's own FLOP counter on the tiny DiT."""

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from bindweave.model.flops import ForwardTokens, dit_forward_flops, video_tokens
from bindweave.model.transformer import BINDWEAVE_14B_CONFIG, TINY_CONFIG, BindWeaveTransformer
from support.dit_inputs import tiny_dit_inputs


@pytest.mark.parametrize("frames,height,width,qwen_tokens,references", [(3, 8, 12, 7, 4), (2, 6, 10, 30, 1)])
@torch.no_grad()
def test_analytic_count_equals_torch_flop_counter(frames, height, width, qwen_tokens, references):
    torch.manual_seed(0)
    model = BindWeaveTransformer(**TINY_CONFIG).eval()
    # The count depends on the shapes alone (the values are the shared seeded ones).
    x = tiny_dit_inputs(frames, height, width, qwen_tokens, clip_tokens=references * 257)
    counter = FlopCounterMode(display=False)
    # The MATH kernel is plain matmuls, which the counter sees (it has no formula for the CPU
    # flash kernel).
    with sdpa_kernel(SDPBackend.MATH), counter:
        model(**x)
    tokens = ForwardTokens(video=video_tokens(TINY_CONFIG, frames, height, width), qwen=qwen_tokens,
                           clip=references * 257)
    assert dit_forward_flops(TINY_CONFIG, tokens)["total"] == counter.get_total_flops()


def test_full_size_count_matches_spec():
    """SPEC §9: about 8.85 PFLOP at 720P, self-attention 6.6 of it, linear layers 2.2."""
    tokens = ForwardTokens(video=video_tokens(BINDWEAVE_14B_CONFIG, 21, 90, 160), qwen=526)
    parts = dit_forward_flops(BINDWEAVE_14B_CONFIG, tokens)
    assert tokens.video == 90_000
    assert parts["self_attention"] == 40 * 4 * 90_000**2 * 5120
    linear = parts["self_attention_projections"] + parts["cross_attention_projections"] + parts["ffn"]
    assert 2.1e15 < linear < 2.2e15
    assert 8.8e15 < parts["total"] < 9.0e15
