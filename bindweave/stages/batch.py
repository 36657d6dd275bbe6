"""Every video of a meta JSON, job by job through :meth:`Stage3Engine.run` (the CLI, a multirun,
srun): resumable (finished samples are skipped), ``on_error=fail`` stops at the first bad sample,
``on_error=skip`` reports it and goes on."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from bindweave.io.inputs import Sample, read_meta
from bindweave.io.outputs import video_done
from bindweave.settings.model import VideoSettings
from bindweave.settings.sampling import CacheSettings, SamplerSettings
from bindweave.stages.engine import Stage3Engine
from bindweave.stages.job import Stage3Job
from bindweave.stages.memory import memory_snapshot
from bindweave.stages.phases import progress_bar

log = logging.getLogger("bindweave")


@dataclass(frozen=True)
class RunSettings:
    meta_path: Path
    image_root: Path | None
    output_dir: Path
    overwrite: bool = False
    on_error: str = "fail"  # "fail": stop at the first bad sample; "skip": report it, go on, exit non-zero
    progress: bool = True


def run_batch(engine: Stage3Engine, run: RunSettings, video: VideoSettings, sampler: SamplerSettings,
              known_bad: dict[str, str] | None = None, cache: CacheSettings = CacheSettings()) -> dict:
    """All samples of the meta JSON in sorted order (under a parallel coordinator, this data group's
    share of them); finished ones are skipped unless overwrite. ``known_bad`` (sample id -> reason;
    found by the check before loading, on_error=skip) are counted as failed and not run."""
    known_bad = known_bad or {}
    runtime = engine.coordinator

    def output_path_of(sample: Sample) -> Path:
        return run.output_dir / f"{sample.sample_id}.mp4"

    def plan() -> tuple[list[Sample], set[str], dict[str, str]]:
        invalid: dict[str, str] = {}
        samples = read_meta(run.meta_path, run.image_root, invalid=invalid if run.on_error == "skip" else None)
        for sample_id, error in invalid.items():
            if sample_id not in known_bad:
                log.error("%s: %s (skipped; on_error=skip)", sample_id, error)
        samples = [sample for sample in samples if sample.sample_id not in known_bad]
        return samples, {sample.sample_id for sample in samples if video_done(output_path_of(sample))}, invalid

    # Rank 0 reads the meta file and looks for finished outputs; every rank follows that one plan,
    # so the ranks sharing a sample never disagree about skipping it.
    samples, finished, invalid = runtime.from_rank0(plan)
    run.output_dir.mkdir(parents=True, exist_ok=True)
    summary = {"done": [], "skipped": [], "failed": {**invalid, **known_bad}}
    for sample in progress_bar(runtime.own_samples(samples), run.progress, desc="samples"):
        output_path = output_path_of(sample)
        if sample.sample_id in finished and not run.overwrite:
            if runtime.is_writer:
                log.info("%s: already done (%s), skipping; overwrite=true redoes it", sample.sample_id, output_path)
            summary["skipped"].append(sample.sample_id)
            continue
        result = engine.run(Stage3Job(sample, video, sampler, output_path, cache=cache), progress_bars=run.progress)
        if result.status == "failed":
            if run.on_error != "skip":
                raise result.exception
            if runtime.is_writer:  # every rank of the group read the same inputs and failed alike
                log.error("%s: %s (skipped; on_error=skip)", sample.sample_id, result.error)
            summary["failed"][sample.sample_id] = result.error
            continue
        summary["done"].append(sample.sample_id)
        if result.record is not None:
            log.info("%s: %.1f s, peak memory %.2f GiB -> %s", sample.sample_id, result.record["timings"]["total_s"],
                     result.record["peak_memory_gib"], output_path)
    # Every rank reports its own memory once (non-writers write no sidecar).
    summary["rank_report"] = {"rank": runtime.rank, **memory_snapshot(engine.models.device)}
    log.info("rank %d memory: %s", runtime.rank, summary["rank_report"])
    summary["output_dir"] = str(run.output_dir)
    return summary
