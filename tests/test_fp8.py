"""FP8 linear layers (bindweave/model/fp8.py) on the CPU: which layers are chosen, and where FP8
cannot run the explicit choice is a clear error while ``auto_fp8`` falls back. The numbers (torchao
on an FP8 GPU) are in tests/test_speed_gpu.py."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from bindweave.model.kernels import DeviceFacts
from bindweave.model.fp8 import fp8_candidates, fp8_layer_names, layer_patterns, resolve_linear_precision
from bindweave.model.speed import fuse_projections
from bindweave.model.transformer import TINY_CONFIG, BindWeaveTransformer

SELF_ATTENTION = ["attn1.to_out.0"]
IN_FP8 = ["attn2.to_q", "attn2.to_out.0", "ffn.net.0.proj", "ffn.net.2"]


def tiny_model() -> BindWeaveTransformer:
    torch.manual_seed(0)
    return BindWeaveTransformer(**TINY_CONFIG)


def test_the_blocks_big_linears_are_chosen_and_nothing_else():
    model = tiny_model()
    chosen = fp8_candidates(model)
    expected = [f"blocks.*.{name}" for name in ["attn1.to_q", "attn1.to_k", "attn1.to_v", *SELF_ATTENTION, *IN_FP8]]
    assert layer_patterns(chosen) == sorted(expected)
    assert len(chosen) == len(expected) * TINY_CONFIG["num_layers"]
    # Kept in the model's dtype: cross-attention K/V (text and image) and everything outside the blocks.
    all_linears = {name for name, module in model.named_modules() if isinstance(module, torch.nn.Linear)}
    kept = layer_patterns(sorted(all_linears - set(chosen)))
    assert {"blocks.*.attn2.to_k", "blocks.*.attn2.to_v", "blocks.*.attn2.add_k_proj", "blocks.*.attn2.add_v_proj",
            "proj_out", "condition_embedder.text_projector.linear_1"} <= set(kept)
    assert not any(name.startswith("blocks.") for name in kept if "attn2" not in name)


def test_with_fused_projections_the_fused_layer_is_chosen_not_its_parts():
    model = tiny_model()
    fuse_projections(model)
    patterns = layer_patterns(fp8_candidates(model))
    assert "blocks.*.attn1.to_qkv" in patterns
    assert not {"blocks.*.attn1.to_q", "blocks.*.attn1.to_k", "blocks.*.attn1.to_v"} & set(patterns)
    assert "blocks.*.attn2.to_kv" not in patterns and "blocks.*.attn2.to_added_kv" not in patterns
    assert "blocks.*.attn2.to_q" in patterns  # cross-attention's query is never fused
    assert fp8_layer_names(model) == []  # nothing quantized yet


def test_fp8_where_it_cannot_run_is_an_error_and_auto_falls_back():
    with pytest.raises(RuntimeError, match="linear_precision=fp8: FP8 GEMMs need a CUDA GPU and the model is on cpu; "
                                           "or choose linear_precision=dtype"):
        resolve_linear_precision("fp8", DeviceFacts(type="cpu"), [])
    notes = []
    assert resolve_linear_precision("auto_fp8", DeviceFacts(type="cpu"), notes) is False
    assert notes == ["linear_precision=auto_fp8: linears stay in the model's dtype (FP8 GEMMs need a CUDA GPU and "
                     "the model is on cpu)"]
    assert resolve_linear_precision("dtype", DeviceFacts(type="cpu"), []) is False
    ada = DeviceFacts(type="cuda", name="RTX 3090", capability=(8, 6), packages=frozenset({"torchao"}))
    with pytest.raises(RuntimeError, match="compute capability 8.9 or newer .* RTX 3090 has 8.6"):
        resolve_linear_precision("fp8", ada, [])
    assert resolve_linear_precision("fp8", replace(ada, capability=(9, 0)), [])
    assert not resolve_linear_precision("auto_fp8", replace(ada, capability=(9, 0), packages=frozenset()), notes)
