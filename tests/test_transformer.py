"""The BindWeave DiT against diffusers' own Wan transformer and against direct computations."""

import inspect

import pytest
import torch
import torch.nn.functional as F
from diffusers import WanTransformer3DModel
from diffusers.models.transformers.transformer_wan import WanAttnProcessor

from bindweave import BindWeaveTransformer
from bindweave.model.attention import CrossAttnProcessor
from bindweave.model.transformer import BINDWEAVE_14B_CONFIG, TINY_CONFIG
from support.dit_inputs import tiny_dit_inputs as inputs

WAN_KEYS = set(inspect.signature(WanTransformer3DModel.__init__).parameters) - {"self"}


@pytest.fixture(scope="module")
def models():
    torch.manual_seed(0)
    ours = BindWeaveTransformer(**TINY_CONFIG).eval()
    stock = WanTransformer3DModel(**{k: v for k, v in TINY_CONFIG.items() if k in WAN_KEYS}).eval()
    missing, unexpected = stock.load_state_dict(ours.state_dict(), strict=False)
    assert not missing and all("text_projector" in key for key in unexpected)
    return ours, stock


@torch.no_grad()
def test_whole_forward_equals_diffusers_where_bindweave_does_not_differ(models):
    """With one reference (257 CLIP tokens) and no Qwen tokens, diffusers' `len - 512` split is
    also 257, so the stock model fed the 4 zero frames explicitly must give our output: this pins
    patch embedding, RoPE, time/text/image embedders, self-attention, FFN, head, unpatchify and the
    prepend/drop of the 4 reference frames."""
    ours, stock = models
    x = inputs(qwen_tokens=0, clip_tokens=257)
    velocity = ours(x["latents"], x["timestep"], t5_embeds=x["t5_embeds"], qwen_states=x["qwen_states"],
                    clip_embeds=x["clip_embeds"], condition=x["condition"])
    padded = torch.cat([torch.zeros(1, 16, 4, 8, 12), x["latents"]], dim=2)
    expected = stock(torch.cat([padded, x["condition"]], dim=1), x["timestep"], encoder_hidden_states=x["t5_embeds"],
                     encoder_hidden_states_image=x["clip_embeds"], return_dict=False)[0]
    assert velocity.shape == x["latents"].shape
    torch.testing.assert_close(velocity, expected[:, :, 4:], rtol=1e-5, atol=1e-5)


@torch.no_grad()
def test_reference_frames_are_dropped_not_the_video_frames(models):
    """The 4 output frames dropped are the reference slots: changing the first video latent frame
    must change output frame 0 (it would not if the drop took the wrong end)."""
    ours, _ = models
    x = inputs()
    base = ours(**x)
    x["latents"][:, :, -1] += 1.0
    moved = ours(**x)
    assert base.shape[2] == 3
    assert not torch.allclose(base[:, :, -1], moved[:, :, -1])


@torch.no_grad()
def test_context_puts_qwen_tokens_before_t5(models):
    ours, _ = models
    x = inputs(qwen_tokens=5)
    context = ours.build_context(x["t5_embeds"], x["qwen_states"])
    projected = ours.condition_embedder.text_projector(x["qwen_states"])
    assert context.shape == (1, 5 + 512, TINY_CONFIG["text_dim"])
    torch.testing.assert_close(context[:, :5], projected)
    torch.testing.assert_close(context[:, 5:], x["t5_embeds"])
    # The projector is Linear -> GELU(tanh) -> Linear.
    p = ours.condition_embedder.text_projector
    direct = F.linear(F.gelu(F.linear(x["qwen_states"], p.linear_1.weight, p.linear_1.bias), approximate="tanh"),
                      p.linear_2.weight, p.linear_2.bias)
    torch.testing.assert_close(projected, direct)


def direct_cross_attention(attn, query_tokens, context, split):
    """Two plain attentions written from SPEC §4.5: image K/V on context[:split], text K/V on the rest."""
    def heads(t):
        return t.unflatten(2, (attn.heads, -1)).transpose(1, 2)

    q = heads(attn.norm_q(attn.to_q(query_tokens)))
    text_out = F.scaled_dot_product_attention(q, heads(attn.norm_k(attn.to_k(context[:, split:]))),
                                              heads(attn.to_v(context[:, split:])))
    image_out = F.scaled_dot_product_attention(q, heads(attn.norm_added_k(attn.add_k_proj(context[:, :split]))),
                                               heads(attn.add_v_proj(context[:, :split])))
    return attn.to_out[0]((text_out + image_out).transpose(1, 2).flatten(2))


@torch.no_grad()
def test_cross_attention_splits_at_257_not_len_minus_512(models):
    ours, _ = models
    attn = ours.blocks[0].attn2
    generator = torch.Generator().manual_seed(3)
    dim = ours.config.num_attention_heads * ours.config.attention_head_dim
    query_tokens = torch.randn(1, 10, dim, generator=generator)
    context = torch.randn(1, 1028 + 9 + 512, dim, generator=generator)
    assert isinstance(attn.processor, CrossAttnProcessor)
    out = attn(query_tokens, context)
    torch.testing.assert_close(out, direct_cross_attention(attn, query_tokens, context, 257))
    stock = WanAttnProcessor()(attn, query_tokens, context)
    assert not torch.allclose(out, stock, atol=1e-3), "the stock len-512 split must differ"


@torch.no_grad()
def test_forward_uses_the_257_split_with_four_references(models):
    """Whole model with 1028 CLIP tokens and Qwen tokens equals the stock model given the same
    Qwen-first context and the 257-split processor: the forward wires the context as SPEC says."""
    ours, stock = models
    x = inputs()
    velocity = ours(**x)
    for block in stock.blocks:
        block.attn2.set_processor(CrossAttnProcessor(257))
    try:
        padded = torch.cat([torch.zeros(1, 16, 4, 8, 12), x["latents"]], dim=2)
        expected = stock(torch.cat([padded, x["condition"]], dim=1), x["timestep"],
                         encoder_hidden_states=ours.build_context(x["t5_embeds"], x["qwen_states"]),
                         encoder_hidden_states_image=x["clip_embeds"], return_dict=False)[0]
    finally:
        for block in stock.blocks:
            block.attn2.set_processor(WanAttnProcessor())
    torch.testing.assert_close(velocity, expected[:, :, 4:], rtol=1e-5, atol=1e-5)


def test_720p_81_frame_shapes_map_as_spec():
    """21 latent frames in, 25 inside (90,000 tokens), 21 out — shape propagation on the meta device."""
    seen = {}
    with torch.device("meta"):
        model = BindWeaveTransformer(**TINY_CONFIG)
        model.patch_embedding.register_forward_hook(lambda m, i, o: seen.update(grid=tuple(o.shape[2:])))
        out = model(torch.empty(1, 16, 21, 90, 160), torch.empty(1), t5_embeds=torch.empty(1, 512, 32),
                    qwen_states=torch.empty(1, 526, 40), clip_embeds=torch.empty(1, 1028, 24),
                    condition=torch.empty(1, 20, 25, 90, 160))
    assert seen["grid"] == (25, 45, 80) and 25 * 45 * 80 == 90_000
    assert tuple(out.shape) == (1, 16, 21, 90, 160)


def test_full_size_config_has_the_published_parameter_count():
    with torch.device("meta"):
        model = BindWeaveTransformer(**BINDWEAVE_14B_CONFIG)
    total = sum(p.numel() for p in model.parameters())
    projector = sum(p.numel() for p in model.condition_embedder.text_projector.parameters())
    assert 16.3e9 < total < 16.5e9
    assert projector == 3584 * 4096 + 4096 + 4096 * 4096 + 4096  # 31.5 M


def test_condition_with_wrong_frame_count_is_rejected(models):
    ours, _ = models
    x = inputs()
    x["condition"] = x["condition"][:, :, 1:]
    with pytest.raises(ValueError, match="expected"):
        ours(**x)
