"""``GET /metrics``: the replica's state in the Prometheus text format (version 0.0.4).

The worker records step and job times, failures and lease take-overs as they happen
(:class:`Metrics`: this process's, so each replica's own; Prometheus labels them by scrape
target); the queue length and the jobs by status are read from the job table when scraped (with
``serve.store=postgres``: the shared queue's), so they survive restarts::

    bindweave_queue_length 2
    bindweave_jobs{status="completed"} 14
    bindweave_running_jobs 1                                  # this replica: 0 or 1
    bindweave_denoise_step_seconds_sum 41.2
    bindweave_denoise_step_seconds_count 700
    bindweave_job_failures_total{code="generation_failed"} 1
    bindweave_jobs_taken_over_total 0                         # interrupted jobs this replica handed back
    bindweave_cuda_memory_allocated_bytes{device="cuda:0"} 5.8e+10     # on CUDA only
"""

from __future__ import annotations

import threading

import torch


class Metrics:
    """Counters since this process started (thread-safe)."""

    def __init__(self):
        self._lock = threading.Lock()
        self.step_seconds = [0.0, 0]  # sum, count
        self.run_seconds: dict[str, list] = {}  # outcome -> [sum, count]
        self.failures: dict[str, int] = {}  # error code -> jobs
        self.taken_over_jobs = 0

    def step(self, seconds: float) -> None:
        with self._lock:
            self.step_seconds[0] += seconds
            self.step_seconds[1] += 1

    def job(self, outcome: str, seconds: float, failure: str | None = None) -> None:
        """A run ended (``failure``: its error code when it failed)."""
        with self._lock:
            total = self.run_seconds.setdefault(outcome, [0.0, 0])
            total[0] += seconds
            total[1] += 1
            if failure is not None:
                self.failures[failure] = self.failures.get(failure, 0) + 1

    def taken_over(self, jobs: int) -> None:
        with self._lock:
            self.taken_over_jobs += jobs

    def render(self, counts: dict[str, int], running: int) -> str:
        """``counts``: the table's jobs by status; ``running``: the jobs this replica runs now."""
        with self._lock:
            step_sum, step_count = self.step_seconds
            runs = {outcome: tuple(total) for outcome, total in sorted(self.run_seconds.items())}
            failures, taken_over = dict(sorted(self.failures.items())), self.taken_over_jobs
        lines = ["# HELP bindweave_queue_length Jobs waiting to start.", "# TYPE bindweave_queue_length gauge",
                 f"bindweave_queue_length {counts['queued']}",
                 "# HELP bindweave_jobs Jobs in the job table, by status.", "# TYPE bindweave_jobs gauge",
                 *(f'bindweave_jobs{{status="{status}"}} {count}' for status, count in counts.items()),
                 "# HELP bindweave_running_jobs Jobs this replica runs now.", "# TYPE bindweave_running_jobs gauge",
                 f"bindweave_running_jobs {running}",
                 "# HELP bindweave_job_failures_total Jobs this replica ran that failed, by error code.",
                 "# TYPE bindweave_job_failures_total counter",
                 *(f'bindweave_job_failures_total{{code="{code}"}} {count}' for code, count in failures.items()),
                 "# HELP bindweave_jobs_taken_over_total Interrupted jobs (lease run out) this replica handled.",
                 "# TYPE bindweave_jobs_taken_over_total counter", f"bindweave_jobs_taken_over_total {taken_over}",
                 "# HELP bindweave_denoise_step_seconds Time of one denoising step (both CFG passes).",
                 "# TYPE bindweave_denoise_step_seconds summary",
                 f"bindweave_denoise_step_seconds_sum {step_sum}", f"bindweave_denoise_step_seconds_count {step_count}",
                 "# HELP bindweave_job_run_seconds Time from a job's start to its end in this process, by outcome.",
                 "# TYPE bindweave_job_run_seconds summary"]
        for outcome, (total, count) in runs.items():
            lines += [f'bindweave_job_run_seconds_sum{{outcome="{outcome}"}} {total}',
                      f'bindweave_job_run_seconds_count{{outcome="{outcome}"}} {count}']
        if torch.cuda.is_available():
            for name, read, text in (("allocated", torch.cuda.memory_allocated, "Memory held by tensors now."),
                                     ("reserved", torch.cuda.memory_reserved, "Memory held by the caching allocator.")):
                lines += [f"# HELP bindweave_cuda_memory_{name}_bytes {text}",
                          f"# TYPE bindweave_cuda_memory_{name}_bytes gauge",
                          *(f'bindweave_cuda_memory_{name}_bytes{{device="cuda:{index}"}} {read(index)}'
                            for index in range(torch.cuda.device_count()))]
        return "\n".join(lines) + "\n"
