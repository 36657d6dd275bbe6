"""Sequence parallel from outside the model: one sample's tokens shared by the ranks of a sequence group.

The DiT calls its :class:`~bindweave.model.attention.AttentionHook` three times per forward; this hook
splits the patchified tokens (and the RoPE tables the same way) after patchify, runs every
self-attention through a sequence-parallel backend over the whole sequence, and all-gathers the
tokens before unpatchify. Cross-attention stays local: every rank holds the whole context.

Token counts need not divide the group size: the sequence is zero-padded at its end to a multiple
of it, the backend excludes the padded KEYS (padded queries only produce rows that the gather
drops), so N ranks give the 1-rank result for any resolution. Everything else in a block acts on
each token alone and never mixes padding into real tokens.
"""

from __future__ import annotations

from typing import Protocol

import torch
import torch.distributed as dist

from bindweave.model.attention import AttentionHook


class SequenceAttention(Protocol):
    """Self-attention over a sequence split across a group.

    ``query``/``key``/``value``: this rank's ``[B, n, H, D]`` share of the padded sequence
    ``[B, n * group_size, H, D]`` -> ``[B, n, H, D]``. Keys at global positions
    ``>= valid_length`` are padding and must not be attended.
    """

    def __call__(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                 valid_length: int) -> torch.Tensor: ...


class SequenceParallelHook(AttentionHook):
    """Split / attend / gather over ``sequence_group``; rank r holds the r-th chunk of the padded sequence."""

    def __init__(self, sequence_group: dist.ProcessGroup, attention: SequenceAttention):
        self.sequence_group = sequence_group
        self.group_size = dist.get_world_size(sequence_group)
        self.group_rank = dist.get_rank(sequence_group)
        self.attention = attention
        self.num_tokens: int | None = None  # the true token count of the forward in flight

    def chunk_length(self) -> int:
        return -(-self.num_tokens // self.group_size)

    def split_tokens(self, tokens: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor]):
        """tokens ``[B, N, C]``, rope cos/sin ``[1, N, 1, D]`` -> this rank's ``[B, n, C]``, ``[1, n, 1, D]``."""
        self.num_tokens = tokens.shape[1]
        return self._own_chunk(tokens), tuple(self._own_chunk(table) for table in rope)

    def _own_chunk(self, sequence: torch.Tensor) -> torch.Tensor:
        """This rank's chunk along dim 1, zero-padded at the end where the sequence runs out."""
        length = self.chunk_length()
        chunk = sequence[:, self.group_rank * length:(self.group_rank + 1) * length]
        missing = length - chunk.shape[1]
        if missing:
            chunk = torch.cat([chunk, chunk.new_zeros(chunk.shape[0], missing, *chunk.shape[2:])], dim=1)
        return chunk

    def self_attention(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
        return self.attention(query, key, value, valid_length=self.num_tokens)

    def gather_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        """``[B, n, C_out]`` on every rank -> the whole ``[B, N, C_out]`` (padding dropped) on every rank."""
        chunks = [torch.empty_like(tokens) for _ in range(self.group_size)]
        dist.all_gather(chunks, tokens.contiguous(), group=self.sequence_group)
        return torch.cat(chunks, dim=1)[:, :self.num_tokens]
