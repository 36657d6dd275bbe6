"""One replica = one torchrun group: rank 0 serves HTTP and runs the worker; every job is handed to
every rank, which runs the same ``Stage3Engine.run`` on its share of the layout; rank 0 writes.

    channel = JobChannel()                       # a collective: every rank, after Runtime.build
    rank 0:   engine = GroupEngine(local_engine, channel)   # what the worker drives
              ... engine.close()                 # the other ranks return from follow()
    others:   follow(local_engine, channel)

Everything between the ranks goes over ``channel``, a gloo group of its own with a timeout of
CONTROL_TIMEOUT: a follower waits there for the next job for as long as the server stays idle,
while the default group keeps ``parallel.timeout_s``, so a peer that dies mid-job still fails the
job's collectives fast. During a job every collective on the channel is one all-reduce of
``[cancel, failed, finished]`` (a "round"), so ranks in different places (one still denoising,
one that failed) always meet in the same collective:

- at each denoising step every running rank takes one round (:class:`AgreedCancel`): a cancel
  asked for on rank 0, or a failure anywhere, stops every rank at the same step, before anything
  is written;
- a rank whose run ended (done, failed, cancelled, or an exception: a bad input, out of memory)
  takes rounds until every rank has ended; then the outcomes are gathered and agreed: a failure
  anywhere fails the job on all (a bad input: ``generation_failed``; an exception on any rank:
  :class:`RankFailed` on rank 0, the worker's ``internal_error``, the log naming the rank), and
  the server goes on.

A channel collective that fails means a rank is gone: :class:`ReplicaBroken`. The worker does
not record that job's end (it stays in_progress, so the restarted replica re-runs it) and the
process ends with ``worker.EXIT_REPLICA_BROKEN`` and one log line; torchrun then ends the others.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from bindweave.serve.worker import ReplicaBroken
from bindweave.stages.engine import JobResult, Stage3Engine
from bindweave.stages.job import Stage3Job

log = logging.getLogger("bindweave")

CONTROL_TIMEOUT = timedelta(days=30)  # an idle server waits this long for its next job
CANCEL, FAILED, FINISHED = range(3)


class RankFailed(RuntimeError):
    """An exception (out of memory, a bug) on some rank of the replica: the job fails on all."""

class JobChannel:
    """Rank 0 -> every rank: the next job; and the rounds of a job (see the module's docstring)."""

    def __init__(self):
        self.group = dist.new_group(backend="gloo", timeout=CONTROL_TIMEOUT)
        self.rank, self.world_size = dist.get_rank(), dist.get_world_size()

    def broadcast(self, message: tuple) -> tuple:
        """Rank 0's ``message`` on every rank (the others pass anything)."""
        box = [message]
        self._collective(lambda: dist.broadcast_object_list(box, src=0, group=self.group))
        return box[0]

    def round(self, cancel: bool = False, failed: bool = False, finished: bool = False) -> list[int]:
        """Each flag summed over the ranks."""
        flags = torch.tensor([int(cancel), int(failed), int(finished)], dtype=torch.int64)
        self._collective(lambda: dist.all_reduce(flags, group=self.group))
        return flags.tolist()

    def gather(self, item) -> list:
        items = [None] * self.world_size
        self._collective(lambda: dist.all_gather_object(items, item, group=self.group))
        return items

    def _collective(self, call) -> None:
        try:
            call()
        except (RuntimeError, ConnectionError) as error:  # gloo: a peer's socket closed, or the wait ran out
            raise ReplicaBroken(f"rank {self.rank}: a rank of this replica is gone ({str(error).splitlines()[0]})") \
                from error


class AgreedCancel:
    """The ``cancel`` the engine reads at each step boundary: one round; set for every rank at the
    same step when rank 0's ``local`` event is set or any rank has failed."""

    def __init__(self, channel: JobChannel, local: threading.Event | None):
        self.channel, self.local = channel, local

    def is_set(self) -> bool:
        flags = self.channel.round(cancel=self.local is not None and self.local.is_set())
        return flags[CANCEL] > 0 or flags[FAILED] > 0


@dataclass
class GroupEngine:
    """Rank 0's engine: the job to every rank, then run here like there."""

    engine: Stage3Engine
    channel: JobChannel

    @property
    def models(self):
        return self.engine.models

    def run(self, job: Stage3Job, on_progress=None, cancel: threading.Event | None = None) -> JobResult:
        self.channel.broadcast(("job", job))
        return run_in_group(self.engine, job, self.channel, on_progress, cancel)

    def close(self) -> None:
        """The other ranks leave :func:`follow`."""
        self.channel.broadcast(("stop", None))


def follow(engine: Stage3Engine, channel: JobChannel) -> None:
    """A rank other than 0: run each job rank 0 hands out, until it says stop."""
    while True:
        kind, job = channel.broadcast((None, None))
        if kind == "stop":
            return
        try:
            run_in_group(engine, job, channel, None, None)
        except RankFailed:  # logged where it happened; rank 0 records it
            pass


def run_in_group(engine: Stage3Engine, job: Stage3Job, channel: JobChannel, on_progress,
                 cancel: threading.Event | None) -> JobResult:
    """This rank's run of ``job``, then the outcome every rank agrees on."""
    try:
        result = engine.run(job, on_progress=on_progress, cancel=AgreedCancel(channel, cancel))
        mine = (result.status, result.error)
    except ReplicaBroken:
        raise
    except Exception as error:  # out of memory or a bug here: the job fails on every rank, the server goes on
        log.exception("rank %d: %s failed", channel.rank, job.sample_id)
        result, mine = None, ("error", f"rank {channel.rank}: {type(error).__name__}: {error}")
    while channel.round(failed=mine[0] in ("failed", "error"), finished=True)[FINISHED] < channel.world_size:
        pass  # the ranks still denoising see the failure at their next step and stop there
    outcomes = channel.gather(mine)
    errors = [message for status, message in outcomes if status == "error"]
    if errors:  # the worker's internal_error, as for an exception in one process
        raise RankFailed("; ".join(errors))
    for agreed in ("failed", "cancelled"):  # a bad input of this job on some rank, then a cancel
        messages = [message for status, message in outcomes if status == agreed]
        if messages:
            return JobResult(job.sample_id, agreed, error=messages[0])
    return result
