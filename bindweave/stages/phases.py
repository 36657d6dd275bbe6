"""A stage-3 job in phases: condition (T5, Qwen states, reference canvases -> CLIP tokens and VAE
latents), denoise (UniPC + CFG through the coordinator), decode, write (MP4, latents, sidecar
last). Parallelism (sequence/CFG/data) is applied from outside: this module sees only a
:class:`~bindweave.stages.coordinator.Coordinator` (``parallel.runtime.Runtime`` under torchrun/srun).
"""

from __future__ import annotations

import logging
import platform
import sys
import time
from dataclasses import asdict, dataclass

import torch
from tqdm import tqdm

from bindweave.encoders.conditioning import assemble_condition, reference_condition
from bindweave.encoders.prompts import T5_NEGATIVE_PROMPT
from bindweave.io.inputs import Sample
from bindweave.io.outputs import latents_path, write_json, write_latents, write_mp4
from bindweave.model.fp8 import layer_patterns
from bindweave.model.transformer import BindWeaveTransformer
from bindweave.sampling.sampler import Step, denoise, initial_noise, make_scheduler
from bindweave.sampling.step_cache import BlockCache, build_step_cache
from bindweave.settings.model import VideoSettings
from bindweave.settings.sampling import CacheSettings
from bindweave.stages.coordinator import Coordinator, SingleProcess
from bindweave.stages.job import JobCancelled, JobProgress, ProgressFn, Stage3Job, StopFn, job_of, sample_seed
from bindweave.stages.memory import memory_snapshot, peak_of
from bindweave.stages.models import Stage3Models
from bindweave.stages.resume import sample_recipe

log = logging.getLogger("bindweave")


@dataclass
class SampleInputs:
    """The DiT's inputs for one sample; text inputs per CFG side."""

    t5: dict[str, torch.Tensor]
    qwen: dict[str, torch.Tensor]
    clip_embeds: torch.Tensor
    condition: torch.Tensor


@torch.no_grad()
def prepare_inputs(models: Stage3Models, source: Sample | Stage3Job, video: VideoSettings) -> SampleInputs:
    """SPEC §5: T5 (positive + cached negative), the Qwen states, reference canvases -> CLIP tokens
    and VAE latents, the cached all-zero video condition. ``source``: a meta-JSON sample or a job."""
    job = job_of(source, video)
    device, dtype = models.device, models.transformer.dtype
    # First, while T5 and CLIP may still be on the CPU: the 81-frame VAE encode is the largest
    # activation of conditioning (8 GiB at 720P), and it is computed once per resolution.
    video_condition = models.video_conditions.get(models.vae, video.num_frames, video.height, video.width)
    models.encoders_to(device)
    try:
        return _encode_inputs(models, job, video, video_condition, device, dtype)
    finally:
        models.encoders_to(torch.device("cpu"))


def _encode_inputs(models: Stage3Models, job: Stage3Job, video: VideoSettings, video_condition: torch.Tensor,
                   device: torch.device, dtype: torch.dtype) -> SampleInputs:
    images = job.reference_images()
    qwen_positive, qwen_negative = job.qwen_states(models.hidden_dim)
    if models.negative_t5 is None:
        models.negative_t5 = models.text_encoder.encode([T5_NEGATIVE_PROMPT])
    clip_embeds, reference_latents = reference_condition(
        images, models.vae, models.image_encoder, width=video.width, height=video.height,
        max_references=models.transformer.config.max_references,
    )
    condition = assemble_condition(reference_latents.to(video_condition.device), video_condition)
    return SampleInputs(
        t5={"positive": models.text_encoder.encode([job.sample.prompt]).to(device, dtype),
            "negative": models.negative_t5.to(device, dtype)},
        qwen={"positive": qwen_positive.to(device, dtype), "negative": qwen_negative.to(device, dtype)},
        clip_embeds=clip_embeds.to(device, dtype),
        condition=condition.to(device, dtype),
    )


def dit_predictor(transformer: BindWeaveTransformer, inputs: SampleInputs, step_cache=None):
    """One DiT forward for one CFG side; both sides share the image conditions (SPEC §6).
    ``step_cache`` (``for_step(step)`` -> the blocks' stand-in) may skip the blocks at some steps."""

    @torch.no_grad()
    def predict(latents: torch.Tensor, step: Step) -> torch.Tensor:
        cached: dict[str, BlockCache] = {} if step_cache is None else {"block_cache": step_cache.for_step(step)}
        return transformer(
            latents.to(transformer.dtype), step.timestep.to(latents.device), t5_embeds=inputs.t5[step.side],
            qwen_states=inputs.qwen[step.side], clip_embeds=inputs.clip_embeds, condition=inputs.condition,
            **cached,
        )

    return predict


def speed_record(models: Stage3Models, step_cache) -> dict:
    """What ran, for the sidecar: the kernels per call site (the plan's), the layers in FP8, the steps skipped."""
    return {
        "attention_kernels": models.plan.attention_sites,
        "fp8_linears": {"count": len(models.fp8_layers), "layers": layer_patterns(models.fp8_layers)},
        "step_cache": step_cache.record() if hasattr(step_cache, "record") else None,
    }


def job_recipe_options(model_options: dict, cache: CacheSettings) -> dict:
    """The plan's recipe options plus the job's step cache (listed only when on, so older videos resume)."""
    return model_options if cache.kind == "none" else {**model_options, "cache": cache.recipe()}


def bars_on_terminal() -> bool:
    """Progress bars only where a person watches: redirected logs (Slurm, nohup, CI) would fill
    with their carriage returns and escape codes."""
    return sys.stderr.isatty()


def progress_bar(items, progress: bool, **options):
    return tqdm(items, **options) if progress and bars_on_terminal() else items


def seconds_since_process_start() -> float:
    import psutil

    return time.time() - psutil.Process().create_time()


def versions() -> dict:
    import diffusers
    import transformers

    return {"python": platform.python_version(), "torch": torch.__version__, "diffusers": diffusers.__version__,
            "transformers": transformers.__version__}


def generate_sample(models: Stage3Models, job: Stage3Job, progress: bool = True, runtime: Coordinator | None = None,
                    on_progress: ProgressFn | None = None, should_stop: StopFn | None = None,
                    write_video=write_mp4, step_cache=None) -> dict | None:
    """Make one video in phases (condition, denoise, decode, write: :class:`JobPhases`); returns its
    sidecar record.

    Under a parallel ``runtime`` every rank of the sample's group conditions and denoises (its
    share of the tokens / its CFG side) and decodes; the group's writer writes, and the others
    return None. ``on_progress`` hears each phase and each finished step; ``should_stop(step)``
    (every rank of the group agrees on its answer: the engine asks the coordinator) stops the job
    before that step (:class:`JobCancelled`), before anything is written. With ``job.output_path``
    None nothing is written and the record holds the frames (``"frames"``). ``step_cache``
    replaces the job's own (``job.cache``): calibration passes its statistics here.
    """
    phases = JobPhases(models, job, runtime or SingleProcess(), on_progress or (lambda update: None))
    inputs = phases.condition()
    step_cache = step_cache if step_cache is not None else build_step_cache(job.cache, job.sampler.num_steps)
    latents = phases.denoise(inputs, step_cache, progress, should_stop)
    frames = phases.decode(latents)
    if not phases.runtime.is_writer:
        return None
    record = phases.record(step_cache)
    if job.output_path is None:
        phases.finish()
        return {**record, "frames": frames}
    phases.write(record, frames, latents, write_video)
    return record


class JobPhases:
    """One job's phases, in order, with the timings and memory each leaves for the sidecar."""

    def __init__(self, models: Stage3Models, job: Stage3Job, runtime: Coordinator, report: ProgressFn):
        self.models, self.job, self.runtime, self.report = models, job, runtime, report
        self.timings: dict[str, float] = {}
        self.memory: dict[str, dict] = {}
        self.started = time.perf_counter()
        self.seed = sample_seed(job.sample, job.sampler)

    def _progress(self, phase: str, step: int) -> None:
        self.report(JobProgress(self.job.sample_id, phase, step, self.job.sampler.num_steps))

    def condition(self) -> SampleInputs:
        self._progress("condition", 0)
        inputs = prepare_inputs(self.models, self.job, self.job.video)
        self.timings["conditioning_s"] = time.perf_counter() - self.started
        self.memory["conditioning"] = memory_snapshot(self.models.device)
        return inputs

    def denoise(self, inputs: SampleInputs, step_cache, progress: bool, should_stop: StopFn | None) -> torch.Tensor:
        sample_id, num_steps = self.job.sample_id, self.job.sampler.num_steps
        noise = initial_noise(self.job.video.latent_shape, self.seed).to(self.models.device)
        velocity = self.runtime.guided_velocity(dit_predictor(self.models.transformer, inputs, step_cache),
                                                self.job.sampler.guidance_scale)
        mark = time.perf_counter()

        def steps(timesteps):
            shown = progress_bar(timesteps, progress, desc=f"{sample_id} steps", leave=False)
            for index, timestep in enumerate(shown):
                if should_stop is not None and should_stop(index):
                    raise JobCancelled(f"{sample_id}: cancelled after {index} of {num_steps} steps")
                yield timestep
                self._progress("denoise", index + 1)
                if progress and not bars_on_terminal():  # a redirected log gets one plain line per step
                    log.info("%s: step %d/%d (%.1f s)", sample_id, index + 1, num_steps, time.perf_counter() - mark)
                if index == 0:  # the first step is done: it includes compiling; from process start, loading too
                    self._wait_for_device()
                    self.timings["first_step_s"] = time.perf_counter() - mark
                    self.timings.setdefault("first_step_since_process_start_s", seconds_since_process_start())

        latents = denoise(noise, make_scheduler(self.job.sampler), velocity, progress=steps)
        self._wait_for_device()
        self.timings["denoise_s"] = time.perf_counter() - mark
        self.memory["denoise"] = memory_snapshot(self.models.device)
        return latents

    def _wait_for_device(self) -> None:
        """Let the queued GPU work finish before a phase's time is read: the CPU runs up to a
        forward ahead, and a 4-step draft once put 6 s of its last forward into the decode's time."""
        if self.models.device.type == "cuda":
            torch.cuda.synchronize(self.models.device)

    def decode(self, latents: torch.Tensor):
        # Every rank of the sample's group takes part in the decode (the whole video each, or its band
        # of rows with parallel.decode=split); the writer check comes after it.
        self._progress("decode", self.job.sampler.num_steps)
        mark = time.perf_counter()
        frames = self.runtime.decode(self.models.vae, latents)
        self.timings["decode_s"] = time.perf_counter() - mark
        self.memory["decode"] = memory_snapshot(self.models.device)
        return frames

    def record(self, step_cache) -> dict:
        models, job, sample, sampler, video = self.models, self.job, self.job.sample, self.job.sampler, self.job.video
        speed = speed_record(models, step_cache)
        if speed["step_cache"] is not None:
            cache = speed["step_cache"]
            log.info("%s: step cache %s skipped %d of %d DiT forwards (%s)", sample.sample_id, cache["kind"],
                     cache["forwards_skipped"], cache["forwards_skipped"] + cache["forwards_run"], cache["calibration"])
        plan = models.plan
        return {
            "sample_id": sample.sample_id, "prompt": sample.prompt, "seed": self.seed,
            "num_steps": sampler.num_steps, "guidance_scale": sampler.guidance_scale, "scheduler": sampler.scheduler,
            "timesteps": list(sampler.timesteps),  # step_distill's listed steps (UniPC: [], its grid is num_steps)
            "resolution": asdict(video), "images": [str(p) for p in sample.image_paths],
            "hidden_states": [str(p) for p in (sample.hidden_states_path, sample.hidden_states_path_negative) if p],
            "sample_fields": sample.fields, "models": plan.provenance, "timings": self.timings,
            "memory": self.memory, "peak_memory_gib": peak_of(self.memory),
            "versions": versions(), "parallel": self.runtime.layout_record(), "attention_kernels": plan.attention_sites,
            "speed": speed, "plan": plan.record(),
            "memory_options": {"offload_encoders": plan.memory.offload_encoders, "vae_tiling": plan.memory.vae_tiling,
                               "dit": plan.memory.record()},
            "recipe": sample_recipe(sample.prompt, job.input_hashes(), self.seed, video, sampler, plan.provenance,
                                    job_recipe_options(plan.recipe_options(), job.cache)),
        }

    def write(self, record: dict, frames, latents: torch.Tensor, write_video) -> None:
        output_path = self.job.output_path
        self._progress("write", self.job.sampler.num_steps)
        mark = time.perf_counter()
        # Redone (overwrite=true): the old sidecar goes first, so an old record never sits beside a new
        # video (the latents file comes before the sidecar too: a sidecar marks all three as finished).
        output_path.with_suffix(".json").unlink(missing_ok=True)
        write_video(output_path, frames, fps=self.job.video.fps)
        write_latents(latents_path(output_path), latents)
        self.timings["write_s"] = time.perf_counter() - mark
        self.timings["load_models_s"] = self.models.load_s
        if self.models.plan.loras:
            self.timings["lora_merge_s"] = self.models.lora_merge_s
        self.finish()
        # The sidecar is written last: its presence marks the sample as finished (resume).
        write_json(output_path.with_suffix(".json"), record)
        self._progress("done", self.job.sampler.num_steps)

    def finish(self) -> None:
        self.timings["total_s"] = time.perf_counter() - self.started
        if self.job.output_path is None:
            self._progress("done", self.job.sampler.num_steps)
