"""``GET /metrics``: the server's state in the Prometheus text format (version 0.0.4).

The worker records step and job times as they happen (:class:`Metrics`); the queue length and the
jobs by status are read from the job table when scraped, so they survive restarts::

    bindweave_queue_length 2
    bindweave_jobs{status="completed"} 14
    bindweave_denoise_step_seconds_sum 41.2
    bindweave_denoise_step_seconds_count 700
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

    def step(self, seconds: float) -> None:
        with self._lock:
            self.step_seconds[0] += seconds
            self.step_seconds[1] += 1

    def job(self, outcome: str, seconds: float) -> None:
        with self._lock:
            total = self.run_seconds.setdefault(outcome, [0.0, 0])
            total[0] += seconds
            total[1] += 1

    def render(self, counts: dict[str, int]) -> str:
        with self._lock:
            step_sum, step_count = self.step_seconds
            runs = {outcome: tuple(total) for outcome, total in sorted(self.run_seconds.items())}
        lines = ["# HELP bindweave_queue_length Jobs waiting to start.", "# TYPE bindweave_queue_length gauge",
                 f"bindweave_queue_length {counts['queued']}",
                 "# HELP bindweave_jobs Jobs in the job table, by status.", "# TYPE bindweave_jobs gauge",
                 *(f'bindweave_jobs{{status="{status}"}} {count}' for status, count in counts.items()),
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
