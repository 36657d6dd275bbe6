"""Ulysses attention through deepspeed's ``DistributedAttention``: CUDA (NCCL) or CPU (gloo).

An all-to-all turns this rank's ``[B, n, H, D]`` (a chunk of the sequence, all heads) into
``[B, n * p, H / p, D]`` (the whole padded sequence, its own heads); attention runs locally over
the valid keys only; a second all-to-all turns the result back. Ulysses only (no ring).
"""

from __future__ import annotations

import functools
from typing import Callable

import torch
import torch.distributed as dist

from bindweave.model.attention import sdpa

# Attention on [B, L, H, D] tensors, no mask.
LocalKernel = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]

# deepspeed's communication layer JIT-compiles a shared-memory all-reduce op the first time it
# starts (30 s to 2 min on a fresh machine). Ulysses only uses all-to-all, which never touches it.
SHARED_MEMORY_OP = "deepspeed_shm_comm"


def attention_over_valid_keys(kernel: LocalKernel, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                              valid_length: int) -> torch.Tensor:
    """``[B, L, h, D]`` over the whole padded sequence with the chosen kernel; keys from
    ``valid_length`` on are padding.

    The padding sits at the end, so dropping those keys is exactly masking them, and keeps the
    fast unmasked kernels.
    """
    return kernel(query, key[:, :valid_length], value[:, :valid_length])


def _start_deepspeed_comm() -> None:
    import deepspeed
    import deepspeed.ops

    # deepspeed.ops documents its probe results as one dict that edits persist in.
    deepspeed.ops.__compatible_ops__[SHARED_MEMORY_OP] = False
    deepspeed.init_distributed(dist_backend=dist.get_backend(), verbose=False)


class DeepSpeedUlyssesAttention:
    """:class:`~parallel.sequence.SequenceAttention` over ``sequence_group`` (heads must divide its size).

    ``local_kernel`` runs the rank-local attention (its heads over the whole sequence): the kernel
    chosen for the model (``bindweave.model.speed``), so sharding and kernel stay two separate choices.
    """

    def __init__(self, sequence_group: dist.ProcessGroup, local_kernel: LocalKernel = sdpa):
        _start_deepspeed_comm()
        from deepspeed.sequence.layer import DistributedAttention

        # [B, L, H, D]: scatter the heads (dim 2), gather the sequence (dim 1).
        self.distributed = DistributedAttention(functools.partial(attention_over_valid_keys, local_kernel),
                                                sequence_group, scatter_idx=2, gather_idx=1)

    def __call__(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                 valid_length: int) -> torch.Tensor:
        return self.distributed(query, key, value, 0, valid_length=valid_length)  # 0: the batch dim
