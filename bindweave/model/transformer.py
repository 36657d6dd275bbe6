"""The BindWeave DiT: diffusers' Wan2.1-I2V-14B transformer plus BindWeave's deltas (SPEC §4).

Every module is diffusers' own (so the published checkpoint loads with diffusers key names);
BindWeave adds ``condition_embedder.text_projector`` and changes three things in the forward:
4 zero reference frames prepended on the time axis (and dropped after the head), Qwen2.5-VL
tokens projected and placed BEFORE the 512 T5 tokens, and the cross-attention split at 257
(:class:`~bindweave.model.attention.CrossAttnProcessor`).
"""

from __future__ import annotations

from typing import Callable

import torch
from diffusers.configuration_utils import register_to_config
from diffusers.models.transformers.transformer_wan import WanTransformer3DModel
from torch import nn

from bindweave.errors import refuse_incomplete_load
from bindweave.model.attention import AttentionHook, CrossAttnProcessor, SelfAttnProcessor

# The published 14B checkpoint's config (diffusers' Wan2.1-I2V-14B plus BindWeave's three keys).
BINDWEAVE_14B_CONFIG = dict(
    patch_size=(1, 2, 2),
    num_attention_heads=40,
    attention_head_dim=128,
    in_channels=36,
    out_channels=16,
    text_dim=4096,
    freq_dim=256,
    ffn_dim=13824,
    num_layers=40,
    cross_attn_norm=True,
    qk_norm="rms_norm_across_heads",
    eps=1e-6,
    image_dim=1280,
    added_kv_proj_dim=5120,
    rope_max_seq_len=1024,
    mllm_dim=3584,
    max_references=4,
    image_tokens_per_reference=257,
)

# Same classes, a few thousand parameters; text/image/mllm dims match the tiny UMT5, CLIP and Qwen.
TINY_CONFIG = dict(
    BINDWEAVE_14B_CONFIG,
    num_attention_heads=2,
    attention_head_dim=16,
    text_dim=32,
    freq_dim=32,
    ffn_dim=64,
    num_layers=2,
    image_dim=24,
    added_kv_proj_dim=32,
    mllm_dim=40,
)


class TextProjector(nn.Module):
    """Qwen2.5-VL hidden states (3584) -> T5 width (4096): Linear, GELU(tanh), Linear."""

    def __init__(self, mllm_dim: int, text_dim: int):
        super().__init__()
        self.linear_1 = nn.Linear(mllm_dim, text_dim)
        self.act = nn.GELU(approximate="tanh")
        self.linear_2 = nn.Linear(text_dim, text_dim)

    def forward(self, qwen_states: torch.Tensor) -> torch.Tensor:
        return self.linear_2(self.act(self.linear_1(qwen_states)))


class BindWeaveTransformer(WanTransformer3DModel):
    """``velocity = model(latents, timestep, t5_embeds=, qwen_states=, clip_embeds=, condition=)``.

    Shapes: latents ``(B,16,F,H,W)``; timestep ``(B,)``; t5 ``(B,512,text_dim)``; qwen
    ``(B,L,mllm_dim)``; clip ``(B, max_references*257, image_dim)``; condition
    ``(B,20,max_references+F,H,W)`` -> velocity ``(B,16,F,H,W)``.
    """


    @register_to_config
    def __init__(
        self,
        patch_size=(1, 2, 2),
        num_attention_heads: int = 40,
        attention_head_dim: int = 128,
        in_channels: int = 36,
        out_channels: int = 16,
        text_dim: int = 4096,
        freq_dim: int = 256,
        ffn_dim: int = 13824,
        num_layers: int = 40,
        cross_attn_norm: bool = True,
        qk_norm: str | None = "rms_norm_across_heads",
        eps: float = 1e-6,
        image_dim: int | None = 1280,
        added_kv_proj_dim: int | None = 5120,
        rope_max_seq_len: int = 1024,
        pos_embed_seq_len: int | None = None,
        mllm_dim: int = 3584,
        max_references: int = 4,
        image_tokens_per_reference: int = 257,
    ):
        super().__init__(
            patch_size=tuple(patch_size),
            num_attention_heads=num_attention_heads,
            attention_head_dim=attention_head_dim,
            in_channels=in_channels,
            out_channels=out_channels,
            text_dim=text_dim,
            freq_dim=freq_dim,
            ffn_dim=ffn_dim,
            num_layers=num_layers,
            cross_attn_norm=cross_attn_norm,
            qk_norm=qk_norm,
            eps=eps,
            image_dim=image_dim,
            added_kv_proj_dim=added_kv_proj_dim,
            rope_max_seq_len=rope_max_seq_len,
            pos_embed_seq_len=pos_embed_seq_len,
        )
        self.condition_embedder.text_projector = TextProjector(mllm_dim, text_dim)
        self.attention_hook = AttentionHook()
        for block in self.blocks:
            block.attn1.set_processor(SelfAttnProcessor(self.attention_hook))
            block.attn2.set_processor(CrossAttnProcessor(image_tokens_per_reference))

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, **kwargs):
        """diffusers' ``from_pretrained``, made strict: a checkpoint with a missing (e.g. no text
        projector), unexpected (a renamed key) or wrongly shaped tensor is a BindWeaveInputError
        naming the keys, where diffusers would only warn and keep random weights there.
        ``output_loading_info=True`` returns ``(model, loading_info)`` as diffusers does."""
        wants_info = kwargs.pop("output_loading_info", False)
        model, loading_info = super().from_pretrained(pretrained_model_name_or_path, output_loading_info=True,
                                                      **kwargs)
        refuse_incomplete_load(loading_info, f"BindWeave DiT checkpoint {pretrained_model_name_or_path}",
                               "check that the download is complete and is ByteDance/BindWeave (diffusers key names "
                               "plus condition_embedder.text_projector.*)")
        return (model, loading_info) if wants_info else model

    def set_attention_hook(self, hook: AttentionHook) -> None:
        """Route token split/gather and every block's self-attention through ``hook``."""
        self.attention_hook = hook
        for block in self.blocks:
            block.attn1.processor.hook = hook

    def build_context(self, t5_embeds: torch.Tensor, qwen_states: torch.Tensor) -> torch.Tensor:
        """Text context before Wan's text_embedder: projected Qwen tokens FIRST, then the 512 T5 tokens."""
        qwen_tokens = self.condition_embedder.text_projector(qwen_states.to(t5_embeds.dtype))
        return torch.cat([qwen_tokens, t5_embeds], dim=1)

    def forward(
        self,
        latents: torch.Tensor,
        timestep: torch.Tensor,
        *,
        t5_embeds: torch.Tensor,
        qwen_states: torch.Tensor,
        clip_embeds: torch.Tensor,
        condition: torch.Tensor,
        block_cache: Callable | None = None,
    ) -> torch.Tensor:
        """``block_cache(run_blocks, tokens, timestep_proj) -> tokens`` stands in for the 40 blocks
        when given (a step cache: bindweave.sampling.step_cache); it may skip them."""
        references = self.config.max_references
        batch, _, frames, height, width = latents.shape
        expected_condition = (batch, condition.shape[1], references + frames, height, width)
        if tuple(condition.shape) != expected_condition:
            raise ValueError(f"condition has shape {tuple(condition.shape)}, expected {expected_condition}")

        # The reference slots are 4 zero latent frames in front of the video (time positions 0..3).
        reference_slots = latents.new_zeros(batch, latents.shape[1], references, height, width)
        hidden = torch.cat([torch.cat([reference_slots, latents], dim=2), condition.to(latents.dtype)], dim=1)

        p_t, p_h, p_w = self.config.patch_size
        grid = (hidden.shape[2] // p_t, height // p_h, width // p_w)
        rope = self.rope(hidden)
        tokens = self.patch_embedding(hidden).flatten(2).transpose(1, 2).contiguous()
        tokens, rope = self.attention_hook.split_tokens(tokens, rope)

        temb, timestep_proj, text_context, image_context = self.condition_embedder(
            timestep, self.build_context(t5_embeds, qwen_states), clip_embeds
        )
        timestep_proj = timestep_proj.unflatten(1, (6, -1))
        context = torch.cat([image_context, text_context], dim=1)

        def run_blocks(tokens: torch.Tensor) -> torch.Tensor:
            for block in self.blocks:
                tokens = block(tokens, context, timestep_proj, rope)
            return tokens

        tokens = run_blocks(tokens) if block_cache is None else block_cache(run_blocks, tokens, timestep_proj)

        shift, scale = (self.scale_shift_table + temb.unsqueeze(1)).chunk(2, dim=1)
        tokens = (self.norm_out(tokens.float()) * (1 + scale) + shift).type_as(tokens)
        tokens = self.attention_hook.gather_tokens(self.proj_out(tokens))

        output = tokens.reshape(batch, *grid, p_t, p_h, p_w, -1)
        output = output.permute(0, 7, 1, 4, 2, 5, 3, 6).flatten(6, 7).flatten(4, 5).flatten(2, 3)
        return output[:, :, references:]
