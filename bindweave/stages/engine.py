"""The stage-3 engine: built once (bindweave/app/build.py ``build_engine``: models loaded as the
plan says, layout applied), then runs job after job.

The command line and a Hydra multirun (bindweave/stages/batch.py loops over a meta JSON), the
calibration, the resident server and the Python API all drive the same :meth:`Stage3Engine.run`:
one video from an in-memory :class:`~bindweave.stages.job.Stage3Job`, its phases and steps
reported, cancellable between two steps (every rank of the job agrees on the step: the
cancel it is given), and its outcome returned instead of ending the process.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, field

from bindweave.errors import BindWeaveInputError
from bindweave.stages.coordinator import Coordinator, SingleProcess
from bindweave.stages.job import JobCancelled, ProgressFn, Stage3Job
from bindweave.stages.models import Stage3Models
from bindweave.stages.phases import generate_sample

log = logging.getLogger("bindweave")


@dataclass
class JobResult:
    """One job's outcome: ``done`` (``record`` is its sidecar record; ``frames`` too when nothing was
    written), ``failed`` (``error`` says why: a bad input of this job; ``exception`` is it), or
    ``cancelled``."""

    sample_id: str
    status: str
    record: dict | None = None
    error: str | None = None
    frames: object = field(default=None, repr=False)
    exception: BaseException | None = field(default=None, repr=False)


class Stage3Engine:
    """The loaded stage-3 models and this process's place in the layout."""

    def __init__(self, models: Stage3Models, coordinator: Coordinator | None = None):
        self.models = models
        self.coordinator = coordinator or SingleProcess()

    @property
    def plan(self):
        """The build plan the models were loaded by (bindweave/stages/plan.py)."""
        return self.models.plan

    def run(self, job: Stage3Job, on_progress: ProgressFn | None = None, cancel: threading.Event | None = None,
            progress_bars: bool = False, step_cache=None) -> JobResult:
        """Make one video. A bad input of this job, or a cancel, is this job's result; the engine
        stays ready for the next job. Other exceptions (a bug, out of memory) propagate.

        ``cancel`` (anything with ``is_set()``) is asked once before each denoising step; a set one
        stops the job there. Over a torchrun replica every rank asks a cancel that agrees across
        the ranks each step (bindweave/app/serve_group.py ``AgreedCancel``), so all stop at the same
        step. ``step_cache`` replaces the job's own (``job.cache``): calibration passes its statistics here."""
        should_stop = None if cancel is None else (lambda step: cancel.is_set())
        try:
            record = generate_sample(self.models, job, progress=progress_bars, runtime=self.coordinator,
                                     on_progress=on_progress, should_stop=should_stop, step_cache=step_cache)
        except JobCancelled as stop:
            log.info("%s", stop)
            return JobResult(job.sample_id, "cancelled", error=str(stop))
        except BindWeaveInputError as error:
            return JobResult(job.sample_id, "failed", error=str(error), exception=error)
        frames = record.pop("frames", None) if record is not None else None
        return JobResult(job.sample_id, "done", record=record, frames=frames)
