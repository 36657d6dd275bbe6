"""One stage-3 job: an in-memory request (prompt, reference images and hidden states as files or
tensors, seed, size, steps, guidance, output target), where it is (:class:`JobProgress`), and how
it stops early (:class:`JobCancelled`)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image

from bindweave.io.inputs import Sample, as_hidden_states, load_reference_image, load_sample_hidden_states, to_rgb
from bindweave.settings.model import VideoSettings
from bindweave.settings.sampling import CacheSettings, SamplerSettings
from bindweave.stages.resume import bytes_sha256, file_sha256


@dataclass(frozen=True)
class Stage3Job:
    """One video to make: an in-memory request. ``sample`` names it and carries the prompt, the
    reference image paths, the hidden-state paths and the sample's own seed (a meta JSON entry, or
    one built by :meth:`from_request`); ``images`` / ``hidden_states`` given here replace the files.
    ``output_path``: the MP4 (its sidecar beside it); None: nothing is written, the frames are returned."""

    sample: Sample
    video: VideoSettings
    sampler: SamplerSettings
    output_path: Path | None
    images: tuple[Image.Image, ...] | None = None
    hidden_states: tuple[torch.Tensor, torch.Tensor] | None = None  # positive, negative: [1, L, mllm_dim]
    cache: CacheSettings = CacheSettings()  # step caching (bindweave.sampling.step_cache); off by default

    @classmethod
    def from_request(cls, sample_id: str, prompt: str, video: VideoSettings, sampler: SamplerSettings,
                     output_path: Path | None, images: list = (), hidden_states: tuple | None = None,
                     seed: int | None = None, cache: CacheSettings = CacheSettings()) -> Stage3Job:
        """A job from values: ``images`` are paths or PIL images (all of one kind); ``hidden_states``
        a (positive, negative) pair of paths or of tensors."""
        in_memory_images = bool(images) and not isinstance(images[0], (str, Path))
        in_memory_states = hidden_states is not None and isinstance(hidden_states[0], torch.Tensor)
        sample = Sample(
            sample_id=sample_id, prompt=prompt,
            image_paths=() if in_memory_images else tuple(Path(p) for p in images),
            hidden_states_path=None if in_memory_states or hidden_states is None else Path(hidden_states[0]),
            hidden_states_path_negative=None if in_memory_states or hidden_states is None else Path(hidden_states[1]),
            seed=seed, fields={})
        return cls(sample, video, sampler, output_path, images=tuple(images) if in_memory_images else None,
                   hidden_states=tuple(hidden_states) if in_memory_states else None, cache=cache)

    @property
    def sample_id(self) -> str:
        return self.sample.sample_id

    def input_hashes(self) -> dict[str, list[str]]:
        """sha256 of each reference image and hidden-states input (files, or in-memory content):
        what resume compares (bindweave.stages.resume)."""
        if self.images is not None:
            images = [bytes_sha256(to_rgb(image).tobytes()) for image in self.images]
        else:
            images = [file_sha256(path) for path in self.sample.image_paths]
        if self.hidden_states is not None:
            states = [bytes_sha256(state.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
                      for state in self.hidden_states]
        else:
            states = [file_sha256(path) for path in (self.sample.hidden_states_path,
                                                     self.sample.hidden_states_path_negative) if path]
        return {"images": images, "hidden_states": states}

    def reference_images(self) -> list[Image.Image]:
        if self.images is not None:
            return [to_rgb(image) for image in self.images]
        return [load_reference_image(path) for path in self.sample.image_paths]

    def qwen_states(self, hidden_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
        if self.hidden_states is not None:
            return tuple(as_hidden_states(state, f"job {self.sample_id!r}: hidden_states[{side}]", hidden_dim)
                         for side, state in enumerate(self.hidden_states))
        return load_sample_hidden_states(self.sample, hidden_dim=hidden_dim)


@dataclass(frozen=True)
class JobProgress:
    """Where a job is: its phase (validate, condition, denoise, decode, write, done) and, while
    denoising, step ``step`` of ``num_steps`` done."""

    sample_id: str
    phase: str
    step: int = 0
    num_steps: int = 0

    @property
    def percent(self) -> float:
        """Of the whole job, counting denoising as all of it (it is ~97 % of the time at 720P)."""
        if self.phase in ("decode", "write", "done"):
            return 100.0 if self.phase == "done" else 99.0
        return 100.0 * self.step / self.num_steps if self.num_steps else 0.0


class JobCancelled(Exception):
    """The job's cancel event was set; it stopped between two steps, nothing written."""


ProgressFn = Callable[[JobProgress], None]


StopFn = Callable[[int], bool]  # asked before each denoising step (its index): stop the job here?


def sample_seed(sample: Sample, sampler: SamplerSettings) -> int:
    return sampler.seed if sample.seed is None else sample.seed


def job_of(source: Sample | Stage3Job, video: VideoSettings) -> Stage3Job:
    """A meta-JSON sample as a job (inputs read from its files)."""
    return source if isinstance(source, Stage3Job) else Stage3Job(source, video, SamplerSettings(), None)
