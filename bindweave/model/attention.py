"""BindWeave's attention processors and the one hook through which self-attention runs.

The DiT is plain single-device PyTorch. Everything a sequence-parallel runtime must change
(split the tokens, run self-attention over the whole sequence group, gather the tokens) goes
through an :class:`AttentionHook`; ``parallel/`` installs another hook with
``BindWeaveTransformer.set_attention_hook``. Cross-attention never needs it: every rank holds
the whole (small) context.

Tensor layout at the hook boundary: ``[batch, tokens, heads, head_dim]``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def sdpa(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """Unmasked attention on ``[B, L, H, D]`` tensors (PyTorch picks the kernel)."""
    out = F.scaled_dot_product_attention(query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2))
    return out.transpose(1, 2)


class AttentionHook:
    """Single-device behaviour; ``parallel.sequence`` subclasses it.

    ``split_tokens`` runs once per forward after patchify (tokens ``[B, N, C]`` and the RoPE
    cos/sin ``[1, N, 1, D]``), ``self_attention`` in every block, ``gather_tokens`` after the head.
    """

    def split_tokens(self, tokens: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor]):
        return tokens, rope

    def self_attention(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
        return sdpa(query, key, value)

    def gather_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        return tokens


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Wan's interleaved RoPE on ``[B, L, H, D]``; cos/sin are diffusers' repeat-interleaved tables."""
    x_even, x_odd = x.unflatten(-1, (-1, 2)).unbind(-1)
    cos, sin = cos[..., 0::2], sin[..., 1::2]
    rotated = torch.stack((x_even * cos - x_odd * sin, x_even * sin + x_odd * cos), dim=-1)
    return rotated.flatten(-2).type_as(x)


def _heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    return x.unflatten(2, (heads, -1))


class SelfAttnProcessor:
    """Stock Wan self-attention (q/k RMS norm across heads, RoPE) with the kernel behind the hook."""

    def __init__(self, hook: AttentionHook):
        self.hook = hook

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, rotary_emb=None):
        if getattr(attn, "fused_projections", False):
            query, key, value = attn.to_qkv(hidden_states).chunk(3, dim=-1)
        else:
            query, key, value = attn.to_q(hidden_states), attn.to_k(hidden_states), attn.to_v(hidden_states)
        query = _heads(attn.norm_q(query), attn.heads)
        key = _heads(attn.norm_k(key), attn.heads)
        value = _heads(value, attn.heads)
        query = apply_rotary(query, *rotary_emb)
        key = apply_rotary(key, *rotary_emb)
        out = self.hook.self_attention(query, key, value).flatten(2).type_as(query)
        return attn.to_out[0](out)


class CrossAttnProcessor:
    """BindWeave cross-attention: the image K/V see ONLY the first ``image_tokens`` (257) tokens.

    The context is ``cat([image_ctx (1028), text_ctx (L + 512)])``. Reference #1's CLIP tokens go
    through the image K/V (``add_k_proj``/``add_v_proj``/``norm_added_k``); the other 771 CLIP
    tokens, the Qwen tokens and the T5 tokens go through the text K/V. diffusers' stock processor
    splits at ``len - 512`` instead, which is wrong for this model (SPEC §4.5). No masks.
    """

    def __init__(self, image_tokens: int):
        self.image_tokens = image_tokens

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, rotary_emb=None):
        image_context = encoder_hidden_states[:, : self.image_tokens]
        text_context = encoder_hidden_states[:, self.image_tokens :]
        query = _heads(attn.norm_q(attn.to_q(hidden_states)), attn.heads)

        if getattr(attn, "fused_projections", False):
            key, value = attn.to_kv(text_context).chunk(2, dim=-1)
            image_key, image_value = attn.to_added_kv(image_context).chunk(2, dim=-1)
        else:
            key, value = attn.to_k(text_context), attn.to_v(text_context)
            image_key, image_value = attn.add_k_proj(image_context), attn.add_v_proj(image_context)
        key = _heads(attn.norm_k(key), attn.heads)
        value = _heads(value, attn.heads)
        image_key = _heads(attn.norm_added_k(image_key), attn.heads)
        image_value = _heads(image_value, attn.heads)

        out = sdpa(query, key, value).flatten(2).type_as(query)
        out = out + sdpa(query, image_key, image_value).flatten(2).type_as(query)
        return attn.to_out[0](out)
