"""Stage 1's command (launch/refine.py): settings -> output folder -> refiner -> refined meta JSON -> exit code."""

from __future__ import annotations

import logging
from pathlib import Path

from omegaconf import DictConfig

from bindweave.encoders.qwen import load_qwen
from bindweave.settings.qwen import QwenSettings
from bindweave.errors import BindWeaveInputError, exits_2_on_input_error
from bindweave.io.inputs import read_meta
from bindweave.stages.refine import (REFINED_META_NAME, EndpointRefiner, LocalQwenRefiner, partial_meta_path,
                                     refine_samples)
from bindweave.settings.refine import EndpointSettings, LocalSettings

log = logging.getLogger("bindweave")


def make_refiner(refiner: EndpointSettings | LocalSettings, qwen: QwenSettings):
    """The refiner its settings' type names (each conf/refiner option extends one schema)."""
    if isinstance(refiner, EndpointSettings):
        return EndpointRefiner(refiner)
    return LocalQwenRefiner(load_qwen(qwen), refiner)


@exits_2_on_input_error
def run_refine_command(cfg: DictConfig) -> int:
    """Exit code: 0 done; 1 some samples failed (on_error=skip: the others are done, and
    <output_dir>/failed.json names each failed one and why); 2 bad input/config/endpoint, or with
    on_error=fail the first bad sample (one clear message).

    The resolved config goes to <output_dir>/.hydra/ (written here, not by Hydra, so an output
    folder that cannot be made is one clear error). In a ``-m`` sweep output_dir is the job's own
    folder (multirun/<stamp>/<job>/), as in stage 3.
    """
    from bindweave.app.config import settings_of
    from bindweave.app.hydra_support import begin_run, job_output_dir, record_failed_samples, save_job_result
    from bindweave.io.outputs import require_writable_folder

    job = settings_of(cfg)  # the schema's own checks (bindweave/app/config.py)
    output_dir = job_output_dir(job.output_dir)
    begin_run(cfg, output_dir)  # checks the output folder first
    meta_path, image_root = job.data.meta_and_image_root()
    if job.data.meta_path is None:
        log.info("demo: built-in cases at %s with the tiny random Qwen2.5-VL (the prompts are gibberish)", meta_path)
    output_meta = Path(job.output_meta) if job.output_meta else output_dir / REFINED_META_NAME
    if meta_path.resolve() in (output_meta.resolve(), partial_meta_path(output_meta).resolve()):
        raise BindWeaveInputError(f"output_meta {output_meta} (or its progress file {partial_meta_path(output_meta).name}) "
                                  f"is the input meta file: stage 1 never rewrites its input; choose another "
                                  f"output_meta or output_dir.")
    require_writable_folder(output_meta.parent)
    invalid: dict[str, str] = {}
    samples = read_meta(meta_path, image_root, invalid=invalid if job.on_error == "skip" else None)
    for sample_id, reason in invalid.items():
        log.error("%s: %s (skipped; on_error=skip)", sample_id, reason)
    summary = refine_samples(make_refiner(job.refiner, job.qwen), samples, output_meta, job.progress,
                             job.on_error, failed=invalid)
    exit_code = 1 if summary["failed"] else 0
    record_failed_samples(output_dir, summary["failed"])
    save_job_result(output_dir, 0, {**summary, "exit_code": exit_code})  # for a sweep's summary table
    if output_meta.is_file():
        log.info("done: %d refined, %d already refined, %d failed; wrote %s (stage 2: python launch/extract.py "
                 "data.meta_path=%s data.image_root=%s)", len(summary["done"]), len(summary["skipped"]),
                 len(summary["failed"]), output_meta, output_meta, (image_root or meta_path.parent).resolve())
    else:
        log.error("no sample was refined: %s not written", output_meta)
    return exit_code
