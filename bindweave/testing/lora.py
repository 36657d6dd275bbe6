"""Random LoRAs in the layout of LightX2V's Wan2.1-I2V step-distill LoRA, for tests and measurements.

That file (``Wan21_I2V_14B_lightx2v_cfg_step_distill_lora_rank64``) names the DiT by original Wan
keys: a low-rank pair and a bias delta on every attention projection (the image K/V too) and FFN
linear of every block, full deltas on the blocks' norms, and a modulation delta per block
(``blocks.N.diff_m``). Its values are not public here, so these are random, small enough that the
merged DiT still computes something near the base model.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors.torch import save_file

from bindweave.model.lora import diffusers_name

PAIRS = ("self_attn.q", "self_attn.k", "self_attn.v", "self_attn.o", "cross_attn.q", "cross_attn.k",
         "cross_attn.v", "cross_attn.o", "cross_attn.k_img", "cross_attn.v_img", "ffn.0", "ffn.2")
NORMS = ("self_attn.norm_q", "self_attn.norm_k", "cross_attn.norm_q", "cross_attn.norm_k", "cross_attn.norm_k_img",
         "norm3")


def write_lightx2v_style_lora(path: Path, parameter_shapes: Mapping[str, torch.Size], rank: int = 64, seed: int = 0,
                              dtype: torch.dtype = torch.bfloat16) -> dict[str, torch.Size]:
    """Write a random LoRA for the DiT of ``parameter_shapes`` (the meta model's) to ``path``; returns
    the shape of each parameter it changes (diffusers' names)."""
    generator = torch.Generator().manual_seed(seed)
    blocks = sorted({int(name.split(".")[1]) for name in parameter_shapes if name.startswith("blocks.")})
    tensors, changed = {}, {}

    def add(key: str, shape, scale: float) -> None:
        tensors[f"diffusion_model.{key}"] = (torch.randn(shape, generator=generator) * scale).to(dtype)

    for block in blocks:
        for module in PAIRS:
            target = diffusers_name(f"blocks.{block}.{module}.weight")
            out_features, in_features = parameter_shapes[target]
            add(f"blocks.{block}.{module}.lora_down.weight", (rank, in_features), in_features ** -0.5)
            add(f"blocks.{block}.{module}.lora_up.weight", (out_features, rank), 1e-2 * rank ** -0.5)
            add(f"blocks.{block}.{module}.diff_b", (out_features,), 1e-3)
            changed[target] = parameter_shapes[target]
            changed[target.replace(".weight", ".bias")] = parameter_shapes[target.replace(".weight", ".bias")]
        for norm in NORMS:
            for ending, leaf in (("diff", "weight"), ("diff_b", "bias")):
                target = diffusers_name(f"blocks.{block}.{norm}.{leaf}")
                if target in parameter_shapes:  # the RMS norms have no bias
                    add(f"blocks.{block}.{norm}.{ending}", parameter_shapes[target], 1e-3)
                    changed[target] = parameter_shapes[target]
        target = diffusers_name(f"blocks.{block}.modulation")
        add(f"blocks.{block}.diff_m", parameter_shapes[target], 1e-3)
        changed[target] = parameter_shapes[target]
    save_file(tensors, path)
    return changed
