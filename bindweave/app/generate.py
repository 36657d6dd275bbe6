"""From a composed Hydra config to a run: settings objects, one clear error, an exit code."""

from __future__ import annotations

import atexit
import logging
from dataclasses import dataclass, replace
from pathlib import Path

import torch.distributed as dist
from omegaconf import DictConfig

from bindweave.app.config import GenerateConfig, settings_of
from bindweave.errors import BindWeaveInputError, report_input_error
from bindweave.stages.engine import Stage3Engine
from parallel.distributed import Processes
from parallel.runtime import Runtime

log = logging.getLogger("bindweave")


@dataclass
class LoadedEngine:
    """The engine of this process and what it was built for: the jobs of a Hydra multirun that keep
    ``model.*`` and the layout reuse it (the process group and the models are loaded once)."""

    key: tuple
    engine: Stage3Engine
    runtime: Runtime
    finish_group: object


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
        from bindweave.app.hydra_support import job_output_dir, log_to_file, save_run_config
        from bindweave.stages.generate import RunSettings
        from parallel.distributed import rank_device, start_process_group, stop_process_group
        from parallel.layout import layout_from_config
        from bindweave.model.speed import check_speed_support
        from bindweave.sampling.calibration import load_calibration
        from parallel.parallelize import refuse_inapplicable_speed_options

        job = settings_of(cfg)  # the schema's own checks (bindweave/app/config.py); the command line passed them already
        model_settings, video, sampler = job.model, job.video, job.sampler
        device_type = _device_type(model_settings.device)
        layout = layout_from_config(job.parallel, processes.world_size,
                                    dit_config(model_settings)["num_attention_heads"], device_type)
        refuse_inapplicable_speed_options(model_settings.attention_kernel, layout, device_type, model_settings.dtype,
                                          model_settings.offload_encoders, model_settings.linear_precision,
                                          model_settings.memory)
        load_calibration(job.cache.calibration)  # a wrong calibration file fails before anything loads
        if not dist.is_initialized():  # once per process, also across the jobs of a multirun
            start_process_group(processes, device_type, job.parallel.timeout_s)
            atexit.register(stop_process_group)
        if processes.world_size > 1:  # one process per GPU: rank r computes on GPU LOCAL_RANK
            model_settings = replace(model_settings, device=str(rank_device(processes, device_type)))
        check_speed_support(model_settings.speed_options(), model_settings.resolved_device())
        plan = memory_plan(model_settings, job.video, layout, processes.rank, processes.local_world_size)

        known_bad = _check_job_first(job, processes.rank) if job.data.meta_path is not None else {}
        loaded = self._engine_for(model_settings, layout, processes, device_type, plan)
        engine, runtime = loaded.engine, loaded.runtime
        meta_path = job.data.meta_path
        if meta_path is None:  # one writer; the other ranks wait for it
            meta_path = runtime.from_rank0(lambda: demo_meta(job.data, model_settings, engine.models.hidden_dim))
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
        run_folder = runtime.from_rank0(lambda: save_run_config(cfg, run.output_dir))
        log_path = log_to_file(run_folder, runtime.rank)
        return _generate_samples(loaded, run, video, sampler, job.cache, known_bad, log_path)

    def _engine_for(self, model_settings, layout, processes: Processes, device_type: str, plan) -> LoadedEngine:
        """The engine for these model settings and this layout: the one already loaded, or a new one."""
        from parallel.distributed import finish_barrier_group
        from parallel.runtime import Runtime

        key = (model_settings, layout)
        if self.loaded is None or self.loaded.key != key:
            self.loaded = None  # the old models go before the new ones load
            runtime = Runtime.build(layout, processes, model_settings.resolved_device())
            log.info("rank %d: loading stage-3 models (%s)", runtime.rank, layout.describe())
            engine = Stage3Engine(build_models(model_settings, runtime, device_type, plan), runtime)
            self.loaded = LoadedEngine(key, engine, runtime, finish_barrier_group())
        return self.loaded


def build_models(model_settings, runtime: Runtime, device_type: str, memory_plan=None):
    """Load the stage-3 models for this layout, in one documented order: load (FSDP: the DiT built
    on the meta device, its projections fused there without aliases, then sharded, each rank
    reading its rows; T5 sharded after loading), then the speed options (kernel, fused projections,
    compiled blocks: bindweave.model.speed; under FSDP the blocks compile after ``fully_shard``, so
    each compiled block runs between FSDP's all-gather and reshard), then the sequence sharding
    around the chosen kernel (parallel/parallelize.py). What the layout cannot honour was refused
    before (``refuse_inapplicable_speed_options``)."""
    from bindweave.stages.generate import load_stage3_models
    from parallel.fsdp import load_sharded_bindweave, shard_t5
    from parallel.parallelize import attention_call_sites, parallelize

    sharded = set(runtime.layout.fsdp) if runtime.fsdp_mesh is not None else set()
    build_dit = (lambda folder, dtype, device: load_sharded_bindweave(
        folder, runtime.fsdp_mesh, dtype, device, fuse=model_settings.fuse_projections)[0]) \
        if "dit" in sharded else None
    sharder = (lambda module: shard_t5(module, runtime.fsdp_mesh)) if "t5" in sharded else None
    # Processes on one machine stream an offloaded DiT from one shared host buffer (a copy each would not fit).
    share = runtime.share_host_buffer if runtime.local_world_size > 1 else None
    models = load_stage3_models(model_settings, build_dit=build_dit, shard_t5=sharder, memory_plan=memory_plan,
                                share_host_buffer=share)
    chosen_kernel = models.transformer.attention_hook.kernel  # `auto` settled by bindweave.model.speed
    parallelize(models.transformer, runtime)
    models.attention_kernels = attention_call_sites(chosen_kernel, runtime.layout, device_type, model_settings.dtype)
    if runtime.rank == 0:
        log.info("attention kernels: %s", "; ".join(f"{site}: {kernel}" for site, kernel in
                                                     models.attention_kernels.items()))
    return models


def _generate_samples(loaded: LoadedEngine, run, video, sampler, cache, known_bad: dict[str, str],
                      log_path: Path) -> dict:
    from bindweave.app.hydra_support import save_job_result, write_failed_samples
    from parallel.runtime import RaisedOnRank0

    runtime = loaded.runtime
    try:
        summary = loaded.engine.run_meta(run, video, sampler, known_bad=known_bad, cache=cache)
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


def _check_job_first(job: GenerateConfig, rank: int) -> dict[str, str]:
    """Every sample's inputs, the output folder and the video writer, before any weight is read.

    Any problem ends the job (exit 2, all problems listed) unless ``on_error=skip``: then the bad
    samples are reported here and returned (sample id -> reason) so the run skips them. Problems of
    the job itself (output folder, video writer) always end it. Every rank checks the same files
    and reaches the same verdict, so all ranks stop together; rank 0 reports.
    """
    from bindweave.app.hydra_support import job_output_dir
    from bindweave.io.outputs import video_done
    from bindweave.stages.preflight import check_job

    output_dir = job_output_dir(job.output_dir)
    finished = set() if job.overwrite else {
        path.stem for path in output_dir.glob("*.mp4") if video_done(path)} if output_dir.is_dir() else set()
    check = check_job(job.data.meta_path, job.data.image_root, hidden_dim=dit_config(job.model)["mllm_dim"],
                      output_dir=output_dir, video=job.video, finished=finished)
    if check.job_problems or (check.problems and job.on_error != "skip"):
        raise check.error()
    _refuse_changed_finished_samples(job, check.samples, finished, output_dir)
    bad = {}
    for problem in check.problems:
        bad.setdefault(problem.sample_id, problem.reason())
    if bad and rank == 0:
        log.error("%s; the %d other samples run", check.report(skipping=True), len(check.samples))
    return bad


def _refuse_changed_finished_samples(job: GenerateConfig, samples, finished: set[str], output_dir: Path) -> None:
    """A finished video is skipped only if its sidecar's recipe is this run's (bindweave/stages/resume.py)."""
    from bindweave.stages.generate import (Stage3Job, job_recipe_options, model_folders, model_provenance,
                                           recipe_options, sample_seed)
    from bindweave.stages.resume import changes, recorded_recipe, refuse_changed_samples, sample_recipe

    done = [sample for sample in samples if sample.sample_id in finished]
    if not done:
        return
    provenance = model_provenance(*model_folders(job.model))
    options = job_recipe_options(recipe_options(job.model), job.cache)
    conflicts = {}
    for sample in done:
        recorded = recorded_recipe(output_dir / f"{sample.sample_id}.json")
        try:
            expected = sample_recipe(sample.prompt, Stage3Job(sample, job.video, job.sampler, None).input_hashes(),
                                     sample_seed(sample, job.sampler), job.video, job.sampler, provenance, options)
        except OSError:  # an input of a finished video is gone: nothing to compare, the video is kept
            continue
        changed = ["its sidecar records no recipe (an older or damaged sidecar)"] if recorded is None \
            else changes(recorded, expected)
        if changed:
            conflicts[sample.sample_id] = changed
    refuse_changed_samples(conflicts, output_dir)


def memory_plan(model_settings, video, layout, rank: int, processes_on_host: int = 1):
    """``model.memory`` settled for this rank's GPU, its share of the job's tokens and its share of
    the host memory (logged by rank 0). Under FSDP the shards are the memory lever: ``auto`` keeps everything resident there
    (``offload`` with FSDP was refused with the other combinations). Every rank plans for the
    smallest free memory of all: they load and stream the DiT alike (one shared host buffer)."""
    from bindweave.stages.generate import job_size, memory_plan_for
    from parallel.distributed import smallest_across_ranks

    settings = replace(model_settings, memory="resident") if layout.fsdp and model_settings.memory == "auto" \
        else model_settings
    plan = memory_plan_for(settings, job_size(settings, video, dit_config(settings), layout.sequence),
                           settings.resolved_device(), processes_on_host, agree=smallest_across_ranks)
    if rank == 0:
        log.info("memory=%s: %s (%s)", model_settings.memory, plan.mode, plan.reason)
    return plan


def _device_type(device: str) -> str:
    """The configured model device's type, cuda or cpu, without touching a GPU (auto: CUDA if present)."""
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    chosen = torch.device(device)
    if chosen.type == "cuda" and not torch.cuda.is_available():
        raise BindWeaveInputError(f"model.device={device} but no CUDA device is visible here: use model.device=auto "
                                  "(CUDA when present, else CPU) or model.device=cpu")
    if chosen.type == "cuda" and chosen.index is not None and chosen.index >= torch.cuda.device_count():
        raise BindWeaveInputError(f"model.device={device} but this process sees {torch.cuda.device_count()} CUDA "
                                  f"device(s) (cuda:0 to cuda:{torch.cuda.device_count() - 1}): use model.device=auto")
    return chosen.type


def dit_config(settings) -> dict:
    """The DiT's config.json alone (heads for the layout, hidden size for the inputs): read before any weight."""
    from bindweave.io.checkpoint import read_config
    from bindweave.stages.generate import model_folders
    from bindweave.model.transformer import BINDWEAVE_14B_CONFIG, BindWeaveTransformer

    return read_config(model_folders(settings)[0], BindWeaveTransformer, BINDWEAVE_14B_CONFIG)
