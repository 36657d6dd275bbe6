"""FSDP2 sharding of the DiT (per block) and the UMT5 encoder (per block), with sharded loading.

The DiT is built on the meta device, sharded with ``fully_shard`` (dim-0 shards, torch.chunk
sizes), then every rank reads ONLY its own rows of every tensor straight from the safetensors
files (one pread per tensor, cast on the fly), so no rank ever holds a full copy, fp32 or bf16.
The checkpoint is checked against the model from the headers first, as in unsharded loading.
Fused projections are made on the meta model, before sharding, without the separate layers
(bindweave.model.speed.fuse_projections): each rank fills its rows of a fused q/k/v (or K/V)
tensor from the checkpoint's separate tensors.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import fully_shard

from bindweave.io.checkpoint import checked_index, read_stacked_rows, set_load_dtypes
from bindweave.model.loading import finish_loading, meta_bindweave_transformer
from bindweave.model.lora import LoraMerge
from bindweave.model.speed import fuse_projections


@dataclass
class ShardedReadStats:
    """What this rank read from disk (tests check that it is only its own share)."""

    bytes_read: int = 0
    tensors: int = 0


def shard_rows(rows: int, mesh: DeviceMesh) -> tuple[int, int]:
    """This rank's [start, stop) rows under FSDP2's dim-0 sharding (torch.chunk sizes; may be empty)."""
    sizes = [len(chunk) for chunk in torch.chunk(torch.empty(rows, device="meta"), mesh.size())]
    sizes += [0] * (mesh.size() - len(sizes))
    rank = mesh.get_local_rank()
    start = sum(sizes[:rank])
    return start, start + sizes[rank]


def shard_dit(model: torch.nn.Module, mesh: DeviceMesh) -> None:
    """One FSDP unit per transformer block, the rest (embedders, head) in the root unit."""
    for block in model.blocks:
        fully_shard(block, mesh=mesh, reshard_after_forward=True)
    fully_shard(model, mesh=mesh, reshard_after_forward=True)


def shard_t5(encoder: torch.nn.Module, mesh: DeviceMesh) -> None:
    """One FSDP unit per UMT5 block (``encoder.block``), embeddings and final norm in the root."""
    for block in encoder.encoder.block:
        fully_shard(block, mesh=mesh, reshard_after_forward=True)
    fully_shard(encoder, mesh=mesh, reshard_after_forward=True)


@torch.no_grad()
def load_sharded_dit(model: torch.nn.Module, folder: Path, mesh: DeviceMesh, dtype: torch.dtype,
                     device: torch.device, fuse: bool = False, lora: LoraMerge | None = None) -> ShardedReadStats:
    """Shard a meta-device DiT over ``mesh`` and fill each rank's shards from ``folder``
    (``fuse``: with fused projections, module docstring; ``lora``: merged into each rank's rows)."""
    tensors = checked_index(model, folder)
    stacked = fuse_projections(model, keep_separate=False) if fuse else {}
    set_load_dtypes(model, dtype)  # FSDP2 keeps each parameter's dtype: set before sharding (on meta: no memory)
    shard_dit(model, mesh)
    model.to_empty(device=device)

    stats = ShardedReadStats()
    for name, parameter in model.named_parameters():
        start, stop = shard_rows(parameter.shape[0], mesh)
        if stop > start:
            rows = read_stacked_rows(tensors, stacked.get(name, [name]), start, stop, deltas=lora)
            stats.bytes_read += rows.nbytes
            stats.tensors += 1
            parameter.to_local().copy_(rows.to(parameter.dtype))
    return stats


def load_sharded_bindweave(folder: Path, mesh: DeviceMesh, dtype: torch.dtype, device: torch.device,
                           fuse: bool = False, lora: LoraMerge | None = None):
    """The BindWeave DiT, FSDP-sharded over ``mesh`` and loaded rank by rank (no full copy anywhere)."""
    model = meta_bindweave_transformer(folder)
    stats = load_sharded_dit(model, folder, mesh, dtype, device, fuse, lora)
    return finish_loading(model, device), stats
