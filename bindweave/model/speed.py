"""Speed options for the BindWeave DiT on one device; the computed function stays the same.

At 720P one forward is ~8.95 PFLOP, 74 % of it self-attention over 90,000 tokens, so the kernel
that runs it decides most of the time (cuDNN's SDPA is ~1.6x PyTorch's flash kernel on an H100;
PyTorch 2.11 already prefers it there, other versions and GPUs may not). The rest is linear
layers, which cuBLAS runs near the matmul rate, and element-wise work on [90,000 x 5120]
activations (norms and modulation in fp32 as diffusers/Wan do them, RoPE in float64 as diffusers
does): each eager op is a separate pass over 1-4 GB, and regional ``torch.compile`` fuses each
chain into one pass without changing what is computed. ``attention="fa4"`` goes further on Hopper
and Blackwell: FlashAttention-4 (the ``flash-attn-4`` package: CuTe-DSL kernels compiled on first
use, cached on disk) runs self-attention instead of an SDPA kernel. The fast modes change the
computed function within a measured error: ``attention="sage2"`` (SageAttention 2: INT8 QK, FP8 PV)
and FP8 linear layers (bindweave.model.fp8). docs/PERFORMANCE.md has the measurements.

    apply_speed_options(model, SpeedOptions())   # cuDNN self-attention, fused QKV, compiled blocks

The order is fixed: fused projections, then FP8 linears (they quantize the fused weights), then the
attention hook, then the block offload hooks (bindweave.model.offload: memory=offload), then
compile (it traces the quantized layers and the chosen kernel inside the offloaded blocks).
"""

import logging
import os
import warnings
from dataclasses import replace

import torch
from diffusers.models.transformers.transformer_wan import WanAttention
from torch.nn.attention import SDPBackend, sdpa_kernel

from bindweave.model.attention import AttentionHook, sdpa
from bindweave.errors import BindWeaveInputError
from bindweave.model.fp8 import note, quantize_linears_fp8, resolve_linear_precision
from bindweave.settings.model import SDPA_KERNELS, SpeedOptions
from bindweave.model.offload import offload_blocks

log = logging.getLogger("bindweave")

# Each name (bindweave.settings.model.SDPA_KERNELS) puts its kernel first and keeps the others as
# fallbacks, in this order, so an input the preferred kernel cannot take (or a CPU tensor) still runs.
SDPA_FALLBACK_ORDER = (SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION,
                       SDPBackend.MATH)
SDPA_PRIORITIES = {name: [first, *(backend for backend in SDPA_FALLBACK_ORDER if backend != first)]
                   for name, first in zip(SDPA_KERNELS, SDPA_FALLBACK_ORDER)}
# The kernels that are not SDPA run on CUDA GPUs only, from their own packages.
CUDA_ONLY_KERNELS = ("fa4", "sage2")
FA4_INSTALL_HINT = "pip install 'flash-attn-4[cu13]' (cu12 for CUDA 12), or choose attention=cudnn"
SAGE2_INSTALL_HINT = ("SageAttention 2 is built from source: git clone https://github.com/thu-ml/SageAttention && "
                      "cd SageAttention && TORCH_CUDA_ARCH_LIST=9.0 pip install --no-build-isolation . (9.0: Hopper; "
                      "8.0/8.6/8.9/12.0 for other GPUs; ~3 min; docs/PERFORMANCE.md), or choose attention=auto")


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


def import_sage2():
    """SageAttention 2's ``sageattn`` (it picks its kernel for the GPU: on Hopper INT8 Q.K^T and FP8
    P.V with fp32 accumulation)."""
    try:
        from sageattention import sageattn
    except ImportError as error:
        raise RuntimeError(f"attention=sage2 needs SageAttention 2, which does not import ({error}): "
                           f"{SAGE2_INSTALL_HINT}") from error
    return sageattn


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


# The same for SageAttention's CUDA kernels; it also takes the [B, L, H, D] ("NHD") layout.
@torch.library.custom_op("bindweave::sage2_attention", mutates_args=())
def sage2_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    from sageattention import sageattn

    return sageattn(query, key, value, tensor_layout="NHD", is_causal=False)


@sage2_attention.register_fake
def _(query, key, value):
    return torch.empty_like(query)


def resolve_attention(choice: str, device: torch.device, notes: list[str] | None = None) -> str:
    """``auto``: FA4 where it runs and is installed (CUDA, compute capability 9.x or 10.x, i.e.
    Hopper or datacenter Blackwell), cuDNN SDPA otherwise. ``auto_8bit``: SageAttention 2 where it
    runs and is installed (CUDA, compute capability 8.0 or newer), else what ``auto`` picks. Other
    choices are returned as they are (FA4 and sage2 need a CUDA device: an error otherwise).
    Each fallback is logged, or added to ``notes`` when given."""
    if choice in CUDA_ONLY_KERNELS and device.type != "cuda":
        raise RuntimeError(f"attention={choice} runs on CUDA GPUs only and the model is on {device}: "
                           "choose attention=auto (or a speed preset: it falls back where a kernel cannot run)")
    if choice == "auto_8bit":
        if device.type == "cuda" and torch.cuda.get_device_capability(device) >= (8, 0):
            try:
                import_sage2()
                return "sage2"
            except RuntimeError as error:
                note(notes, f"attention=auto_8bit: not SageAttention 2 ({error})")
        else:
            note(notes, f"attention=auto_8bit: SageAttention 2 needs a CUDA GPU of compute capability 8.0+; "
                        f"falling back to attention=auto on {device}")
        choice = "auto"
    if choice != "auto":
        return choice
    if device.type == "cuda" and torch.cuda.get_device_capability(device)[0] in (9, 10):
        try:
            import_fa4()
            return "fa4"
        except RuntimeError as error:
            note(notes, f"attention=auto: cuDNN SDPA ({error})")
    return "cudnn"


def resolve_speed_options(options: SpeedOptions, device: torch.device,
                          notes: list[str] | None = None) -> SpeedOptions:
    """``options`` with the ``auto`` choices settled for ``device`` (and the packages installed);
    an explicit choice that cannot run here is a RuntimeError that names the fix."""
    attention = resolve_attention(options.attention, device, notes)
    if attention == "fa4":
        import_fa4()
    if attention == "sage2":
        import_sage2()
    use_fp8 = resolve_linear_precision(options.linear_precision, device, notes)
    return replace(options, attention=attention, linear_precision="fp8" if use_fp8 else "dtype")


def check_speed_support(options: SpeedOptions, device: torch.device) -> None:
    """Before any weight is read: the chosen kernel and FP8 can run on ``device``."""
    try:
        resolve_speed_options(options, device, notes=[])
    except RuntimeError as error:
        raise BindWeaveInputError(f"model: {error}") from error


class PreferredKernelAttention(AttentionHook):
    """Single-device self-attention with an SDPA kernel tried first (``SDPA_PRIORITIES``), or FA4,
    or SageAttention 2."""

    def __init__(self, kernel: str):
        if kernel == "fa4":
            import_fa4()  # a missing package fails here, before any weight is loaded or step run
        if kernel == "sage2":
            import_sage2()
        self.kernel = kernel

    def self_attention(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
        if self.kernel == "default":
            return sdpa(query, key, value)
        if self.kernel == "fa4":
            return fa4_attention(query, key, value)
        if self.kernel == "sage2":
            return sage2_attention(query, key, value)
        # torch.compile records this context in the graph, so the compiled block keeps the choice.
        with sdpa_kernel(SDPA_PRIORITIES[self.kernel], set_priority=True):
            return sdpa(query, key, value)


def projection_groups(attn: WanAttention) -> list[tuple[str, tuple[str, ...]]]:
    """Each layer diffusers' ``fuse_projections`` makes, with the separate layers it stacks by rows."""
    groups = [("to_qkv", ("to_q", "to_k", "to_v"))] if not attn.is_cross_attention else [("to_kv", ("to_k", "to_v"))]
    if attn.added_kv_proj_dim is not None:
        groups.append(("to_added_kv", ("add_k_proj", "add_v_proj")))
    return groups


@torch.no_grad()
def fuse_projections(model: torch.nn.Module, keep_separate: bool = True) -> dict[str, list[str]]:
    """diffusers' ``fuse_projections`` on every attention, with the weights held once.

    diffusers concatenates q/k/v (and each cross-attention K/V pair) into new tensors and keeps
    the separate ones: 14.7 GB more for the 14B DiT. Here the separate layers are re-pointed at
    slices of the fused weights, so every parameter name still loads and nothing is stored twice.
    ``keep_separate=False`` removes them instead: FSDP2 shards each parameter on its own, so a slice
    cannot stay a view of its fused tensor (parallel/fsdp.py fuses the meta model this way and fills
    each fused parameter from its parts' rows). Returns, for each new fused parameter, the
    parameters it stacks.
    """
    stacked = {}
    for attn_name, attn in model.named_modules():
        if not isinstance(attn, WanAttention) or getattr(attn, "fused_projections", False):
            continue
        attn.fuse_projections()
        for fused_name, part_names in projection_groups(attn):
            fused = getattr(attn, fused_name)
            rows = 0
            for part_name in part_names:
                part = getattr(attn, part_name)
                size = part.out_features
                if keep_separate:
                    part.weight = torch.nn.Parameter(fused.weight[rows:rows + size], requires_grad=False)
                    part.bias = torch.nn.Parameter(fused.bias[rows:rows + size], requires_grad=False)
                else:
                    delattr(attn, part_name)
                rows += size
            for tensor in ("weight", "bias"):
                stacked[f"{attn_name}.{fused_name}.{tensor}"] = [f"{attn_name}.{part}.{tensor}" for part in part_names]
    return stacked


def apply_speed_options(model: torch.nn.Module, options: SpeedOptions,
                        offload_to: torch.device | None = None) -> torch.nn.Module:
    """Apply ``options`` to a single-device ``BindWeaveTransformer`` in place, in the module
    docstring's order, and return it (``fp8.fp8_layer_names`` lists the layers in FP8).
    ``offload_to``: the model is on the host and computes there with its blocks streamed in.
    An FSDP-sharded DiT (parallel/fsdp.py) comes with its projections already fused; its blocks
    compile as they are, sharded.

    Multi-GPU runs install their own attention hook (``parallel/``) after this; the fused
    projections, the FP8 layers and the compiled blocks stay.
    """
    compute_device = offload_to or next(model.parameters()).device
    options = resolve_speed_options(options, compute_device)  # fails before the work
    log.debug("single-device self-attention kernel: %s", options.attention)  # the job logs what runs under its layout
    if options.fuse_projections:
        fuse_projections(model)
    if options.linear_precision == "fp8":
        quantize_linears_fp8(model)
    model.set_attention_hook(PreferredKernelAttention(options.attention))
    if offload_to is not None:
        offload_blocks(model, offload_to)
    if options.compile:
        # Regional compile, every block in place: what diffusers' compile_repeated_blocks does, but
        # that finds the blocks by class name, which FSDP2 changes (FSDPWanTransformerBlock).
        for block in model.blocks:
            block.compile(backend=options.compile_backend)
    return model
