"""Stage-3 models and engines for tests, built through the one door users take (bindweave/app/build.py)."""

from __future__ import annotations

import torch

from bindweave.app.build import BuildRequest, build_single_process_engine
from bindweave.model.kernels import DeviceFacts
from bindweave.settings.model import ModelSettings, VideoSettings
from bindweave.stages.engine import Stage3Engine
from bindweave.stages.models import Stage3Models

TINY_VIDEO = VideoSettings(height=96, width=160, num_frames=17)


def build_engine_for(settings: ModelSettings, video: VideoSettings = TINY_VIDEO) -> Stage3Engine:
    """The one-process engine ``launch/generate.py`` would build for ``settings`` (planned for ``video``)."""
    return build_single_process_engine(BuildRequest(settings, video))


def build_models(settings: ModelSettings, video: VideoSettings = TINY_VIDEO) -> Stage3Models:
    return build_engine_for(settings, video).models


def simulate_gpu(monkeypatch, free_gib: float = 24.0, host_gib: float = 120.0, capability=(9, 0),
                 packages=("torchao",)) -> DeviceFacts:
    """Make the build plan see a CUDA GPU with ``free_gib`` free (and the host ``host_gib``
    available): the device every command plans for, without a GPU here. Only planning can run."""
    facts = DeviceFacts(type="cuda", name="Simulated GPU", capability=capability, packages=frozenset(packages),
                        free_gib=free_gib, total_gib=free_gib, host_available_gib=host_gib)
    for module in ("bindweave.app.build", "bindweave.app.generate"):
        monkeypatch.setattr(f"{module}.process_device", lambda device, processes: torch.device("cuda", 0))
    monkeypatch.setattr("bindweave.app.build.probe_device", lambda device, gpu_memory_gib=None: facts)
    return facts


def run_batch_on(models: Stage3Models, run, video: VideoSettings, sampler, runtime=None, known_bad=None,
                 cache=None) -> dict:
    """A meta JSON through an engine over already-built ``models`` (bindweave/stages/batch.py)."""
    from bindweave.settings.sampling import CacheSettings
    from bindweave.stages.batch import run_batch

    return run_batch(Stage3Engine(models, runtime), run, video, sampler, known_bad=known_bad,
                     cache=cache or CacheSettings())
