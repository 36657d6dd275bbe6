"""FP8 linear layers for the DiT blocks: torchao's float8 dynamic-activation / float8-weight
quantization with per-row scales (one scale per weight row, one per activation token).

The weights are stored in FP8 (the DiT drops from 31.7 to ~20.3 GiB; the cross-attention K/V stay
in bf16) and each GEMM runs on the FP8 tensor cores (``torch._scaled_mm``), about twice the bf16
rate on Hopper. In compiled blocks inductor can fuse the activation quantization (absmax per token,
scale, cast) with the ops before it; the speed-up of the whole forward is measured in
docs/PERFORMANCE.md (not profiled kernel by kernel).

Which layers, and why (docs/PERFORMANCE.md has the measured errors):

- In FP8: every block's self-attention projections (q/k/v, fused or not, and the output), the
  cross-attention query and output, and the feed-forward pair: ~99 % of the linear FLOPs.
- Kept in the model's dtype: the cross-attention K/V projections (text and image), which see only
  the ~1,300 context tokens (under 1 % of the FLOPs, so nothing to win, while their error would
  reach every video token); and everything outside the blocks: patch embedding, the time, text and
  image embedders, the Qwen text projector, the modulation tables (parameters, not linears) and the
  output head, which writes the velocity directly.
"""

from __future__ import annotations

import logging
import re

import torch

from bindweave.model.kernels import DeviceFacts

log = logging.getLogger("bindweave")

# Cross-attention K/V projections (separate or fused) stay in the model's dtype (module docstring).
KEPT_IN_MODEL_DTYPE = re.compile(r"\.attn2\.(to_k|to_v|add_k_proj|add_v_proj|to_kv|to_added_kv)$")
TORCHAO_INSTALL_HINT = "pip install torchao (0.13 or newer)"


def torchao_problem() -> str | None:
    """Why torchao's FP8 quantization does not import here (None: it does)."""
    try:
        import torchao.quantization  # noqa: F401
    except ImportError as error:
        return f"torchao does not import ({error}): {TORCHAO_INSTALL_HINT}"
    return None


def fp8_support_problem(facts: DeviceFacts) -> str | None:
    """Why FP8 linears cannot run on the device (None: they can)."""
    if facts.type != "cuda":
        return f"FP8 GEMMs need a CUDA GPU and the model is on {facts.type}"
    if facts.capability is not None and facts.capability < (8, 9):
        return (f"FP8 GEMMs need compute capability 8.9 or newer (Ada, Hopper, Blackwell); "
                f"{facts.name or 'this GPU'} has {facts.capability[0]}.{facts.capability[1]}")
    if "torchao" not in facts.packages:
        return facts.package_problems.get("torchao") or f"torchao is not installed: {TORCHAO_INSTALL_HINT}"
    return None


def resolve_linear_precision(choice: str, facts: DeviceFacts, notes: list[str]) -> bool:
    """Whether the blocks' linears go FP8: ``dtype`` never; ``fp8`` always (an error where it
    cannot run); ``auto_fp8`` where it can (a fallback is appended to ``notes``)."""
    if choice == "dtype":
        return False
    problem = fp8_support_problem(facts)
    if problem is None:
        return True
    if choice == "fp8":
        raise RuntimeError(f"linear_precision=fp8: {problem}; or choose linear_precision=dtype")
    notes.append(f"linear_precision=auto_fp8: linears stay in the model's dtype ({problem})")
    return False


def fp8_candidates(model: torch.nn.Module) -> list[str]:
    """The names of the linear layers that go FP8 (module docstring). With fused projections the
    fused q/k/v layer is chosen and its separate parts (views of its weight) are not."""
    names = []
    for name, module in model.named_modules():
        if not name.startswith("blocks.") or not isinstance(module, torch.nn.Linear) or KEPT_IN_MODEL_DTYPE.search(name):
            continue
        attention_name, _, layer = name.rpartition(".")
        attention = model.get_submodule(attention_name)
        fused = getattr(attention, "fused_projections", False)
        if layer in ("to_q", "to_k", "to_v") and fused and not attention.is_cross_attention:
            continue
        if layer == "to_qkv" and not fused:
            continue
        names.append(name)
    return names


@torch.no_grad()
def quantize_linears_fp8(model: torch.nn.Module) -> list[str]:
    """Quantize :func:`fp8_candidates` in place with torchao; returns their names."""
    from torchao.quantization import Float8DynamicActivationFloat8WeightConfig, PerRow, quantize_

    chosen = set(fp8_candidates(model))
    quantize_(model, Float8DynamicActivationFloat8WeightConfig(granularity=PerRow()),
              filter_fn=lambda module, name: name in chosen)
    # A fused layer's separate parts still point at its old full-precision weight; they only exist
    # so that the checkpoint's names load. Releasing them frees that weight (a stray use fails loudly).
    for attention in model.modules():
        if getattr(attention, "fused_projections", False) and hasattr(attention, "to_qkv"):
            for part in (attention.to_q, attention.to_k, attention.to_v):
                part.register_parameter("weight", None)
                part.register_parameter("bias", None)
    log.info("FP8 linears: %d layers (%s)", len(chosen), ", ".join(layer_patterns(sorted(chosen))))
    return sorted(chosen)


def fp8_layer_names(model: torch.nn.Module) -> list[str]:
    """The linear layers whose weight is stored in FP8 now (torchao's tensor subclass reports the
    original dtype; its ``qdata`` holds the FP8 values)."""
    return [name for name, module in model.named_modules()
            if isinstance(module, torch.nn.Linear) and module.weight is not None
            and getattr(module.weight, "qdata", module.weight).dtype in (torch.float8_e4m3fn, torch.float8_e5m2)]


def layer_patterns(names: list[str]) -> list[str]:
    """``blocks.0.ffn.net.2`` ... ``blocks.39.ffn.net.2`` -> ``blocks.*.ffn.net.2`` (logs, sidecars)."""
    return sorted({re.sub(r"^blocks\.\d+\.", "blocks.*.", name) for name in names})
