"""FlashAttention-4 on a GPU computes the attention SDPA computes, within bf16 noise, eager and in
the compiled blocks. Skipped without a CUDA GPU and the flash-attn-4 package (CI)."""

import pytest
import torch

from bindweave.model.attention import sdpa
from bindweave.model.speed import SpeedOptions, apply_speed_options, fa4_attention
from bindweave.model.transformer import TINY_CONFIG, BindWeaveTransformer
from test_transformer import inputs as tiny_inputs

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


@pytest.fixture(autouse=True)
def flash_attn_4():
    pytest.importorskip("flash_attn.cute.interface", reason="needs flash-attn-4")


def relative_error(output, reference):
    return ((output.float() - reference.float()).norm() / reference.float().norm()).item()


@torch.no_grad()
def test_fa4_equals_sdpa_within_bf16_noise():
    """Against float32 attention: FA4's error is no larger than cuDNN SDPA's own bf16 error, with
    the value a strided view of a fused QKV output, as the DiT hands it over."""
    generator = torch.Generator("cuda").manual_seed(0)
    fused = torch.randn(1, 4096, 3, 40, 128, device="cuda", dtype=torch.bfloat16, generator=generator)
    query, key, value = fused.unbind(2)
    reference = sdpa(query.float(), key.float(), value.float())
    fa4_error = relative_error(fa4_attention(query, key, value), reference)
    cudnn_error = relative_error(sdpa(query, key, value), reference)
    assert fa4_error < 1.5 * cudnn_error + 1e-3, (fa4_error, cudnn_error)


@torch.no_grad()
def test_fa4_compiled_dit_matches_cudnn_eager():
    """A 2-block DiT with the real head size (128): compiled FA4 blocks against eager cuDNN blocks."""
    config = dict(TINY_CONFIG, num_attention_heads=2, attention_head_dim=128, added_kv_proj_dim=256)
    torch.manual_seed(0)
    reference_model = BindWeaveTransformer(**config).to("cuda", torch.bfloat16).eval()
    x = {name: tensor.to("cuda", torch.bfloat16) if tensor.is_floating_point() else tensor.cuda()
         for name, tensor in tiny_inputs(frames=5, height=16, width=16).items()}
    x["timestep"] = x["timestep"].float()
    expected = reference_model(**x)
    model = apply_speed_options(reference_model, SpeedOptions(attention="fa4", compile=True))
    assert relative_error(model(**x), expected) < 2e-2
