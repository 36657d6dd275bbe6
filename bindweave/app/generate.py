"""From a composed Hydra config to a run: settings objects, one clear error, an exit code."""

from __future__ import annotations

import atexit
import logging
from dataclasses import dataclass
from pathlib import Path

import torch.distributed as dist
from omegaconf import DictConfig

from bindweave.app.build import BuildRequest, build_engine, plan_build, process_device
from bindweave.app.config import GenerateConfig, settings_of
from bindweave.errors import BindWeaveInputError, report_input_error
from bindweave.stages.engine import Stage3Engine
from bindweave.stages.plan import BuildPlan
from parallel.distributed import Processes
from parallel.runtime import Runtime

log = logging.getLogger("bindweave")


@dataclass
class LoadedEngine:
    """The engine of this process and what it was built for: the jobs of a Hydra multirun that keep
    ``model.*`` and ``parallel.*`` reuse it (the process group, the plan and the models, once)."""

    key: tuple
    plan: BuildPlan
    runtime: Runtime
    engine: Stage3Engine | None = None
    finish_group: object = None


class GenerateCommand:
    """``launch/generate.py``: one stage-3 job per call (a multirun calls it once per job). It holds
    the loaded engine between calls, so no module keeps state."""

    def __init__(self):
        self.loaded: LoadedEngine | None = None

    def __call__(self, cfg: DictConfig) -> dict:
        """Run one job; returns its summary with ``exit_code``: 0 all done, 1 some samples failed
        (on_error=skip), 2 bad input/config.

        Under torchrun or srun every rank runs this. Ranks that read the same inputs fail alike, so
        an input error is reported once: by rank 0, or for a sample's own inputs by that sample's
        writer. The other ranks exit too, or the launcher ends them (collectives time out after
        ``parallel.timeout_s``).
        """
        from parallel.distributed import detect_processes

        is_rank0 = True
        try:
            processes = detect_processes()
            is_rank0 = processes.rank == 0
            return self._generate(cfg, processes)
        except BindWeaveInputError as error:
            if is_rank0:
                report_input_error(error)
            return {"exit_code": 2, "error": str(error)}

    def _generate(self, cfg: DictConfig, processes: Processes) -> dict:
        """The job's plan first (every choice and refusal, bindweave/app/build.py), then its inputs
        checked (the demo's meta built first, so it is checked the same way), then the models
        loaded by the plan, then the meta JSON job by job (bindweave/stages/batch.py)."""
        from bindweave.app.hydra_support import job_output_dir, log_to_file, save_run_config
        from bindweave.sampling.calibration import load_calibration
        from bindweave.stages.batch import RunSettings

        job = settings_of(cfg)  # the schema's own checks (bindweave/app/config.py); the command line passed them already
        load_calibration(job.cache.calibration)  # a wrong calibration file fails before anything loads
        loaded = self._plan_for(job, processes)
        plan, runtime = loaded.plan, loaded.runtime
        meta_path = job.data.meta_path
        if meta_path is None:  # the built-in demo: one writer; the other ranks wait for it
            meta_path = runtime.from_rank0(lambda: demo_meta(job.data, job.model, plan.hidden_dim))
            if runtime.rank == 0:
                log.info("demo: built-in cases at %s (tiny random models: the videos are noise)", meta_path)
        run = RunSettings(
            meta_path=Path(meta_path),
            image_root=Path(job.data.image_root) if job.data.image_root else None,
            output_dir=job_output_dir(job.output_dir),
            overwrite=job.overwrite,
            on_error=job.on_error,
            progress=job.progress and runtime.rank == 0,
        )
        # Rank 0 checks and every rank follows its verdict, so the ranks never part ways on a job.
        known_bad = runtime.from_rank0(lambda: _check_job_first(job, run, plan))
        if loaded.engine is None:
            log.info("rank %d: loading stage-3 models (%s)", runtime.rank, runtime.layout.describe())
            loaded.engine = build_engine(plan, runtime, job.model.gpu_memory_gib)
        run_folder = runtime.from_rank0(lambda: save_run_config(cfg, run.output_dir))
        log_path = log_to_file(run_folder, runtime.rank)
        return _generate_samples(loaded, run, job.video, job.sampler, job.cache, known_bad, log_path)

    def _plan_for(self, job: GenerateConfig, processes: Processes) -> LoadedEngine:
        """The plan (and engine, once loaded) for these model and layout settings: the one already
        made, or a new one (the process group started first: the ranks agree on the free memory)."""
        from bindweave.stages.models import model_folders
        from parallel.distributed import finish_barrier_group, smallest_across_ranks, start_process_group, \
            stop_process_group

        key = (job.model, job.parallel, job.sampler.cfg_passes)
        if self.loaded is not None and self.loaded.key == key:
            return self.loaded
        self.loaded = None  # the old models go before the new ones load
        device = process_device(job.model.device, processes)
        if not dist.is_initialized():  # once per process, also across the jobs of a multirun
            start_process_group(processes, device.type, job.parallel.timeout_s)
            atexit.register(stop_process_group)
        if job.model.tiny_root and processes.world_size > 1:  # the tiny set is written once, by rank 0, then read by all
            if processes.rank == 0:
                model_folders(job.model)
            dist.barrier()
        plan = plan_build(BuildRequest(job.model, job.video, job.parallel, job.sampler), processes,
                          agree=smallest_across_ranks)
        runtime = Runtime.build(plan.layout, processes, device)
        self.loaded = LoadedEngine(key, plan, runtime, finish_group=finish_barrier_group())
        return self.loaded


def _generate_samples(loaded: LoadedEngine, run, video, sampler, cache, known_bad: dict[str, str],
                      log_path: Path) -> dict:
    from bindweave.app.hydra_support import save_job_result, write_failed_samples
    from parallel.runtime import RaisedOnRank0

    from bindweave.stages.batch import run_batch

    runtime = loaded.runtime
    try:
        summary = run_batch(loaded.engine, run, video, sampler, known_bad=known_bad, cache=cache)
    except BindWeaveInputError as error:
        # A sample's inputs are read by every rank of its group, and they fail alike: its writer reports.
        if runtime.is_writer and not isinstance(error, RaisedOnRank0):
            report_input_error(error)
        summary = {"exit_code": 2, "error": str(error)}
    else:
        summary["exit_code"] = 1 if summary["failed"] else 0
        if runtime.is_writer:
            log.info("done: %d written, %d already there, %d failed; videos in %s (log: %s)", len(summary["done"]),
                     len(summary["skipped"]), len(summary["failed"]), run.output_dir.resolve(), log_path)
    if runtime.is_writer:  # one result per data group, for the sweep summary
        _report_once(lambda: save_job_result(run.output_dir, runtime.data_rank, summary), summary)
    # No rank leaves before every rank is done: a launcher ends the others as soon as one process
    # exits non-zero (a data group whose samples were all bad would kill the healthy groups).
    if loaded.finish_group is not None:
        dist.barrier(group=loaded.finish_group)
    if runtime.rank == 0 and summary["exit_code"] != 2:
        _report_once(lambda: write_failed_samples(run.output_dir), summary)
    return summary


def demo_meta(data, model_settings, hidden_dim: int) -> Path:
    """The built-in demo cases with hidden states from the tiny Qwen2.5-VL (model=tiny only)."""
    from bindweave.testing.demo import demo_meta_with_hidden_states
    from bindweave.testing.tiny import write_tiny_models

    return demo_meta_with_hidden_states(Path(data.demo_dir), hidden_dim=hidden_dim,
                                        qwen_folder=write_tiny_models(Path(model_settings.tiny_root)).qwen)


def _report_once(write, summary: dict) -> None:
    """A run summary file that cannot be written (e.g. the disk filled up) is the job's one error,
    unless the job already failed with one (then it is only noted); every rank still reaches the end."""
    try:
        write()
    except BindWeaveInputError as error:
        if summary["exit_code"] == 2:
            log.warning("run summary not saved: %s", error)
        else:
            report_input_error(error)
            summary.update(exit_code=2, error=str(error))


def _check_job_first(job: GenerateConfig, run, plan: BuildPlan) -> dict[str, str]:
    """Every sample's inputs, the output folder and the video writer, and the recipes of finished
    videos against the plan, before any weight is read.

    Any problem ends the job (exit 2, all problems listed) unless ``on_error=skip``: then the bad
    samples are reported here and returned (sample id -> reason) so the run skips them. Problems of
    the job itself (output folder, video writer) always end it. Run on rank 0 (``from_rank0``): its
    verdict is every rank's, so all ranks stop together; rank 0 reports.
    """
    from bindweave.io.outputs import video_done
    from bindweave.stages.preflight import check_job

    output_dir = run.output_dir
    finished = set() if job.overwrite else {
        path.stem for path in output_dir.glob("*.mp4") if video_done(path)} if output_dir.is_dir() else set()
    check = check_job(run.meta_path, run.image_root, hidden_dim=plan.hidden_dim, output_dir=output_dir,
                      video=job.video, finished=finished)
    if check.job_problems or (check.problems and job.on_error != "skip"):
        raise check.error()
    _refuse_changed_finished_samples(job, plan, check.samples, finished, output_dir)
    bad = {}
    for problem in check.problems:
        bad.setdefault(problem.sample_id, problem.reason())
    if bad:
        log.error("%s; the %d other samples run", check.report(skipping=True), len(check.samples))
    return bad


def _refuse_changed_finished_samples(job: GenerateConfig, plan: BuildPlan, samples, finished: set[str],
                                     output_dir: Path) -> None:
    """A finished video is skipped only if its sidecar's recipe is this run's (bindweave/stages/resume.py)."""
    from bindweave.stages.job import Stage3Job, sample_seed
    from bindweave.stages.phases import job_recipe_options
    from bindweave.stages.resume import changes, recorded_recipe, refuse_changed_samples, sample_recipe

    done = [sample for sample in samples if sample.sample_id in finished]
    if not done:
        return
    options = job_recipe_options(plan.recipe_options(), job.cache)
    conflicts = {}
    for sample in done:
        recorded = recorded_recipe(output_dir / f"{sample.sample_id}.json")
        try:
            expected = sample_recipe(sample.prompt, Stage3Job(sample, job.video, job.sampler, None).input_hashes(),
                                     sample_seed(sample, job.sampler), job.video, job.sampler, plan.provenance, options)
        except OSError:  # an input of a finished video is gone: nothing to compare, the video is kept
            continue
        changed = ["its sidecar records no recipe (an older or damaged sidecar)"] if recorded is None \
            else changes(recorded, expected)
        if changed:
            conflicts[sample.sample_id] = changed
    refuse_changed_samples(conflicts, output_dir)
