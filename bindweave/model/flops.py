"""Analytic FLOP count of one BindWeave DiT forward (SPEC §4, §9).

Counts what ``torch.utils.flop_counter.FlopCounterMode`` counts: matrix products only (linear
layers, the patch-embedding convolution, the two products of every attention), 2 FLOPs per
multiply-add, biases, norms, RoPE, activations and softmax left out. At 720P (90,000 video
tokens) this is about 8.9 PFLOP, three quarters of it self-attention; the benchmark divides it by
the measured time to get the achieved rate.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class ForwardTokens:
    """Token counts of one forward.

    ``video``: patch tokens, reference slots included (25 x 45 x 80 = 90,000 at 720P);
    ``qwen``: Qwen2.5-VL hidden states; ``t5``: T5 embeddings (always 512);
    ``clip``: CLIP tokens, all reference slots (4 x 257 = 1028).
    """

    video: int
    qwen: int
    t5: int = 512
    clip: int = 1028


def video_tokens(config: dict, latent_frames: int, latent_height: int, latent_width: int) -> int:
    """Patch tokens of latents ``(B, 16, latent_frames, h, w)`` after the reference slots are prepended."""
    p_t, p_h, p_w = config["patch_size"]
    return ((config["max_references"] + latent_frames) // p_t) * (latent_height // p_h) * (latent_width // p_w)


def _linear(tokens: int, fan_in: int, fan_out: int) -> int:
    return 2 * tokens * fan_in * fan_out


def _attention(query_tokens: int, key_tokens: int, width: int) -> int:
    # Q K^T and P V, each 2 * Lq * Lk * head_dim per head; heads * head_dim = width.
    return 4 * query_tokens * key_tokens * width


def dit_forward_flops(config: dict, tokens: ForwardTokens, batch: int = 1) -> dict[str, int]:
    """FLOPs of one forward by part, and ``total``. ``config``: a BindWeaveTransformer config dict.

    The cross-attention follows SPEC §4.5: the image K/V see the first ``image_tokens_per_reference``
    (257) CLIP tokens, the text K/V see the other CLIP tokens, the Qwen and the T5 tokens. diffusers'
    stock split (at ``len - 512``) moves tokens between the two K/V sets but not their total, so the
    count holds for the stock forward on the same inputs too.
    """
    width = config["num_attention_heads"] * config["attention_head_dim"]
    layers = config["num_layers"]
    n = tokens.video
    image_kv_tokens = config["image_tokens_per_reference"]
    text_kv_tokens = tokens.qwen + tokens.t5 + tokens.clip - image_kv_tokens
    patch_volume = math.prod(config["patch_size"])

    per_block = {
        "self_attention_projections": 4 * _linear(n, width, width),  # q, k, v, out
        "self_attention": _attention(n, n, width),
        "cross_attention_projections": (
            2 * _linear(n, width, width)  # q, out
            + 2 * _linear(text_kv_tokens, width, width)  # to_k, to_v
            + 2 * _linear(image_kv_tokens, config["added_kv_proj_dim"], width)  # add_k_proj, add_v_proj
        ),
        "cross_attention": _attention(n, text_kv_tokens + image_kv_tokens, width),
        "ffn": 2 * _linear(n, width, config["ffn_dim"]),
    }
    parts = {name: layers * flops for name, flops in per_block.items()}
    parts["patch_embedding"] = _linear(n, config["in_channels"] * patch_volume, width)
    parts["condition_embedding"] = (
        _linear(1, config["freq_dim"], width) + _linear(1, width, width)  # time_embedder
        + _linear(1, width, 6 * width)  # time_proj
        + _linear(tokens.qwen, config["mllm_dim"], config["text_dim"])  # text_projector
        + _linear(tokens.qwen, config["text_dim"], config["text_dim"])
        + _linear(tokens.qwen + tokens.t5, config["text_dim"], width)  # text_embedder
        + _linear(tokens.qwen + tokens.t5, width, width)
        + _linear(tokens.clip, config["image_dim"], config["image_dim"])  # image_embedder
        + _linear(tokens.clip, config["image_dim"], width)
    )
    parts["head"] = _linear(n, width, config["out_channels"] * patch_volume)
    parts = {name: batch * flops for name, flops in parts.items()}
    parts["total"] = sum(parts.values())
    return parts
