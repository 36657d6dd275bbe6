"""Speed options for the BindWeave DiT on one device; the computed function stays the same.

At 720P one forward is ~8.95 PFLOP, 74 % of it self-attention over 90,000 tokens, so the kernel
that runs it decides most of the time (cuDNN's SDPA is ~1.6x PyTorch's flash kernel on an H100;
PyTorch 2.11 already prefers it there, other versions and GPUs may not). The rest is linear
layers, which cuBLAS runs near the matmul rate, and element-wise work on [90,000 x 5120]
activations (norms and modulation in fp32 as diffusers/Wan do them, RoPE in float64 as diffusers
does): each eager op is a separate pass over 1-4 GB, and regional ``torch.compile`` fuses each
chain into one pass without changing what is computed. ``attention="fa4"`` goes further on Hopper
and Blackwell: FlashAttention-4 (the ``flash-attn-4`` package: CuTe-DSL kernels compiled on first
use, cached on disk) runs self-attention instead of an SDPA kernel. docs/PERFORMANCE.md has the
measurements.

    apply_speed_options(model, SpeedOptions())   # cuDNN self-attention, fused QKV, compiled blocks
"""

import logging
import os
import warnings
from dataclasses import dataclass

import torch
from diffusers.models.transformers.transformer_wan import WanAttention
from torch.nn.attention import SDPBackend, sdpa_kernel

from bindweave.model.attention import AttentionHook, sdpa

log = logging.getLogger("bindweave")

# Each name puts its kernel first and keeps the others as fallbacks, so an input the preferred
# kernel cannot take (or a CPU tensor) still runs.
SDPA_PRIORITIES = {
    "cudnn": [SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH],
    "flash": [SDPBackend.FLASH_ATTENTION, SDPBackend.CUDNN_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH],
    "efficient": [SDPBackend.EFFICIENT_ATTENTION, SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.MATH],
}
ATTENTION_CHOICES = (*SDPA_PRIORITIES, "fa4", "default", "auto")
FA4_INSTALL_HINT = "pip install 'flash-attn-4[cu13]' (cu12 for CUDA 12), or choose attention=cudnn"


def import_fa4():
    """FlashAttention-4's attention function, with its kernel cache on disk unless the environment
    says otherwise (on an H100 the import takes ~7 s and each new shape compiles for ~2 s on first
    use; the cache makes later runs skip the compile)."""
    os.environ.setdefault("FLASH_ATTENTION_CUTE_DSL_CACHE_ENABLED", "1")
    # flash-attn-4 4.0 warns at each kernel compile that its aux_data argument is not a JIT
    # argument: internal to the library and harmless, but it fills the job log.
    warnings.filterwarnings("ignore", message=r"Argument aux_data .* cannot be converted to a JitArgument")
    try:
        from flash_attn.cute.interface import flash_attn_func
    except ImportError as error:
        raise RuntimeError(f"attention=fa4 needs FlashAttention-4, which does not import ({error}): "
                           f"{FA4_INSTALL_HINT}") from error
    return flash_attn_func


# An opaque op for torch.compile: FA4 launches JIT-compiled kernels from Python, which dynamo
# cannot trace. It takes the hook's [B, L, H, D] layout as it is (no transposes).
@torch.library.custom_op("bindweave::fa4_attention", mutates_args=())
def fa4_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    # Callers checked the package with import_fa4() once; here it is a sys.modules lookup.
    from flash_attn.cute.interface import flash_attn_func

    out, _ = flash_attn_func(query, key, value)
    return out


@fa4_attention.register_fake
def _(query, key, value):
    return torch.empty_like(query)


@dataclass(frozen=True)
class SpeedOptions:
    """``attention``: the SDPA kernel tried first for self-attention (``default``: PyTorch's own
    order; ``fa4``: FlashAttention-4, not SDPA; ``auto``: see ``resolve_attention``); ``fuse_projections``: one GEMM for q/k/v (and for each cross-attention K/V pair);
    ``compile``: ``torch.compile`` each transformer block (one graph, reused by all 40 blocks)."""

    attention: str = "cudnn"
    fuse_projections: bool = True
    compile: bool = True

    def __post_init__(self):
        if self.attention not in ATTENTION_CHOICES:
            raise ValueError(f"attention={self.attention!r}: choose one of {', '.join(ATTENTION_CHOICES)}")


def resolve_attention(choice: str, device: torch.device) -> str:
    """``auto``: FA4 where it runs and is installed (CUDA, compute capability 9.x or 10.x, i.e.
    Hopper or datacenter Blackwell), cuDNN SDPA otherwise. Other choices are returned as they are."""
    if choice != "auto":
        return choice
    if device.type == "cuda" and torch.cuda.get_device_capability(device)[0] in (9, 10):
        try:
            import_fa4()
            return "fa4"
        except RuntimeError as error:
            log.info("attention=auto: cuDNN SDPA (%s)", error)
    return "cudnn"


class PreferredKernelAttention(AttentionHook):
    """Single-device self-attention with an SDPA kernel tried first (``SDPA_PRIORITIES``), or FA4."""

    def __init__(self, kernel: str):
        if kernel == "fa4":
            import_fa4()  # a missing package fails here, before any weight is loaded or step run
        self.kernel = kernel

    def self_attention(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
        if self.kernel == "default":
            return sdpa(query, key, value)
        if self.kernel == "fa4":
            return fa4_attention(query, key, value)
        # torch.compile records this context in the graph, so the compiled block keeps the choice.
        with sdpa_kernel(SDPA_PRIORITIES[self.kernel], set_priority=True):
            return sdpa(query, key, value)


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


def apply_speed_options(model: torch.nn.Module, options: SpeedOptions) -> torch.nn.Module:
    """Apply ``options`` to a single-device ``BindWeaveTransformer`` in place and return it.

    Multi-GPU runs install their own attention hook (``parallel/``) after this; the fused
    projections and the compiled blocks stay.
    """
    attention = resolve_attention(options.attention, next(model.parameters()).device)
    log.debug("single-device self-attention kernel: %s", attention)  # the job logs what runs under its layout
    model.set_attention_hook(PreferredKernelAttention(attention))
    if options.fuse_projections:
        fuse_projections(model)
    if options.compile:
        model.compile_repeated_blocks()  # regional compile: diffusers' API, every block in place
    return model
