"""Apply the layout to a loaded model from outside (torchtitan style), and share the samples out."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TypeVar

from parallel.runtime import Runtime
from parallel.sequence import SequenceParallelHook

SampleT = TypeVar("SampleT")


def parallelize(transformer, runtime: Runtime) -> None:
    """Route the DiT's token split/gather and self-attention through the sequence group, if it has
    more than one rank. ``transformer`` is anything with ``set_attention_hook`` (the BindWeave DiT).
    CFG parallel needs nothing from the model (see :mod:`parallel.cfg`).
    """
    if runtime.layout.sequence == 1:
        return
    if runtime.layout.backend == "xfuser":
        from parallel.xfuser_backend import XfuserUspAttention

        attention = XfuserUspAttention(runtime, transformer)
    else:
        from parallel.deepspeed_backend import DeepSpeedUlyssesAttention

        attention = DeepSpeedUlyssesAttention(runtime.sequence_group)
    transformer.set_attention_hook(SequenceParallelHook(runtime.sequence_group, attention))


def own_samples(samples: Sequence[SampleT], runtime: Runtime) -> list[SampleT]:
    """This data group's share: the samples sorted by id, strided over the data groups.

    Every rank of a data group gets the same list; no other rank opens these samples' files.
    """
    ordered = sorted(samples, key=lambda sample: sample.sample_id)
    return ordered[runtime.data_rank::runtime.layout.data]
