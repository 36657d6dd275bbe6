"""Loading the BindWeave DiT: built on the meta device from its folder's config, then filled
strictly, tensor by tensor (bindweave.io.checkpoint), into one host buffer for block offload, or by
parallel/fsdp.py shard by shard.

The model file (transformer.py) imports no loader; this module joins the two.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers.models.transformers.transformer_wan import WanRotaryPosEmbed

from bindweave.io.checkpoint import (checked_index, load_strict, read_config, read_stacked_rows, resolve_folder,
                                     set_load_dtypes)
from bindweave.model.host_buffer import HostBuffer
from bindweave.model.lora import LoraMerge
from bindweave.model.transformer import BINDWEAVE_14B_CONFIG, BindWeaveTransformer


def meta_bindweave_transformer(folder: Path):
    """The DiT of ``folder``'s config (14B defaults for a bare safetensors folder), on the meta device."""
    config = read_config(folder, BindWeaveTransformer, BINDWEAVE_14B_CONFIG)
    with torch.device("meta"):
        return BindWeaveTransformer(**config)


def parameter_shapes(folder: Path) -> dict[str, torch.Size]:
    """Every parameter's shape of ``folder``'s DiT (unfused names), from its config alone: what a
    LoRA's keys are checked and mapped against."""
    return {name: parameter.shape for name, parameter in meta_bindweave_transformer(folder).named_parameters()}


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
    lora: LoraMerge | None = None,
):
    """Build the DiT on the meta device and load it strictly, tensor by tensor (``lora``: merged
    into each tensor as it is read)."""
    folder = resolve_folder(path_or_repo_id, subfolder, revision)
    model = meta_bindweave_transformer(folder)
    load_strict(model, folder, dtype, device, lora)
    return finish_loading(model, device)


# Offsets in the host buffer: a multiple of every element size, and of a cache line.
HOST_BUFFER_ALIGNMENT = 256


@torch.no_grad()
def load_bindweave_to_host_buffer(path_or_repo_id, dtype: torch.dtype = torch.bfloat16, fuse: bool = False,
                                  pinned: bool = False, revision: str | None = None,
                                  share: Callable[[int, Callable[[torch.Tensor], None]], HostBuffer] | None = None,
                                  lora: LoraMerge | None = None):
    """The DiT on the host for block offload, every weight a view of ONE buffer filled straight
    from the files (``pinned``: page-locked, what the side stream copies from; ``fuse``: q/k/v and
    K/V fused on the meta model, filled from the separate tensors).

    The buffer is this process's own (PyTorch's page-locked allocator), or with ``share(nbytes,
    fill)`` a shared one (bindweave.model.host_buffer; parallel.runtime's fills one per machine and
    maps it in the launch's other processes there), kept as ``model.host_buffer`` (None: its own).
    ``lora`` is merged as the buffer is filled: once per machine with a shared buffer.

    Why one buffer: group offloading needs page-locked weights, and pinning them one by one holds
    the loaded copy and the pinned one at once and rounds every allocation up to a power of two
    (PyTorch's pinned allocator): 104 GiB of host RSS for the 14B DiT and the encoders (NVIDIA H200
    machine, 2026-12-01). One 31.9 GiB buffer rounds to 32 GiB, and nothing is held twice.
    """
    from bindweave.model.speed import fuse_projections

    folder = resolve_folder(path_or_repo_id, None, revision)
    model = meta_bindweave_transformer(folder)
    tensors = checked_index(model, folder)
    stacked = fuse_projections(model, keep_separate=False) if fuse else {}
    set_load_dtypes(model, dtype)
    spans, nbytes = host_buffer_spans(model)

    def fill(buffer: torch.Tensor) -> None:
        for span in spans:
            read_stacked_rows(tensors, stacked.get(span.name, [span.name]), 0, span.shape[0], out=span.view(buffer),
                              deltas=lora)

    model.host_buffer = None if share is None else share(nbytes, fill)
    if model.host_buffer is None:
        buffer = torch.empty(nbytes, dtype=torch.uint8, pin_memory=pinned)
        fill(buffer)
    else:
        if pinned:
            model.host_buffer.pin()
        buffer = model.host_buffer.tensor
    for span in spans:
        owner, _, attribute = span.name.rpartition(".")
        model.get_submodule(owner)._parameters[attribute] = torch.nn.Parameter(span.view(buffer), requires_grad=False)
    return finish_loading(model, "cpu")


@dataclass(frozen=True)
class HostSpan:
    """Where one parameter of the DiT sits in its host buffer."""

    name: str
    start: int
    dtype: torch.dtype
    shape: torch.Size

    def view(self, buffer: torch.Tensor) -> torch.Tensor:
        """This parameter's view of ``buffer`` (flat uint8)."""
        return buffer[self.start:self.start + self.dtype.itemsize * self.shape.numel()].view(self.dtype).view(self.shape)


def host_buffer_spans(model: torch.nn.Module) -> tuple[list[HostSpan], int]:
    """Where each (meta) parameter of ``model`` goes in one host buffer, at aligned offsets, in
    ``named_parameters`` order, and the buffer's size in bytes."""
    spans, start = [], 0
    for name, parameter in model.named_parameters():
        spans.append(HostSpan(name, start, parameter.dtype, parameter.shape))
        start += -(-parameter.numel() * parameter.element_size() // HOST_BUFFER_ALIGNMENT) * HOST_BUFFER_ALIGNMENT
    return spans, start
