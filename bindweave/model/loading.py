"""Loading the BindWeave DiT: built on the meta device from its folder's config, then filled
strictly, tensor by tensor (bindweave.io.checkpoint), or by parallel/fsdp.py shard by shard.

The model file (transformer.py) imports no loader; this module joins the two.
"""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers.models.transformers.transformer_wan import WanRotaryPosEmbed

from bindweave.io.checkpoint import load_strict, read_config, resolve_folder
from bindweave.model.transformer import BINDWEAVE_14B_CONFIG, BindWeaveTransformer


def meta_bindweave_transformer(folder: Path):
    """The DiT of ``folder``'s config (14B defaults for a bare safetensors folder), on the meta device."""
    config = read_config(folder, BindWeaveTransformer, BINDWEAVE_14B_CONFIG)
    with torch.device("meta"):
        return BindWeaveTransformer(**config)


def finish_loading(model, device: torch.device | str):
    """Rebuild the RoPE tables (non-persistent buffers: computed from the config, never stored)."""
    config = model.config
    model.rope = WanRotaryPosEmbed(config.attention_head_dim, config.patch_size, config.rope_max_seq_len).to(device)
    return model.eval().requires_grad_(False)


def load_bindweave_transformer(
    path_or_repo_id,
    dtype: torch.dtype = torch.bfloat16,
    device: torch.device | str = "cpu",
    subfolder: str | None = None,
    revision: str | None = None,
):
    """Build the DiT on the meta device and load it strictly, tensor by tensor."""
    folder = resolve_folder(path_or_repo_id, subfolder, revision)
    model = meta_bindweave_transformer(folder)
    load_strict(model, folder, dtype, device)
    return finish_loading(model, device)
