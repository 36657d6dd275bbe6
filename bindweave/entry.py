"""From a composed Hydra config to a run: settings objects, one clear error, an exit code."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from bindweave.errors import BindWeaveInputError

log = logging.getLogger("bindweave")


def run_generate_command(cfg: DictConfig) -> int:
    """Exit code: 0 all done, 1 some samples failed (on_error=skip), 2 bad input/config."""
    try:
        return _generate(cfg)
    except BindWeaveInputError as error:
        log.error("%s", error)
        print(f"error: {error}", file=sys.stderr)
        return 2


def _generate(cfg: DictConfig) -> int:
    from bindweave.demo import demo_meta_with_hidden_states
    from bindweave.pipeline import ModelSettings, RunSettings, VideoSettings, load_stage3_models, run_generation
    from bindweave.sampler import SamplerSettings

    if cfg.on_error not in ("fail", "skip"):
        raise BindWeaveInputError(f"on_error={cfg.on_error}: use on_error=fail or on_error=skip")
    video = VideoSettings(**OmegaConf.to_container(cfg.video))
    sampler = SamplerSettings(**OmegaConf.to_container(cfg.sampler))
    model_settings = ModelSettings(**OmegaConf.to_container(cfg.model))
    if cfg.data.meta_path is None and not model_settings.tiny_root:
        raise BindWeaveInputError("data.meta_path is not set: pass data.meta_path=META_JSON data.image_root=IMAGE_DIR")

    models = load_stage3_models(model_settings)
    meta_path = cfg.data.meta_path
    if meta_path is None:
        meta_path = demo_meta_with_hidden_states(Path(cfg.data.demo_dir), hidden_dim=models.hidden_dim)
        log.info("demo: built-in cases at %s (tiny random models: the videos are noise)", meta_path)
    run = RunSettings(
        meta_path=Path(meta_path),
        image_root=Path(cfg.data.image_root) if cfg.data.image_root else None,
        output_dir=Path(cfg.output_dir),
        overwrite=cfg.overwrite,
        on_error=cfg.on_error,
        progress=cfg.progress,
    )
    summary = run_generation(models, run, video, sampler)
    log.info("done: %d written, %d already there, %d failed; videos in %s", len(summary["done"]),
             len(summary["skipped"]), len(summary["failed"]), run.output_dir.resolve())
    return 1 if summary["failed"] else 0
