"""Loading the BindWeave DiT: built on the meta device from its folder's config, then filled
strictly, tensor by tensor (bindweave.io.checkpoint), into one host buffer for block offload, or by
parallel/fsdp.py shard by shard.

The model file (transformer.py) imports no loader; this module joins the two.
"""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers.models.transformers.transformer_wan import WanRotaryPosEmbed

from bindweave.io.checkpoint import (checked_index, load_strict, read_config, read_stacked_rows, resolve_folder,
                                     set_load_dtypes)
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


# Offsets in the host buffer: a multiple of every element size, and of a cache line.
HOST_BUFFER_ALIGNMENT = 256


@torch.no_grad()
def load_bindweave_to_host_buffer(path_or_repo_id, dtype: torch.dtype = torch.bfloat16, fuse: bool = False,
                                  pinned: bool = False, revision: str | None = None):
    """The DiT on the host for block offload, every weight a view of ONE buffer filled straight
    from the files (``pinned``: page-locked, what the side stream copies from; ``fuse``: q/k/v and
    K/V fused on the meta model, filled from the separate tensors).

    Why one buffer: group offloading needs page-locked weights, and pinning them one by one holds
    the loaded copy and the pinned one at once and rounds every allocation up to a power of two
    (PyTorch's pinned allocator): 104 GiB of host RSS for the 14B DiT and the encoders (NVIDIA H200
    machine, 2026-12-01). One 31.7 GiB buffer rounds to 32 GiB, and nothing is held twice.
    """
    from bindweave.model.speed import fuse_projections

    folder = resolve_folder(path_or_repo_id, None, revision)
    model = meta_bindweave_transformer(folder)
    tensors = checked_index(model, folder)
    stacked = fuse_projections(model, keep_separate=False) if fuse else {}
    set_load_dtypes(model, dtype)
    place_in_one_host_buffer(model, pinned)
    for name, parameter in model.named_parameters():
        read_stacked_rows(tensors, stacked.get(name, [name]), 0, parameter.shape[0], out=parameter.data)
    return finish_loading(model, "cpu")


def place_in_one_host_buffer(model: torch.nn.Module, pinned: bool) -> None:
    """Replace every (meta) parameter of ``model`` by an uninitialised view of one host buffer."""
    parameters = [(module, name, parameter) for module in model.modules()
                  for name, parameter in module.named_parameters(recurse=False)]
    nbytes = [parameter.numel() * parameter.element_size() for _, _, parameter in parameters]
    starts = [0]
    for size in nbytes:
        starts.append(starts[-1] + -(-size // HOST_BUFFER_ALIGNMENT) * HOST_BUFFER_ALIGNMENT)
    buffer = torch.empty(starts[-1], dtype=torch.uint8, pin_memory=pinned)
    for (module, name, parameter), start, size in zip(parameters, starts, nbytes):
        view = buffer[start:start + size].view(parameter.dtype).view(parameter.shape)
        module._parameters[name] = torch.nn.Parameter(view, requires_grad=False)

