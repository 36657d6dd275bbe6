"""What the stage-3 engine needs from the process layout, and the one-process answer.

The engine never imports ``parallel/``: the app hands it a coordinator. ``parallel.runtime.Runtime``
implements this protocol for torchrun/srun layouts (data, CFG and sequence parallel); with one
process, :class:`SingleProcess` is everything.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Protocol, TypeVar

from bindweave.sampling.sampler import PredictFn, VelocityFn, guided_velocity

T = TypeVar("T")
SampleT = TypeVar("SampleT")

# The layout record of one process, as a sidecar states it (the fields of parallel.layout.ParallelLayout).
ONE_PROCESS_LAYOUT = {"data": 1, "cfg": 1, "ring": 1, "ulysses": 1, "backend": "auto", "fsdp": (),
                      "fsdp_scope": "group", "decode": "single"}


class Coordinator(Protocol):
    """This rank's part in a job."""

    rank: int

    @property
    def is_writer(self) -> bool:
        """Whether this rank writes its data group's outputs (one rank per group)."""

    @property
    def data_rank(self) -> int:
        """Which data group this rank belongs to."""

    def from_rank0(self, compute: Callable[[], T]) -> T:
        """``compute`` on rank 0, its result on every rank (one plan followed everywhere)."""

    def own_samples(self, samples: Sequence[SampleT]) -> list[SampleT]:
        """This data group's share of the samples."""

    def guided_velocity(self, predict: PredictFn, guidance_scale: float) -> VelocityFn:
        """CFG over this layout (both sides here, or one side per CFG group)."""

    def layout_record(self) -> dict:
        """The layout, for sidecars."""

    def decode(self, vae, latents) -> object:
        """The job's frames from its final latents (every rank of the sample's group calls it)."""


class SingleProcess:
    """The coordinator of one process: every coordinate 0, every sample its own."""

    rank = 0
    is_writer = True
    data_rank = 0

    def from_rank0(self, compute: Callable[[], T]) -> T:
        return compute()

    def own_samples(self, samples: Sequence[SampleT]) -> list[SampleT]:
        return sorted(samples, key=lambda sample: sample.sample_id)

    def guided_velocity(self, predict: PredictFn, guidance_scale: float) -> VelocityFn:
        return guided_velocity(predict, guidance_scale)

    def layout_record(self) -> dict:
        return dict(ONE_PROCESS_LAYOUT)

    def decode(self, vae, latents):
        return vae.decode_to_frames(latents)
