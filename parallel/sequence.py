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


def rank_chunk(sequence: torch.Tensor, rank: int, group_size: int) -> torch.Tensor:
    """Rank ``rank``'s chunk (``ceil(N / group_size)`` long) of ``sequence`` along dim 1, zero-padded
    at the end where the sequence runs out."""
    length = -(-sequence.shape[1] // group_size)
    chunk = sequence[:, rank * length:(rank + 1) * length]
    missing = length - chunk.shape[1]
    if missing:
        chunk = torch.cat([chunk, chunk.new_zeros(chunk.shape[0], missing, *chunk.shape[2:])], dim=1)
    return chunk


class SequenceParallelHook(AttentionHook):
    """Split / attend / gather over ``sequence_group``; rank r holds the r-th chunk of the padded sequence."""

    def __init__(self, sequence_group: dist.ProcessGroup, attention: SequenceAttention):
        self.sequence_group = sequence_group
        self.group_size = dist.get_world_size(sequence_group)
        self.group_rank = dist.get_rank(sequence_group)
        self.attention = attention
        self.num_tokens: int | None = None  # the true token count of the forward in flight

    def split_tokens(self, tokens: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor]):
        """tokens ``[B, N, C]``, rope cos/sin ``[1, N, 1, D]`` -> this rank's ``[B, n, C]``, ``[1, n, 1, D]``."""
        self.num_tokens = tokens.shape[1]
        return (rank_chunk(tokens, self.group_rank, self.group_size),
                tuple(rank_chunk(table, self.group_rank, self.group_size) for table in rope))

    def self_attention(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
        return self.attention(query, key, value, valid_length=self.num_tokens)

    def gather_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        """``[B, n, C_out]`` on every rank -> the whole ``[B, N, C_out]`` (padding dropped) on every rank."""
        chunks = [torch.empty_like(tokens) for _ in range(self.group_size)]
        dist.all_gather(chunks, tokens.contiguous(), group=self.sequence_group)
        return torch.cat(chunks, dim=1)[:, :self.num_tokens]


def ulysses_bytes_per_rank(num_tokens: int, heads: int, head_dim: int, layers: int, degree: int,
                           element_size: int, head_out_channels: int, batch: int = 1) -> int:
    """Bytes one rank of a Ulysses group of ``degree`` ranks sends to the others in one DiT forward.

    Each rank holds ``n = ceil(num_tokens / degree)`` tokens (padding included). Per block, four
    all-to-alls (q, k and v before the attention, its output after) each move a ``[B, n, H, D]``
    tensor of which ``(degree - 1) / degree`` (what the other ranks own) leaves the rank; after the head,
    the all-gather sends the rank's ``[B, n, head_out_channels]`` tokens to each of the other ranks.
    This is also the per-rank volume NCCL's bus bandwidth is quoted against (nccl-tests' ``busbw``),
    so bytes / busbw is the time of these collectives.
    """
    chunk = batch * -(-num_tokens // degree)
    all_to_alls = 4 * layers * chunk * (heads // degree) * head_dim * (degree - 1)  # Ulysses: degree divides heads
    gather = chunk * head_out_channels * (degree - 1)
    return (all_to_alls + gather) * element_size
