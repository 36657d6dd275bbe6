"""The fast kernels on a GPU: FlashAttention-4 computes the attention SDPA computes within bf16
noise (eager and in the compiled blocks); SageAttention 2 and FP8 linears stay within their measured
8-bit error of the exact path, and FP8 stores exactly the chosen layers in FP8. Each test is
skipped without a CUDA GPU or its package (CI); docs/PERFORMANCE.md has the full-size errors."""

import pytest
import torch

from bindweave.model.attention import sdpa
from bindweave.model.fp8 import fp8_candidates, fp8_layer_names
from bindweave.model.speed import apply_speed_options, fa4_attention, fuse_projections, sage2_attention
from bindweave.settings.model import SpeedOptions
from bindweave.model.transformer import TINY_CONFIG, BindWeaveTransformer
from support.dit_inputs import tiny_dit_inputs as tiny_inputs

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


@pytest.fixture
def flash_attn_4():
    pytest.importorskip("flash_attn.cute.interface", reason="needs flash-attn-4")


@pytest.fixture
def sageattention():
    pytest.importorskip("sageattention", reason="needs SageAttention 2 (built from source)")


@pytest.fixture
def fp8_gpu():
    pytest.importorskip("torchao.quantization", reason="needs torchao")
    if torch.cuda.get_device_capability() < (8, 9):
        pytest.skip("FP8 GEMMs need compute capability 8.9+")


def relative_error(output, reference):
    return ((output.float() - reference.float()).norm() / reference.float().norm()).item()


@torch.no_grad()
def test_fa4_equals_sdpa_within_bf16_noise(flash_attn_4):
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
def test_fa4_compiled_dit_matches_cudnn_eager(flash_attn_4):
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


def random_qkv(tokens: int = 4096):
    generator = torch.Generator("cuda").manual_seed(0)
    fused = torch.randn(1, tokens, 3, 40, 128, device="cuda", dtype=torch.bfloat16, generator=generator)
    return fused.unbind(2)


@torch.no_grad()
def test_sage2_is_within_8bit_noise_of_float32_attention(sageattention):
    query, key, value = random_qkv()
    reference = sdpa(query.float(), key.float(), value.float())
    sage_error = relative_error(sage2_attention(query, key, value), reference)
    cudnn_error = relative_error(sdpa(query, key, value), reference)
    print(f"relative error against float32 attention: sage2 {sage_error:.2e}, cuDNN bf16 {cudnn_error:.2e}")
    assert sage_error < 5e-2, (sage_error, cudnn_error)


def small_dit(config_overrides: dict | None = None):
    config = dict(TINY_CONFIG, num_attention_heads=2, attention_head_dim=128, added_kv_proj_dim=256,
                  ffn_dim=512, **(config_overrides or {}))
    torch.manual_seed(0)
    model = BindWeaveTransformer(**config).to("cuda", torch.bfloat16).eval()
    x = {name: tensor.to("cuda", torch.bfloat16) if tensor.is_floating_point() else tensor.cuda()
         for name, tensor in tiny_inputs(frames=5, height=16, width=16).items()}
    x["timestep"] = x["timestep"].float()
    return model, x


@pytest.mark.parametrize("compile", [False, True])
@torch.no_grad()
def test_fp8_linears_store_the_chosen_layers_in_fp8_and_stay_close(fp8_gpu, compile):
    model, x = small_dit()
    expected = model(**x)
    reference = BindWeaveTransformer(**model.config).to("cuda", torch.bfloat16)
    fuse_projections(reference)
    chosen = fp8_candidates(reference)
    apply_speed_options(model, SpeedOptions(attention="cudnn", fuse_projections=True, compile=compile,
                                            linear_precision="fp8"))
    assert sorted(fp8_layer_names(model)) == sorted(chosen)
    # The fused layer's separate parts no longer hold the old full-precision weight.
    assert all(block.attn1.to_q.weight is None for block in model.blocks)
    error = relative_error(model(**x), expected)
    print(f"FP8 linears (compile={compile}): relative error {error:.2e}")
    assert error < 5e-2, error
    torch._dynamo.reset()
