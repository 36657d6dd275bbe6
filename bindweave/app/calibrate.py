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

from bindweave.errors import exits_2_on_input_error

log = logging.getLogger("bindweave")


@exits_2_on_input_error
def run_calibrate_command(cfg: DictConfig) -> int:
    from bindweave.app.config import settings_of
    from bindweave.app.generate import demo_meta, dit_config
    from bindweave.app.hydra_support import begin_run
    from bindweave.io.inputs import read_meta
    from bindweave.io.outputs import write_json
    from bindweave.model.speed import check_speed_support
    from bindweave.sampling.calibration import calibration_record
    from bindweave.sampling.step_cache import StepStatistics, calibration_from
    from bindweave.stages.generate import Stage3Job, generate_sample, load_stage3_models
    from bindweave.stages.preflight import check_job

    job = settings_of(cfg)  # the schema's own checks (bindweave/app/config.py)
    output = Path(job.output)
    begin_run(cfg, output.parent)  # checks the output folder first
    check_speed_support(job.model.speed_options(), job.model.resolved_device())
    meta_path, image_root = (Path(job.data.meta_path), Path(job.data.image_root) if job.data.image_root else None) \
        if job.data.meta_path is not None else (None, None)
    if meta_path is not None:  # every input checked before any weight is read
        check = check_job(meta_path, image_root, hidden_dim=dit_config(job.model)["mllm_dim"], output_dir=output.parent, video=job.video,
                          finished=set())
        if check.job_problems or check.problems:
            raise check.error()
    started = time.perf_counter()
    models = load_stage3_models(job.model)
    if meta_path is None:
        meta_path = demo_meta(job.data, job.model, models.hidden_dim)
    samples = read_meta(meta_path, image_root)[: job.samples]
    statistics = StepStatistics()
    for number, sample in enumerate(samples, 1):
        log.info("calibrating on %s (%d of %d): %d exact steps at %dx%d x %d frames", sample.sample_id, number,
                 len(samples), job.sampler.num_steps, job.video.width, job.video.height, job.video.num_frames)
        generate_sample(models, Stage3Job(sample, job.video, job.sampler, None), progress=job.progress,
                        step_cache=statistics)
    calibration = calibration_from(statistics, source=str(output), details={
        "num_steps": job.sampler.num_steps, "samples": [sample.sample_id for sample in samples],
        "video": {"height": job.video.height, "width": job.video.width, "num_frames": job.video.num_frames},
        "sampler": {"guidance_scale": job.sampler.guidance_scale, "flow_shift": job.sampler.flow_shift},
        "models": models.provenance, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "seconds": round(time.perf_counter() - started, 1)})
    write_json(output, calibration_record(calibration))
    log.info("calibration of %d job(s) written to %s; use it with: speed=fastest cache.calibration=%s",
             len(samples), output, output)
    return 0

