"""Stage 2's command (launch/extract.py): settings -> output folder -> Qwen -> hidden states -> exit code."""

from __future__ import annotations

import logging
import time
from dataclasses import replace
from pathlib import Path

import torch
from omegaconf import DictConfig

from bindweave.encoders.qwen import load_qwen
from bindweave.errors import exits_2_on_input_error
from bindweave.stages.extract import BARRIER_TIMEOUT, ExtractSettings, run_extract

log = logging.getLogger("bindweave")


@exits_2_on_input_error
def run_extract_command(cfg: DictConfig) -> int:
    """Exit code: 0 done; 1 some samples failed (on_error=skip: the others are done, and
    <output_dir>/failed.json names each failed one and why); 2 bad input/config, or with
    on_error=fail the first bad sample (one clear message).

    The resolved config goes to <output_dir>/.hydra/ (written here, not by Hydra, so an output
    folder that cannot be made is one clear error). In a ``-m`` sweep output_dir is the job's own
    folder (multirun/<stamp>/<job>/), as in stage 3.
    """
    from bindweave.app.config import settings_of
    from bindweave.app.hydra_support import begin_run, job_output_dir, record_failed_samples, save_job_result
    from bindweave.io.outputs import require_writable_folder
    from parallel.distributed import detect_processes, rank_device, start_process_group, stop_process_group

    job = settings_of(cfg)  # the schema's own checks (bindweave/app/config.py)
    processes = detect_processes()
    settings = ExtractSettings(
        output_dir=job_output_dir(job.output_dir),
        output_meta=Path(job.output_meta) if job.output_meta else None,
        write_official_pt=job.write_official_pt,
        progress=job.progress,
    )
    if processes.rank == 0:
        begin_run(cfg, settings.output_dir)  # checks the output folder first
    else:  # the same check, so that every rank stops alike
        require_writable_folder(settings.output_dir)
    meta_path, image_root = job.data.meta_and_image_root()
    if job.data.meta_path is None:
        log.info("demo: built-in cases at %s with the tiny random Qwen2.5-VL (the states are noise)", meta_path)
    qwen_settings = job.qwen
    device_type = qwen_settings.device_type()
    # For a barrier and the gathering of each rank's summary only, before rank 0 writes the meta JSON:
    # ranks may finish hours apart.
    start_process_group(processes, device_type, timeout_s=BARRIER_TIMEOUT.total_seconds())
    summary: dict = {}
    try:
        if processes.world_size > 1:  # one process per GPU: rank r computes on GPU LOCAL_RANK
            qwen_settings = replace(qwen_settings, device=str(rank_device(processes, device_type)))
        barrier = torch.distributed.barrier if processes.world_size > 1 else lambda: None
        started = time.perf_counter()
        qwen = load_qwen(qwen_settings)
        summary["load_qwen_s"] = round(time.perf_counter() - started, 1)
        written = run_extract(qwen, meta_path, image_root, settings, processes.rank, processes.world_size, barrier,
                              job.on_error, _gather(processes.world_size), summary)
        exit_code = 1 if summary["failed"] else 0  # the same on every rank
        if processes.rank == 0:  # reports the run
            record_failed_samples(settings.output_dir, summary["failed"])
            save_job_result(settings.output_dir, 0, {**summary, "exit_code": exit_code})  # for a sweep's table
            if written is not None:
                root = (image_root or meta_path.parent).resolve()
                log.info("wrote %s; stage 3: python launch/generate.py data.meta_path=%s data.image_root=%s",
                         written, written, root)
            else:
                log.error("no sample was extracted: %s not written", settings.meta_path)
        # No rank leaves before rank 0 has written everything: with exit code 1 a launcher (torchrun,
        # srun) ends the other processes as soon as one exits.
        barrier()
    finally:
        stop_process_group()
    return exit_code


def _gather(world_size: int):
    """One value from every rank, in rank order, on every rank (each rank's summary)."""
    if world_size == 1:
        return lambda value: [value]

    def gather(value):
        values = [None] * world_size
        torch.distributed.all_gather_object(values, value)
        return values

    return gather
