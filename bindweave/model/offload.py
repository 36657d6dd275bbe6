"""The DiT's blocks on the host, streamed to the GPU ahead of use: diffusers' group offloading at
block level (one block per group; on CUDA a side stream prefetches the next block while the
current one computes, from pinned host memory). The small modules outside the blocks (embedders,
patch embedding, head) form one more group. Which jobs use it: bindweave.stages.memory. The job
loads the DiT into one page-locked host buffer first (bindweave.model.loading), which the hooks
stream from as it is (a pinned tensor is not copied again)."""

from __future__ import annotations

import torch

GROUP_OFFLOAD_HOOK = "group_offloading"  # diffusers' hook name (diffusers.hooks.group_offloading)


def offload_blocks(model, device: torch.device) -> None:
    """``model`` (on the host) computes on ``device`` with its blocks streamed in one at a time."""
    streamed = device.type == "cuda"
    model.enable_group_offload(onload_device=device, offload_device=torch.device("cpu"), offload_type="block_level",
                               num_blocks_per_group=1, use_stream=streamed, record_stream=streamed,
                               non_blocking=streamed)


def offloaded_blocks(model) -> list[int]:
    """The indices of the blocks that carry a group-offloading hook."""
    from diffusers.hooks import HookRegistry

    found = []
    for index, block in enumerate(model.blocks):
        registry = getattr(block, "_diffusers_hook", None)
        if isinstance(registry, HookRegistry) and registry.get_hook(GROUP_OFFLOAD_HOOK) is not None:
            found.append(index)
    return found

