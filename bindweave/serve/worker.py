"""The engine's thread: runs the queued jobs one at a time, oldest first, and settles each.

    worker = Worker(engine, encode, store, defaults, metrics, max_image_pixels)
    worker.start()
    worker.wake()               # a job was queued
    worker.cancel(job_id)       # queued: cancelled now; running: stops at the next step boundary
    worker.stop(timeout_s)      # the running job goes back to the queue at its next step boundary

One job runs at a time because one engine holds the GPU(s). A job's life: the references read
back from its folder (``load_reference_image``, as a meta-JSON run reads them), stage 2 in memory
(:class:`~bindweave.serve.hidden_states.PromptEncoder`), then ``Stage3Engine.run`` with the
job's cancel event; its progress (phase, step, percent: ``JobProgress``) goes to the job table at
every report, so any request, or a restarted server, sees it.

Under torchrun (not done yet, docs/SERVING.md): rank 0 would run this loop and the HTTP server,
and hand each claimed job (its request, reference bytes and hidden states) and each step's cancel
decision to the other ranks, which run the same ``engine.run`` on their share.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

from bindweave.errors import BindWeaveInputError
from bindweave.io.inputs import load_reference_image
from bindweave.serve.job_request import JobDefaults, VideoRequest
from bindweave.serve.metrics import Metrics
from bindweave.serve.store import JobRecord, JobStore
from bindweave.stages.engine import Stage3Engine
from bindweave.stages.job import JobProgress, Stage3Job

log = logging.getLogger("bindweave")


class Worker:
    def __init__(self, engine: Stage3Engine, encode: Callable, store: JobStore, defaults: JobDefaults,
                 metrics: Metrics, max_image_pixels: int):
        self.engine = engine
        self.encode = encode  # (prompt, images) -> (positive, negative) hidden states
        self.store = store
        self.defaults = defaults
        self.metrics = metrics
        self.max_image_pixels = max_image_pixels
        self._lock = threading.Lock()  # a claim and its cancel event are registered together
        self._running: tuple[str, threading.Event] | None = None
        self._wakeup = threading.Event()
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="bindweave-worker", daemon=True)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def start(self) -> None:
        self._thread.start()

    def wake(self) -> None:
        self._wakeup.set()

    def stop(self, timeout_s: float) -> None:
        """Stop taking jobs; the running one stops at its next step boundary and is queued again.
        After ``timeout_s`` the process may exit anyway: the job is then still in_progress in the
        table, and the next start handles it as interrupted (serve.on_interrupted)."""
        self._stopping.set()
        with self._lock:
            if self._running is not None:
                self._running[1].set()
        self._wakeup.set()
        self._thread.join(timeout_s)

    def cancel(self, job_id: str) -> str | None:
        """Cancel a job: a queued one now (its files go), a running one at its next step boundary (the
        worker removes its files). Returns the status it had, None if there is no such job."""
        with self._lock:
            status = self.store.request_cancel(job_id)
            if status == "in_progress" and self._running is not None and self._running[0] == job_id:
                self._running[1].set()
        if status == "queued":
            self.store.files(job_id).remove()
        return status

    def _loop(self) -> None:
        while not self._stopping.is_set():
            self._wakeup.clear()  # before the claim: a job queued after it wakes the wait below
            with self._lock:
                record = self.store.claim_next()
                cancel = threading.Event()
                self._running = (record.id, cancel) if record is not None else None
            if record is None:
                self._wakeup.wait()
                continue
            started = time.perf_counter()
            status, code, message = self._run(record, cancel)
            # The table's word is final: a cancel asked for meanwhile wins over a finished run.
            status = self.store.settle(record.id, status, code, message)
            if status == "cancelled":
                self.store.files(record.id).remove()
            with self._lock:
                self._running = None
            seconds = time.perf_counter() - started
            self.metrics.job(status, seconds)
            outcome = "back in the queue (the server is stopping)" if status == "queued" else status
            log.info("%s: %s after %.1f s%s", record.id, outcome, seconds, f": {message}" if status == "failed" else "")

    def _run(self, record: JobRecord, cancel: threading.Event) -> tuple[str, str | None, str | None]:
        """Make the job's video (and thumbnail): its status, error code and error message."""
        request = VideoRequest(**record.request)
        files = self.store.files(record.id)
        reports = ProgressReports(self.store, self.metrics, record.id)
        try:
            reports(JobProgress(record.id, "extract", 0, request.steps))
            images = [load_reference_image(files.reference(index), max_pixels=self.max_image_pixels)
                      for index in range(request.references)]
            job = Stage3Job.from_request(
                record.id, request.prompt, request.video(), request.sampler(self.defaults.sampler), files.video,
                images=images, hidden_states=self.encode(request.prompt, images), seed=request.seed,
                cache=request.cache(self.defaults.cache))
            result = self.engine.run(job, on_progress=reports, cancel=cancel)
            if result.status == "done":
                files.write_thumbnail()
        except BindWeaveInputError as error:  # this job's input, or a full disk
            return "failed", "generation_failed", str(error)
        except Exception as error:  # a bug or out of memory: this job fails, the server goes on
            log.exception("%s: failed", record.id)
            return "failed", "internal_error", f"internal error ({type(error).__name__}): see the server log"
        if result.status == "cancelled":
            # Stopped by the server's shutdown rather than by its owner: it runs again after the restart.
            return ("queued" if self._stopping.is_set() else "cancelled"), "cancelled", result.error
        if result.status == "failed":
            return "failed", "generation_failed", result.error
        return "completed", None, None


class ProgressReports:
    """A job's ``on_progress``: each report into the job table; the time of each denoising step
    after the first (the first includes conditioning and any compiling) into the metrics."""

    def __init__(self, store: JobStore, metrics: Metrics, job_id: str):
        self.store, self.metrics, self.job_id = store, metrics, job_id
        self.last_step_at: float | None = None

    def __call__(self, update: JobProgress) -> None:
        now = time.perf_counter()
        if update.phase == "denoise":
            if self.last_step_at is not None:
                self.metrics.step(now - self.last_step_at)
            self.last_step_at = now
        self.store.report(self.job_id, update.phase, update.step, update.num_steps, update.percent)
