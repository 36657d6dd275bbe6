"""Speed options for the BindWeave DiT on one device; the computed function stays the same.

At 720P one forward is ~8.95 PFLOP, 74 % of it self-attention over 90,000 tokens, so the kernel
that runs it decides most of the time (cuDNN's SDPA is ~1.6x PyTorch's flash kernel on an H100).
The rest is linear layers, which cuBLAS runs near the matmul rate, and element-wise work on
[90,000 x 5120] activations (norms and modulation in fp32 as diffusers/Wan do them, RoPE in
float64 as diffusers does): each eager op is a separate pass over 1-4 GB, and regional
``torch.compile`` fuses each chain into one pass without changing what is computed.

Measured on an H100 (docs/PERFORMANCE.md): compiled as is, inductor writes q/k/v for its SDPA
call as contiguous [B, heads, tokens, dim] copies, on which cuDNN runs ~4 % slower than on the
[B, tokens, heads, dim] layout the model produces (558 vs 581 TFLOP/s at 90,000 tokens). With
``opaque_attention`` every attention goes through the ``bindweave::attention`` operator, which
inductor cannot look into, so it hands over the tensors in the layout eager code has.

    apply_speed_options(model, SpeedOptions())   # cuDNN attention, fused QKV, compiled blocks
"""

from dataclasses import dataclass

import torch
from diffusers.models.transformers.transformer_wan import WanAttention
from torch.nn.attention import SDPBackend, sdpa_kernel

from bindweave.attention import AttentionHook, CrossAttnProcessor, sdpa

# Each name puts its kernel first and keeps the others as fallbacks, so an input the preferred
# kernel cannot take (or a CPU tensor) still runs.
SDPA_PRIORITIES = {
    "cudnn": [SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH],
    "flash": [SDPBackend.FLASH_ATTENTION, SDPBackend.CUDNN_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH],
    "efficient": [SDPBackend.EFFICIENT_ATTENTION, SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.MATH],
}
ATTENTION_CHOICES = (*SDPA_PRIORITIES, "default")


@dataclass(frozen=True)
class SpeedOptions:
    """``attention``: the SDPA kernel tried first for self-attention (``default``: PyTorch's own
    order); ``text_attention`` / ``image_attention``: the same for the two cross-attentions (90,000
    queries against ~1,900 text or 257 image keys, shapes where kernels rank differently);
    ``opaque_attention``: run them through ``bindweave::attention`` (see the module docstring);
    ``fuse_projections``: one GEMM for q/k/v (and for each cross-attention K/V pair); ``compile``:
    ``torch.compile`` each transformer block (one graph, reused by all 40 blocks)."""

    attention: str = "cudnn"
    text_attention: str = "cudnn"
    image_attention: str = "cudnn"
    opaque_attention: bool = True
    fuse_projections: bool = True
    compile: bool = True

    def __post_init__(self):
        for field in ("attention", "text_attention", "image_attention"):
            if getattr(self, field) not in ATTENTION_CHOICES:
                raise ValueError(f"{field}={getattr(self, field)!r}: choose one of {', '.join(ATTENTION_CHOICES)}")


def attention_with(kernel: str, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """Unmasked attention on ``[B, L, H, D]`` tensors with ``kernel`` tried first."""
    if kernel == "default":
        return sdpa(query, key, value)
    # torch.compile records this context in the graph, so a compiled block keeps the choice.
    with sdpa_kernel(SDPA_PRIORITIES[kernel], set_priority=True):
        return sdpa(query, key, value)


@torch.library.custom_op("bindweave::attention", mutates_args=())
def opaque_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, kernel: str) -> torch.Tensor:
    """``attention_with`` as one operator torch.compile does not trace into: contiguous ``[B, L, H, D]`` out."""
    return attention_with(kernel, query, key, value).contiguous()


@opaque_attention.register_fake
def _(query, key, value, kernel):
    return query.new_empty(*query.shape[:-1], value.shape[-1])


def _attend(kernel: str, opaque: bool, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    return opaque_attention(query, key, value, kernel) if opaque else attention_with(kernel, query, key, value)


class PreferredKernelAttention(AttentionHook):
    """Single-device self-attention with an SDPA kernel tried first (``SDPA_PRIORITIES``)."""

    def __init__(self, kernel: str, opaque: bool = True):
        self.kernel, self.opaque = kernel, opaque

    def self_attention(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
        return _attend(self.kernel, self.opaque, query, key, value)


class PreferredKernelCrossAttnProcessor(CrossAttnProcessor):
    """BindWeave's cross-attention with an SDPA kernel tried first for each of its two attentions."""

    def __init__(self, image_tokens: int, text_kernel: str, image_kernel: str, opaque: bool = True):
        super().__init__(image_tokens)
        self.text_kernel, self.image_kernel, self.opaque = text_kernel, image_kernel, opaque

    def text_attention(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
        return _attend(self.text_kernel, self.opaque, query, key, value)

    def image_attention(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
        return _attend(self.image_kernel, self.opaque, query, key, value)


@torch.no_grad()
def fuse_projections(model: torch.nn.Module) -> None:
    """diffusers' ``fuse_projections`` on every attention, with the weights held once.

    diffusers concatenates q/k/v (and each cross-attention K/V pair) into new tensors and keeps
    the separate ones: 14.7 GB more for the 14B DiT. Here the separate layers are re-pointed at
    slices of the fused weights, so every parameter name still loads and nothing is stored twice.
    """
    for attn in model.modules():
        if not isinstance(attn, WanAttention) or getattr(attn, "fused_projections", False):
            continue
        attn.fuse_projections()
        groups = [("to_qkv", ("to_q", "to_k", "to_v"))] if not attn.is_cross_attention else [("to_kv", ("to_k", "to_v"))]
        if attn.added_kv_proj_dim is not None:
            groups.append(("to_added_kv", ("add_k_proj", "add_v_proj")))
        for fused_name, part_names in groups:
            fused = getattr(attn, fused_name)
            rows = 0
            for part_name in part_names:
                part = getattr(attn, part_name)
                size = part.out_features
                part.weight = torch.nn.Parameter(fused.weight[rows:rows + size], requires_grad=False)
                part.bias = torch.nn.Parameter(fused.bias[rows:rows + size], requires_grad=False)
                rows += size


def fast_processors(model: torch.nn.Module, options: SpeedOptions):
    """The self-attention hook and the cross-attention processors (one per block) for ``options``."""
    hook = PreferredKernelAttention(options.attention, options.opaque_attention)
    cross = [PreferredKernelCrossAttnProcessor(block.attn2.processor.image_tokens, options.text_attention,
                                               options.image_attention, options.opaque_attention)
             for block in model.blocks]
    return hook, cross


def apply_speed_options(model: torch.nn.Module, options: SpeedOptions) -> torch.nn.Module:
    """Apply ``options`` to a single-device ``BindWeaveTransformer`` in place and return it.

    Multi-GPU runs install their own attention hook (``parallel/``) after this; the fused
    projections, the cross-attention processors and the compiled blocks stay.
    """
    hook, cross = fast_processors(model, options)
    model.set_attention_hook(hook)
    for block, processor in zip(model.blocks, cross):
        block.attn2.set_processor(processor)
    if options.fuse_projections:
        fuse_projections(model)
    if options.compile:
        model.compile_repeated_blocks()  # regional compile: diffusers' API, every block in place
    return model
