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

    apply_speed_options(model, SpeedOptions(attention="cudnn", fuse_projections=True, compile=True))

The order is fixed: fused projections, then FP8 linears (they quantize the fused weights), then the
block offload hooks (bindweave.model.offload: memory=offload), then the attention kernel and the
sequence sharding around it, then compile (it traces the quantized layers and the chosen kernel
inside the offloaded blocks). Which kernel, and whether FP8 runs, the build plan settled before a
weight was read (bindweave/app/build.py; the kernels' registry is bindweave/model/kernels.py).
"""

import logging
import os
import warnings
from collections.abc import Callable
from dataclasses import replace

import torch
from diffusers.models.transformers.transformer_wan import WanAttention
from torch.nn.attention import SDPBackend, sdpa_kernel

from bindweave.model.attention import AttentionHook
from bindweave.model.fp8 import quantize_linears_fp8, resolve_linear_precision, torchao_problem
from bindweave.model.kernels import KERNELS, SDPA_FALLBACK_ORDER, DeviceFacts, attention_function, resolve_kernel
from bindweave.model.offload import offload_blocks
from bindweave.settings.model import SpeedOptions

log = logging.getLogger("bindweave")

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


class PreferredKernelAttention(AttentionHook):
    """Single-device self-attention through one registry kernel (bindweave.model.kernels): an SDPA
    kernel tried first with the others as fallbacks (so an input it cannot take, or a CPU tensor,
    still runs), or a kernel of its own package (FA4, SageAttention 2)."""

    def __init__(self, kernel: str):
        self.kernel = kernel
        entry = KERNELS[kernel]
        self._attend = attention_function(entry)
        self._sdpa_priority = None if entry.sdpa_first is None else [
            getattr(SDPBackend, name) for name in (entry.sdpa_first, *(other for other in SDPA_FALLBACK_ORDER
                                                                       if other != entry.sdpa_first))]

    def self_attention(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
        if self._sdpa_priority is None:
            return self._attend(query, key, value)
        # torch.compile records this context in the graph, so the compiled block keeps the choice.
        with sdpa_kernel(self._sdpa_priority, set_priority=True):
            return self._attend(query, key, value)


def resolve_speed_options(options: SpeedOptions, facts: DeviceFacts, notes: list[str]) -> SpeedOptions:
    """``options`` with the kernel and the linear precision settled for the device (``auto``
    choices: the first that runs, each one passed over appended to ``notes``); an explicit choice
    that cannot run is a RuntimeError naming the fix. The build plan calls it once
    (bindweave/app/build.py); the benchmarks of a bare DiT too."""
    kernel = resolve_kernel(options.attention, facts, notes)
    fp8 = resolve_linear_precision(options.linear_precision, facts, notes)
    return replace(options, attention=kernel, linear_precision="fp8" if fp8 else "dtype")


def probe_kernel_facts(device: torch.device) -> DeviceFacts:
    """What the kernel and FP8 choices need to know about ``device``: its capability and which
    optional packages import there (asked once; memory facts are the plan's to add)."""
    if device.type != "cuda":
        return DeviceFacts(type=device.type)
    problems = optional_package_problems()
    return DeviceFacts(type="cuda", name=torch.cuda.get_device_name(device),
                       capability=torch.cuda.get_device_capability(device),
                       packages=frozenset(name for name, problem in problems.items() if problem is None),
                       package_problems={name: problem for name, problem in problems.items() if problem})


def optional_package_problems() -> dict[str, str | None]:
    """Each optional kernel package (bindweave.model.kernels ``Kernel.package``) and torchao: None if
    it imports here, else why not with the fix. Asked once, by the plan, on CUDA machines."""
    problems = {}
    for package, load in (("flash_attn_4", import_fa4), ("sageattention", import_sage2)):
        try:
            load()
            problems[package] = None
        except RuntimeError as error:
            problems[package] = str(error)
    problems["torchao"] = torchao_problem()
    return problems


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


def apply_speed_options(model: torch.nn.Module, options: SpeedOptions, offload_to: torch.device | None = None,
                        shard_sequence: Callable[[torch.nn.Module], None] | None = None) -> torch.nn.Module:
    """Apply resolved ``options`` (a registry kernel, ``linear_precision`` dtype or fp8: the plan
    settled them, bindweave/app/build.py) to a single-device ``BindWeaveTransformer`` in place, in
    the module docstring's order, and return it. ``offload_to``: the model is on the host and
    computes there with its blocks streamed in. ``shard_sequence(model)`` (parallel/parallelize.py)
    wraps the kernel hook in the sequence-parallel one before the blocks compile. An FSDP-sharded
    DiT (parallel/fsdp.py) comes with its projections already fused; its blocks compile as they
    are, sharded.
    """
    if options.attention not in KERNELS or options.linear_precision not in ("dtype", "fp8"):
        raise ValueError(f"apply_speed_options takes resolved options (a kernel of {', '.join(KERNELS)}, "
                         f"linear_precision dtype or fp8), not {options}: the build plan resolves them")
    if options.fuse_projections:
        fuse_projections(model)
    if options.linear_precision == "fp8":
        quantize_linears_fp8(model)
    if offload_to is not None:
        offload_blocks(model, offload_to)
    model.set_attention_hook(PreferredKernelAttention(options.attention))
    if shard_sequence is not None:
        shard_sequence(model)
    if options.compile:
        # Regional compile, every block in place: what diffusers' compile_repeated_blocks does, but
        # that finds the blocks by class name, which FSDP2 changes (FSDPWanTransformerBlock).
        for block in model.blocks:
            block.compile(backend=options.compile_backend)
    return model
