"""The engine's thread: runs the queued jobs one at a time, oldest first, and settles each.

    worker = Worker(store, defaults, metrics, settings, on_ended=callbacks.job_ended)    # /health: loading
    worker.start(engine, encode)                           # /health: ready
    worker.wake()               # a job was queued here
    worker.cancel(job_id)       # queued: cancelled now; running (on any replica): stops at its next step
    worker.stop(timeout_s)      # the running job goes back to the queue at its next step boundary

One job runs at a time because one engine holds the GPU(s). A job's life: claimed from the table
with a lease (``serve.lease_s``, renewed by a :class:`LeaseKeeper` thread while it runs), the
references read back from its folder (``load_reference_image``, as a meta-JSON run reads them),
stage 2 in memory (:class:`~bindweave.serve.hidden_states.PromptEncoder`), then
``Stage3Engine.run`` with the job's cancel event; its progress (phase, step, percent:
``JobProgress``) goes to the table at every report, and each report reads back whether a cancel
was asked for (through any replica). An idle worker looks at the table every
``serve.queue_poll_ms`` (jobs queued by other replicas) and first hands the jobs whose lease ran
out (their replica died) back to the queue.

Under torchrun (bindweave/app/serve_group.py) ``engine`` is rank 0's side of the group: it hands
the job to every rank and agrees each step's cancel and the job's outcome with them.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable

from bindweave.errors import BindWeaveInputError
from bindweave.io.inputs import load_reference_image
from bindweave.serve.job_request import JobDefaults, VideoRequest
from bindweave.serve.metrics import Metrics
from bindweave.serve.settings import ServeSettings
from bindweave.serve.store import JobRecord, JobStore
from bindweave.stages.engine import Stage3Engine
from bindweave.stages.job import JobProgress, Stage3Job

log = logging.getLogger("bindweave")

EXIT_REPLICA_BROKEN = 3  # the exit code of a replica that lost one of its ranks


class ReplicaBroken(RuntimeError):
    """The ranks of this replica can no longer talk (one is gone): the replica must end."""


class Worker:
    """The job loop of this replica; ``state`` is what ``/health`` says: loading (the engine is being
    built; jobs are queued meanwhile), ready, or broken (the engine could not be built, or the loop
    stopped)."""

    def __init__(self, store: JobStore, defaults: JobDefaults, metrics: Metrics, settings: ServeSettings,
                 on_ended: Callable[[JobRecord], None] = lambda record: None):
        self.on_ended = on_ended  # a job's end is in the table (completed, failed, cancelled): its webhook
        self.engine: Stage3Engine | None = None
        self.encode: Callable | None = None  # (prompt, images) -> (positive, negative) hidden states
        self.store = store
        self.defaults = defaults
        self.metrics = metrics
        self.settings = settings
        self.broken: str | None = None  # why the replica cannot run jobs
        self._lock = threading.Lock()  # a claim and its cancel event are registered together
        self._running: tuple[str, threading.Event] | None = None
        self._wakeup = threading.Event()
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="bindweave-worker", daemon=True)

    @property
    def state(self) -> str:
        if self.broken is not None or (self._thread.ident is not None and not self._thread.is_alive()):
            return "broken"
        return "ready" if self.engine is not None else "loading"

    @property
    def done(self) -> bool:
        """Whether the job loop has ended (or never started): nothing of it runs on the engine any more."""
        return not self._thread.is_alive()

    @property
    def running(self) -> str | None:
        """The id of the job this replica runs now."""
        running = self._running
        return running[0] if running is not None else None

    def start(self, engine: Stage3Engine, encode: Callable) -> None:
        """The engine is built: run jobs."""
        self.engine, self.encode = engine, encode
        self._thread.start()

    def fail(self, reason: str) -> None:
        """The engine could not be built."""
        self.broken = reason

    def wake(self) -> None:
        self._wakeup.set()

    def stop(self, finish_s: float, timeout_s: float) -> None:
        """Stop taking jobs (the drain on SIGTERM). The running job may finish for up to ``finish_s``
        (serve.drain=finish; 0: not at all); then it stops at its next step boundary and is queued
        again. After ``timeout_s`` more the process may exit anyway: the job is then still
        in_progress in the table, and the next start (or, with a shared store, another replica once
        the lease runs out) handles it as interrupted (serve.on_interrupted)."""
        self._stopping.set()
        self._wakeup.set()
        if self._thread.is_alive() and finish_s > 0:
            self._thread.join(finish_s)
        with self._lock:
            if self._running is not None:
                self._running[1].set()
        if self._thread.is_alive():
            self._thread.join(timeout_s)

    def cancel(self, job_id: str) -> str | None:
        """Cancel a job: a queued one now (its files go), a running one at its next step boundary (the
        replica running it removes its files). Returns the status it had, None if there is no such job."""
        with self._lock:
            status = self.store.request_cancel(job_id)
            if status == "in_progress" and self._running is not None and self._running[0] == job_id:
                self._running[1].set()
        if status == "queued":
            self.store.files(job_id).remove()
        return status

    def _loop(self) -> None:
        settings = self.settings
        while not self._stopping.is_set():
            self._wakeup.clear()  # before the claim: a job queued after it wakes the wait below
            taken_over = self.store.take_over_interrupted(settings.on_interrupted, settings.max_attempts)
            if any(taken_over.values()):
                log.warning("jobs whose replica stopped while they ran (lease over): %s", _listed(taken_over))
                self.metrics.taken_over(sum(map(len, taken_over.values())))
            for job_id in taken_over["failed"] + taken_over["cancelled"]:
                self._ended(job_id)
            with self._lock:
                record = self.store.claim_next(settings.lease_s)
                cancel = threading.Event()
                self._running = (record.id, cancel) if record is not None else None
            if record is None:
                self._wakeup.wait(settings.queue_poll_ms / 1000)
                continue
            started = time.perf_counter()
            with LeaseKeeper(self.store, record.id, settings.lease_s, cancel) as lease:
                try:
                    status, code, message = self._run(record, cancel, lease)
                except ReplicaBroken as error:
                    # The job stays in_progress: the restarted replica (or, with a shared store, another
                    # one once the lease runs out) runs it again. os._exit: the uvicorn and lease threads
                    # must not outlive the group, and the process manager must see a failure.
                    log.critical("%s; the replica stops (exit code %d), %s runs again when it restarts",
                                 error, EXIT_REPLICA_BROKEN, record.id)
                    logging.shutdown()
                    os._exit(EXIT_REPLICA_BROKEN)
            # The table's word is final: a cancel asked for meanwhile wins over a finished run.
            status = self.store.settle(record.id, status, code, message) if not lease.lost else None
            if status == "cancelled":
                self.store.files(record.id).remove()
            with self._lock:
                self._running = None
            seconds = time.perf_counter() - started
            if status is None:
                log.warning("%s: stopped, its lease ran out and another replica runs it now", record.id)
                continue
            self.metrics.job(status, seconds, code if status == "failed" else None)
            if status != "queued":
                self._ended(record.id)
            outcome = "back in the queue (the server is stopping)" if status == "queued" else status
            log.info("%s: %s after %.1f s on %s%s", record.id, outcome, seconds, self.store.replica_id,
                     f": {message}" if status == "failed" else "")

    def _ended(self, job_id: str) -> None:
        record = self.store.get(job_id)
        if record is not None:
            self.on_ended(record)

    def _run(self, record: JobRecord, cancel: threading.Event,
             lease: LeaseKeeper) -> tuple[str, str | None, str | None]:
        """Make the job's video (and thumbnail): its status, error code and error message."""
        request = VideoRequest(**record.request)
        files = self.store.files(record.id)
        reports = ProgressReports(self.store, self.metrics, record.id, lease)
        try:
            reports(JobProgress(record.id, "extract", 0, request.steps))
            images = [load_reference_image(files.reference(index), max_pixels=self.settings.max_image_pixels)
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
        except ReplicaBroken:
            raise
        except Exception as error:  # a bug or out of memory: this job fails, the server goes on
            log.exception("%s: failed", record.id)
            return "failed", "internal_error", f"internal error ({type(error).__name__}): see the server log"
        if result.status == "cancelled":
            # Stopped by the server's shutdown rather than by its owner: it runs again after the restart.
            return ("queued" if self._stopping.is_set() else "cancelled"), "cancelled", result.error
        if result.status == "failed":
            return "failed", "generation_failed", result.error
        return "completed", None, None


class LeaseKeeper:
    """Renews a running job's lease every third of ``lease_s`` on its own thread (a step, the first
    one's compiling or the decode may take longer than the lease). Each renewal, like each progress
    report, reads the job's cancel mark; a job that is no longer this replica's (``lost``) is
    stopped too, and its end is not recorded."""

    def __init__(self, store: JobStore, job_id: str, lease_s: float, cancel: threading.Event):
        self.store, self.job_id, self.lease_s, self.cancel = store, job_id, lease_s, cancel
        self.lost = False
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._renew, name="bindweave-lease", daemon=True)

    def __enter__(self) -> LeaseKeeper:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._done.set()
        self._thread.join()

    def heard(self, cancel_requested: bool | None) -> None:
        """What the table said about the job: True cancel it, None it is no longer ours."""
        if cancel_requested is None:
            self.lost = True
        if cancel_requested is not False:
            self.cancel.set()

    def _renew(self) -> None:
        while not self._done.wait(self.lease_s / 3):
            try:
                self.heard(self.store.renew(self.job_id, self.lease_s))
            except Exception:  # the database is unreachable for a moment: the next renewal may succeed
                log.exception("%s: could not renew its lease", self.job_id)


def _listed(outcome: dict[str, list[str]]) -> str:
    return "; ".join(f"{what}: {', '.join(ids)}" for what, ids in outcome.items() if ids)


class ProgressReports:
    """A job's ``on_progress``: each report into the job table (its answer, a cancel asked for or
    the job lost, to the lease); the time of each denoising step after the first (the first
    includes conditioning and any compiling) into the metrics."""

    def __init__(self, store: JobStore, metrics: Metrics, job_id: str, lease: LeaseKeeper):
        self.store, self.metrics, self.job_id, self.lease = store, metrics, job_id, lease
        self.last_step_at: float | None = None

    def __call__(self, update: JobProgress) -> None:
        now = time.perf_counter()
        if update.phase == "denoise":
            if self.last_step_at is not None:
                self.metrics.step(now - self.last_step_at)
            self.last_step_at = now
        self.lease.heard(self.store.report(self.job_id, update.phase, update.step, update.num_steps, update.percent,
                                           self.lease.lease_s))
