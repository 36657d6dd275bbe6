"""``launch/calibrate.py``: exact jobs on the user's weights -> the step-cache calibration JSON.

    python launch/calibrate.py model=bindweave_14b data.meta_path=META data.image_root=IMAGES \
        output=calibration/bindweave_720p.json
    python launch/generate.py model=bindweave_14b speed=fastest cache.calibration=calibration/bindweave_720p.json ...

Each of the first ``samples`` jobs of the meta JSON runs every step exactly (one process, the
size and step count of the runs it is for) while bindweave.sampling.step_cache.StepStatistics
measures, per CFG side and step, the blocks' residual magnitude ratio and the TeaCache distances;
the file holds their mean over the jobs and TeaCache's fitted polynomial. No video is written.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

from omegaconf import DictConfig

from bindweave.errors import BindWeaveInputError, exits_2_on_input_error

log = logging.getLogger("bindweave")


@exits_2_on_input_error
def run_calibrate_command(cfg: DictConfig) -> int:
    from bindweave.app.build import BuildRequest, build_engine, plan_build
    from bindweave.app.config import settings_of
    from bindweave.app.generate import demo_meta
    from bindweave.app.hydra_support import begin_run
    from bindweave.io.inputs import read_meta
    from bindweave.io.outputs import write_json
    from bindweave.sampling.calibration import calibration_record
    from bindweave.sampling.step_cache import StepStatistics, calibration_from
    from bindweave.stages.job import Stage3Job
    from bindweave.stages.preflight import check_job
    from parallel.runtime import Runtime

    job = settings_of(cfg)  # the schema's own checks (bindweave/app/config.py)
    output = Path(job.output)
    begin_run(cfg, output.parent)  # checks the output folder first
    # The same plan as launch/generate.py makes for these settings on one process (memory plan included).
    plan = plan_build(BuildRequest(job.model, job.video))
    meta_path, image_root = (Path(job.data.meta_path), Path(job.data.image_root) if job.data.image_root else None) \
        if job.data.meta_path is not None else (demo_meta(job.data, job.model, plan.hidden_dim), None)
    # every input checked before any weight is read
    check = check_job(meta_path, image_root, hidden_dim=plan.hidden_dim, output_dir=output.parent, video=job.video,
                      finished=set())
    if check.job_problems or check.problems:
        raise check.error()
    started = time.perf_counter()
    engine = build_engine(plan, Runtime.single_process(plan.device), job.model.gpu_memory_gib)
    samples = read_meta(meta_path, image_root)[: job.samples]
    statistics = StepStatistics()
    for number, sample in enumerate(samples, 1):
        log.info("calibrating on %s (%d of %d): %d exact steps at %dx%d x %d frames", sample.sample_id, number,
                 len(samples), job.sampler.num_steps, job.video.width, job.video.height, job.video.num_frames)
        result = engine.run(Stage3Job(sample, job.video, job.sampler, None), progress_bars=job.progress,
                            step_cache=statistics)
        if result.status != "done":
            raise result.exception or BindWeaveInputError(f"{sample.sample_id}: {result.error}")
    calibration = calibration_from(statistics, source=str(output), details={
        "num_steps": job.sampler.num_steps, "samples": [sample.sample_id for sample in samples],
        "video": {"height": job.video.height, "width": job.video.width, "num_frames": job.video.num_frames},
        "sampler": {"guidance_scale": job.sampler.guidance_scale, "flow_shift": job.sampler.flow_shift},
        "models": plan.provenance, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "seconds": round(time.perf_counter() - started, 1)})
    write_json(output, calibration_record(calibration))
    log.info("calibration of %d job(s) written to %s; use it with: speed=fastest cache.calibration=%s",
             len(samples), output, output)
    return 0

