"""The stage-3 engine: built once (models loaded, layout applied), then runs job after job.

The command line, a Hydra multirun (the app holds the engine between jobs) and a resident server
all drive the same object: :meth:`Stage3Engine.run` makes one video from an in-memory
:class:`~bindweave.stages.generate.Stage3Job` (prompt, images and hidden states as files or
tensors, seed, size, steps, guidance, output target), reports its phases and steps, can be
cancelled between two steps, and returns the job's outcome instead of ending the process;
:meth:`Stage3Engine.run_meta` makes every video of a meta JSON (resume, on_error).
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, field

from bindweave.errors import BindWeaveInputError
from bindweave.settings.sampling import CacheSettings, SamplerSettings
from bindweave.stages.coordinator import Coordinator, SingleProcess
from bindweave.stages.generate import (JobCancelled, ProgressFn, RunSettings, Stage3Job, Stage3Models,
                                       generate_sample, run_generation)
from bindweave.settings.model import VideoSettings

log = logging.getLogger("bindweave")


@dataclass
class JobResult:
    """One job's outcome: ``done`` (``record`` is its sidecar record; ``frames`` too when nothing was
    written), ``failed`` (``error`` says why: a bad input of this job), or ``cancelled``."""

    sample_id: str
    status: str
    record: dict | None = None
    error: str | None = None
    frames: object = field(default=None, repr=False)


class Stage3Engine:
    """The loaded stage-3 models and this process's place in the layout."""

    def __init__(self, models: Stage3Models, coordinator: Coordinator | None = None):
        self.models = models
        self.coordinator = coordinator or SingleProcess()

    def run(self, job: Stage3Job, on_progress: ProgressFn | None = None, cancel: threading.Event | None = None,
            progress_bars: bool = False) -> JobResult:
        """Make one video. A bad input of this job, or a cancel, is this job's result; the engine
        stays ready for the next job. Other exceptions (a bug, out of memory) propagate."""
        try:
            record = generate_sample(self.models, job, progress=progress_bars, runtime=self.coordinator,
                                     on_progress=on_progress, cancel=cancel)
        except JobCancelled as stop:
            log.info("%s", stop)
            return JobResult(job.sample_id, "cancelled", error=str(stop))
        except BindWeaveInputError as error:
            return JobResult(job.sample_id, "failed", error=str(error))
        frames = record.pop("frames", None) if record is not None else None
        return JobResult(job.sample_id, "done", record=record, frames=frames)

    def run_meta(self, run: RunSettings, video: VideoSettings, sampler: SamplerSettings,
                 known_bad: dict[str, str] | None = None, cache: CacheSettings = CacheSettings()) -> dict:
        """Every sample of a meta JSON (this data group's share), resumable; see ``run_generation``."""
        return run_generation(self.models, run, video, sampler, self.coordinator, known_bad=known_bad, cache=cache)
