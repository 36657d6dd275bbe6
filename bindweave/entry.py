"""From a composed Hydra config to a run: settings objects, one clear error, an exit code."""

from __future__ import annotations

import atexit
import logging
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

from omegaconf import DictConfig, OmegaConf

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
    from bindweave.pipeline import ModelSettings, RunSettings, VideoSettings, load_stage3_models, run_generation
    from bindweave.sampler import SamplerSettings
    import torch.distributed as dist

    from parallel.distributed import rank_device, start_process_group, stop_process_group
    from parallel.layout import layout_from_config
    from parallel.parallelize import parallelize
    from bindweave.hydra_support import save_job_result, save_run_config
    from parallel.runtime import RaisedOnRank0, Runtime

    if cfg.on_error not in ("fail", "skip"):
        raise BindWeaveInputError(f"on_error={cfg.on_error}: use on_error=fail or on_error=skip")
    video = VideoSettings(**OmegaConf.to_container(cfg.video))
    sampler = SamplerSettings(**OmegaConf.to_container(cfg.sampler))
    model_settings = ModelSettings(**OmegaConf.to_container(cfg.model))
    if cfg.data.meta_path is None and not model_settings.tiny_root:
        raise BindWeaveInputError("data.meta_path is not set: pass data.meta_path=META_JSON data.image_root=IMAGE_DIR")

    device_type = _device_type(model_settings.device)
    layout = layout_from_config(cfg.parallel, processes.world_size, _dit_attention_heads(model_settings), device_type)
    if not dist.is_initialized():  # once per process, also across the jobs of a multirun
        start_process_group(processes, device_type, cfg.parallel.timeout_s)
        atexit.register(stop_process_group)
    if processes.world_size > 1:  # one process per GPU: rank r computes on GPU LOCAL_RANK
        model_settings = replace(model_settings, device=str(rank_device(processes, device_type)))

    # Loaded once per process: a sweep job that changes only sampler/video/data/output reuses them.
    key = (model_settings, layout)
    if _SESSION.get("key") != key:
        _SESSION.clear()
        runtime = Runtime.build(layout, processes, model_settings.resolved_device())
        log.info("rank %d: loading stage-3 models (%s)", runtime.rank, layout.describe())
        models = load_stage3_models(model_settings, runtime)
        parallelize(models.transformer, runtime)
        _SESSION.update(key=key, runtime=runtime, models=models)
    runtime, models = _SESSION["runtime"], _SESSION["models"]
    meta_path = cfg.data.meta_path
    if meta_path is None:
        from bindweave.tiny import write_tiny_models

        def write_demo() -> Path:
            return demo_meta_with_hidden_states(Path(cfg.data.demo_dir), hidden_dim=models.hidden_dim,
                                                qwen_folder=write_tiny_models(Path(model_settings.tiny_root)).qwen)

        meta_path = runtime.from_rank0(write_demo)  # one writer; the other ranks wait for it
        if runtime.rank == 0:
            log.info("demo: built-in cases at %s (tiny random models: the videos are noise)", meta_path)
    run = RunSettings(
        meta_path=Path(meta_path),
        image_root=Path(cfg.data.image_root) if cfg.data.image_root else None,
        output_dir=_job_output_dir(cfg),
        overwrite=cfg.overwrite,
        on_error=cfg.on_error,
        progress=cfg.progress and runtime.rank == 0,
    )
    runtime.from_rank0(lambda: save_run_config(cfg, run.output_dir))
    try:
        summary = run_generation(models, run, video, sampler, runtime)
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


def _job_output_dir(cfg: DictConfig) -> Path:
    """``output_dir``, or in a multirun the job's own folder (Hydra's sweep subdir, config saved there)."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN:
        return Path(HydraConfig.get().runtime.output_dir)
    return Path(cfg.output_dir)


def _device_type(device: str) -> str:
    """The configured model device's type, cuda or cpu, without touching a GPU (auto: CUDA if present)."""
    import torch

    return ("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else torch.device(device).type


def _dit_attention_heads(settings) -> int:
    """The DiT's head count from its config.json alone: the layout is checked before any weight is read."""
    from bindweave.checkpoint import read_config, resolve_folder
    from bindweave.tiny import write_tiny_models
    from bindweave.transformer import BINDWEAVE_14B_CONFIG, BindWeaveTransformer

    if settings.tiny_root:
        folder = write_tiny_models(Path(settings.tiny_root)).bindweave
    else:
        folder = resolve_folder(settings.dit, settings.dit_subfolder, settings.revision)
    return read_config(folder, BindWeaveTransformer, BINDWEAVE_14B_CONFIG)["num_attention_heads"]
