"""From a composed Hydra config to a run: settings objects, one clear error, an exit code."""

from __future__ import annotations

import atexit
import logging
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

from omegaconf import DictConfig

from bindweave.config import GenerateConfig, settings_of
from bindweave.errors import BindWeaveInputError, report_input_error

if TYPE_CHECKING:
    from parallel.distributed import Processes

log = logging.getLogger("bindweave")
# Process-wide state kept across the jobs of a Hydra multirun: the process group is started once
# and the models are reloaded only when the model settings or the layout change.
_SESSION: dict = {}


def run_generate_command(cfg: DictConfig) -> dict:
    """Run one stage-3 job; returns its summary with ``exit_code``: 0 all done, 1 some samples
    failed (on_error=skip), 2 bad input/config.

    Under torchrun or srun every rank runs this. Ranks that read the same inputs fail alike, so an
    input error is reported once: by rank 0, or for a sample's own inputs by that sample's writer.
    The other ranks exit too, or the launcher ends them (collectives time out after
    ``parallel.timeout_s``). The process group and the loaded models outlive the job, so the jobs
    of a Hydra multirun reuse them (see :data:`_SESSION`).
    """
    from parallel.distributed import detect_processes

    is_rank0 = True
    try:
        processes = detect_processes()
        is_rank0 = processes.rank == 0
        return _generate(cfg, processes)
    except BindWeaveInputError as error:
        if is_rank0:
            report_input_error(error)
        return {"exit_code": 2, "error": str(error)}


def _generate(cfg: DictConfig, processes: Processes) -> int:
    from bindweave.demo import demo_meta_with_hidden_states
    from bindweave.pipeline import RunSettings, load_stage3_models, run_generation
    import torch.distributed as dist

    from parallel.distributed import rank_device, start_process_group, stop_process_group
    from parallel.layout import layout_from_config
    from bindweave.fast import resolve_attention
    from parallel.parallelize import attention_call_sites, parallelize, refuse_inapplicable_speed_options
    from bindweave.hydra_support import save_job_result, save_run_config
    from parallel.runtime import RaisedOnRank0, Runtime

    job = settings_of(cfg)  # the schema's own checks (bindweave/config.py); the command line passed them already
    model_settings, video, sampler = job.model, job.video, job.sampler

    device_type = _device_type(model_settings.device)
    layout = layout_from_config(job.parallel, processes.world_size, _dit_config(model_settings)["num_attention_heads"], device_type)
    refuse_inapplicable_speed_options(model_settings.attention_kernel, model_settings.fuse_projections,
                                      model_settings.compile, layout, device_type, model_settings.dtype)
    if not dist.is_initialized():  # once per process, also across the jobs of a multirun
        start_process_group(processes, device_type, job.parallel.timeout_s)
        atexit.register(stop_process_group)
    if processes.world_size > 1:  # one process per GPU: rank r computes on GPU LOCAL_RANK
        model_settings = replace(model_settings, device=str(rank_device(processes, device_type)))

    known_bad = _check_job_first(job, processes.rank) if job.data.meta_path is not None else {}

    # Loaded once per process: a sweep job that changes only sampler/video/data/output reuses them.
    key = (model_settings, layout)
    if _SESSION.get("key") != key:
        _SESSION.clear()
        runtime = Runtime.build(layout, processes, model_settings.resolved_device())
        log.info("rank %d: loading stage-3 models (%s)", runtime.rank, layout.describe())
        models = load_stage3_models(model_settings, runtime)
        parallelize(models.transformer, runtime)
        models.attention_kernels = attention_call_sites(
            resolve_attention(model_settings.attention_kernel, models.device), runtime.layout, device_type,
            model_settings.dtype)
        if runtime.rank == 0:
            log.info("attention kernels: %s", "; ".join(f"{site}: {kernel}" for site, kernel in
                                                         models.attention_kernels.items()))
        _SESSION.update(key=key, runtime=runtime, models=models)
    runtime, models = _SESSION["runtime"], _SESSION["models"]
    meta_path = job.data.meta_path
    if meta_path is None:
        from bindweave.tiny import write_tiny_models

        def write_demo() -> Path:
            return demo_meta_with_hidden_states(Path(job.data.demo_dir), hidden_dim=models.hidden_dim,
                                                qwen_folder=write_tiny_models(Path(model_settings.tiny_root)).qwen)

        meta_path = runtime.from_rank0(write_demo)  # one writer; the other ranks wait for it
        if runtime.rank == 0:
            log.info("demo: built-in cases at %s (tiny random models: the videos are noise)", meta_path)
    run = RunSettings(
        meta_path=Path(meta_path),
        image_root=Path(job.data.image_root) if job.data.image_root else None,
        output_dir=_job_output_dir(job),
        overwrite=job.overwrite,
        on_error=job.on_error,
        progress=job.progress and runtime.rank == 0,
    )
    runtime.from_rank0(lambda: save_run_config(cfg, run.output_dir))
    try:
        summary = run_generation(models, run, video, sampler, runtime, known_bad=known_bad)
    except BindWeaveInputError as error:
        # A sample's inputs are read by every rank of its group, and they fail alike: its writer reports.
        if runtime.is_writer and not isinstance(error, RaisedOnRank0):
            report_input_error(error)
        summary = {"exit_code": 2, "error": str(error)}
    else:
        summary["exit_code"] = 1 if summary["failed"] else 0
        if runtime.is_writer:
            log.info("done: %d written, %d already there, %d failed; videos in %s", len(summary["done"]),
                     len(summary["skipped"]), len(summary["failed"]), run.output_dir.resolve())
    if runtime.is_writer:  # one result per data group, for the sweep summary
        save_job_result(run.output_dir, runtime.data_rank, summary)
    return summary


def _check_job_first(job: GenerateConfig, rank: int) -> dict[str, str]:
    """Every sample's inputs, the output folder and the video writer, before any weight is read.

    Any problem ends the job (exit 2, all problems listed) unless ``on_error=skip``: then the bad
    samples are reported here and returned (sample id -> reason) so the run skips them. Problems of
    the job itself (output folder, video writer) always end it. Every rank checks the same files
    and reaches the same verdict, so all ranks stop together; rank 0 reports.
    """
    from bindweave.outputs import video_done
    from bindweave.preflight import check_job

    output_dir = _job_output_dir(job)
    finished = set() if job.overwrite else {
        path.stem for path in output_dir.glob("*.mp4") if video_done(path)} if output_dir.is_dir() else set()
    check = check_job(job.data.meta_path, job.data.image_root, hidden_dim=_dit_config(job.model)["mllm_dim"],
                      output_dir=output_dir, video=job.video, finished=finished)
    if check.job_problems or (check.problems and job.on_error != "skip"):
        raise check.error()
    bad = {}
    for problem in check.problems:
        bad.setdefault(problem.sample_id, problem.line())
    if bad and rank == 0:
        log.error("%s; the %d other samples run", check.report(skipping=True), len(check.samples))
    return bad


def _job_output_dir(job: GenerateConfig) -> Path:
    """``output_dir``, or in a multirun the job's own folder (Hydra's sweep subdir, config saved there)."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN:
        return Path(HydraConfig.get().runtime.output_dir)
    return Path(job.output_dir)


def _device_type(device: str) -> str:
    """The configured model device's type, cuda or cpu, without touching a GPU (auto: CUDA if present)."""
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if torch.device(device).type == "cuda" and not torch.cuda.is_available():
        raise BindWeaveInputError(f"model.device={device} but no CUDA device is visible here: use model.device=auto "
                                  "(CUDA when present, else CPU) or model.device=cpu")
    return torch.device(device).type


def _dit_config(settings) -> dict:
    """The DiT's config.json alone (heads for the layout, hidden size for the inputs): read before any weight."""
    from bindweave.checkpoint import read_config, resolve_folder
    from bindweave.tiny import write_tiny_models
    from bindweave.transformer import BINDWEAVE_14B_CONFIG, BindWeaveTransformer

    if settings.tiny_root:
        folder = write_tiny_models(Path(settings.tiny_root)).bindweave
    else:
        folder = resolve_folder(settings.dit, settings.dit_subfolder, settings.revision)
    return read_config(folder, BindWeaveTransformer, BINDWEAVE_14B_CONFIG)
